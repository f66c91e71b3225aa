"""``python -m paracomm.bench kernels`` on CPU with tiny shapes: the JSON it writes and its flag handling.

No timing assertions: only that every kernel was measured, times are positive and the derived columns are
computed from those times.
"""
import json

import pytest

from paracomm.bench import __main__ as bench_main
from paracomm.bench import kernels

TINY = ["--device", "cpu", "--iters", "2", "--warmup", "1", "--small-tensors", "7", "--small-numel", "33",
        "--large-tensors", "2", "--large-numel", "5000"]


def test_json_rows(tmp_path, capsys):
    path = tmp_path / "sub" / "kernels.json"
    assert bench_main.main(["kernels", *TINY, "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(path.read_text())

    assert result["mode"] == "kernels"
    assert result["date"] and result["torch"] and result["build_info"]["version"]
    assert "git_commit" in result and result["copy_ceiling_gbps"] is None  # CPU: no copy ceiling
    assert result["iters"] == 2 and result["warmup"] == 1
    rows = result["rows"]
    assert sorted((r["kernel"], r["shape"]) for r in rows) == sorted(
        (k, s) for k in kernels.KERNELS for s in ("small", "large"))
    per_elem = {"unscale_fp16_fp32": 6, "unscale_fp32": 8, "unscale_fp32_norm": 8, "flatten": 8}
    for r in rows:
        tensors, numel = (7, 33) if r["shape"] == "small" else (2, 5000)
        assert (r["tensors"], r["elements"]) == (tensors, tensors * numel)
        assert r["bytes"] == r["elements"] * per_elem[r["kernel"]]
        assert r["time_us"] > 0 and r["baseline_time_us"] > 0
        assert r["ratio"] == pytest.approx(r["baseline_time_us"] / r["time_us"])
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["time_us"] * 1e-6) / 1e9)
        assert r["baseline_gbps"] == pytest.approx(r["bytes"] / (r["baseline_time_us"] * 1e-6) / 1e9)
        assert r["match"] is True and r["copy_fraction"] is None
        assert r["baseline"]
        assert r["kernel"] in printed


def test_subset_of_kernels_and_one_shape(tmp_path):
    path = tmp_path / "k.json"
    argv = ["--shapes", "small", "--kernels", "flatten,unscale_fp32", *TINY, "--json", str(path)]
    assert kernels.main(argv) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["kernel"], r["shape"]) for r in rows] == [("unscale_fp32", "small"), ("flatten", "small")]


def test_counts_take_the_allreduce_size_suffixes(tmp_path):
    """--large-numel 64M as the help shows it (here 8K and 1K, to stay small), parsed like allreduce's -b/-e."""
    path = tmp_path / "k.json"
    argv = ["--device", "cpu", "--iters", "1", "--warmup", "0", "--kernels", "flatten", "--small-tensors", "3",
            "--small-numel", "1K", "--large-tensors", "2", "--large-numel", "8K", "--json", str(path)]
    assert kernels.main(argv) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["shape"], r["elements"]) for r in rows] == [("small", 3 * 1024), ("large", 2 * 8192)]
    assert kernels._parse(["--large-numel", "64M"]).large_numel == 64 << 20


@pytest.mark.parametrize("bad", [["--bogus"], ["--large-numel", "64MB"], ["--small-numel", "1.5K"], ["--iters", "0"], ["--iters", "x"], ["--shapes", "huge"],
                                 ["--kernels", "nope"], ["--large-numel", "0"], ["--device", "tpu"]])
def test_bad_flags_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as info:
        kernels.main(["--device", "cpu", *bad])
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err
