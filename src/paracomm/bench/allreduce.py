"""``python -m paracomm.bench allreduce``: all-reduce time and bandwidth, paracomm next to the backend's own.

In the style of nccl-tests' ``all_reduce_perf``: a sweep of message sizes from ``-b`` to ``-e`` (each step
times ``-f``), and for each size one row with the time, the algorithm bandwidth (bytes / time) and the bus
bandwidth (algbw * 2(n-1)/n, the bytes each rank's link carries in a ring all-reduce, so figures compare across
rank counts) of

* **paracomm**: ``paracomm.Communicator().all_reduce(t, op, wire_dtype=..., algorithm=...)`` with the
  algorithm ``--algorithm`` names (``auto``: paracomm's own choice; ``all``: ring, direct and one_shot one
  after another in the same run, one row each, the ``algo`` column says which; the JSON also records the plan
  ``paracomm.explain_all_reduce`` reports for it), and
* **baseline**: ``torch.distributed.all_reduce`` on the same ranks (NCCL's or gloo's own algorithm). gloo has
  no AVG, so on CPU the baseline's avg is SUM followed by a division by the world size.

Timing: ``-w`` warm-up runs, then ``-n`` timed runs, each after a barrier (CUDA events on GPU, perf_counter on
CPU); the median per rank, then the slowest rank's median. Timing data is random; a separate check pass
(``-c 1``) uses small integers whose exact result is known in every dtype and wire dtype and counts the
elements that differ (``#wrong``, summed over ranks).

Output as nccl-tests': every line that is not a data row starts with ``#`` (scripts skip them), and the run
ends with ``# Avg bus bandwidth    : X`` (paracomm's mean busbw over the sizes; with several algorithms, the
first one's). Bandwidths are printed with enough digits to read the smallest sizes. With ``--wire-dtype`` a
``relerr`` column gives paracomm's normwise relative error ||result - ref|| / ||ref|| against a float64
reference, from a separate pass on random normal data (the timing data's rounding is what the wire costs).

In-place (``--inplace 1``, the default) reduces the buffer itself; the buffer is refilled from the random
source outside the timed region before every run, so values do not grow run to run. Out-of-place
(``--inplace 0``): neither paracomm nor torch.distributed has an out-of-place all-reduce, so the timed region
is ``out.copy_(in)`` followed by the in-place reduction of ``out`` (the copy is counted, for both).
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Optional

import torch

from . import emulate as emulate_mod
from . import launch as launch_mod
from . import report
from .cli import SIZE_SUFFIXES, parse_size  # noqa: F401  (parse_size: also this module's public helper)
from .timing import barrier, gbps, load_average, median, quantile, slowest_rank, sum_over_ranks, time_iterations

DTYPES = {
    "float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16,
    "double": torch.float64, "int32": torch.int32, "int64": torch.int64,
}
DTYPE_ALIASES = {"float32": "float", "fp32": "float", "float16": "half", "fp16": "half", "bf16": "bfloat16",
                 "float64": "double", "fp64": "double"}
WIRE_DTYPES = {"none": None, "half": torch.float16, "bfloat16": torch.bfloat16}
WIRE_ALIASES = {"fp16": "half", "float16": "half", "bf16": "bfloat16"}
OPS = ("sum", "avg")
ALGORITHMS = ("auto", "ring", "direct", "one_shot", "hierarchical")
ALL_ALGORITHMS = ("ring", "direct", "one_shot")  # what --algorithm all runs, in this order


# ---------------------------------------------------------------------------------------------- flags

def _choice(table: dict, aliases: dict, what: str):
    def convert(text: str) -> str:
        name = aliases.get(text.lower(), text.lower())
        if name not in table:
            raise argparse.ArgumentTypeError(
                f"invalid {what} {text!r}: choose one of {', '.join(table)}")
        return name
    return convert


def _zero_one(text: str) -> int:
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"expected 0 or 1, got {text!r}")
    return int(text)


def add_sweep_args(group, *, minbytes: str, maxbytes: Optional[str], maxbytes_help: str) -> None:
    """The size sweep and its checks, as nccl-tests spell them: -b/-e/-f, -n/-w, -c; and -d (element type).
    ``maxbytes`` None: the mode picks it after parsing (``maxbytes_help`` says how)."""
    group.add_argument("-b", "--minbytes", type=parse_size, default=parse_size(minbytes), metavar="SIZE",
                       help=f"smallest size in bytes, suffixes K, M, G (default {minbytes})")
    group.add_argument("-e", "--maxbytes", type=parse_size, default=parse_size(maxbytes) if maxbytes else None,
                       metavar="SIZE", help=f"largest size ({maxbytes_help})")
    group.add_argument("-f", "--stepfactor", type=int, default=2, metavar="F",
                       help="multiply the size by F each step (default 2)")
    report.add_iteration_args(group, iters=20, warmup=5, per="size")
    group.add_argument("-c", "--check", type=_zero_one, default=1, metavar="0|1",
                       help="count wrong elements with an exact-result pass (default 1)")


def add_datatype_arg(group) -> None:
    """``-d/--datatype``: the element type, a key of DTYPES or an alias (default float)."""
    group.add_argument("-d", "--datatype", type=_choice(DTYPES, DTYPE_ALIASES, "datatype"), default="float",
                       metavar="TYPE", help=f"element type: {', '.join(DTYPES)} (default float)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="paracomm-bench allreduce",
        description="All-reduce time and bandwidth: paracomm vs torch.distributed.all_reduce, per message size "
                    "(flags and output after nccl-tests' all_reduce_perf).",
        epilog="Without torchrun, spawns --nproc local ranks (default: one per GPU; on CPU one rank per core, "
               "at least 2).")
    g = p.add_argument_group("sizes and iterations")
    add_sweep_args(g, minbytes="1K", maxbytes=None, maxbytes_help="default 32M on CPU, 256M on GPU")
    g = p.add_argument_group("operation")
    add_datatype_arg(g)
    g.add_argument("-o", "--op", type=_choice(dict.fromkeys(OPS), {}, "op"), default="sum", metavar="OP",
                   help="reduction: sum or avg (default sum)")
    g.add_argument("--wire-dtype", type=_choice(WIRE_DTYPES, WIRE_ALIASES, "wire dtype"), default="none",
                   metavar="TYPE", help="paracomm only, float data only: half or bfloat16 on the wire "
                                        "(accumulation stays fp32); the baseline always sends the data type")
    g.add_argument("--algorithm", type=_choice(dict.fromkeys(ALGORITHMS + ("all",)), {"one-shot": "one_shot"},
                                               "algorithm"),
                   default="auto", metavar="ALGO",
                   help="paracomm's algorithm: auto (its own choice per size), ring, direct, one_shot, or all "
                        "(each of ring, direct, one_shot in the same run, one row each; default auto)")
    g.add_argument("--inplace", type=_zero_one, default=1, metavar="0|1",
                   help="1: reduce the buffer in place (default); 0: out-of-place, timed as copy into the "
                        "output then in-place reduce")
    launch_mod.add_rank_args(p)
    emulate_mod.add_args(p)
    g = p.add_argument_group("output")
    report.add_json_arg(g)
    g.add_argument("--plot", metavar="FILE.png", default=None,
                   help="plot busbw and time against size (log-log) with the busbw ratio (needs matplotlib)")
    g.add_argument("--check-cost", action="store_true",
                   help="also time paracomm with PARACOMM_CHECK_SHAPES=0 (no per-call signature header), "
                        "alternating with the checked runs in the same sweep, and print what the check costs")
    g.add_argument("--stats", action="store_true",
                   help="print each row's spread: p10 / p90 of the timed runs (slowest rank) for paracomm and the "
                        "baseline, and the ratio's range; the JSON always has them")
    return p


def parse_args(argv) -> argparse.Namespace:
    """Parse and cross-check the flags; any error prints the usage and raises SystemExit(2)."""
    p = build_parser()
    args = p.parse_args(argv)
    launch_mod.check_rank_args(p, args)
    if args.maxbytes is None:
        args.maxbytes = max(args.minbytes, parse_size("256M" if args.device == "cuda" else "32M"))
    if args.minbytes > args.maxbytes:
        p.error(f"-b/--minbytes ({args.minbytes}) is larger than -e/--maxbytes ({args.maxbytes})")
    if args.stepfactor < 2 and args.minbytes != args.maxbytes:
        p.error(f"-f/--stepfactor must be at least 2, got {args.stepfactor}")
    if args.iters < 1:
        p.error(f"-n/--iters must be at least 1, got {args.iters}")
    if args.warmup_iters < 0:
        p.error(f"-w/--warmup_iters must be >= 0, got {args.warmup_iters}")
    if args.wire_dtype != "none" and args.datatype != "float":
        p.error(f"--wire-dtype {args.wire_dtype} compresses float (fp32) data only, not -d {args.datatype}")
    if args.op == "avg" and args.datatype in ("int32", "int64"):
        p.error(f"-o avg needs a floating datatype, not -d {args.datatype} (paracomm refuses avg on integers)")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib (pip install matplotlib)")
    for flag in ("json", "plot"):
        launch_mod.check_output_path(p, args, flag)
    emulate_mod.check_args(p, args)
    return args


def size_sweep(minbytes: int, maxbytes: int, stepfactor: int, elem_size: int) -> list:
    """Message sizes from ``minbytes`` to ``maxbytes`` (each ``stepfactor`` times the last), rounded down to
    whole elements (at least one); duplicates after rounding are dropped. Returns ``[(nbytes, count)]``."""
    out, nbytes = [], minbytes
    while nbytes <= maxbytes:
        count = max(1, nbytes // elem_size)
        if not out or out[-1][1] != count:
            out.append((count * elem_size, count))
        if stepfactor < 2:
            break
        nbytes *= stepfactor
    return out


def bus_bandwidth(algbw: float, world_size: int) -> float:
    """A ring all-reduce sends and receives 2(n-1)/n of the message per rank: busbw = algbw * 2(n-1)/n."""
    return algbw * 2 * (world_size - 1) / world_size


# ---------------------------------------------------------------------------------------------- data

def check_data(count: int, rank: int, world_size: int, dtype: torch.dtype, op: str, device):
    """This rank's input for the check pass, and the exact result every rank must end with.

    Element i is ``a_i + d_i`` with ``a_i = i % 4``. Ranks are paired (2k, 2k+1): one adds ``+s_i``, the other
    ``-s_i`` (``s_i = +-1``); an odd last rank adds 0. So inputs are small integers in [-1, 4], every partial
    sum in any order stays within +-4n (exact in fp16, and in bf16 up to n = 64), the sum is exactly
    ``n * a_i`` and the average exactly ``a_i`` -- no rounding in any dtype or wire dtype, so the comparison is
    exact.
    """
    i = torch.arange(count, dtype=torch.int64, device=device)
    a = i % 4
    x = a.clone()
    pair = rank // 2
    if rank < 2 * (world_size // 2):
        s = 1 - 2 * ((i + pair) % 2)
        x += s if rank % 2 == 0 else -s
    expected = a * world_size if op == "sum" else a
    return x.to(dtype), expected.to(dtype)


def random_data(count: int, dtype: torch.dtype, device, generator) -> torch.Tensor:
    """Timing data: uniform in [-1, 1) for floating types, integers in [-1000, 1000) otherwise."""
    if dtype.is_floating_point:
        return (torch.rand(count, generator=generator, device=device, dtype=torch.float32) * 2 - 1).to(dtype)
    return torch.randint(-1000, 1000, (count,), generator=generator, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- the engine

def requested_algorithms(algorithm: str) -> list:
    """The algorithms a run measures, in column order: ``all`` -> ring, direct, one_shot; else the one named."""
    return list(ALL_ALGORITHMS) if algorithm == "all" else [algorithm]


def explain(count: int, dtype, world_size: int, wire_dtype, algorithm: str, backend: str,
            node_size=None) -> dict:
    """``paracomm.explain_all_reduce`` for one row: what the algorithm resolves to and its plan's size."""
    import paracomm

    info = paracomm.explain_all_reduce(count, dtype, world_size, wire_dtype=wire_dtype, algorithm=algorithm,
                                       backend=backend, node_size=node_size)
    # JSON-safe: dtypes and other objects as their names.
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else str(v))
            for k, v in dict(info).items()}


