"""paracomm.Communicator / paracomm.all_reduce over gloo, on real processes (tests/dist_utils.run_ranks).

Each spawn costs seconds, so every test batches many cases into one run and checks them inside the ranks;
results that must agree across ranks come back as digests and are compared here.
"""
import hashlib
import os
import re
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64]


def _assert_close(actual, expected, rtol, atol, msg=""):
    """|actual - expected| <= atol + rtol * |expected| elementwise (torch.testing.assert_close would import
    torch.distributed.tensor in every rank: seconds of start-up per process)."""
    actual, expected = actual.double(), expected.double()
    bad = (actual - expected).abs() > atol + rtol * expected.abs()
    assert not bad.any(), f"{msg}: {int(bad.sum())} values differ, e.g. {actual[bad][:3]} vs {expected[bad][:3]}"


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _int_valued(rank, numel, dtype, salt=0):
    """Small integers (exact in every dtype, sums included) drawn per rank: reproducible on any rank."""
    g = torch.Generator().manual_seed(1000 * rank + 7 * numel + salt)
    return torch.randint(-8, 9, (numel,), generator=g).to(dtype)


def _normal(rank, numel, dtype, salt=0):
    g = torch.Generator().manual_seed(99991 * (rank + 1) + numel + salt)
    return torch.randn(numel, generator=g, dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------------------------------------------
# The matrix: world sizes 1..5, awkward sizes, every dtype, sum and avg
# ------------------------------------------------------------------------------------------------------------


ALGOS = ("ring", "direct", "one_shot")


def _matrix(rank, world_size):
    import paracomm

    comm = paracomm.Communicator(timeout=timedelta(seconds=60))
    assert (comm.rank, comm.world_size, comm.backend) == (rank, world_size, "gloo")
    n = world_size
    digests = {}
    # Every algorithm; odd (numel, dtype) cases alternate between synchronous and async calls.
    big = 1 << 20  # about a million elements
    for algo in ALGOS:
        case = 0
        for numel in sorted({0, 1, max(n - 1, 0), n, n + 1, 37, 1000, big}):
            # The big size for one dtype per accumulation type; every dtype at the awkward sizes.
            for dtype in DTYPES if numel < big else (torch.float32, torch.bfloat16, torch.int64):
                ops = ("sum", "avg") if dtype.is_floating_point else ("sum",)
                x = _int_valued(rank, numel, dtype)
                exact = sum(_int_valued(r, numel, dtype).double() for r in range(n))
                torch_sum = x.clone()
                dist.all_reduce(torch_sum)
                for op in ops:
                    y = x.clone()
                    case += 1
                    if case % 2:
                        assert comm.all_reduce(y, op, algorithm=algo) is y
                    else:
                        assert comm.all_reduce(y, op, algorithm=algo, async_op=True).wait() is y
                    if op == "sum":
                        assert torch.equal(y, torch_sum), (algo, numel, dtype, op)
                        assert torch.equal(y.double(), exact), (algo, numel, dtype, op)
                    else:  # gloo has no avg: torch's sum divided by N (exact sums, one rounding of the quotient)
                        assert torch.equal(y, torch_sum / n), (algo, numel, dtype, op)
                    digests[f"int/{algo}/{numel}/{dtype}/{op}"] = _digest(y)

        # Random (non-integer) data: float64 reference, determinism, chunking must not change a single bit.
        numel = 10_007
        for dtype in DTYPES[:4]:
            x = _normal(rank, numel, dtype)
            exact = sum(_normal(r, numel, dtype).double() for r in range(n))
            for op in ("sum", "avg"):
                ref = exact / n if op == "avg" else exact
                runs = []
                # The chunk policy, then 128-element pieces: every algorithm sums each element in an order that
                # does not depend on the pieces (rank order, or ring order ending at the segment's owner).
                for chunk in ("", "512"):
                    os.environ["PARACOMM_CHUNK_BYTES"] = chunk
                    y = x.clone()
                    comm.all_reduce(y, op, algorithm=algo)
                    runs.append(_digest(y))
                os.environ.pop("PARACOMM_CHUNK_BYTES")
                assert len(set(runs)) == 1, f"chunking or repetition changed the result: {algo} {dtype} {op}"
                tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
                _assert_close(y, ref, tol, tol * n, f"{algo} {dtype} {op}")
                digests[f"normal/{algo}/{dtype}/{op}"] = runs[0]
            # Compressed wire on float32 (ignored at N == 1: nothing travels).
            if dtype == torch.float32:
                for wire in (torch.float16, torch.bfloat16):
                    y = x.clone()
                    if wire == torch.float16:
                        comm.all_reduce(y, "avg", wire_dtype=wire, algorithm=algo, async_op=True).wait()
                    else:
                        comm.all_reduce(y, "avg", wire_dtype=wire, algorithm=algo)
                    _assert_close(y, exact / n, 2e-2, 2e-2, f"{algo} wire {wire}")
                    if n == 1:
                        assert torch.equal(y, x)
                    digests[f"wire/{algo}/{wire}"] = _digest(y)

    if n == 2:
        # 2,000 back-to-back small calls: memory must not grow (generous bound: 32 MiB).
        t = torch.ones(64)
        for _ in range(200):
            comm.all_reduce(t, "avg")
        rss0 = _rss_bytes()
        for _ in range(2000):
            comm.all_reduce(t, "avg")
        growth = _rss_bytes() - rss0
        assert growth < 32 << 20, f"RSS grew by {growth} bytes over 2,000 calls"
        assert torch.equal(t, torch.ones(64))
    return digests


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5, 6, 7, 8])
def test_matrix_every_algorithm_matches_torch_and_float64_bitwise_on_every_rank(world_size):
    # World size 2 also makes 2,000 back-to-back small calls and checks that memory does not grow.
    digests = run_ranks(world_size, _matrix, timeout=600)
    for r in range(1, world_size):
        assert digests[r] == digests[0], f"rank {r} differs from rank 0"


