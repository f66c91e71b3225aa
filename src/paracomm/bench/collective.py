"""``python -m paracomm.bench reduce_scatter`` / ``all_gather``: time and bandwidth of paracomm's reduce-scatter
and all-gather next to torch.distributed's own on the same ranks, after nccl-tests' ``reduce_scatter_perf`` /
``all_gather_perf``:

* ``size``: as nccl-tests prints it, the per-rank *input* bytes of a reduce-scatter (world_size x the output)
  and the per-rank *output* bytes of an all-gather (world_size x the input); ``count``: its elements. Sizes are
  rounded down to a multiple of world_size elements.
* ``algbw = size / time``, ``busbw = algbw x (n-1)/n`` (the bytes each rank's link carries in either
  collective, so figures compare across rank counts).
* ``#wrong``: a separate pass on small integers whose exact result is known in every dtype and wire dtype (the
  all-reduce bench's check data), elements that differ, summed over ranks.
* ``relerr`` (reduce-scatter with ``--wire-dtype``): normwise ||shard - ref|| / ||ref|| against a float64
  reduction of random normal inputs, the largest over ranks.
* baseline: ``torch.distributed.reduce_scatter_tensor`` / ``all_gather_into_tensor`` on the default group.

Timing, flags and output conventions are the all-reduce bench's (paracomm.bench.allreduce, whose helpers this
module reuses): ``-w`` warm-up runs, ``-n`` timed runs each after a barrier, the median per rank, then the
slowest rank's; every non-data line starts with ``#``; the run ends with ``# Avg bus bandwidth : X``.
"""
from __future__ import annotations

import argparse
import sys

import torch

from . import emulate as emulate_mod
from . import launch as launch_mod
from . import report
from .allreduce import (DTYPES, WIRE_ALIASES, WIRE_DTYPES, _choice, _geomean, _timedelta, add_datatype_arg,
                        add_sweep_args, check_data, fmt_bw, fmt_time, random_data, size_sweep)
from .timing import barrier, gbps, median, slowest_rank, sum_over_ranks, time_iterations

ALGORITHMS = {"reduce_scatter": ("ring", "direct", "one_shot"), "all_gather": ("ring", "direct")}


def bus_bandwidth(algbw: float, world_size: int) -> float:
    """Reduce-scatter and all-gather move (n-1)/n of ``size`` through each rank's link: busbw = algbw (n-1)/n."""
    return algbw * (world_size - 1) / world_size


def build_parser(kind: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"paracomm-bench {kind}",
        description=f"{kind} time and bandwidth: paracomm vs torch.distributed, per size (after nccl-tests' "
                    f"{kind}_perf; size = per-rank {'input' if kind == 'reduce_scatter' else 'output'} bytes).")
    g = p.add_argument_group("sizes and iterations")
    add_sweep_args(g, minbytes="4K", maxbytes="16M", maxbytes_help="default 16M")
    g = p.add_argument_group("operation")
    add_datatype_arg(g)
    if kind == "reduce_scatter":
        g.add_argument("-o", "--op", type=_choice(dict.fromkeys(("sum", "avg")), {}, "op"), default="sum",
                       metavar="OP", help="reduction: sum or avg (default sum)")
        g.add_argument("--wire-dtype", type=_choice(WIRE_DTYPES, WIRE_ALIASES, "wire dtype"), default="none",
                       metavar="TYPE", help="paracomm only, float data only: half or bfloat16 on the wire")
    g.add_argument("--algorithm", type=_choice(dict.fromkeys(("auto", "all") + ALGORITHMS[kind]),
                                               {"one-shot": "one_shot"}, "algorithm"),
                   default="auto", metavar="ALGO",
                   help=f"paracomm's algorithm: auto, {', '.join(ALGORITHMS[kind])}, or all (one row each)")
    launch_mod.add_rank_args(p)
    emulate_mod.add_args(p)
    g = p.add_argument_group("output")
    report.add_json_arg(g)
    return p


