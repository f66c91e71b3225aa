"""``python -m paracomm.bench all_gather``: paracomm's all-gather vs torch.distributed's (nccl-tests'
all_gather_perf conventions; see paracomm.bench.collective)."""
from __future__ import annotations

from .collective import main as _main


def main(argv=None) -> int:
    """Entry point; returns the exit code (2 for bad flags)."""
    return _main("all_gather", argv)