# ------------------------------------------------------------------------------------------------------------
# Compressed wire at world size 8 against torch's compress-hook path
# ------------------------------------------------------------------------------------------------------------


def _compressed(rank, world_size):
    import paracomm

    numel = 100_003
    x = _normal(rank, numel, torch.float32) * 3
    exact = sum(_normal(r, numel, torch.float32).double() * 3 for r in range(world_size)) / world_size
    out = {}
    for wire in (torch.float16, torch.bfloat16):
        y = x.clone()
        paracomm.all_reduce(y, "avg", wire_dtype=wire)
        # torch.distributed.algorithms.ddp_comm_hooks' fp16/bf16 compress hook: divide, cast, all-reduce, cast back.
        z = (x / world_size).to(wire)
        dist.all_reduce(z)
        z = z.float()
        err = (y.double() - exact).abs()
        err_torch = (z.double() - exact).abs()
        out[str(wire)] = (err.pow(2).mean().sqrt().item(), err.max().item(),
                          err_torch.pow(2).mean().sqrt().item(), err_torch.max().item(), _digest(y))
    return out


def test_compressed_wire_no_worse_than_torch_compress_hook():
    results = run_ranks(8, _compressed, timeout=240)
    for wire, (rms, mx, rms_torch, mx_torch, digest) in results[0].items():
        assert all(r[wire][4] == digest for r in results), f"{wire}: ranks differ"
        assert rms <= rms_torch, f"{wire}: rms error {rms} vs torch's compress hook {rms_torch}"
        # The largest of 100k errors is one sample, noisy either way: within one more rounding of torch's.
        assert mx <= 1.5 * mx_torch, f"{wire}: max error {mx} vs torch's compress hook {mx_torch}"


# ------------------------------------------------------------------------------------------------------------
# async, futures, NumPy through __dlpack__, scale/found_inf, subgroups, handshake, memory
# ------------------------------------------------------------------------------------------------------------