# ---------------------------------------------------------------------------------------------- measuring

def make_paracomm_op(comm, args, algorithm: str):
    """paracomm's all-reduce with ``algorithm``, as ``f(tensor)`` reducing in place."""
    wire = WIRE_DTYPES[args.wire_dtype]
    op = args.op

    def paracomm_op(t):
        comm.all_reduce(t, op, wire_dtype=wire, algorithm=algorithm)

    return paracomm_op


def make_baseline_op(ctx, args):
    """torch.distributed.all_reduce on the default group, as ``f(tensor)`` reducing in place."""
    import torch.distributed as dist

    op = args.op
    native_avg = ctx.backend == "nccl"  # gloo has no ReduceOp.AVG
    n = ctx.world_size

    def baseline_op(t):
        if op == "sum":
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        elif native_avg:
            dist.all_reduce(t, op=dist.ReduceOp.AVG)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(n)  # avg is refused for integer types (parse_args)

    return baseline_op


def _timedelta(seconds):
    from datetime import timedelta
    return timedelta(seconds=seconds)


def measure(reduce_fn, *, src, inplace: bool, args, ctx) -> dict:
    """Time ``reduce_fn`` on a copy of ``src`` and (``-c 1``) count wrong elements; every rank calls this."""
    device = ctx.device
    count = src.numel()
    nbytes = count * src.element_size()
    buf = torch.empty_like(src)
    if inplace:
        def run(_):
            reduce_fn(buf)

        def before():
            buf.copy_(src)  # fresh data every run, outside the timed region
            barrier(device)
    else:
        def run(_):
            buf.copy_(src)
            reduce_fn(buf)

        def before():
            barrier(device)
    times = time_iterations(run, device=device, warmup=args.warmup_iters, iters=args.iters, before_each=before)
    seconds = slowest_rank(median(times), device)
    algbw = gbps(nbytes, seconds)
    # The spread, as the slowest rank sees it: each rank's 10th and 90th percentile, the largest over ranks.
    result = {"time_us": seconds * 1e6, "algbw_gbps": algbw,
              "busbw_gbps": bus_bandwidth(algbw, ctx.world_size), "wrong": None,
              "time_p10_us": slowest_rank(quantile(times, 0.1), device) * 1e6,
              "time_p90_us": slowest_rank(quantile(times, 0.9), device) * 1e6}
    if args.check:
        x, expected = check_data(count, ctx.rank, ctx.world_size, src.dtype, args.op, device)
        if inplace:
            reduce_fn(x)
            wrong = int((x != expected).sum())
        else:
            buf.copy_(x)
            reduce_fn(buf)
            wrong = int((buf != expected).sum())
        result["wrong"] = sum_over_ranks(wrong, device)
    return result


