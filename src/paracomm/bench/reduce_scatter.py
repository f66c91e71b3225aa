"""``python -m paracomm.bench reduce_scatter``: paracomm's reduce-scatter vs torch.distributed's (nccl-tests'
reduce_scatter_perf conventions; see paracomm.bench.collective)."""
from __future__ import annotations

from .collective import main as _main


def main(argv=None) -> int:
    """Entry point; returns the exit code (2 for bad flags)."""
    return _main("reduce_scatter", argv)
