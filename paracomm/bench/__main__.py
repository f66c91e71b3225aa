"""``python -m paracomm.bench MODE [flags]`` (also the console script ``paracomm-bench``).

Modes: ``allreduce`` (bandwidth, nccl-tests style, the default), ``kernels`` (fused gradient kernels vs
torch), ``ddp`` (training step time with each comm hook). Each mode is a module of this package with a
``main(argv) -> int``; ``MODE --help`` lists its flags. Bad flags exit with status 2.
"""
from __future__ import annotations

import importlib
import sys

MODES = ("allreduce", "kernels", "ddp")


def main(argv=None) -> int:
    """Dispatch ``[MODE] [flags]`` to ``paracomm.bench.MODE.main``; returns the exit status (2 for bad usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    mode = "allreduce"
    if argv and not argv[0].startswith("-"):
        mode = argv.pop(0)
    if mode not in MODES:
        print(f"paracomm-bench: unknown mode {mode!r}; choose one of {', '.join(MODES)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"paracomm.bench.{mode}")
    return module.main(argv)


if __name__ == "__main__":
    sys.exit(main())
