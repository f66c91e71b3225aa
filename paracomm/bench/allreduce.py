"""``python -m paracomm.bench allreduce``: all-reduce bandwidth, paracomm's ring next to the backend's own.

In the style of nccl-tests' ``all_reduce_perf``: a sweep of message sizes from ``-b`` to ``-e`` (each step
times ``-f``), and for each size one row with the time, the algorithm bandwidth (bytes / time) and the bus
bandwidth (algbw * 2(n-1)/n, the bytes each rank's link carries in a ring all-reduce, so figures compare across
rank counts) of

* **paracomm**: ``paracomm.Communicator().all_reduce(t, op, wire_dtype=...)`` (ring over NCCL send/recv on
  GPU, the same schedule over gloo on CPU), and
* **baseline**: ``torch.distributed.all_reduce`` on the same ranks (NCCL's or gloo's own algorithm). gloo has
  no AVG, so on CPU the baseline's avg is SUM followed by a division by the world size.

Timing: ``-w`` warm-up runs, then ``-n`` timed runs, each after a barrier (CUDA events on GPU, perf_counter on
CPU); the median per rank, then the slowest rank's median. Timing data is random; a separate check pass
(``-c 1``) uses small integers whose exact result is known in every dtype and wire dtype and counts the
elements that differ (``#wrong``, summed over ranks).

In-place (``--inplace 1``, the default) reduces the buffer itself; the buffer is refilled from the random
source outside the timed region before every run, so values do not grow run to run. Out-of-place
(``--inplace 0``): neither paracomm nor torch.distributed has an out-of-place all-reduce, so the timed region
is ``out.copy_(in)`` followed by the in-place reduction of ``out`` (the copy is counted, for both).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from . import launch as launch_mod
from .timing import barrier, gbps, median, slowest_rank, sum_over_ranks, time_iterations

DTYPES = {
    "float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16,
    "double": torch.float64, "int32": torch.int32, "int64": torch.int64,
}
DTYPE_ALIASES = {"float32": "float", "fp32": "float", "float16": "half", "fp16": "half", "bf16": "bfloat16",
                 "float64": "double", "fp64": "double"}
WIRE_DTYPES = {"none": None, "half": torch.float16, "bfloat16": torch.bfloat16}
WIRE_ALIASES = {"fp16": "half", "float16": "half", "bf16": "bfloat16"}
OPS = ("sum", "avg")
SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


# ---------------------------------------------------------------------------------------------- flags

def parse_size(text: str) -> int:
    """``"64"``, ``"1K"``, ``"32M"``, ``"1G"`` (binary multiples, as nccl-tests; a trailing B is allowed)."""
    s = text.strip().upper()
    if s.endswith("B") and len(s) > 1 and s[-2] in "KMG":
        s = s[:-1]
    suffix = s[-1] if s and s[-1] in "KMG" else ""
    digits = s[:-1] if suffix else s
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: expected a number with an optional K, M or G")
    value = int(digits) * SIZE_SUFFIXES[suffix]
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be at least 1 byte")
    return value


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="paracomm-bench allreduce",
        description="All-reduce bandwidth: paracomm's ring vs torch.distributed.all_reduce, per message size "
                    "(flags after nccl-tests' all_reduce_perf).",
        epilog="Without torchrun, spawns --nproc local ranks (default: one per GPU, or 4 CPU ranks over gloo).")
    g = p.add_argument_group("sizes and iterations")
    g.add_argument("-b", "--minbytes", type=parse_size, default=parse_size("1K"), metavar="SIZE",
                   help="smallest message in bytes, suffixes K, M, G (default 1K)")
    g.add_argument("-e", "--maxbytes", type=parse_size, default=None, metavar="SIZE",
                   help="largest message (default 32M on CPU, 256M on GPU)")
    g.add_argument("-f", "--stepfactor", type=int, default=2, metavar="F",
                   help="multiply the size by F each step (default 2)")
    g.add_argument("-n", "--iters", type=int, default=20, help="timed runs per size (default 20)")
    g.add_argument("-w", "--warmup_iters", type=int, default=5, help="untimed warm-up runs per size (default 5)")
    g.add_argument("-c", "--check", type=_zero_one, default=1, metavar="0|1",
                   help="count wrong elements with an exact-result pass (default 1)")
    g = p.add_argument_group("operation")
    g.add_argument("-d", "--datatype", type=_choice(DTYPES, DTYPE_ALIASES, "datatype"), default="float",
                   metavar="TYPE", help=f"element type: {', '.join(DTYPES)} (default float)")
    g.add_argument("-o", "--op", type=_choice(dict.fromkeys(OPS), {}, "op"), default="sum", metavar="OP",
                   help="reduction: sum or avg (default sum)")
    g.add_argument("--wire-dtype", type=_choice(WIRE_DTYPES, WIRE_ALIASES, "wire dtype"), default="none",
                   metavar="TYPE", help="paracomm only, float data only: half or bfloat16 on the wire "
                                        "(accumulation stays fp32); the baseline always sends the data type")
    g.add_argument("--inplace", type=_zero_one, default=1, metavar="0|1",
                   help="1: reduce the buffer in place (default); 0: out-of-place, timed as copy into the "
                        "output then in-place reduce")
    launch_mod.add_rank_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="FILE", default=None, help="write the header and every row as JSON")
    g.add_argument("--plot", metavar="FILE.png", default=None,
                   help="plot busbw against size for both (needs matplotlib)")
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


# ---------------------------------------------------------------------------------------------- measuring

def make_ops(ctx, args):
    """The two all-reduces under test, each ``f(tensor)`` reducing in place over the default group."""
    import torch.distributed as dist

    import paracomm

    comm = paracomm.Communicator(timeout=_timedelta(args.timeout))
    wire = WIRE_DTYPES[args.wire_dtype]
    op = args.op

    def paracomm_op(t):
        comm.all_reduce(t, op, wire_dtype=wire)

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

    return paracomm_op, baseline_op


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
    result = {"time_us": seconds * 1e6, "algbw_gbps": algbw,
              "busbw_gbps": bus_bandwidth(algbw, ctx.world_size), "wrong": None}
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


# ---------------------------------------------------------------------------------------------- output

COLUMNS = ("{:>12} {:>12} {:>8} {:>5}  |{:>11} {:>7} {:>7} {:>7}  |{:>11} {:>7} {:>7} {:>7}  |{:>6}")


def table_head(header: dict) -> str:
    s = header["settings"]
    b = header["paracomm"]
    lines = [
        "# paracomm all-reduce benchmark",
        f"#  world size {header['world_size']} ({header['launcher']}), backend {header['backend']}: "
        f"{header['backend_version']}",
        f"#  device: {header['device']}"
        + (f", {header['ranks_per_gpu']} ranks per GPU (NCCL over loopback sockets)"
           if (header.get("ranks_per_gpu") or 1) > 1 else ""),
        f"#  paracomm {b.get('version')} (torch {b.get('torch')}, cuda build {b.get('cuda')}, "
        f"cuda {b.get('cuda_version')}, nccl {b.get('nccl_version')}, archs {b.get('archs')})",
        f"#  {'in-place' if s['inplace'] else 'out-of-place (copy into the output, then reduce in place)'}, "
        f"op {s['op']}, type {s['datatype']}, paracomm wire dtype {s['wire_dtype']}, "
        f"iters {s['iters']}, warm-up {s['warmup_iters']}, check {s['check']}",
        f"#  baseline: {header['baseline']}",
        "#  time: median over iters of the slowest rank; algbw = size / time; busbw = algbw * 2(n-1)/n; "
        "ratio = paracomm busbw / baseline busbw",
        "#",
        COLUMNS.format("", "", "", "", "paracomm", "", "", "", "baseline", "", "", "", ""),
        COLUMNS.format("size", "count", "type", "redop", "time", "algbw", "busbw", "#wrong",
                       "time", "algbw", "busbw", "#wrong", "ratio"),
        COLUMNS.format("(B)", "(elements)", "", "", "(us)", "(GB/s)", "(GB/s)", "",
                       "(us)", "(GB/s)", "(GB/s)", "", "busbw"),
    ]
    return "\n".join(lines)


def _wrong_str(w):
    return "N/A" if w is None else str(w)


def format_row(row: dict) -> str:
    p, q = row["paracomm"], row["baseline"]
    return COLUMNS.format(
        row["size"], row["count"], row["type"], row["redop"],
        f"{p['time_us']:.1f}", f"{p['algbw_gbps']:.2f}", f"{p['busbw_gbps']:.2f}", _wrong_str(p["wrong"]),
        f"{q['time_us']:.1f}", f"{q['algbw_gbps']:.2f}", f"{q['busbw_gbps']:.2f}", _wrong_str(q["wrong"]),
        f"{row['busbw_ratio']:.2f}")


def summarize(rows: list) -> dict:
    """nccl-tests' "Avg bus bandwidth" (plain mean over sizes) for both, the geometric mean of the ratios,
    and the total of wrong elements (None when unchecked)."""
    ratios = [r["busbw_ratio"] for r in rows]
    wrong = [r[k]["wrong"] for r in rows for k in ("paracomm", "baseline")]
    return {
        "avg_busbw_gbps": {k: sum(r[k]["busbw_gbps"] for r in rows) / len(rows) for k in ("paracomm", "baseline")},
        "busbw_ratio_geomean": math.exp(sum(math.log(x) for x in ratios) / len(ratios)),
        "busbw_ratio_min": min(ratios),
        "busbw_ratio_max": max(ratios),
        "wrong_total": None if any(w is None for w in wrong) else sum(wrong),
    }


def table_tail(summary: dict) -> str:
    avg = summary["avg_busbw_gbps"]
    return "\n".join([
        f"# Avg bus bandwidth (GB/s): paracomm {avg['paracomm']:.3f}, baseline {avg['baseline']:.3f}",
        f"# busbw ratio paracomm/baseline: geometric mean {summary['busbw_ratio_geomean']:.2f} "
        f"(min {summary['busbw_ratio_min']:.2f}, max {summary['busbw_ratio_max']:.2f})",
        f"# wrong elements in total: {_wrong_str(summary['wrong_total'])}",
    ])


def plot_busbw(rows: list, header: dict, path: str) -> None:
    """Bus bandwidth against message size (log2 x axis) for paracomm and the baseline, written as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["size"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(sizes, [r["paracomm"]["busbw_gbps"] for r in rows], "o-", label="paracomm ring")
    ax.plot(sizes, [r["baseline"]["busbw_gbps"] for r in rows], "s--", label=f"torch.distributed ({header['backend']})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    s = header["settings"]
    ax.set_title(f"all-reduce {s['op']} {s['datatype']}"
                 + (f", wire {s['wire_dtype']}" if s["wire_dtype"] != "none" else "")
                 + f", {header['world_size']} ranks, {header['backend']}\n{header['device']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- per rank

def run_rank(ctx, args) -> int:
    """The benchmark on one rank: every rank measures, rank 0 prints each row as soon as it is measured and
    writes the JSON and the plot. Returns 1 when any element was wrong, else 0."""
    dtype = DTYPES[args.datatype]
    paracomm_op, baseline_op = make_ops(ctx, args)
    gen = torch.Generator(device=ctx.device).manual_seed(1234 + ctx.rank)
    lead = ctx.rank == 0
    header = launch_mod.run_header(ctx)
    header["baseline"] = ("torch.distributed.all_reduce"
                          + (" (gloo has no AVG: SUM, then divide by the world size)"
                             if ctx.backend == "gloo" and args.op == "avg" else ""))
    header["settings"] = {k: getattr(args, k) for k in (
        "minbytes", "maxbytes", "stepfactor", "iters", "warmup_iters", "check", "datatype", "op",
        "wire_dtype", "inplace")}
    if lead:
        print(table_head(header), flush=True)
    rows = []
    for nbytes, count in size_sweep(args.minbytes, args.maxbytes, args.stepfactor,
                                    torch.empty(0, dtype=dtype).element_size()):
        src = random_data(count, dtype, ctx.device, gen)
        row = {"size": nbytes, "count": count, "type": args.datatype, "redop": args.op,
               "inplace": bool(args.inplace)}
        row["paracomm"] = measure(paracomm_op, src=src, inplace=bool(args.inplace), args=args, ctx=ctx)
        row["baseline"] = measure(baseline_op, src=src, inplace=bool(args.inplace), args=args, ctx=ctx)
        row["busbw_ratio"] = row["paracomm"]["busbw_gbps"] / row["baseline"]["busbw_gbps"]
        rows.append(row)
        if lead:
            print(format_row(row), flush=True)
        del src
    summary = summarize(rows)
    if lead:
        print(table_tail(summary), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"benchmark": "allreduce", "header": header, "rows": rows, "summary": summary}, f,
                          indent=2)
            print(f"# wrote {args.json}", flush=True)
        if args.plot:
            plot_busbw(rows, header, args.plot)
            print(f"# wrote {args.plot}", flush=True)
    if summary["wrong_total"]:
        if lead:
            print(f"# FAILED: {summary['wrong_total']} wrong elements", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv=None) -> int:
    """Entry point for ``python -m paracomm.bench allreduce``; returns the exit code (2 for bad flags)."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as e:  # argparse: 2 on a bad flag, 0 after --help
        return e.code if isinstance(e.code, int) else 2
    return launch_mod.launch(run_rank, args, nproc=args.nproc, device=args.device,
                             ranks_per_gpu=args.ranks_per_gpu, timeout_s=args.timeout)