def _misc(rank, world_size):
    import paracomm

    comm = paracomm.Communicator(timeout=timedelta(seconds=60))
    n = world_size


    # async_op: several calls in flight, completed in order; the future holds the tensor.
    xs = [_int_valued(rank, m, torch.float32, salt=5) for m in (17, 3000, 100_000)]
    expected = [sum(_int_valued(r, t.numel(), torch.float32, salt=5) for r in range(n)) for t in xs]
    works = [comm.all_reduce(t, async_op=True) for t in xs]
    chained = works[1].get_future().then(lambda f: f.value() * 2)
    for t, w, e in zip(xs, works, expected):
        assert w.wait() is t and torch.equal(t, e)
        assert w.is_completed()
        assert w.get_future().wait() is t
    assert torch.equal(chained.wait(), expected[1] * 2)
    # A synchronous call after async ones goes through the same FIFO worker.
    y = _int_valued(rank, 55, torch.int64)
    assert comm.all_reduce(y) is y
    assert torch.equal(y, sum(_int_valued(r, 55, torch.int64) for r in range(n)))
    # An error raised on the worker reaches wait() (mismatched numel on one rank).
    bad = torch.ones(10 + (rank == 0))
    w = comm.all_reduce(bad, async_op=True)
    try:
        w.wait()
        raise AssertionError("a mismatched async call did not raise")
    except RuntimeError as e:
        assert "different arguments" in str(e)

    # NumPy arrays through __dlpack__: reduced in place, the same object returned.
    a = _int_valued(rank, 1001, torch.float32).numpy().copy()
    assert paracomm.all_reduce(a) is a
    assert np.array_equal(a, sum(_int_valued(r, 1001, torch.float32) for r in range(n)).numpy())
    b = _int_valued(rank, 7, torch.int64).numpy().copy()
    wb = paracomm.all_reduce(b, async_op=True)
    assert wb.wait() is b
    assert np.array_equal(b, sum(_int_valued(r, 7, torch.int64) for r in range(n)).numpy())

    # scale and found_inf (also on the compressed wire): inf on one rank flags every rank.
    for wire in (None, torch.bfloat16):
        x = _int_valued(rank, 5003, torch.float32, salt=9)
        total = sum(_int_valued(r, 5003, torch.float32, salt=9) for r in range(n))
        found = torch.zeros(1)
        comm.all_reduce(x, "avg", scale=torch.tensor([0.5]), found_inf=found, wire_dtype=wire)
        assert found.item() == 0.0
        _assert_close(x, total / n * 0.5, 1e-2 if wire else 1e-6, 1e-6, f"scale {wire}")
        for pos in (0, 2501, 5002):
            x = _int_valued(rank, 5003, torch.float32, salt=9)
            if rank == 1:
                x[pos] = float("inf") if pos else float("nan")
            found = torch.zeros(1)
            comm.all_reduce(x, found_inf=found, wire_dtype=wire)
            assert found.item() == 1.0, (wire, pos)

    # Mismatches raise on every rank, naming each field that differs, and the communicator stays usable.
    half = torch.tensor([0.5])
    mismatches = [
        (torch.ones(20 + rank), "sum", None, {}, ["numel"]),
        (torch.ones(20, dtype=torch.float32 if rank else torch.float64), "sum", None, {}, ["dtype"]),
        (torch.ones(20), "sum" if rank else "avg", None, {}, ["op"]),
        (torch.ones(20), "sum", torch.float16 if rank else None, {}, ["wire_dtype"]),
        (torch.ones(20), "avg", None, {"scale": half} if rank else {}, ["scale"]),
        (torch.ones(20), "sum", None, {"algorithm": "ring" if rank else "direct"}, ["algorithm"]),
        (torch.ones(20 + rank), "avg" if rank else "sum", None, {}, ["numel", "op"]),
    ]
    for t, op, wire, kwargs, fields in mismatches:
        before = t.clone()
        try:
            comm.all_reduce(t, op, wire_dtype=wire, **kwargs)
            raise AssertionError("a mismatched call did not raise")
        except RuntimeError as e:
            message = str(e)
            assert "different arguments" in message and "rank 0" in message, message
            for field in ("numel", "dtype", "op", "wire_dtype", "scale", "algorithm"):
                named = re.search(rf"[:;] {field} differs", message) is not None
                assert named == (field in fields), (field, fields, message)
        assert torch.equal(t, before)
        ok = torch.full((4,), float(rank))
        comm.all_reduce(ok)
        assert torch.equal(ok, torch.full((4,), float(sum(range(n)))))

    # torch.distributed.ReduceOp.SUM / AVG are accepted where the strings are.
    r1 = _int_valued(rank, 99, torch.float32, salt=3)
    r2 = r1.clone()
    comm.all_reduce(r1, dist.ReduceOp.AVG)
    comm.all_reduce(r2, "avg")
    assert torch.equal(r1, r2)
    paracomm.all_reduce(r1, dist.ReduceOp.SUM)
    try:
        comm.all_reduce(r1, dist.ReduceOp.MAX)
        raise AssertionError("ReduceOp.MAX was accepted")
    except ValueError as e:
        assert "not supported" in str(e)

    # gloo checks every call (the header): a signature seen before that now differs still raises on every rank.
    for _ in range(2):
        comm.all_reduce(torch.ones(4321))
    try:
        comm.all_reduce(torch.ones(4321 if rank else 4320))
        raise AssertionError("a mismatch in a signature seen before did not raise")
    except RuntimeError as e:
        assert "numel differs" in str(e), str(e)

    # PARACOMM_CHECK_SHAPES=0 turns the header off; matching calls still work.
    os.environ["PARACOMM_CHECK_SHAPES"] = "0"
    z = _int_valued(rank, 333, torch.float16)
    comm.all_reduce(z)
    assert torch.equal(z, sum(_int_valued(r, 333, torch.float16).float() for r in range(n)).half())
    del os.environ["PARACOMM_CHECK_SHAPES"]

    # The NCCL path's store handshake (backend-agnostic; keys of call k-2 deleted at call k).
    store = paracomm.comm.c10d._get_process_group_store(dist.group.WORLD)
    for k in range(5):
        comm._handshake_store(comm._validate(torch.ones(8), "sum", None, None, None, None), time.monotonic() + 30)
    # Key of the rank's own call 4 - 2 = 2 is gone (deleted at call 4); call 4's key is still there.
    assert not store.check([f"{comm._prefix}/hs/2/{rank}"]) and store.check([f"{comm._prefix}/hs/4/{rank}"])
    try:
        comm._handshake_store(comm._validate(torch.ones(8 + rank), "sum", None, None, None, None),
                              time.monotonic() + 30)
        raise AssertionError("a mismatched store handshake did not raise")
    except RuntimeError as e:
        assert "different arguments" in str(e)

    # A subgroup: ring neighbours are addressed by global rank; module-level calls cache one Communicator.
    sub = dist.new_group(ranks=[0, n - 1])
    if rank in (0, n - 1):
        s = torch.full((9,), float(rank + 1))
        paracomm.all_reduce(s, group=sub)
        assert torch.equal(s, torch.full((9,), float(1 + n)))
        sub_comm = paracomm.comm._communicator_for(sub)
        assert sub_comm is paracomm.comm._communicator_for(sub)
        assert (sub_comm.rank, sub_comm.world_size) == ((0, 1)[rank == n - 1], 2)

    return True


