"""``python -m paracomm.bench hosttime``: host microseconds per CUDA all-reduce call, paracomm vs torch.

What a small bucket costs the CPU that issues it (for small calls the host, not the wire, is the limit). For each
size, per call: a Python-level timer (``time.perf_counter`` around ``all_reduce`` as a user calls it: validation,
the handshake check, the one C++ call) and, for paracomm, ``last_enqueue_us`` (the time spent inside the C++
communicator: plan lookup, checks, NCCL groups and kernel launches). The device is drained before each call
(outside the timed region), so no call waits for queue space behind an earlier one. Beside it the same timer
around ``torch.distributed.all_reduce`` on the same group. op avg (values stay bounded). Synchronous and ``async_op=True`` calls. Slowest
rank's median. CUDA only.
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import timedelta

import torch

from . import launch as launch_mod
from . import report
from .cli import parse_size
from .timing import barrier, median, slowest_rank


def parse_args(argv) -> argparse.Namespace:
    """Parse and cross-check the flags; errors print the usage and raise SystemExit(2)."""
    p = argparse.ArgumentParser(prog="paracomm-bench hosttime",
                                description="Host time per CUDA all-reduce call: paracomm vs torch.distributed.")
    p.add_argument("--sizes", default="4K,64M", help="comma-separated byte sizes, fp32 (default 4K,64M)")
    report.add_iteration_args(p, iters=50, warmup=10, per="size and setting (a run: one call)")
    report.add_json_arg(p, "the header and the rows")
    launch_mod.add_rank_args(p)
    args = p.parse_args(argv)
    try:
        args.byte_sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except argparse.ArgumentTypeError as e:
        p.error(f"--sizes: {e}")
    if not args.byte_sizes or min(args.byte_sizes) < 4:
        p.error(f"--sizes needs sizes of at least 4 bytes (one float32), got {args.sizes!r}")
    if args.iters < 1 or args.warmup_iters < 0:
        p.error(f"need -n >= 1 and -w >= 0, got {args.iters}, {args.warmup_iters}")
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        p.error("hosttime measures the CUDA path: it needs a CUDA GPU (--device cuda)")
    launch_mod.check_rank_args(p, args)
    launch_mod.check_output_path(p, args, "json")
    return args


def run_rank(ctx, args) -> int:
    """The measurement on one rank; rank 0 prints the table."""
    import torch.distributed as dist

    import paracomm

    dev = ctx.device
    comm = paracomm.Communicator(timeout=timedelta(seconds=args.timeout))
    rows = []
    for nbytes in args.byte_sizes:
        x = torch.randn(nbytes // 4, device=dev)
        for kind in ("paracomm", "torch"):
            for async_op in (False, True):
                host, enqueue = [], []
                for i in range(args.warmup_iters + args.iters):
                    barrier(dev)
                    t0 = time.perf_counter()
                    if kind == "paracomm":
                        work = comm.all_reduce(x, "avg", async_op=async_op)
                    else:
                        work = dist.all_reduce(x, op=dist.ReduceOp.AVG, async_op=async_op)
                    t1 = time.perf_counter()
                    if async_op:
                        work.wait()
                    if i >= args.warmup_iters:
                        host.append((t1 - t0) * 1e6)
                        if kind == "paracomm" and comm._nccl is not None:
                            enqueue.append(comm._nccl.last_enqueue_us)
                rows.append({"bytes": nbytes, "setting": kind, "async_op": async_op,
                             "host_us": slowest_rank(median(host), dev),
                             "last_enqueue_us": slowest_rank(median(enqueue), dev) if enqueue else None})
    if ctx.rank == 0:
        header = launch_mod.run_header(ctx)
        print(f"# paracomm host time per all-reduce call (us; slowest rank's median of {args.iters}), world size "
              f"{ctx.world_size}, {header['device']}")
        fmt = "{:>10} {:>9} {:>6} {:>10} {:>16}"
        print(fmt.format("bytes", "setting", "async", "host (us)", "last_enqueue_us"))
        for r in rows:
            print(fmt.format(r["bytes"], r["setting"], str(r["async_op"]), f"{r['host_us']:.1f}",
                             "-" if r["last_enqueue_us"] is None else f"{r['last_enqueue_us']:.1f}"), flush=True)
        report.write_json(args.json, "hosttime", header, rows)
    return 0


def main(argv=None) -> int:
    """Entry point for ``python -m paracomm.bench hosttime``; returns the exit code (2 for bad flags)."""
    return launch_mod.run_mode(parse_args, run_rank, argv)


if __name__ == "__main__":
    sys.exit(main())
