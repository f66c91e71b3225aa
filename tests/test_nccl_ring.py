"""GPU tests of the NCCL ring executor through the raw binding (paracomm._C.NcclComm).

Several ranks share the one GPU of the test machine: each rank gets its own NCCL_HOSTID (set inside the rank
function, before NCCL first runs) and traffic goes over the socket transport on loopback (DESIGN.md, "Several
ranks on one GPU"). Every multi-rank run has a deadline (run_ranks) and every communicator a timeout.

Results are compared bitwise with torch.distributed.all_reduce (gloo, on CPU, in float64/int64) on
integer-valued data, where every summation order gives the same exact value, so the ring's bits must match.
"""
import os
import time

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks

pytestmark = pytest.mark.cuda

CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3, torch.int32: 4, torch.int64: 5}
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
NCCL_ENV = {
    "NCCL_SOCKET_IFNAME": "lo",
    "NCCL_P2P_DISABLE": "1",
    "NCCL_SHM_DISABLE": "1",
    "NCCL_IB_DISABLE": "1",
}
TIMEOUT_S = 60.0
MiB = 1 << 20


def _binding():
    import paracomm._C as C

    assert hasattr(C, "NcclComm"), "paracomm._C was built without CUDA/NCCL"
    return C


@pytest.fixture(autouse=True)
def _needs_nccl_build():
    import paracomm._C as C

    if not hasattr(C, "NcclComm"):
        pytest.skip("paracomm._C was built without CUDA/NCCL")


