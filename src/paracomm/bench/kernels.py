"""``python -m paracomm.bench kernels``: paracomm's fused gradient kernels side by side with torch's own path.

Kernels (paracomm  vs  the torch baseline):

* ``unscale_fp16_fp32``: fp16 grads -> fp32 master grads, ``paracomm.unscale_and_check_(g16, inv, found,
  out=g32)``  vs  ``out.copy_(g)`` per tensor, then ``torch._amp_foreach_non_finite_check_and_unscale_``.
  paracomm must move 2 + 4 bytes per element; torch moves 2 + 4 + 4 + 4.
* ``unscale_fp32``: fp32 grads in place, ``paracomm.unscale_and_check_(g32, ...)``  vs  the torch AMP op
  (4 + 4 bytes).
* ``unscale_fp32_norm``: as ``unscale_fp32`` plus the L2 norm of all grads (``norm=``)  vs  the torch AMP op
  followed by ``torch.linalg.vector_norm`` over all grads (torch reads everything once more).
* ``flatten``: fp32 tensors into one new buffer, ``paracomm.flatten(ts)``  vs
  ``torch._utils._flatten_dense_tensors(ts)`` (4 + 4 bytes).

Shapes: ``small`` = 1000 tensors x 4096 elements (a model of many small parameters), ``large`` = 4 tensors x
64M elements (bandwidth bound); ``--small-*`` / ``--large-*`` change them. GB/s counts the bytes a kernel must
read and write (the same count for paracomm and the baseline: an effective bandwidth); ``ratio`` is
baseline time / paracomm time (> 1: paracomm is faster). Times are medians of ``--iters`` runs after
``--warmup``, timed with CUDA events on CUDA, with L2 flushed before each run so data comes from HBM. On CUDA
the device-to-device copy bandwidth is measured in the same run and each kernel is reported as a fraction of
it. Before timing, every kernel's result is compared with the baseline's (``match``); the exit status is 1 if
any differ. Data is random (never zeros); in-place kernels alternate inv_scale 0.5 and 2.0 so values stay
exact across iterations.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

import paracomm
from paracomm.bench import timing
from paracomm.bench.cli import parse_count

KERNELS = ("unscale_fp16_fp32", "unscale_fp32", "unscale_fp32_norm", "flatten")
SHAPE_NAMES = ("small", "large")


@dataclass
class Shape:
    name: str
    tensors: int
    numel: int  # elements per tensor

    @property
    def elements(self) -> int:
        return self.tensors * self.numel


@dataclass
class Case:
    """One kernel on one shape: how to run paracomm and the baseline, and what must be moved."""

    kernel: str
    baseline: str  # the torch path, in words
    bytes: int  # read + written by the kernel
    run: Callable[[int], None]  # paracomm, iteration i
    run_baseline: Callable[[int], None]
    check: Callable[[], bool]  # one run of each on the same input; True when the results agree


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="paracomm-bench kernels", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"),
                   help="where to run (default: cuda if available, else cpu)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--iters", type=int, default=None, help="timed runs per measurement (default 50 cuda, 5 cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 5 cuda, 1 cpu)")
    p.add_argument("--shapes", default="both", choices=SHAPE_NAMES + ("both",), help="which shapes (default both)")
    p.add_argument("--kernels", default=",".join(KERNELS),
                   help=f"comma-separated subset of {', '.join(KERNELS)} (default all)")
    # Counts take the allreduce mode's suffixes (K, M, G; binary), so "--large-numel 64M" works as the help says.
    p.add_argument("--small-tensors", type=parse_count, default=1000, metavar="N",
                   help="tensors in the small shape (default 1000)")
    p.add_argument("--small-numel", type=parse_count, default=4096, metavar="N",
                   help="elements per small tensor (default 4K = 4096)")
    p.add_argument("--large-tensors", type=parse_count, default=4, metavar="N",
                   help="tensors in the large shape (default 4)")
    p.add_argument("--large-numel", type=parse_count, default=64 << 20, metavar="N",
                   help="elements per large tensor, suffixes K, M, G (default 64M = 64 * 2**20)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the data (default 0)")
    args = p.parse_args(argv)

    if args.device == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA device")
        if not paracomm.build_info()["cuda"]:
            p.error("--device cuda: this paracomm build has no CUDA kernels (built without CUDA)")
    wanted = [k.strip() for k in args.kernels.split(",") if k.strip()]
    unknown = [k for k in wanted if k not in KERNELS]
    if unknown or not wanted:
        p.error(f"--kernels: unknown {unknown or 'empty list'}; choose from {', '.join(KERNELS)}")
    args.kernels = [k for k in KERNELS if k in wanted]  # always in the documented order
    on_cuda = args.device == "cuda"
    args.iters = (50 if on_cuda else 5) if args.iters is None else args.iters
    args.warmup = (5 if on_cuda else 1) if args.warmup is None else args.warmup
    if args.iters < 1 or args.warmup < 0:
        p.error(f"need --iters >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}")
    for name in ("small_tensors", "small_numel", "large_tensors", "large_numel"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def _shapes(args) -> List[Shape]:
    all_shapes = {
        "small": Shape("small", args.small_tensors, args.small_numel),
        "large": Shape("large", args.large_tensors, args.large_numel),
    }
    names = SHAPE_NAMES if args.shapes == "both" else (args.shapes,)
    return [all_shapes[n] for n in names]


def _randn(shape: Shape, dtype: torch.dtype, device: torch.device) -> List[torch.Tensor]:
    return [torch.randn(shape.numel, device=device).to(dtype) for _ in range(shape.tensors)]


def _torch_norm(tensors: List[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all tensors together, the way torch.nn.utils.clip_grad_norm_ computes it."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2.0)), 2.0)


def _one(device: torch.device, value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float32, device=device)


def _unscale_fp16_fp32(shape: Shape, device: torch.device) -> Case:
    g16 = _randn(shape, torch.float16, device)
    out_p = [torch.empty(g.shape, dtype=torch.float32, device=device) for g in g16]
    out_t = [torch.empty(g.shape, dtype=torch.float32, device=device) for g in g16]
    inv, found_p, found_t = _one(device, 1.0 / 1024), _one(device, 0.0), _one(device, 0.0)

    def run(i):
        paracomm.unscale_and_check_(g16, inv, found_p, out=out_p)

    def run_baseline(i):
        for o, g in zip(out_t, g16):
            o.copy_(g)
        torch._amp_foreach_non_finite_check_and_unscale_(out_t, found_t, inv)

    def check():
        run(0)
        run_baseline(0)
        return all(torch.equal(a, b) for a, b in zip(out_p, out_t)) and torch.equal(found_p, found_t)

    return Case("unscale_fp16_fp32", "copy_ + _amp_foreach_non_finite_check_and_unscale_", shape.elements * (2 + 4),
                run, run_baseline, check)


def _unscale_fp32(shape: Shape, device: torch.device, with_norm: bool) -> Case:
    g32 = _randn(shape, torch.float32, device)
    # Powers of two, alternated: the in-place kernels leave the data exactly as it was every two runs.
    invs = [_one(device, 0.5), _one(device, 2.0)]
    found_p, found_t = _one(device, 0.0), _one(device, 0.0)
    norm = _one(device, 0.0) if with_norm else None

    def run(i):
        paracomm.unscale_and_check_(g32, invs[i % 2], found_p, norm=norm)

    def run_baseline(i):
        torch._amp_foreach_non_finite_check_and_unscale_(g32, found_t, invs[i % 2])
        if with_norm:
            norm.copy_(_torch_norm(g32))

    def check():
        ref = [g.clone() for g in g32]
        run(0)
        torch._amp_foreach_non_finite_check_and_unscale_(ref, found_t, invs[0])
        same = all(torch.equal(a, b) for a, b in zip(g32, ref)) and torch.equal(found_p, found_t)
        if with_norm:
            # Against float64, not torch's float32 norm: at 4 x 64M elements torch's own norm is off by ~1e-4.
            exact = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in ref]))
            same = same and torch.allclose(norm.double(), exact.reshape(1), rtol=1e-5, atol=0.0)
        run(1)  # back to the original values
        return same

    if with_norm:
        return Case("unscale_fp32_norm", "_amp_foreach_non_finite_check_and_unscale_ + linalg.vector_norm",
                    shape.elements * (4 + 4), run, run_baseline, check)
    return Case("unscale_fp32", "_amp_foreach_non_finite_check_and_unscale_", shape.elements * (4 + 4), run,
                run_baseline, check)


def _flatten(shape: Shape, device: torch.device) -> Case:
    g32 = _randn(shape, torch.float32, device)

    def run(i):
        paracomm.flatten(g32)

    def run_baseline(i):
        torch._utils._flatten_dense_tensors(g32)

    def check():
        return torch.equal(paracomm.flatten(g32), torch._utils._flatten_dense_tensors(g32))

    return Case("flatten", "torch._utils._flatten_dense_tensors", shape.elements * (4 + 4), run, run_baseline, check)


# kernel name -> builder(shape, device) -> Case. Each case allocates its own buffers (the large shape holds GBs)
# and drops them when measured.
BUILDERS = {
    "unscale_fp16_fp32": _unscale_fp16_fp32,
    "unscale_fp32": lambda shape, device: _unscale_fp32(shape, device, with_norm=False),
    "unscale_fp32_norm": lambda shape, device: _unscale_fp32(shape, device, with_norm=True),
    "flatten": _flatten,
}


def _measure(case: Case, device: torch.device, args) -> Dict:
    def flush():
        timing.flush_l2(device)

    match = case.check()
    # paracomm and the baseline alternate, run by run, so both see the same allocator and cache history (on
    # CPU the first few allocating runs are several times slower than later ones, and timing one side's
    # runs before the other's handed that cost to whichever went first).
    times_p, times_b = [], []
    for i in range(args.warmup + args.iters):
        for fn, times in ((case.run, times_p), (case.run_baseline, times_b)):
            t = timing.time_iterations(lambda _: fn(i), device=device, warmup=0, iters=1, before_each=flush)[0]
            if i >= args.warmup:
                times.append(t)
    t_p, t_b = timing.median(times_p), timing.median(times_b)
    return {
        "kernel": case.kernel,
        "baseline": case.baseline,
        "bytes": case.bytes,
        "time_us": t_p * 1e6,
        "gbps": timing.gbps(case.bytes, t_p),
        "baseline_time_us": t_b * 1e6,
        "baseline_gbps": timing.gbps(case.bytes, t_b),
        "ratio": t_b / t_p,
        "match": bool(match),
    }


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main(argv=None) -> int:
    """Run the kernels benchmark; returns 0, 1 if a kernel's result differed from torch's, 2 on bad flags."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(args.seed)

    info = paracomm.build_info()
    print(f"# paracomm kernels benchmark on {timing.device_name(device)}")
    print(f"# torch {torch.__version__}; paracomm {info}")
    ceiling = timing.copy_ceiling_gbps(device) if device.type == "cuda" else None
    if ceiling is not None:
        print(f"# device-to-device copy ceiling: {ceiling:.1f} GB/s (read + written)")
    print(f"# median of {args.iters} runs after {args.warmup} warm-up; GB/s = bytes the kernel must move / time; "
          f"ratio = torch time / paracomm time")
    header = (f"#{'kernel':<17} {'shape':<6} {'tensors':>8} {'elements':>11} {'us':>10} {'GB/s':>8} "
              f"{'%copy':>6} {'torch us':>10} {'torch GB/s':>10} {'ratio':>6} match")
    print(header)

    rows = []
    for shape in _shapes(args):
        for kernel in args.kernels:
            case = BUILDERS[kernel](shape, device)
            row = {"shape": shape.name, "tensors": shape.tensors, "elements": shape.elements}
            row.update(_measure(case, device, args))
            row["copy_fraction"] = None if ceiling is None else row["gbps"] / ceiling
            rows.append(row)
            pct = None if ceiling is None else 100 * row["copy_fraction"]
            print(f"{row['kernel']:<18} {shape.name:<6} {shape.tensors:>8} {shape.elements:>11} "
                  f"{row['time_us']:>10.1f} {row['gbps']:>8.1f} {_fmt(pct, '5.1f'):>6} "
                  f"{row['baseline_time_us']:>10.1f} {row['baseline_gbps']:>10.1f} {row['ratio']:>6.2f} "
                  f"{'yes' if row['match'] else 'NO'}", flush=True)
            del case
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.json:
        result = {
            "mode": "kernels",
            "date": timing.now_iso(),
            "git_commit": timing.git_commit(),
            "device": timing.device_name(device),
            "torch": torch.__version__,
            "build_info": info,
            "copy_ceiling_gbps": ceiling,
            "iters": args.iters,
            "warmup": args.warmup,
            "rows": rows,
        }
        parent = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(parent, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"# wrote {args.json}")

    mismatched = [f"{r['kernel']}/{r['shape']}" for r in rows if not r["match"]]
    if mismatched:
        print(f"# results differ from torch: {', '.join(mismatched)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
