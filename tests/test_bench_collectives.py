"""``python -m paracomm.bench reduce_scatter`` / ``all_gather`` / ``fsdp`` as a user runs them: real
subprocesses, 2 CPU ranks over gloo, tiny sizes. Checks nccl-tests' layout (every non-data line starts with #,
the run ends with '# Avg bus bandwidth : X'), the size convention (per-rank input bytes for reduce_scatter,
output bytes for all_gather: multiples of world_size elements), #wrong == 0, the JSON, exit code 2 on bad flags.
No timing assertions."""
from __future__ import annotations

import json

import pytest

from paracomm.bench import collective, fsdp

from test_bench_allreduce import _check_nccl_tests_layout, _run, _table_rows


@pytest.mark.parametrize("kind", ["reduce_scatter", "all_gather"])
def test_cli_table_and_json(kind, tmp_path):
    out = tmp_path / "r.json"
    extra = ["--wire-dtype", "bf16", "-o", "avg"] if kind == "reduce_scatter" else []
    res = _run([kind, "-b", "4K", "-e", "8K", "-n", "2", "-w", "1", "--nproc", "2", "--device", "cpu",
                "--algorithm", "all", "--json", str(out), *extra], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    _check_nccl_tests_layout(res.stdout)
    rows = _table_rows(res.stdout)
    algos = collective.ALGORITHMS[kind]
    assert len(rows) == 2 * len(algos)
    data = json.loads(out.read_text())
    assert data["benchmark"] == kind and data["summary"]["wrong_total"] == 0
    for row in data["rows"]:
        assert row["size"] in (4096, 8192) and row["count"] * 4 == row["size"] and row["count"] % 2 == 0
        assert row["paracomm"]["wrong"] == 0 and row["baseline"]["wrong"] == 0
        assert row["algorithm"] == row["algorithm_requested"]
        assert row["paracomm"]["busbw_gbps"] == pytest.approx(row["paracomm"]["algbw_gbps"] / 2)
        if kind == "reduce_scatter":
            assert 0 < row["paracomm"]["relerr"] < 5e-3  # bf16 wire, rounded once per input (ring: per hop)
    assert collective.bus_bandwidth(8.0, 4) == 6.0


def test_fsdp_cli(tmp_path):
    out = tmp_path / "f.json"
    res = _run(["fsdp", "--nproc", "2", "--device", "cpu", "--d-model", "32", "--seq", "8", "--batch", "2",
                "-n", "2", "-w", "1", "--json", str(out)], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [r["variant"] for r in data["rows"]] == list(fsdp.VARIANTS)  # 2 ranks: the HSDP rows too (2 x 1)
    losses = [r["loss"] for r in data["rows"]]
    assert abs(losses[1] - losses[0]) <= 1e-5 * abs(losses[0]) + 1e-7  # paracomm fp32 trains as torch does
    assert abs(losses[2] - losses[0]) <= 0.01 * abs(losses[0])
    assert abs(losses[4] - losses[3]) <= 1e-5 * abs(losses[3]) + 1e-7  # paracomm's HSDP as torch's
    assert data["header"]["hsdp_mesh"] == {"replicate": 2, "shard": 1}


@pytest.mark.parametrize("argv", [
    ["reduce_scatter", "-b", "8K", "-e", "4K"],
    ["reduce_scatter", "-d", "int32", "-o", "avg"],
    ["reduce_scatter", "--wire-dtype", "bf16", "-d", "double"],
    ["all_gather", "--algorithm", "one_shot"],
    ["all_gather", "--wire-dtype", "bf16"],
    ["fsdp", "--variants", "torch,nope"],
    ["reduce_scatter", "--emulate-nodes", "0"],
    ["all_gather", "--emulate-nodes", "2", "--inter-node-gbit", "-1"],
])
def test_bad_flags_exit_2(argv):
    from paracomm.bench import __main__ as bench_main

    assert bench_main.main(argv) == 2