def _checked_and_unchecked(reduce_fn, *, src, inplace: bool, args, ctx, rounds: int = 4) -> tuple:
    """Time ``reduce_fn`` with the signature check on and off, alternating in ``rounds`` blocks of
    ``args.iters`` runs each, in ABBA order (so drifting machine load and block order hit both alike); returns (checked, unchecked), each a
    ``measure`` result whose times are the medians over the blocks."""
    import os

    blocks = {"1": [], "0": []}
    saved = os.environ.get("PARACOMM_CHECK_SHAPES")
    try:
        # ABBA order (checked first in even rounds, unchecked first in odd ones): a block that runs right after
        # the other mode's (warmer caches, a just-woken peer) is as often one mode as the other.
        for k in range(rounds):
            for mode in (("1", "0") if k % 2 == 0 else ("0", "1")):
                os.environ["PARACOMM_CHECK_SHAPES"] = mode
                blocks[mode].append(measure(reduce_fn, src=src, inplace=inplace, args=args, ctx=ctx))
    finally:
        if saved is None:
            os.environ.pop("PARACOMM_CHECK_SHAPES", None)
        else:
            os.environ["PARACOMM_CHECK_SHAPES"] = saved
    out = []
    for mode in ("1", "0"):
        ms = blocks[mode]
        result = dict(ms[0])
        for key in ("time_us", "time_p10_us", "time_p90_us"):
            result[key] = median([m[key] for m in ms])
        result["algbw_gbps"] = src.numel() * src.element_size() / (result["time_us"] * 1e-6) / 1e9
        result["busbw_gbps"] = bus_bandwidth(result["algbw_gbps"], ctx.world_size)
        out.append(result)
    return tuple(out)


