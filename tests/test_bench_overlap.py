"""The overlap and hosttime benchmark modes on the CPU: their arithmetic and their refusals (they run on a GPU)."""
import pytest
import torch

from paracomm.bench import __main__ as bench_main
from paracomm.bench import hosttime, overlap


def test_overlap_ratio_spans_serialised_to_hidden():
    assert overlap.overlap_ratio(10.0, 4.0, 14.0) == 0.0  # one after the other
    assert overlap.overlap_ratio(10.0, 4.0, 10.0) == 1.0  # the all-reduce fully hidden behind the matmuls
    assert overlap.overlap_ratio(4.0, 10.0, 12.0) == pytest.approx(0.5)
    assert overlap.overlap_ratio(0.0, 3.0, 3.0) == 0.0


def test_modes_are_listed(capsys):
    assert bench_main.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "  overlap " in out and "  hosttime " in out


@pytest.mark.parametrize("argv", [["--size", "2"], ["--size", "1.5M"], ["--matmul", "0"], ["-n", "0"],
                                  ["--device", "cpu"]])
def test_overlap_refuses_bad_flags(argv, capsys):
    assert overlap.main(argv) == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--sizes", "4K,x"], ["--sizes", "2"], ["-n", "0"], ["--device", "cpu"]])
def test_hosttime_refuses_bad_flags(argv, capsys):
    assert hosttime.main(argv) == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_both_say_they_need_a_gpu(capsys):
    assert overlap.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert hosttime.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
