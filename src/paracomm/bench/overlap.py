"""``python -m paracomm.bench overlap``: does an async all-reduce overlap the caller's compute? (CUDA only)

The question DDP asks of a comm hook: a bucket's ``all_reduce(async_op=True)`` is issued from inside backward,
and the backward kernels enqueued after it must not wait for it. Per rank, on the caller's current stream, a
chain of matmuls is timed with CUDA events in three settings, side by side in one run:

=================  ==========================================================================================
alone              the chain by itself (T_mm), and each all-reduce by itself (T_ar, synchronous)
paracomm           ``paracomm.all_reduce(x, async_op=True)`` issued just before the chain, ``wait()`` after it
torch              ``torch.distributed.all_reduce(x, async_op=True)`` issued just before the chain, ``wait()``
=================  ==========================================================================================

For the two overlapped settings: ``chain_ms`` (start of the step to the chain's end: it grows by T_ar when the
chain is blocked behind the all-reduce), ``step_ms`` (start to the end of both, after ``wait()``), and the
overlap ratio ``(T_mm + T_ar - step) / min(T_mm, T_ar)``: 1 = the shorter one is hidden completely, 0 = they
ran one after the other (the ratio can exceed neither bound by much; noise aside). The chain's length is chosen
so that T_mm is about T_ar of paracomm (the same on every rank). Several ranks on one GPU (--ranks-per-gpu)
share its SMs, so the figures are for the paracomm-vs-torch comparison, not absolute.
"""
from __future__ import annotations

import argparse
import sys
from datetime import timedelta

import torch

from . import launch as launch_mod
from . import report
from .cli import parse_size
from .timing import barrier, median, slowest_rank


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="paracomm-bench overlap",
                                description="Overlap of an async all-reduce with a matmul chain on the caller's "
                                            "stream: paracomm vs torch.distributed (CUDA only).")
    p.add_argument("--size", type=parse_size, default=parse_size("64M"), metavar="SIZE",
                   help="all-reduce bytes (fp32; K/M/G suffixes; default 64M)")
    p.add_argument("--matmul", type=int, default=4096, help="square matmul size of the chain (default 4096)")
    report.add_iteration_args(p, iters=10, warmup=3, per="setting (a run: one step)")
    report.add_json_arg(p, "the header and the rows")
    launch_mod.add_rank_args(p)
    return p