# ---------------------------------------------------------------------------------------------------- helpers
def _make_comm(rank, world_size, timeout_s=TIMEOUT_S):
    """This rank's NcclComm on GPU 0; the unique id travels over the run's gloo group."""
    os.environ["NCCL_HOSTID"] = f"rank{rank}"  # each rank looks like its own node: no "Duplicate GPU"
    C = _binding()
    torch.cuda.set_device(0)
    box = [C.nccl_unique_id() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    comm = C.NcclComm(box[0], world_size, rank, 0, timeout_s)
    assert (comm.rank, comm.world_size, comm.device, comm.timeout_s) == (rank, world_size, 0, timeout_s)
    return comm


def _chunk_elems(dtype, wire, chunk_bytes):
    travel = wire if wire is not None else dtype
    return max(1, chunk_bytes // travel.itemsize)


def _all_reduce(comm, x, op="sum", wire=None, scale=None, found_inf=None, chunk_bytes=MiB, stream=None,
                workspace_bytes=None):
    """One in-place ring all_reduce of CUDA tensor x, as paracomm.comm will call it."""
    C = _binding()
    stream = stream or torch.cuda.current_stream()
    wire_code = -1 if wire is None else CODE[wire]
    chunk = _chunk_elems(x.dtype, wire, chunk_bytes)
    need = C.nccl_workspace_bytes(x.numel(), CODE[x.dtype], wire_code, chunk)
    with torch.cuda.stream(stream):
        ws = torch.empty(need, dtype=torch.uint8, device=x.device)
    divisor = float(comm.world_size) if op == "avg" else 1.0
    comm.all_reduce(x.data_ptr(), x.numel(), CODE[x.dtype], divisor, wire_code,
                    0 if scale is None else scale.data_ptr(), 0 if found_inf is None else found_inf.data_ptr(),
                    ws.data_ptr(), need if workspace_bytes is None else workspace_bytes, stream.cuda_stream, chunk)
    # The workspace is released right away: the contract says the caller's stream already waits for the ring.


def _data(case_id, rank, dtype, numel):
    g = torch.Generator().manual_seed(7919 * case_id + rank)
    if dtype == torch.int32:
        return torch.randint(-(1 << 20), 1 << 20, (numel,), generator=g, dtype=torch.int32)
    if dtype == torch.int64:
        return torch.randint(-(1 << 40), 1 << 40, (numel,), generator=g, dtype=torch.int64)
    # Small integers: every partial sum (N <= 4) is exact in fp16/bf16/fp32, and so is avg's division by N = 2, 4.
    return torch.randint(-8, 9, (numel,), generator=g).to(dtype)


def _reference(x_cpu, op, scale_value, world_size):
    """torch.distributed.all_reduce (gloo) of the exact values, then avg/scale, then the tensor's dtype."""
    wide = x_cpu.to(torch.float64 if x_cpu.is_floating_point() else torch.int64)
    dist.all_reduce(wide)
    if op == "avg":
        wide = wide / world_size
    if scale_value is not None:
        wide = wide * scale_value
    return wide.to(x_cpu.dtype)


def _bits(t):
    return t.contiguous().view(BITS[t.element_size()])


def _cases(world_size):
    """(dtype, numel, op, wire, chunk_bytes, scale, found_inf, inf_rank) covering every path of the executor."""
    cases = []
    small = sorted({0, 1, max(world_size - 1, 0), world_size + 1, 1000, 4099})
    for dtype in CODE:
        for numel in small:
            for op in (["sum", "avg"] if dtype.is_floating_point else ["sum"]):
                cases.append((dtype, numel, op, None, MiB, None, False, None))
    # Several chunks per segment, segments straddling chunk boundaries (4 KiB chunks).
    for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.float64):
        per = 4096 // dtype.itemsize
        cases.append((dtype, world_size * per * 3 + 7, "sum", None, 4096, None, False, None))
        cases.append((dtype, world_size * per - 1, "sum", None, 4096, None, False, None))
    # Compressed wire on float32.
    for wire in (torch.bfloat16, torch.float16):
        for numel in (1, 1000, 4099, MiB + 3):
            for op in ("sum", "avg"):
                cases.append((torch.float32, numel, op, wire, MiB, None, False, None))
        cases.append((torch.float32, world_size * 2048 * 2 + 5, "avg", wire, 4096, None, False, None))
    # scale and found_inf (finite data: found_inf stays 0; one rank's inf: found_inf 1 on every rank).
    cases.append((torch.float32, 10007, "avg", None, 4096, 0.5, True, None))
    cases.append((torch.float32, 10007, "avg", torch.bfloat16, 4096, 0.5, True, None))
    cases.append((torch.float16, 10007, "sum", None, 4096, None, True, 0))
    cases.append((torch.float32, 10007, "sum", torch.float16, 4096, 0.25, True, world_size - 1))
    cases.append((torch.float32, 3, "sum", None, MiB, None, True, world_size - 1))
    # Large: up to 64 MB, default 1 MiB chunks.
    cases.append((torch.float32, 16 * MiB, "sum", None, MiB, None, False, None))
    cases.append((torch.float32, 16 * MiB, "avg", torch.bfloat16, MiB, None, False, None))
    cases.append((torch.bfloat16, 32 * MiB, "sum", None, MiB, None, False, None))
    cases.append((torch.int64, 8 * MiB, "sum", None, MiB, None, False, None))
    return cases


def _run_case(comm, rank, world_size, case_id, case, stream=None):
    dtype, numel, op, wire, chunk_bytes, scale_value, want_found, inf_rank = case
    x_cpu = _data(case_id, rank, dtype, numel)
    if inf_rank == rank and numel > 0:
        x_cpu[numel // 2] = float("inf")
    x = x_cpu.cuda()
    scale = None if scale_value is None else torch.tensor([scale_value], device="cuda")
    found = torch.zeros(1, device="cuda") if want_found else None
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream())  # the inputs were written on the current stream
    _all_reduce(comm, x, op, wire, scale, found, chunk_bytes, stream=stream)
    torch.cuda.synchronize()
    comm.check()
    expected = _reference(x_cpu, op, scale_value, world_size)
    problems = []
    got = x.cpu()
    if not torch.equal(_bits(got), _bits(expected)):
        bad = (_bits(got) != _bits(expected)).nonzero().flatten()
        problems.append(f"{bad.numel()} elements differ, first at {bad[0].item()}: "
                        f"{got[bad[0]].item()} vs {expected[bad[0]].item()}")
    if found is not None:
        want = 1.0 if inf_rank is not None and numel > 0 else 0.0
        if found.item() != want:
            problems.append(f"found_inf {found.item()} != {want}")
    return [f"rank {rank} case {case_id} {case}: {p}" for p in problems]


# ---------------------------------------------------------------------------------------------- rank functions
def _rank_matches_torch(rank, world_size):
    comm = _make_comm(rank, world_size)
    problems = []
    for case_id, case in enumerate(_cases(world_size)):
        problems += _run_case(comm, rank, world_size, case_id, case)

    # A side stream, and several calls in flight at once on one communicator before a single synchronize.
    side = torch.cuda.Stream()
    problems += _run_case(comm, rank, world_size, 1000, (torch.float32, 50001, "sum", None, 4096, None, False, None),
                          stream=side)
    xs_cpu = [_data(2000 + k, rank, torch.float32, 3000 + 17 * k) for k in range(8)]
    xs = [t.cuda() for t in xs_cpu]
    for k, x in enumerate(xs):
        _all_reduce(comm, x, "avg" if k % 2 else "sum", torch.bfloat16 if k % 3 == 0 else None, chunk_bytes=4096)
    torch.cuda.synchronize()
    comm.check()
    for k, (x, x_cpu) in enumerate(zip(xs, xs_cpu)):
        expected = _reference(x_cpu, "avg" if k % 2 else "sum", None, world_size)
        if not torch.equal(_bits(x.cpu()), _bits(expected)):
            problems.append(f"rank {rank}: in-flight call {k} differs")

    # Refused calls raise, enqueue nothing, and leave the communicator usable (every rank refuses alike).
    C = _binding()
    x_cpu = _data(3000, rank, torch.float32, 5000)
    x = x_cpu.cuda()
    x_int = x.to(torch.int32)
    stream = torch.cuda.current_stream().cuda_stream
    refusals = {
        "wire_dtype": lambda: _all_reduce(comm, x.to(torch.float64), wire=torch.float16),
        "divisor": lambda: comm.all_reduce(x_int.data_ptr(), x_int.numel(), CODE[torch.int32], 2.0, -1, 0, 0, 0, 0,
                                           stream, 1),
        "DType code": lambda: comm.all_reduce(x.data_ptr(), x.numel(), 9, 1.0, -1, 0, 0, 0, 0, stream, 1),
    }
    if world_size > 1:  # world size 1 moves nothing and needs no workspace
        refusals["workspace_bytes"] = lambda: _all_reduce(comm, x, workspace_bytes=16)
    for needle, call in refusals.items():
        try:
            call()
            problems.append(f"rank {rank}: bad {needle} was not refused")
        except RuntimeError as e:
            if needle not in str(e):
                problems.append(f"rank {rank}: refusal of {needle} says {e}")
    torch.cuda.synchronize()
    if not torch.equal(x.cpu(), x_cpu):
        problems.append(f"rank {rank}: a refused call changed the data")
    comm.check()
    _all_reduce(comm, x)
    torch.cuda.synchronize()
    if not torch.equal(_bits(x.cpu()), _bits(_reference(x_cpu, "sum", None, world_size))):
        problems.append(f"rank {rank}: call after refusals differs")
    assert C.nccl_workspace_bytes(0, 0, -1, 1) == 0
    del comm  # clean shutdown: finalize + destroy within the timeout
    return problems


def _rank_steady_memory(rank, world_size):
    """2,000 back-to-back calls (synchronised every 100) allocate nothing that stays."""
    comm = _make_comm(rank, world_size)
    x_cpu = _data(4000, rank, torch.float32, 4096)
    x = x_cpu.cuda()
    # avg of values that are already equal on every rank leaves them unchanged: the result stays checkable.
    expected = _reference(x_cpu, "avg", None, world_size)

    def burst(calls):
        for k in range(calls):
            _all_reduce(comm, x, "avg", torch.bfloat16 if k % 2 else None, chunk_bytes=4096)
            if k % 100 == 99:
                torch.cuda.synchronize()
        torch.cuda.synchronize()

    def rss_bytes():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    burst(300)  # warm-up: NCCL connections, the event pool, torch's caching allocator
    rss0, alloc0 = rss_bytes(), torch.cuda.memory_allocated()
    burst(2000)
    rss1, alloc1 = rss_bytes(), torch.cuda.memory_allocated()
    comm.check()
    ok = torch.equal(_bits(x.cpu()), _bits(expected))
    return rss1 - rss0, alloc1 - alloc0, ok


def _all_reduce_until_error(comm, x, timeout_s):
    """Start an all-reduce a peer will never join and poll check() until the watchdog reports it (or give up
    30 s past the timeout). Returns (the error text or None, seconds it took)."""
    start = time.monotonic()
    error = None
    try:
        _all_reduce(comm, x)
        while time.monotonic() - start < timeout_s + 30:
            comm.check()
            time.sleep(0.05)
    except RuntimeError as e:
        error = str(e)
    return error, time.monotonic() - start


def _rank_killed_peer(rank, world_size, timeout_s):
    comm = _make_comm(rank, world_size, timeout_s)
    x = _data(5000, rank, torch.float32, 1 << 16).cuda()
    _all_reduce(comm, x)
    torch.cuda.synchronize()
    comm.check()
    dist.barrier()
    if rank == world_size - 1:
        os._exit(0)  # dies without a word: no destructor, no NCCL shutdown
    time.sleep(1.0)
    error, elapsed = _all_reduce_until_error(comm, x, timeout_s)
    torch.cuda.synchronize()  # the abort released the kernels that waited for the dead peer
    try:
        _all_reduce(comm, x)
        later = None
    except RuntimeError as e:
        later = str(e)
    return error, elapsed, later


def _rank_stalled_peer(rank, world_size, timeout_s):
    comm = _make_comm(rank, world_size, timeout_s)
    x = _data(6000, rank, torch.float32, 1 << 12).cuda()
    _all_reduce(comm, x)
    torch.cuda.synchronize()
    dist.barrier()
    if rank == 1:
        time.sleep(timeout_s + 6)  # alive but absent from the next all_reduce
        comm.abort()
        comm.abort()  # idempotent
        try:
            comm.check()
            return "check() did not raise after abort()"
        except RuntimeError as e:
            return str(e)
    error, elapsed = _all_reduce_until_error(comm, x, timeout_s)
    torch.cuda.synchronize()
    return error, elapsed


def _rank_init_without_peers(rank, world_size, timeout_s):
    os.environ["NCCL_HOSTID"] = "rank0"
    C = _binding()
    start = time.monotonic()
    try:
        C.NcclComm(C.nccl_unique_id(), 2, 0, 0, timeout_s)  # rank 1 never joins
        return None, time.monotonic() - start
    except RuntimeError as e:
        return str(e), time.monotonic() - start


# ------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ring_matches_torch_all_reduce_bitwise(world_size):
    results = run_ranks(world_size, _rank_matches_torch, timeout=900, env=NCCL_ENV, pg_timeout_s=600)
    problems = [p for r in results for p in r]
    assert not problems, "\n".join(problems[:20])


def test_back_to_back_calls_do_not_grow_memory():
    results = run_ranks(2, _rank_steady_memory, timeout=600, env=NCCL_ENV)
    for rank, (rss_growth, alloc_growth, ok) in enumerate(results):
        assert ok, f"rank {rank}: result changed across 2,000 calls"
        assert alloc_growth == 0, f"rank {rank}: CUDA memory grew by {alloc_growth} bytes"
        assert rss_growth < 16 * MiB, f"rank {rank}: host memory grew by {rss_growth} bytes"


def test_killed_rank_makes_the_others_raise_within_the_timeout():
    timeout_s = 15.0
    for world_size in (2, 4):
        results = run_ranks(world_size, _rank_killed_peer, timeout_s, timeout=240, env=NCCL_ENV,
                            allow_missing=(world_size - 1,))
        for rank, result in enumerate(results[:-1]):
            error, elapsed, later = result
            assert error is not None, f"rank {rank} of {world_size} never raised"
            assert elapsed < timeout_s + 10, f"rank {rank} raised after {elapsed:.1f} s"
            assert later is not None and "unusable" in later, later


def test_stalled_rank_times_out_and_abort_is_idempotent():
    timeout_s = 8.0
    (error, elapsed), after_abort = run_ranks(2, _rank_stalled_peer, timeout_s, timeout=240, env=NCCL_ENV)
    assert error is not None, "rank 0 never raised"
    assert elapsed < timeout_s + 10, f"rank 0 raised after {elapsed:.1f} s"
    assert "unusable" in error
    assert "unusable" in after_abort


def test_init_times_out_when_a_rank_never_joins():
    timeout_s = 5.0
    [(error, elapsed)] = run_ranks(1, _rank_init_without_peers, timeout_s, timeout=120, env=NCCL_ENV)
    assert error is not None and "did not complete within" in error, error
    assert elapsed < timeout_s + 30