def test_async_numpy_scale_found_inf_mismatch_subgroup():
    run_ranks(3, _misc, timeout=240)


# ------------------------------------------------------------------------------------------------------------
# Refused inputs (one process): clear errors naming the argument, nothing written
# ------------------------------------------------------------------------------------------------------------


def _bad_inputs(rank, world_size):
    import paracomm

    comm = paracomm.Communicator()
    x = torch.randn(12)
    cases = [
        (dict(tensor=torch.randn(4, 6)[:, ::2]), ValueError, "contiguous"),
        (dict(tensor=torch.arange(6, dtype=torch.uint8)), TypeError, "unsupported dtype"),
        (dict(tensor=torch.ones(3, dtype=torch.complex64)), TypeError, "unsupported dtype"),
        (dict(tensor=[1.0, 2.0]), TypeError, "tensor must be"),
        (dict(tensor=torch.randn(4, dtype=torch.float64), wire_dtype=torch.bfloat16), ValueError, "wire_dtype"),
        (dict(tensor=torch.randn(4, dtype=torch.float16), wire_dtype=torch.float16), ValueError, "wire_dtype"),
        (dict(tensor=x, wire_dtype=torch.float32), ValueError, "wire_dtype"),
        (dict(tensor=x, wire_dtype="bf16"), TypeError, "wire_dtype"),
        (dict(tensor=torch.arange(5, dtype=torch.int32), op="avg"), ValueError, "avg"),
        (dict(tensor=x, op="max"), ValueError, "op must be"),
        (dict(tensor=x, op=None), TypeError, "op must be"),
        (dict(tensor=x, op=dist.ReduceOp.PRODUCT), ValueError, "not supported"),
        (dict(tensor=x, algorithm="tree"), ValueError, "algorithm must be one of"),
        (dict(tensor=x, algorithm=2), TypeError, "algorithm must be one of"),
        (dict(tensor=torch.empty(4, device="meta")), ValueError, "meta"),
        (dict(tensor=x, op="avg", scale=torch.ones(2)), ValueError, "scale must have exactly one"),
        (dict(tensor=x, op="avg", scale=torch.ones(1, dtype=torch.float64)), TypeError, "scale must be torch.float32"),
        (dict(tensor=x, op="avg", scale=0.5), TypeError, "scale must be None"),
        (dict(tensor=x, op="avg", scale=torch.ones(1, device="meta")), ValueError, "scale is on meta"),
        (dict(tensor=torch.arange(4), scale=torch.ones(1)), ValueError, "scale needs a floating"),
        (dict(tensor=x, found_inf=torch.zeros(3)), ValueError, "found_inf must have exactly one"),
        (dict(tensor=x, found_inf=torch.zeros(1, dtype=torch.float16)), TypeError, "found_inf must be torch.float32"),
        (dict(tensor=x, found_inf=torch.zeros(1, device="meta")), ValueError, "found_inf is on meta"),
    ]
    for kwargs, err, match in cases:
        t = kwargs["tensor"]
        before = t.clone() if isinstance(t, torch.Tensor) and t.device.type == "cpu" else None
        scale = kwargs.get("scale")
        try:
            comm.all_reduce(**kwargs)
            raise AssertionError(f"not refused: {kwargs}")
        except err as e:
            assert match in str(e) and "paracomm" in str(e), (match, str(e))
        if before is not None:
            assert torch.equal(t, before), kwargs
        if isinstance(scale, torch.Tensor) and scale.device.type == "cpu":
            assert torch.equal(scale, torch.ones_like(scale))
    # A read-only NumPy array cannot be written through __dlpack__: refused before anything happens.
    ro = np.arange(4, dtype=np.float32)
    ro.setflags(write=False)
    try:
        comm.all_reduce(ro)
        raise AssertionError("a read-only array was accepted")
    except ValueError as e:
        assert "paracomm" in str(e) and "read-only" in str(e), str(e)
    assert np.array_equal(ro, np.arange(4, dtype=np.float32))
    # World size 1: no communication; avg divides by 1, scale and found_inf still apply, wire is ignored.
    y = x.clone()
    found = torch.zeros(1)
    assert comm.all_reduce(y, "avg", wire_dtype=torch.float16, scale=torch.tensor([2.0]), found_inf=found) is y
    assert torch.equal(y, x * 2) and found.item() == 0.0
    y[3] = float("inf")
    comm.all_reduce(y, found_inf=found)
    assert found.item() == 1.0
    # Communicator arguments.
    for kwargs, err, match in ((dict(timeout=5), TypeError, "timeout"),
                               (dict(timeout=timedelta(seconds=0)), ValueError, "timeout"),
                               (dict(algorithm="fast"), ValueError, "algorithm")):
        try:
            paracomm.Communicator(**kwargs)
            raise AssertionError(f"Communicator accepted {kwargs}")
        except err as e:
            assert match in str(e)
    return True