def parse_args(argv) -> argparse.Namespace:
    """Parse and cross-check the flags; errors print the usage and raise SystemExit(2)."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.size < 4:
        p.error(f"--size must be at least 4 bytes (one float32), got {args.size}")
    args.bytes = args.size - args.size % 4
    for name in ("matmul", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup_iters < 0:
        p.error(f"-w/--warmup_iters must be >= 0, got {args.warmup_iters}")
    if args.device == "auto" and not torch.cuda.is_available():
        p.error("overlap needs a CUDA GPU (torch.cuda.is_available() is False)")
    if args.device == "cpu":
        p.error("overlap measures CUDA streams: --device cuda only")
    launch_mod.check_rank_args(p, args)
    launch_mod.check_output_path(p, args, "json")
    return args


def overlap_ratio(t_mm: float, t_ar: float, step: float) -> float:
    """(t_mm + t_ar - step) / min(t_mm, t_ar): 1 when the shorter is fully hidden, 0 when serialised."""
    shorter = min(t_mm, t_ar)
    return (t_mm + t_ar - step) / shorter if shorter > 0 else 0.0


def _events(n):
    return [torch.cuda.Event(enable_timing=True) for _ in range(n)]


def run_rank(ctx, args) -> int:
    """The probe on one rank; rank 0 prints the table."""
    import torch.distributed as dist

    import paracomm

    dev = ctx.device
    gen = torch.Generator(device=dev).manual_seed(99 + ctx.rank)
    x0 = torch.randn(args.bytes // 4, device=dev, generator=gen)
    a = torch.randn(args.matmul, args.matmul, device=dev, generator=gen, dtype=torch.bfloat16)
    b = torch.randn(args.matmul, args.matmul, device=dev, generator=gen, dtype=torch.bfloat16)
    comm = paracomm.Communicator(timeout=timedelta(seconds=args.timeout))

    def chain(k):
        c = a
        for _ in range(k):
            c = torch.matmul(c, b)
            c = c * 1e-3  # keeps values finite; same cost in every setting
        return c

    def timed(body, iters, warmup):
        """body(events) fills events[0..] on the current stream; returns per-iteration lists of ms spans."""
        spans = []
        for i in range(warmup + iters):
            barrier(dev)
            ev = _events(3)
            body(ev)
            torch.cuda.synchronize(dev)
            if i >= warmup:
                spans.append((ev[0].elapsed_time(ev[1]), ev[0].elapsed_time(ev[2])))
        return spans

    def ar_alone(kind):
        def body(ev):
            x = x0.clone()
            ev[0].record()
            if kind == "paracomm":
                comm.all_reduce(x)
            else:
                dist.all_reduce(x)
            ev[1].record()
            ev[2].record()
        return median([s[0] for s in timed(body, args.iters, args.warmup_iters)])

    t_ar = {k: ar_alone(k) for k in ("paracomm", "torch")}
    # Chain length: T_mm ~ T_ar of paracomm, the same k on every rank (the slowest rank's estimate).
    one = median([s[0] for s in timed(lambda ev: (ev[0].record(), chain(4), ev[1].record(), ev[2].record()),
                                      3, 1)]) / 4
    k = torch.tensor([max(1, round(t_ar["paracomm"] / max(one, 1e-3)))], device=dev)
    dist.all_reduce(k, op=dist.ReduceOp.MAX)
    k = int(k.item())

    def mm_alone(ev):
        ev[0].record()
        chain(k)
        ev[1].record()
        ev[2].record()

    t_mm = median([s[0] for s in timed(mm_alone, args.iters, args.warmup_iters)])

    def beside(kind):
        def body(ev):
            x = x0.clone()
            ev[0].record()
            work = comm.all_reduce(x, async_op=True) if kind == "paracomm" else dist.all_reduce(x, async_op=True)
            chain(k)
            ev[1].record()
            work.wait()
            ev[2].record()
        spans = timed(body, args.iters, args.warmup_iters)
        return median([s[0] for s in spans]), median([s[1] for s in spans])

    rows = []
    for kind in ("paracomm", "torch"):
        chain_ms, step_ms = beside(kind)
        rows.append({"setting": kind, "matmuls": k, "mm_alone_ms": t_mm, "ar_alone_ms": t_ar[kind],
                     "chain_ms": chain_ms, "step_ms": step_ms,
                     "overlap": overlap_ratio(t_mm, t_ar[kind], step_ms)})
    # The slowest rank's figures (every rank ran the same steps).
    for row in rows:
        for key in ("mm_alone_ms", "ar_alone_ms", "chain_ms", "step_ms"):
            row[key] = slowest_rank(row[key], dev)
        row["overlap"] = overlap_ratio(row["mm_alone_ms"], row["ar_alone_ms"], row["step_ms"])
    if ctx.rank == 0:
        header = launch_mod.run_header(ctx)
        print(f"# paracomm overlap probe: all-reduce {args.bytes} B fp32, async, beside {k} x "
              f"{args.matmul}^2 bf16 matmuls on the caller's stream")
        print(f"#  world size {ctx.world_size}, {header['device']}; slowest rank's medians of {args.iters}")
        fmt = "{:>10} {:>13} {:>13} {:>10} {:>10} {:>8}"
        print(fmt.format("setting", "matmuls (ms)", "all-red (ms)", "chain (ms)", "step (ms)", "overlap"))
        for r in rows:
            print(fmt.format(r["setting"], f"{r['mm_alone_ms']:.2f}", f"{r['ar_alone_ms']:.2f}",
                             f"{r['chain_ms']:.2f}", f"{r['step_ms']:.2f}", f"{r['overlap']:.2f}"), flush=True)
        report.write_json(args.json, "overlap", header, rows)
    return 0


def main(argv=None) -> int:
    """Entry point for ``python -m paracomm.bench overlap``; returns the exit code (2 for bad flags)."""
    return launch_mod.run_mode(parse_args, run_rank, argv)


if __name__ == "__main__":
    sys.exit(main())