def parse_args(kind: str, argv) -> argparse.Namespace:
    """Parse and cross-check the flags; any error prints the usage and raises SystemExit(2)."""
    p = build_parser(kind)
    args = p.parse_args(argv)
    launch_mod.check_rank_args(p, args)
    emulate_mod.check_args(p, args)
    if kind != "reduce_scatter":
        args.op, args.wire_dtype = "sum", "none"
    if args.minbytes > args.maxbytes:
        p.error(f"-b/--minbytes ({args.minbytes}) is larger than -e/--maxbytes ({args.maxbytes})")
    if args.stepfactor < 2 and args.minbytes != args.maxbytes:
        p.error(f"-f/--stepfactor must be at least 2, got {args.stepfactor}")
    if args.iters < 1 or args.warmup_iters < 0:
        p.error("-n/--iters must be >= 1 and -w/--warmup_iters >= 0")
    if args.wire_dtype != "none" and args.datatype != "float":
        p.error(f"--wire-dtype {args.wire_dtype} compresses float (fp32) data only, not -d {args.datatype}")
    if args.op == "avg" and args.datatype in ("int32", "int64"):
        p.error(f"-o avg needs a floating datatype, not -d {args.datatype}")
    if args.device == "cuda":
        p.error("--device cuda: paracomm's reduce-scatter / all-gather serve CPU tensors only so far")
    launch_mod.check_output_path(p, args, "json")
    return args


def _ops(kind: str, comm, args, algorithm: str, world: int):
    """(paracomm op, baseline op), each ``f(out, inp)``."""
    import torch.distributed as dist

    if kind == "reduce_scatter":
        wire = WIRE_DTYPES[args.wire_dtype]
        torch_op = dist.ReduceOp.AVG if args.op == "avg" else dist.ReduceOp.SUM

        def mine(out, inp):
            comm.reduce_scatter(out, inp, args.op, wire_dtype=wire, algorithm=algorithm)

        def theirs(out, inp):
            dist.reduce_scatter_tensor(out, inp, op=torch_op)
    else:
        def mine(out, inp):
            comm.all_gather(out, inp, algorithm=algorithm)

        def theirs(out, inp):
            dist.all_gather_into_tensor(out, inp)
    return mine, theirs


def _buffers(kind: str, total: int, world: int, dtype, device, gen):
    """(out, inp) with ``total`` elements in the larger one, random timing data in the input."""
    small = total // world
    if kind == "reduce_scatter":
        return torch.empty(small, dtype=dtype, device=device), random_data(total, dtype, device, gen)
    return torch.empty(total, dtype=dtype, device=device), random_data(small, dtype, device, gen)


def _check(kind: str, fn, total: int, ctx, args, dtype) -> int:
    """Elements that differ from the exact result (this rank), on data every dtype represents exactly."""
    world, rank, n = ctx.world_size, ctx.rank, total // ctx.world_size
    if kind == "reduce_scatter":
        x, expected = check_data(total, rank, world, dtype, args.op, ctx.device)
        out = torch.empty(n, dtype=dtype, device=ctx.device)
        fn(out, x)
        return int((out != expected[rank * n:(rank + 1) * n]).sum())
    idx = torch.arange(n, device=ctx.device)
    inputs = [((idx * 7 + r) % 128).to(dtype) for r in range(world)]  # integers < 128: exact in bf16 too
    out = torch.empty(total, dtype=dtype, device=ctx.device)
    fn(out, inputs[rank])
    return int((out != torch.cat(inputs)).sum())


