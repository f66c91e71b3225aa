"""``python -m paracomm.bench [MODE] [flags]`` (also the console script ``paracomm-bench``).

Each mode is a module of this package with a ``main(argv) -> int``; ``MODE --help`` lists its flags. Bad flags
exit with status 2.
"""
from __future__ import annotations

import importlib
import sys

# mode -> what it measures (the --help text lists them in this order; the first is the default)
MODES = {
    "allreduce": "all-reduce time and bandwidth per size, paracomm vs torch.distributed (nccl-tests style)",
    "kernels": "the fused gradient kernels (unscale-and-check, flatten) vs torch's own path",
    "ddp": "DDP step time of a small transformer with each comm hook, torch's and paracomm's",
    "overlap": "an async all-reduce beside a matmul chain on the caller's stream: overlap ratio, paracomm vs torch",
    "hosttime": "host microseconds per CUDA all-reduce call (and last_enqueue_us), paracomm vs torch",
    "reduce_scatter": "reduce-scatter time and bandwidth per size, paracomm vs torch.distributed (nccl-tests style)",
    "all_gather": "all-gather time and bandwidth per size, paracomm vs torch.distributed (nccl-tests style)",
    "fsdp": "FSDP2 step time and final loss of a small transformer: torch's collectives vs paracomm's",
}

USAGE = "usage: python -m paracomm.bench [MODE] [flags]    (or: paracomm-bench [MODE] [flags])"


def help_text() -> str:
    """The top-level ``--help``: usage line, the modes, and where each mode's flags are listed."""
    width = max(len(m) for m in MODES)
    lines = [USAGE, "", "Benchmarks of paracomm against torch on this machine (CPU ranks over gloo, or GPUs over "
             "NCCL).", "", "modes:"]
    for i, (mode, what) in enumerate(MODES.items()):
        lines.append(f"  {mode:<{width}}  {what}" + (" (default)" if i == 0 else ""))
    lines += ["", "Run `python -m paracomm.bench MODE --help` for a mode's flags. Examples:",
              "  python -m paracomm.bench allreduce -b 1K -e 32M -f 2 --device cpu --nproc 2",
              "  python -m paracomm.bench allreduce --algorithm all --wire-dtype bf16 --plot ar.png",
              "  python -m paracomm.bench kernels --large-numel 64M",
              "  python -m paracomm.bench ddp --variants default,paracomm-allreduce",
              "  python -m paracomm.bench reduce_scatter -b 4K -e 16M --nproc 4 --wire-dtype bf16",
              "  python -m paracomm.bench fsdp --nproc 2"]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Dispatch ``[MODE] [flags]`` to ``paracomm.bench.MODE.main``; returns the exit status (2 for bad usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(help_text())
        return 0
    mode = "allreduce"
    if argv and not argv[0].startswith("-"):
        mode = argv.pop(0)
    if mode not in MODES:
        print(f"{USAGE}\npython -m paracomm.bench: unknown mode {mode!r}; choose one of {', '.join(MODES)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"paracomm.bench.{mode}")
    return module.main(argv)


if __name__ == "__main__":
    sys.exit(main())
