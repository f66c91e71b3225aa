"""``python -m paracomm.bench allreduce`` and ``ddp`` as a user runs them: real subprocesses, 2-3 CPU ranks
over gloo (``--device cpu``: on a machine with a GPU the default would be NCCL ranks), tiny sizes. Checks the
table (nccl-tests' layout: every non-data line starts with #), the JSON fields, #wrong == 0, the PNG, and
exit code 2 on bad flags. No timing assertions: speed is what the benchmark reports, not what the tests
judge."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from paracomm.bench import __main__ as bench_main
from paracomm.bench import allreduce, ddp, launch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(args, timeout=150):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # never look like torchrun to the benchmark
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "paracomm.bench", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _table_rows(stdout):
    return [line.split() for line in stdout.splitlines() if line.strip() and not line.startswith("#")
            and line.split()[0].isdigit()]


def _check_nccl_tests_layout(stdout):
    """What a script written for all_reduce_perf expects: every line is a # line or a data row, and the run
    ends with '# Avg bus bandwidth    : <number>'."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    for line in lines:
        assert line.startswith("#") or line.split()[0].isdigit(), line
    avg = [line for line in lines if line.startswith("# Avg bus bandwidth    : ")]
    assert len(avg) == 1
    assert float(avg[0].split(":")[1]) > 0
    assert any(line.startswith("#") and "size" in line and "busbw" in line for line in lines)


# ------------------------------------------------------------------------------------------ pure helpers

def test_bandwidths_stay_readable_at_small_sizes():
    assert allreduce.fmt_bw(0.000923) == "0.000923"
    assert allreduce.fmt_bw(0.0124) == "0.0124"
    assert allreduce.fmt_bw(0.5) == "0.500"
    assert allreduce.fmt_bw(5.0) == "5.00"
    assert allreduce.fmt_bw(371.234) == "371.23"
    assert [allreduce.human_size(x) for x in (1024, 3 << 20, 1 << 30, 1000)] == ["1K", "3M", "1G", "1000"]


def test_default_cpu_ranks_follow_the_cores(monkeypatch):
    for cores, ranks in ((1, 2), (2, 2), (3, 3), (64, launch.MAX_DEFAULT_CPU_RANKS)):
        monkeypatch.setattr(launch, "cpu_cores", lambda cores=cores: cores)
        assert launch.default_cpu_ranks() == ranks
        assert launch.default_nproc("cpu", 1) == ranks


def test_gpu_rank_count_checked_against_the_gpus():
    assert launch.gpu_rank_problem(None, 1, 1) is None
    assert launch.gpu_rank_problem(2, 2, 1) is None and launch.gpu_rank_problem(8, 1, 8) is None
    msg = launch.gpu_rank_problem(2, 1, 1)
    assert "--nproc 2 needs 2 GPUs" in msg and "1 GPU is visible" in msg
    assert "--nproc 1 or fewer" in msg and "--ranks-per-gpu 2" in msg
    msg = launch.gpu_rank_problem(8, 2, 2)
    assert "needs 4 GPUs" in msg and "--nproc 4 or fewer" in msg and "--ranks-per-gpu 4" in msg


def test_top_level_help_has_a_usage_line_and_the_modes(capsys):
    assert bench_main.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m paracomm.bench [MODE] [flags]")
    for mode in ("allreduce", "kernels", "ddp"):
        assert f"  {mode} " in out
    assert "``" not in out  # no raw reStructuredText
    assert bench_main.main(["nope"]) == 2
    assert "usage:" in capsys.readouterr().err


def test_parse_size_suffixes_are_binary():
    assert [allreduce.parse_size(s) for s in ("64", "1K", "1k", "32M", "2G", "4KB")] == [
        64, 1024, 1024, 32 << 20, 2 << 30, 4096]
    for bad in ("", "K", "1.5M", "-4", "0", "12X"):
        with pytest.raises(Exception):
            allreduce.parse_size(bad)


def test_size_sweep_rounds_to_elements_and_stops_at_max():
    assert allreduce.size_sweep(1024, 65536, 4, 4) == [(1024, 256), (4096, 1024), (16384, 4096), (65536, 16384)]
    # sizes below one element become one element, and duplicates after rounding are dropped
    assert allreduce.size_sweep(1, 16, 2, 8) == [(8, 1), (16, 2)]
    assert allreduce.size_sweep(3000, 3000, 1, 4) == [(3000, 750)]


def test_bus_bandwidth_is_ring_traffic():
    assert allreduce.bus_bandwidth(10.0, 1) == 0.0
    assert allreduce.bus_bandwidth(10.0, 2) == 10.0
    assert allreduce.bus_bandwidth(10.0, 4) == pytest.approx(15.0)
    assert allreduce.bus_bandwidth(10.0, 8) == pytest.approx(17.5)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7, 64])
