"""Timing helpers shared by the benchmarks (never used by unit tests).

On CUDA each iteration is timed with a pair of CUDA events on the current stream; on CPU with
``time.perf_counter`` around the call. Both warm up first and report every iteration so callers take the
median (robust to the occasional preemption) and keep the spread.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, List, Optional

import torch


def time_iterations(fn: Callable[[int], None], *, device: torch.device, warmup: int, iters: int,
                    before_each: Callable[[], None] | None = None) -> List[float]:
    """Run ``fn(i)`` ``warmup`` times, then ``iters`` times, timing each run; returns seconds per run.

    ``before_each`` runs outside the timed region (e.g. a barrier, or an L2 flush on CUDA).
    """
    if warmup < 0 or iters < 1:
        raise ValueError(f"time_iterations: need warmup >= 0 and iters >= 1, got {warmup}, {iters}")
    for i in range(warmup):
        if before_each is not None:
            before_each()
        fn(i)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for i in range(iters):
            if before_each is not None:
                before_each()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for i in range(iters):
            if before_each is not None:
                before_each()
            t0 = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t0)
    return times


def median(xs: List[float]) -> float:
    """The median of per-iteration times (robust to the odd preempted run)."""
    return statistics.median(xs)


def quantile(xs: List[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of per-iteration times, linearly interpolated (numpy's default)."""
    ys = sorted(xs)
    if not ys:
        raise ValueError("quantile: no values")
    pos = q * (len(ys) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ys) - 1)
    return ys[lo] + (ys[hi] - ys[lo]) * (pos - lo)


def load_average() -> tuple:
    """(1, 5, 15)-minute load averages of this machine, or (nan, nan, nan) where the OS has none."""
    try:
        return os.getloadavg()
    except (OSError, AttributeError):
        return (float("nan"),) * 3


_L2_FLUSH = {}


def flush_l2(device: torch.device, nbytes: int = 256 << 20) -> None:
    """Overwrite a buffer larger than the GPU's L2 (50 MB on H100) so the next kernel reads from HBM."""
    if device.type != "cuda":
        return
    buf = _L2_FLUSH.get(device)
    if buf is None:
        buf = _L2_FLUSH[device] = torch.empty(nbytes, dtype=torch.uint8, device=device)
    buf.fill_(1)


def copy_ceiling_gbps(device: torch.device, nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-local copy bandwidth in GB/s, counting bytes read + written (the ceiling kernels are held to)."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    times = time_iterations(lambda i: dst.copy_(src), device=device, warmup=3, iters=iters)
    return 2 * n * 4 / median(times) / 1e9


def barrier(device: torch.device) -> None:
    """Line every rank up before a timed region (and drain this rank's GPU work first).

    On CPU the caller's perf_counter then starts with every rank at the same point, so one rank's late start
    is not counted as another's communication time.
    """
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        dist.barrier(device_ids=[device.index])
        torch.cuda.synchronize(device)
    else:
        dist.barrier()


def slowest_rank(seconds: float, device: torch.device) -> float:
    """The largest of every rank's ``seconds`` (an all-reduce with MAX): a collective is as slow as its
    slowest participant, so that is the figure a benchmark reports."""
    import torch.distributed as dist

    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def sum_over_ranks(count: int, device: torch.device) -> int:
    """Sum of an integer (e.g. a count of wrong elements) over every rank."""
    import torch.distributed as dist

    t = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def gbps(nbytes: float, seconds: float) -> float:
    """Bandwidth in GB/s (1e9 bytes per second) for `nbytes` moved (read + written) in `seconds`."""
    return nbytes / seconds / 1e9


def device_name(device: torch.device) -> str:
    """"NVIDIA H100 80GB HBM3" on CUDA; the processor and torch's thread count on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"cpu {cpu} ({torch.get_num_threads()} threads)"


def git_commit() -> Optional[str]:
    """`git rev-parse HEAD` of the checkout paracomm is imported from, or None (not a checkout, no git)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def now_iso() -> str:
    """The current local time, ISO 8601 with the UTC offset (for result files)."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")