def relative_error(reduce_fn, count: int, *, args, ctx) -> float:
    """Normwise relative error ||result - ref|| / ||ref|| of ``reduce_fn`` on random normal float32 data (a
    different draw on every rank), against the float64 all-reduce of the same inputs; the largest over ranks.

    The float64 reference is torch.distributed's float64 all-reduce of the inputs (then divided by the world
    size for avg): its own rounding, ~1e-16, is far below any wire dtype's.
    """
    import torch.distributed as dist

    gen = torch.Generator(device=ctx.device).manual_seed(98765 + 7919 * ctx.rank)
    x = torch.randn(count, generator=gen, device=ctx.device, dtype=torch.float32)
    ref = x.double()
    dist.all_reduce(ref, op=dist.ReduceOp.SUM)
    if args.op == "avg":
        ref /= ctx.world_size
    reduce_fn(x)
    denom = torch.linalg.vector_norm(ref).item()
    err = torch.linalg.vector_norm(x.double() - ref).item() / denom if denom > 0 else 0.0
    return slowest_rank(err, ctx.device)  # the MAX over ranks


# ---------------------------------------------------------------------------------------------- output

def fmt_bw(x: float) -> str:
    """A bandwidth in GB/s with three significant digits at least, never fewer than two decimals: 1 KiB on
    CPU is ~0.01 GB/s, which two decimals would print as 0.00."""
    if x <= 0 or x != x:
        return f"{x:.2f}"
    decimals = min(6, max(2, 2 - math.floor(math.log10(x))))
    return f"{x:.{decimals}f}"