def _relerr(fn, total: int, ctx, args) -> float:
    import torch.distributed as dist

    n = total // ctx.world_size
    gen = torch.Generator(device=ctx.device).manual_seed(98765 + 7919 * ctx.rank)
    x = torch.randn(total, generator=gen, device=ctx.device)
    ref = x.double()
    dist.all_reduce(ref)
    ref = ref[ctx.rank * n:(ctx.rank + 1) * n] / (ctx.world_size if args.op == "avg" else 1)
    out = torch.empty(n, device=ctx.device)
    fn(out, x)
    denom = torch.linalg.vector_norm(ref).item()
    err = torch.linalg.vector_norm(out.double() - ref).item() / denom if denom > 0 else 0.0
    return slowest_rank(err, ctx.device)  # the max over ranks


def _measure(kind: str, fn, out, inp, total_bytes: int, ctx, args, total: int, dtype) -> dict:
    device = ctx.device
    times = time_iterations(lambda _: fn(out, inp), device=device, warmup=args.warmup_iters, iters=args.iters,
                            before_each=lambda: barrier(device))
    seconds = slowest_rank(median(times), device)
    algbw = gbps(total_bytes, seconds)
    r = {"time_us": seconds * 1e6, "algbw_gbps": algbw, "busbw_gbps": bus_bandwidth(algbw, ctx.world_size),
         "wrong": None}
    if args.check:
        r["wrong"] = sum_over_ranks(_check(kind, fn, total, ctx, args, dtype), device)
    return r