def test_bad_inputs_refused_and_nothing_written():
    assert run_ranks(1, _bad_inputs) == [True]


# ------------------------------------------------------------------------------------------------------------
# A rank dying mid-call
# ------------------------------------------------------------------------------------------------------------


def _victim(rank, world_size, timeout_s, mode, algo):
    import types

    import paracomm
    import paracomm._cpu_executor as executor

    comm = paracomm.Communicator(timeout=timedelta(seconds=timeout_s), algorithm=algo)
    t = torch.ones(30_000)
    comm.all_reduce(t)  # a healthy call first (it also checks the signature, so the next call goes straight in)
    if rank == world_size - 1:
        def fail(*args, **kwargs):
            # ring/direct: the first reduction of the next call, after the first transfers, mid-plan.
            if mode == "hang":  # alive but silent: the others can only notice through their timeout
                time.sleep(timeout_s + 5)
            os._exit(1)
        if algo == "one_shot":
            # one_shot's only reduction comes after every transfer: peers would already have all they need,
            # so fail before the transfers instead.
            executor.CpuExecutor.run = fail
        else:
            executor.ops = types.SimpleNamespace(reduce_=fail)
    start = time.monotonic()
    try:
        comm.all_reduce(torch.ones(30_000))
    except RuntimeError as e:
        message = str(e)
    else:
        message = "no error"
    elapsed = time.monotonic() - start
    try:  # the communicator refuses further use instead of hanging again
        comm.all_reduce(torch.ones(30_000))
        later = "no error"
    except RuntimeError as e:
        later = str(e)
    return message, elapsed, later


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("mode", ["die", "hang"])
def test_rank_dead_or_hung_mid_call_makes_the_others_raise(mode, algo):
    timeout_s = 3.0
    # The fault is injected into the gloo executor's Python loop (tests/test_shm.py kills shm ranks for real).
    results = run_ranks(3, _victim, timeout_s, mode, algo, timeout=120, allow_missing=(2,),
                        env={"PARACOMM_CPU_TRANSPORT": "gloo"})
    assert results[2] is None
    for message, elapsed, later in results[:2]:
        assert "paracomm" in message and ("timeout" in message or "peer" in message), message
        assert elapsed < timeout_s + 10, f"took {elapsed:.1f} s to notice a {mode} rank"
        assert "failed earlier" in later, later