def human_size(nbytes: float) -> str:
    """1024 -> "1K", 3 << 20 -> "3M" (binary units, as the -b/-e flags take them); other values as numbers."""
    n = int(round(nbytes))
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def fmt_time(us: float) -> str:
    """A time in microseconds: one decimal, two below 10 us."""
    return f"{us:.2f}" if us < 10 else f"{us:.1f}"


def _columns(with_relerr: bool):
    """(header line 1, header line 2, header line 3, width) per column, after nccl-tests' table."""
    cols = [("", "size", "(B)", 12), ("", "count", "(elements)", 12), ("", "type", "", 8), ("", "redop", "", 5),
            ("", "algo", "", 8), ("paracomm", "time", "(us)", 10), ("", "algbw", "(GB/s)", 9),
            ("", "busbw", "(GB/s)", 9), ("", "#wrong", "", 6)]
    if with_relerr:
        cols.append(("", "relerr", "(norm)", 9))
    cols += [("baseline", "time", "(us)", 10), ("", "algbw", "(GB/s)", 9), ("", "busbw", "(GB/s)", 9),
             ("", "#wrong", "", 6), ("", "ratio", "busbw", 6)]
    return cols


def _join(values, cols) -> str:
    return " ".join(f"{v:>{w}}" for v, (_, _, _, w) in zip(values, cols))


def table_head(header: dict) -> str:
    s = header["settings"]
    b = header["paracomm"]
    cols = _columns(s["wire_dtype"] != "none")
    cores, local = header.get("cpu_cores"), header.get("local_ranks")
    lines = [
        "# paracomm all-reduce benchmark",
        f"#  world size {header['world_size']} ({header['launcher']}), backend {header['backend']}: "
        f"{header['backend_version']}",
        f"#  device: {header['device']}"
        + (f", {header['ranks_per_gpu']} ranks per GPU (NCCL over loopback sockets)"
           if (header.get("ranks_per_gpu") or 1) > 1 else ""),
    ]
    if cores is not None and local is not None:
        lines.append(f"#  {local} local ranks on a machine with {cores} cores"
                     + (" (more ranks than cores: ranks wait for a core, and figures jump from size to size)"
                        if header["backend"] == "gloo" and local > cores else ""))
    if header.get("cpu_transport"):
        lines.append(f"#  paracomm CPU transport: {header['cpu_transport']} "
                     "(PARACOMM_CPU_TRANSPORT=auto|shm|gloo|mixed)")
    lines += [
        f"#  paracomm {b.get('version')} (torch {b.get('torch')}, cuda build {b.get('cuda')}, "
        f"cuda {b.get('cuda_version')}, nccl {b.get('nccl_version')}, archs {b.get('archs')})",
        f"#  {'in-place' if s['inplace'] else 'out-of-place (copy into the output, then reduce in place)'}, "
        f"op {s['op']}, type {s['datatype']}, paracomm wire dtype {s['wire_dtype']}, "
        f"algorithm {s['algorithm']}, iters {s['iters']}, warm-up {s['warmup_iters']}, check {s['check']}",
        f"#  baseline: {header['baseline']}",
        "#  time: median over iters of the slowest rank; algbw = size / time; busbw = algbw * 2(n-1)/n; "
        "ratio = paracomm busbw / baseline busbw (= baseline time / paracomm time; at one rank, where busbw is 0, "
        "the time ratio); algo: the algorithm paracomm ran"
        + ("; relerr: ||result - ref|| / ||ref|| vs float64 on random normal data" if s["wire_dtype"] != "none"
           else ""),
    ]
    load = header.get("loadavg_start")
    if load is not None:
        lines.append(f"#  load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min)"
                     + _load_warning(load[0], cores))
    lines += [
        "#",
    ]
    topo = header.get("topology")
    if topo:
        lines.append(f"#  nodes: {topo['node_map']}" + (f"; {topo['emulated']}" if topo.get("emulated") else ""))
    lines += [
        "#" + _join([c[0] for c in cols], cols)[1:],
        "#" + _join([c[1] for c in cols], cols)[1:],
        "#" + _join([c[2] for c in cols], cols)[1:],
    ]
    return "\n".join(lines)