@pytest.mark.parametrize("op", ["sum", "avg"])
def test_check_data_has_an_exact_known_result(world_size, op):
    count = 1031  # not a multiple of 4 or 2: every residue pattern appears
    inputs = [allreduce.check_data(count, r, world_size, torch.float64, op, "cpu")[0] for r in range(world_size)]
    expected = allreduce.check_data(count, 0, world_size, torch.float64, op, "cpu")[1]
    stacked = torch.stack(inputs)
    assert stacked.min() >= -1 and stacked.max() <= 4 and torch.equal(stacked, stacked.round())
    if world_size > 1:
        assert not torch.equal(inputs[0], expected)  # the data is not already the answer
        assert not torch.equal(inputs[0], inputs[1])  # ranks contribute different data
    total = stacked.sum(0)
    reference = total if op == "sum" else total / world_size
    assert torch.equal(reference, expected)
    # Every running sum, in any rank order, stays an integer within +-4n: exact in bf16 for n <= 64.
    for order in (range(world_size), reversed(range(world_size))):
        acc = torch.zeros(count, dtype=torch.float64)
        for r in order:
            acc += inputs[r]
            assert torch.equal(acc.to(torch.bfloat16).double(), acc)


# ------------------------------------------------------------------------------------------ the CLI

def test_allreduce_cli_prints_table_writes_json_and_png(tmp_path):
    out_json, out_png = tmp_path / "ar.json", tmp_path / "ar.png"
    proc = _run(["allreduce", "--device", "cpu", "--nproc", "2", "-b", "1K", "-e", "64K", "-f", "4", "-n", "3",
                 "-w", "1", "--json", str(out_json), "--plot", str(out_png)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "world size 2" in out and "backend gloo" in out and "paracomm 0.1.0" in out
    assert "#wrong" in out and "busbw" in out
    assert f"2 local ranks on a machine with {launch.cpu_cores()} cores" in out
    _check_nccl_tests_layout(out)
    rows = _table_rows(out)
    assert [(int(r[0]), int(r[1]), r[2], r[3]) for r in rows] == [
        (1024, 256, "float", "sum"), (4096, 1024, "float", "sum"), (16384, 4096, "float", "sum"),
        (65536, 16384, "float", "sum")]
    for r in rows:
        assert r[4] in ("ring", "direct", "one_shot")  # the algo column: what auto resolved to
        assert float(r[6]) > 0 and float(r[11]) > 0  # small sizes print digits, not 0.00

    data = json.loads(out_json.read_text())
    assert data["benchmark"] == "allreduce"
    head = data["header"]
    assert head["world_size"] == 2 and head["backend"] == "gloo" and head["launcher"] == "spawn"
    assert head["paracomm"]["version"] == "0.1.0" and "backend_version" in head and head["device"]
    assert head["settings"]["op"] == "sum" and head["settings"]["datatype"] == "float"
    assert head["settings"]["algorithm"] == "auto" and head["cpu_cores"] == launch.cpu_cores()
    assert [r["size"] for r in data["rows"]] == [1024, 4096, 16384, 65536]
    for row in data["rows"]:
        assert row["count"] * 4 == row["size"] and row["type"] == "float" and row["redop"] == "sum"
        assert row["algorithm_requested"] == "auto" and row["algorithm"] == row["plan"]["algorithm"]
        for impl in ("paracomm", "baseline"):
            m = row[impl]
            assert set(m) == {"time_us", "algbw_gbps", "busbw_gbps", "wrong", "time_p10_us", "time_p90_us"}
            assert m["wrong"] == 0
            assert 0 < m["time_p10_us"] <= m["time_p90_us"]
            assert m["time_us"] > 0
            assert m["algbw_gbps"] == pytest.approx(row["size"] / (m["time_us"] * 1e-6) / 1e9)
            assert m["busbw_gbps"] == pytest.approx(m["algbw_gbps"])  # 2(n-1)/n == 1 at n = 2
        assert row["busbw_ratio"] == pytest.approx(row["paracomm"]["busbw_gbps"] / row["baseline"]["busbw_gbps"])
    assert data["summary"]["wrong_total"] == 0
    assert len(head["loadavg_start"]) == 3 and len(data["summary"]["loadavg_end"]) == 3
    assert "load average at start" in out and "load average at end" in out

    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.image
    assert matplotlib.image.imread(str(out_png)).shape[:2] == (1000, 800)  # busbw, time and ratio panels


def test_allreduce_cli_avg_out_of_place_compressed_wire_three_ranks(tmp_path):
    """An odd world size, avg, the bf16 wire and out-of-place in one run: the check data stays exact."""
    out_json = tmp_path / "ar.json"
    proc = _run(["allreduce", "--device", "cpu", "--nproc", "3", "-b", "4K", "-e", "16K", "-f", "4", "-n", "2",
                 "-w", "1", "-o", "avg", "--inplace", "0", "--wire-dtype", "bf16", "--json", str(out_json)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gloo has no AVG" in proc.stdout and "out-of-place" in proc.stdout
    _check_nccl_tests_layout(proc.stdout)
    assert "relerr" in proc.stdout
    data = json.loads(out_json.read_text())
    assert data["header"]["world_size"] == 3 and data["header"]["settings"]["wire_dtype"] == "bfloat16"
    assert [(r["size"], r["redop"], r["inplace"]) for r in data["rows"]] == [(4096, "avg", False),
                                                                            (16384, "avg", False)]
    for row in data["rows"]:
        assert row["paracomm"]["wrong"] == 0 and row["baseline"]["wrong"] == 0
        assert row["paracomm"]["busbw_gbps"] == pytest.approx(row["paracomm"]["algbw_gbps"] * 4 / 3)
        # bf16 wire on random normal data: about one bf16 rounding (2^-9 relative) per value, and more than
        # the baseline's float32 sum (which sends float32)
        assert 1e-4 < row["paracomm"]["relerr"] < 5e-3
        assert row["baseline"]["relerr"] < 1e-6


def test_bad_flag_exits_2_with_usage():
    proc = _run(["allreduce", "--no-such-flag"], timeout=60)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr and "--no-such-flag" in proc.stderr


@pytest.mark.parametrize("argv,message", [
    (["-b", "12X"], "invalid size"),
    (["-b", "2M", "-e", "1K"], "larger than"),
    (["-f", "1"], "stepfactor"),
    (["-n", "0"], "iters"),
    (["-c", "2"], "0 or 1"),
    (["-d", "int8"], "datatype"),
    (["-o", "max"], "op"),
    (["-d", "int32", "-o", "avg"], "floating"),
    (["-d", "half", "--wire-dtype", "bf16"], "float (fp32) data only"),
    (["--ranks-per-gpu", "2", "--device", "cpu"], "needs CUDA"),
    (["--algorithm", "two_shot"], "algorithm"),
    (["--nproc", "0"], "nproc"),
    (["--json", "/no/such/dir/x.json"], "does not exist"),
])
def test_bad_flags_are_refused_before_any_rank_starts(argv, message, capsys):
    assert allreduce.main(argv) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err


def test_ddp_bad_flags_exit_2(capsys):
    assert ddp.main(["--variants", "default,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert ddp.main(["--d-model", "30", "--heads", "4"]) == 2
    assert "multiple of --heads" in capsys.readouterr().err


def test_ddp_mode_runs_every_variant_and_writes_json(tmp_path):
    out_json = tmp_path / "ddp.json"
    proc = _run(["ddp", "--device", "cpu", "--nproc", "2", "--layers", "1", "--d-model", "16", "--heads", "2", "--ff", "32",
                 "--seq", "4", "--batch", "2", "-n", "2", "-w", "1", "--json", str(out_json)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out_json.read_text())
    assert data["benchmark"] == "ddp" and data["header"]["world_size"] == 2
    assert data["header"]["model"]["layers"] == 1 and data["header"]["model"]["params"] > 0
    variants = [r["variant"] for r in data["rows"]]
    # torch's own bf16 hook is CUDA/NCCL-only; everything else runs on gloo, and the run says what it left out
    assert variants == [v for v in ddp.VARIANTS if v != "torch-bf16"]
    assert "# " in proc.stdout and "skipped: torch-bf16: torch allows its bf16_compress_hook only on CUDA" in proc.stdout
    assert data["header"]["skipped"] == {"torch-bf16": ddp.skipped_variants("gloo")["torch-bf16"]}
    for line in proc.stdout.splitlines():
        assert not line.strip() or line.startswith("#") or line.split()[0] in ddp.VARIANTS, line
    losses = {}
    for row in data["rows"]:
        assert row["step_ms"] > 0 and row["samples_per_s"] > 0 and row["vs_default"] > 0
        losses[row["variant"]] = row["loss"]
        assert row["variant"] in proc.stdout
    # Same weights, same data: the uncompressed variants train identically, the compressed ones nearly so.
    assert losses["paracomm-allreduce"] == pytest.approx(losses["default"], rel=1e-5)
    for v in ("torch-fp16", "paracomm-fp16", "paracomm-bf16", "ring-bf16+scaler"):
        assert losses[v] == pytest.approx(losses["default"], rel=1e-2)


def test_allreduce_algorithm_all_side_by_side(tmp_path):
    """--algorithm all: one row per algorithm per size, each checked exact, beside the one baseline."""
    out_json = tmp_path / "ar.json"
    proc = _run(["allreduce", "--device", "cpu", "--nproc", "2", "-b", "1K", "-e", "16K", "-f", "16", "-n", "2",
                 "-w", "1", "--algorithm", "all", "--wire-dtype", "bf16", "--json", str(out_json)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _check_nccl_tests_layout(proc.stdout)
    rows = _table_rows(proc.stdout)
    assert [(int(r[0]), r[4]) for r in rows] == [(s, a) for s in (1024, 16384) for a in allreduce.ALL_ALGORITHMS]
    data = json.loads(out_json.read_text())
    for row in data["rows"]:
        assert row["algorithm"] == row["algorithm_requested"] == row["plan"]["algorithm"]
        assert {"chunk_bytes", "transfer_groups", "reductions", "workspace_bytes"} <= set(row["plan"])
        assert row["paracomm"]["wrong"] == 0
        assert 1e-4 < row["paracomm"]["relerr"] < 5e-3
    by_size = {}
    for row in data["rows"]:
        by_size.setdefault(row["size"], []).append(row["baseline"])
    assert all(b[0] == b[1] == b[2] for b in by_size.values())  # one baseline measurement per size
    assert set(data["summary"]["per_algorithm"]) == set(allreduce.ALL_ALGORITHMS)


# ------------------------------------------------------------------------------------------ on a GPU

@pytest.mark.cuda
def test_nproc_above_the_gpus_is_refused_with_what_to_pass(capsys):
    gpus = torch.cuda.device_count()
    assert allreduce.main(["--device", "cuda", "--nproc", str(gpus + 1)]) == 2
    err = capsys.readouterr().err
    assert f"--nproc {gpus + 1} needs" in err and f"--ranks-per-gpu {-(-(gpus + 1) // gpus)}" in err


@pytest.mark.cuda
def test_allreduce_cli_two_ranks_on_one_gpu():
    """Two NCCL ranks on GPU 0 (--ranks-per-gpu 2, NCCL over loopback sockets), exact results; the
    subprocess timeout bounds a hung NCCL kernel."""
    proc = _run(["allreduce", "--device", "cuda", "--nproc", "2", "--ranks-per-gpu", "2", "-b", "4K", "-e", "64K",
                 "-f", "16", "-n", "2", "-w", "1", "--timeout", "120"], timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _check_nccl_tests_layout(proc.stdout)
    rows = _table_rows(proc.stdout)
    assert [int(r[0]) for r in rows] == [4096, 65536]
    assert all(r[8] == "0" and r[12] == "0" for r in rows)  # #wrong of paracomm and of NCCL


def test_allreduce_cli_one_rank_with_stats(tmp_path):
    """--nproc 1 (one GPU, or one CPU rank): busbw is 0 on both sides, the ratio is the time ratio against
    torch's world-1 call; --stats prints each row's p10 / p90 spread."""
    out_json = tmp_path / "one.json"
    proc = _run(["allreduce", "--device", "cpu", "--nproc", "1", "-b", "4K", "-e", "16K", "-f", "4", "-n", "5",
                 "-w", "1", "--stats", "--json", str(out_json)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "world size 1" in proc.stdout
    spreads = [line for line in proc.stdout.splitlines() if line.startswith("#   ^ spread p10/p90")]
    assert len(spreads) == 2 and all("paracomm" in line and "baseline" in line for line in spreads)
    data = json.loads(out_json.read_text())
    assert data["header"]["settings"]["stats"] is True
    for row in data["rows"]:
        p, q = row["paracomm"], row["baseline"]
        assert p["busbw_gbps"] == 0 and q["busbw_gbps"] == 0 and p["wrong"] == 0
        assert row["busbw_ratio"] == pytest.approx(q["time_us"] / p["time_us"])
        assert row["ratio_p90_p10"] <= row["busbw_ratio"] <= row["ratio_p10_p90"]


def test_allreduce_cli_check_cost_times_both_modes(tmp_path):
    """--check-cost: paracomm with and without the per-call signature check, alternating in one run."""
    out_json = tmp_path / "cost.json"
    proc = _run(["allreduce", "--device", "cpu", "--nproc", "2", "-b", "4K", "-e", "4K", "-n", "3", "-w", "1",
                 "--check-cost", "--json", str(out_json)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "signature check:" in proc.stdout and "the check costs" in proc.stdout
    (row,) = json.loads(out_json.read_text())["rows"]
    checked, unchecked = row["paracomm"], row["paracomm_unchecked"]
    assert checked["wrong"] == 0 and unchecked["time_us"] > 0
    assert row["check_cost"] == pytest.approx(checked["time_us"] / unchecked["time_us"] - 1)