# ------------------------------------------------------------------------------------------------------------
# paracomm's async calls and the user's own collectives on the same group never deadlock
# ------------------------------------------------------------------------------------------------------------


def _interleaved(rank, world_size, iters):
    import paracomm

    n = world_size
    for i in range(iters):
        # An async paracomm all-reduce in flight while the main thread runs torch collectives on the same group.
        a = torch.full((1000 + i,), float(rank + 1))
        b = torch.full((7,), float(rank))
        w = paracomm.all_reduce(a, async_op=True, algorithm=ALGOS[i % 3])
        dist.all_reduce(b)
        if i % 10 == 0:
            dist.barrier()
        assert w.wait() is a
        assert torch.equal(a, torch.full((1000 + i,), float(n * (n + 1) // 2)))
        assert torch.equal(b, torch.full((7,), float(n * (n - 1) // 2)))
    return True


@pytest.mark.parametrize("world_size", [2, 4])
def test_async_paracomm_and_torch_collectives_interleave_without_deadlock(world_size):
    # Before the private group, `w = all_reduce(a, async_op=True); dist.all_reduce(b); w.wait()` hung every rank.
    assert run_ranks(world_size, _interleaved, 100, timeout=300) == [True] * world_size


# ------------------------------------------------------------------------------------------------------------
# The compressed wire's error does not grow with N (direct and one_shot), on real processes
# ------------------------------------------------------------------------------------------------------------


def _compressed_error(rank, world_size, algo):
    import paracomm

    numel = 1 << 17
    x = _normal(rank, numel, torch.float32, salt=77)
    exact = sum(_normal(r, numel, torch.float32, salt=77).double() for r in range(world_size)) / world_size
    errors = {}
    for wire in (torch.float16, torch.bfloat16):
        y = x.clone()
        paracomm.all_reduce(y, "avg", wire_dtype=wire, algorithm=algo)
        errors[str(wire)] = ((y.double() - exact).norm() / exact.norm()).item()
    return errors


@pytest.mark.parametrize("algo", ["direct", "one_shot"])
def test_compressed_error_bounded_and_flat_in_world_size(algo):
    errors = {n: run_ranks(n, _compressed_error, algo, timeout=240)[0] for n in (2, 4, 8)}
    for wire, bound in (("torch.bfloat16", 2.5e-3), ("torch.float16", 3.1e-4)):
        per_n = [errors[n][wire] for n in (2, 4, 8)]
        assert max(per_n) <= bound, (algo, wire, per_n)
        assert per_n[2] <= 1.1 * per_n[0], (algo, wire, per_n)