def _load_warning(load1: float, cores) -> str:
    if cores and load1 > cores:
        return (f"  WARNING: above the {cores} cores: other work is running, figures (and ratios) are not "
                "reliable; note it with any result")
    return ""


def format_spread(row: dict) -> str:
    """The --stats line under a row: p10 / p90 of both sides and the ratio's range."""
    p, q = row["paracomm"], row["baseline"]
    return (f"#   ^ spread p10/p90 (us): paracomm {fmt_time(p['time_p10_us'])}/{fmt_time(p['time_p90_us'])}, "
            f"baseline {fmt_time(q['time_p10_us'])}/{fmt_time(q['time_p90_us'])}; ratio between "
            f"{row['ratio_p90_p10']:.2f} and {row['ratio_p10_p90']:.2f}")


def _wrong_str(w):
    return "N/A" if w is None else str(w)


def format_row(row: dict) -> str:
    p, q = row["paracomm"], row["baseline"]
    with_relerr = "relerr" in p
    values = [row["size"], row["count"], row["type"], row["redop"], row["algorithm"],
              fmt_time(p["time_us"]), fmt_bw(p["algbw_gbps"]), fmt_bw(p["busbw_gbps"]), _wrong_str(p["wrong"])]
    if with_relerr:
        values.append(f"{p['relerr']:.2e}")
    values += [fmt_time(q["time_us"]), fmt_bw(q["algbw_gbps"]), fmt_bw(q["busbw_gbps"]), _wrong_str(q["wrong"]),
               f"{row['busbw_ratio']:.2f}"]
    return " " + _join(values, _columns(with_relerr))[1:]


def _geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs and all(x > 0 for x in xs) else float("nan")


def summarize(rows: list) -> dict:
    """nccl-tests' "Avg bus bandwidth" (plain mean over sizes) per paracomm algorithm and for the baseline, the
    geometric mean of the busbw ratios per algorithm, and the total of wrong elements (None when unchecked)."""
    by_algo: dict = {}
    for r in rows:
        by_algo.setdefault(r["algorithm_requested"], []).append(r)
    baseline_rows = {r["size"]: r for r in rows}.values()  # one baseline measurement per size
    wrong = [r["paracomm"]["wrong"] for r in rows] + [r["baseline"]["wrong"] for r in baseline_rows]
    per_algo = {}
    for algo, rs in by_algo.items():
        ratios = [r["busbw_ratio"] for r in rs]
        per_algo[algo] = {
            "avg_busbw_gbps": sum(r["paracomm"]["busbw_gbps"] for r in rs) / len(rs),
            "busbw_ratio_geomean": _geomean(ratios),
            "busbw_ratio_min": min(ratios),
            "busbw_ratio_max": max(ratios),
        }
    first = next(iter(per_algo.values()))
    return {
        "avg_busbw_gbps": {"paracomm": first["avg_busbw_gbps"],
                           "baseline": sum(r["baseline"]["busbw_gbps"] for r in baseline_rows) / len(baseline_rows)},
        "busbw_ratio_geomean": first["busbw_ratio_geomean"],
        "busbw_ratio_min": first["busbw_ratio_min"],
        "busbw_ratio_max": first["busbw_ratio_max"],
        "per_algorithm": per_algo,
        "wrong_total": None if any(w is None for w in wrong) else sum(wrong),
    }


def table_tail(summary: dict) -> str:
    avg = summary["avg_busbw_gbps"]
    wrong = summary["wrong_total"]
    lines = [
        f"# Out of bounds values : {_wrong_str(wrong)} {'OK' if not wrong else 'FAILED'}",
        f"# Avg bus bandwidth    : {avg['paracomm']:g}",
        "#",
        f"#  avg busbw (GB/s): baseline {fmt_bw(avg['baseline'])}, "
        + ", ".join(f"paracomm {a} {fmt_bw(v['avg_busbw_gbps'])}" for a, v in summary["per_algorithm"].items()),
    ]
    for a, v in summary["per_algorithm"].items():
        lines.append(f"#  busbw ratio paracomm {a} / baseline: geometric mean {v['busbw_ratio_geomean']:.2f} "
                     f"(min {v['busbw_ratio_min']:.2f}, max {v['busbw_ratio_max']:.2f})")
    lines.append(f"#  wrong elements in total: {_wrong_str(wrong)}")
    return "\n".join(lines)