def run_rank(ctx, args, kind: str) -> int:
    """The benchmark on one rank; rank 0 prints each row as soon as it is measured. 1 if anything was wrong."""
    import paracomm

    dtype = DTYPES[args.datatype]
    world = ctx.world_size
    comm = paracomm.Communicator(timeout=_timedelta(args.timeout))
    algorithms = list(ALGORITHMS[kind]) if args.algorithm == "all" else [args.algorithm]
    explain = paracomm.explain_reduce_scatter if kind == "reduce_scatter" else paracomm.explain_all_gather
    gen = torch.Generator(device=ctx.device).manual_seed(1234 + ctx.rank)
    lead = ctx.rank == 0
    header = launch_mod.run_header(ctx)
    header["baseline"] = ("torch.distributed.reduce_scatter_tensor" if kind == "reduce_scatter"
                          else "torch.distributed.all_gather_into_tensor")
    header["settings"] = {k: getattr(args, k) for k in (
        "minbytes", "maxbytes", "stepfactor", "iters", "warmup_iters", "check", "datatype", "op", "wire_dtype",
        "algorithm")}
    from paracomm._shm import transport_of

    header["cpu_transport"] = transport_of(comm)  # collective: every rank creates the executor here
    emulated = emulate_mod.describe()
    relerr = args.wire_dtype != "none"
    fmt = "{:>10} {:>10} {:>8} {:>9} {:>9} {:>9} {:>6}" + (" {:>9}" if relerr else "") + " {:>9} {:>9} {:>6} {:>6}"
    if lead:
        print("\n".join([
            f"# paracomm {kind} benchmark",
            f"#  world size {world} ({header['launcher']}), backend {header['backend']}: {header['backend_version']}",
            f"#  device: {header['device']}",
            f"#  type {args.datatype}, op {args.op}, paracomm wire dtype {args.wire_dtype}, algorithm "
            f"{args.algorithm}, iters {args.iters}, warm-up {args.warmup_iters}, check {args.check}",
            f"#  baseline: {header['baseline']}",
            f"#  paracomm CPU transport: {header['cpu_transport']}" + (f"; {emulated}" if emulated else ""),
            f"#  size: per-rank {'input' if kind == 'reduce_scatter' else 'output'} bytes (nccl-tests); time: "
            "median of the slowest rank; busbw = algbw x (n-1)/n; ratio = paracomm busbw / baseline busbw",
            "#",
            "#" + fmt.format("size(B)", "count", "algo", "time(us)", "algbw", "busbw", "#wrong",
                             *(("relerr",) if relerr else ()), "base(us)", "busbw", "#wrong", "ratio")[1:],
        ]), flush=True)
    rows = []
    esize = torch.empty(0, dtype=dtype).element_size()
    for nbytes, count in size_sweep(args.minbytes, args.maxbytes, args.stepfactor, esize * world):
        total = count * world  # size_sweep counted units of world_size elements
        out, inp = _buffers(kind, total, world, dtype, ctx.device, gen)
        base = None
        for algo in algorithms:
            mine, theirs = _ops(kind, comm, args, algo, world)
            if base is None:
                base = _measure(kind, theirs, out, inp, nbytes, ctx, args, total, dtype)
            measured = _measure(kind, mine, out, inp, nbytes, ctx, args, total, dtype)
            # After a call, so the node map the Communicator found is known (several nodes: hierarchical).
            topology = {"node_size": comm.node_map.count(0)} if comm.node_map and max(comm.node_map) > 0 else {}
            plan = explain(total // world, dtype, world, algorithm=algo, backend=ctx.backend, **topology,
                           **({"wire_dtype": WIRE_DTYPES[args.wire_dtype]} if kind == "reduce_scatter" else {}))
            row = {"size": nbytes, "count": total, "type": args.datatype, "algorithm_requested": algo,
                   "algorithm": plan["algorithm"], "plan": plan, "paracomm": measured, "baseline": base}
            if relerr:
                row["paracomm"]["relerr"] = _relerr(mine, total, ctx, args)
            row["busbw_ratio"] = row["paracomm"]["busbw_gbps"] / base["busbw_gbps"]
            rows.append(row)
            if lead:
                p = row["paracomm"]
                print(" " + fmt.format(nbytes, total, plan["algorithm"], fmt_time(p["time_us"]),
                                       fmt_bw(p["algbw_gbps"]), fmt_bw(p["busbw_gbps"]), str(p["wrong"]),
                                       *((f"{p['relerr']:.2e}",) if relerr else ()), fmt_time(base["time_us"]),
                                       fmt_bw(base["busbw_gbps"]), str(base["wrong"]),
                                       f"{row['busbw_ratio']:.2f}")[1:], flush=True)
    wrong = [r["paracomm"]["wrong"] for r in rows] + [r["baseline"]["wrong"] for r in rows]
    wrong_total = None if any(w is None for w in wrong) else sum(wrong)
    ratios = [r["busbw_ratio"] for r in rows]
    summary = {"avg_busbw_gbps": sum(r["paracomm"]["busbw_gbps"] for r in rows) / len(rows),
               "busbw_ratio_geomean": _geomean(ratios), "busbw_ratio_min": min(ratios),
               "wrong_total": wrong_total}
    if lead:
        print("\n".join([
            f"# Out of bounds values : {wrong_total} {'OK' if not wrong_total else 'FAILED'}",
            f"# Avg bus bandwidth    : {summary['avg_busbw_gbps']:g}",
            f"#  busbw ratio paracomm / baseline: geometric mean {summary['busbw_ratio_geomean']:.2f} "
            f"(min {summary['busbw_ratio_min']:.2f})",
        ]), flush=True)
        report.write_json(args.json, kind, header, rows, summary)
    return 1 if wrong_total else 0


def _run_reduce_scatter(ctx, args) -> int:
    return run_rank(ctx, args, "reduce_scatter")


def _run_all_gather(ctx, args) -> int:
    return run_rank(ctx, args, "all_gather")


def main(kind: str, argv=None) -> int:
    """Entry point of ``python -m paracomm.bench reduce_scatter|all_gather``; exit code (2 for bad flags)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(kind, argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    code = emulate_mod.dispatch(kind, args, argv)  # --emulate-nodes: run the ranks in an emulated cluster
    if code is not None:
        return code
    worker = _run_reduce_scatter if kind == "reduce_scatter" else _run_all_gather  # picklable for spawn
    return launch_mod.launch(worker, args, nproc=args.nproc, device=args.device, ranks_per_gpu=args.ranks_per_gpu,
                             timeout_s=args.timeout)