def plot_busbw(rows: list, header: dict, path: str) -> None:
    """Three panels against message size, all log-scaled: bus bandwidth and time (the latency view, where small
    messages live) of every paracomm algorithm and the baseline, and the busbw ratio. Written as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    by_algo: dict = {}
    for r in rows:
        by_algo.setdefault(r["algorithm_requested"], []).append(r)
    base = sorted({r["size"]: r for r in rows}.values(), key=lambda r: r["size"])
    fig, (ax_bw, ax_t, ax_r) = plt.subplots(3, 1, figsize=(8, 10), sharex=True,
                                            gridspec_kw={"height_ratios": [3, 3, 2]})
    base_label = f"torch.distributed ({header['backend']})"
    for algo, rs in by_algo.items():
        label = f"paracomm {algo}"
        sizes = [r["size"] for r in rs]
        ax_bw.plot(sizes, [r["paracomm"]["busbw_gbps"] for r in rs], "o-", label=label)
        ax_t.plot(sizes, [r["paracomm"]["time_us"] for r in rs], "o-", label=label)
        ax_r.plot(sizes, [r["busbw_ratio"] for r in rs], "o-", label=label)
    ax_bw.plot([r["size"] for r in base], [r["baseline"]["busbw_gbps"] for r in base], "s--", color="k",
               label=base_label)
    ax_t.plot([r["size"] for r in base], [r["baseline"]["time_us"] for r in base], "s--", color="k",
              label=base_label)
    ax_r.axhline(1.0, color="k", linestyle="--", linewidth=1)
    for ax in (ax_bw, ax_t, ax_r):
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
    ax_bw.set_yscale("log")
    ax_t.set_yscale("log")
    ax_r.set_yscale("log", base=2)
    # Sizes as 1K, 64K, 1M (nccl-tests' units); the ratio as a plain number (0.5, 1, 2).
    ax_r.xaxis.set_major_formatter(FuncFormatter(lambda x, _: human_size(x)))
    ax_r.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax_r.yaxis.set_minor_formatter(NullFormatter())
    ax_bw.set_ylabel("bus bandwidth (GB/s)")
    ax_t.set_ylabel("time (us)")
    ax_r.set_ylabel("busbw ratio\nparacomm / baseline")
    ax_r.set_xlabel("message size (bytes)")
    ax_bw.legend(fontsize=8)
    ax_t.legend(fontsize=8)
    s = header["settings"]
    ax_bw.set_title(f"all-reduce {s['op']} {s['datatype']}"
                    + (f", wire {s['wire_dtype']}" if s["wire_dtype"] != "none" else "")
                    + f", {header['world_size']} ranks, {header['backend']}\n{header['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- per rank

def run_rank(ctx, args) -> int:
    """The benchmark on one rank: every rank measures, rank 0 prints each row as soon as it is measured and
    writes the JSON and the plot. Returns 1 when any element was wrong, else 0."""
    import paracomm

    dtype = DTYPES[args.datatype]
    wire = WIRE_DTYPES[args.wire_dtype]
    comm = paracomm.Communicator(timeout=_timedelta(args.timeout))
    algorithms = requested_algorithms(args.algorithm)
    paracomm_ops = {a: make_paracomm_op(comm, args, a) for a in algorithms}
    baseline_op = make_baseline_op(ctx, args)
    gen = torch.Generator(device=ctx.device).manual_seed(1234 + ctx.rank)
    lead = ctx.rank == 0
    header = launch_mod.run_header(ctx)
    header["loadavg_start"] = list(load_average())
    if ctx.device.type == "cpu":  # shm or gloo (paracomm/_shm.py); collective: every rank asks
        from paracomm._shm import transport_of
        header["cpu_transport"] = transport_of(comm)
    header["baseline"] = ("torch.distributed.all_reduce"
                          + (" (gloo has no AVG: SUM, then divide by the world size)"
                             if ctx.backend == "gloo" and args.op == "avg" else ""))
    header["settings"] = {k: getattr(args, k) for k in (
        "minbytes", "maxbytes", "stepfactor", "iters", "warmup_iters", "check", "datatype", "op",
        "wire_dtype", "algorithm", "inplace", "stats", "check_cost")}
    header["settings"]["algorithms"] = algorithms
    node_size = _node_size(comm, ctx)
    if node_size is not None or emulate_mod.describe():
        header["topology"] = {"node_map": comm.node_map, "emulated": emulate_mod.describe()}
    if lead:
        print(table_head(header), flush=True)
    rows = []
    inplace = bool(args.inplace)
    for nbytes, count in size_sweep(args.minbytes, args.maxbytes, args.stepfactor,
                                    torch.empty(0, dtype=dtype).element_size()):
        src = random_data(count, dtype, ctx.device, gen)
        baseline = measure(baseline_op, src=src, inplace=inplace, args=args, ctx=ctx)
        if wire is not None:
            baseline["relerr"] = relative_error(baseline_op, count, args=args, ctx=ctx)
        for algo in algorithms:
            plan = explain(count, dtype, ctx.world_size, wire, algo, ctx.backend, node_size)
            row = {"size": nbytes, "count": count, "type": args.datatype, "redop": args.op, "inplace": inplace,
                   "algorithm_requested": algo, "algorithm": plan["algorithm"], "plan": plan}
            row["paracomm"] = measure(paracomm_ops[algo], src=src, inplace=inplace, args=args, ctx=ctx)
            if args.check_cost:
                row["paracomm"], row["paracomm_unchecked"] = _checked_and_unchecked(
                    paracomm_ops[algo], src=src, inplace=inplace, args=args, ctx=ctx)
                row["check_cost"] = row["paracomm"]["time_us"] / row["paracomm_unchecked"]["time_us"] - 1
            if wire is not None:
                row["paracomm"]["relerr"] = relative_error(paracomm_ops[algo], count, args=args, ctx=ctx)
            row["baseline"] = baseline
            # busbw ratio = baseline time / paracomm time (the same bytes on both sides); also at one rank,
            # where busbw is 0 for both.
            p_t, b_t = row["paracomm"], row["baseline"]
            row["busbw_ratio"] = b_t["time_us"] / p_t["time_us"]
            # The ratio's range from the spreads: pessimistic (slow paracomm, fast baseline) and optimistic.
            row["ratio_p90_p10"] = b_t["time_p10_us"] / p_t["time_p90_us"]
            row["ratio_p10_p90"] = b_t["time_p90_us"] / p_t["time_p10_us"]
            rows.append(row)
            if lead:
                print(format_row(row), flush=True)
                if args.stats:
                    print(format_spread(row), flush=True)
                if args.check_cost:
                    u = row["paracomm_unchecked"]
                    print(f"#   ^ signature check: {fmt_time(u['time_us'])} us without it "
                          f"(p10/p90 {fmt_time(u['time_p10_us'])}/{fmt_time(u['time_p90_us'])}): "
                          f"the check costs {100 * row['check_cost']:+.1f}%", flush=True)
        del src
    summary = summarize(rows)
    summary["loadavg_end"] = list(load_average())
    if lead:
        print(table_tail(summary), flush=True)
        end = summary["loadavg_end"]
        print(f"#  load average at end: {end[0]:.2f} {end[1]:.2f} {end[2]:.2f} (1/5/15 min)"
              + _load_warning(end[0], header.get("cpu_cores")), flush=True)
        report.write_json(args.json, "allreduce", header, rows, summary)
        if args.plot:
            plot_busbw(rows, header, args.plot)
            print(f"# wrote {args.plot}", flush=True)
    if summary["wrong_total"]:
        if lead:
            print(f"# FAILED: {summary['wrong_total']} wrong elements", file=sys.stderr, flush=True)
        return 1
    return 0


def _node_size(comm, ctx):
    """Ranks per node when paracomm's node map (found on a first, tiny call) is node_size-shaped and spans more
    than one node, for explain_all_reduce; else None."""
    if ctx.device.type != "cpu":
        return None
    comm.all_reduce(torch.zeros(1, device=ctx.device))
    node_map = comm.node_map
    if not node_map or max(node_map) == 0:
        return None
    k = node_map.count(0)
    return k if node_map == [r // k for r in range(len(node_map))] else None


def main(argv=None) -> int:
    """Entry point for ``python -m paracomm.bench allreduce``; returns the exit code (2 for bad flags)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: 2 on a bad flag, 0 after --help
        return e.code if isinstance(e.code, int) else 2
    # With --emulate-nodes this process builds the cluster and starts the ranks in it (each sees ENV_MARK).
    code = emulate_mod.dispatch("allreduce", args, argv)
    if code is not None:
        return code
    return launch_mod.launch(run_rank, args, nproc=args.nproc, device=args.device,
                             ranks_per_gpu=args.ranks_per_gpu, timeout_s=args.timeout)
