"""GPU tests of the NCCL plan executor and communicator through the raw binding (paracomm._C.NcclComm).

Several ranks share the one GPU of the test machine: each rank gets its own NCCL_HOSTID (set inside the rank
function, before NCCL first runs) and traffic goes over the socket transport on loopback (docs/ARCHITECTURE.md, "Several
ranks on one GPU"). Every multi-rank run has a deadline (run_ranks) and every communicator a timeout.

Every algorithm (ring, direct, one_shot) x dtype x wire dtype x size (0, 1, < N, odd, ~1e6) on random data:
  * the result has the same bits on every rank;
  * it has the bits of paracomm's CPU executor running the same algorithm over gloo on the same data (both
    executors run plans of the same algorithm, which reduce every element in the same order);
  * it is within the rounding bound of a float64 reference (exact for integers).
Then: calls in flight on several streams, refusals that leave the communicator usable, a capturing stream
refused, a user's global-mode graph capture (begun while a call is pending) undisturbed by the watchdog, dead /
stalled / absent peers raising within the timeout, destruction completing healthy pending work and aborting
failed work at its deadline.
"""
import hashlib
import os
import time

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks

pytestmark = pytest.mark.cuda

CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3, torch.int32: 4, torch.int64: 5}
ALGORITHMS = {"ring": 0, "direct": 1, "one_shot": 2}
BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
# Unit roundoff of each dtype (integers: exact).
UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}
NCCL_ENV = {
    "NCCL_SOCKET_IFNAME": "lo",
    "NCCL_P2P_DISABLE": "1",
    "NCCL_SHM_DISABLE": "1",
    "NCCL_IB_DISABLE": "1",
}
TIMEOUT_S = 60.0


@pytest.fixture(autouse=True)
def _needs_nccl_build():
    import paracomm._C as C

    if not hasattr(C, "NcclComm"):
        pytest.skip("paracomm._C was built without CUDA/NCCL")


# ---------------------------------------------------------------------------------------------------- helpers
def _binding():
    import paracomm._C as C

    return C


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


def _workspace_bytes(numel, dtype, wire, world_size, rank, algorithm, has_found_inf, has_final_op, chunk_bytes):
    """Device bytes this rank's plan needs (the plan binding paracomm.comm sizes the workspace with)."""
    summary = _binding().plan_summary(numel, CODE[dtype], -1 if wire is None else CODE[wire], world_size, rank,
                                      algorithm, "nccl", has_found_inf, has_final_op, chunk_bytes)
    return int(summary["workspace_bytes"])


def _all_reduce(comm, x, op="sum", wire=None, algorithm="ring", scale=None, found_inf=None, stream=None,
                workspace_bytes=None, chunk_bytes=0):
    """One in-place all_reduce of CUDA tensor x through the raw binding, as paracomm.comm calls it: the
    workspace is allocated on the call's stream and released as soon as the call returns."""
    stream = stream or torch.cuda.current_stream()
    wire_code = -1 if wire is None else CODE[wire]
    need = _workspace_bytes(x.numel(), x.dtype, wire, comm.world_size, comm.rank, algorithm, found_inf is not None,
                            op == "avg" or scale is not None or found_inf is not None, chunk_bytes)
    with torch.cuda.stream(stream):
        ws = torch.empty(max(need, 1), dtype=torch.uint8, device=x.device)
    divisor = float(comm.world_size) if op == "avg" else 1.0
    comm.all_reduce(x.data_ptr(), x.numel(), CODE[x.dtype], divisor, wire_code,
                    0 if scale is None else scale.data_ptr(), 0 if found_inf is None else found_inf.data_ptr(),
                    ws.data_ptr(), need if workspace_bytes is None else workspace_bytes, stream.cuda_stream,
                    ALGORITHMS[algorithm], chunk_bytes)
    del ws  # the raw call is synchronous (`stream` waited for it): the allocator may reuse it at once


def _data(case_id, rank, dtype, numel):
    g = torch.Generator().manual_seed(7919 * case_id + rank)
    if dtype == torch.int32:
        return torch.randint(-(1 << 28), 1 << 28, (numel,), generator=g, dtype=torch.int32)
    if dtype == torch.int64:
        return torch.randint(-(1 << 60), 1 << 60, (numel,), generator=g, dtype=torch.int64)
    return (torch.randn(numel, generator=g, dtype=torch.float64) * 3).to(dtype)


def _bits(t):
    t = t.contiguous()
    return t.view(BITS[t.element_size()])


def _digest(t):
    return hashlib.sha256(_bits(t.cpu()).numpy().tobytes()).hexdigest()


def _within_reference(got, xs_all, op, scale_value, wire, world_size):
    """got vs the float64 sum of every rank's input (avg, scale applied), within (N + 3) unit roundoffs of
    the least precise dtype involved times the sum of magnitudes (integers: exact)."""
    if not got.is_floating_point():
        wide = sum(x.to(torch.int64) for x in xs_all)
        return torch.equal(got.cpu(), wide.to(got.dtype))
    ref = sum(x.double() for x in xs_all)
    mag = sum(x.double().abs() for x in xs_all)
    factor = (1.0 / world_size if op == "avg" else 1.0) * (scale_value if scale_value is not None else 1.0)
    ref, mag = ref * factor, mag * abs(factor)
    unit = max(UNIT[got.dtype], UNIT[wire] if wire is not None else 0.0)
    bound = (world_size + 3) * unit * mag + 1e-300
    return bool(((got.cpu().double() - ref).abs() <= bound).all())


def _cases(world_size):
    """(dtype, wire, numel, op, scale, found_inf, inf_rank, chunk_bytes) for every algorithm."""
    sizes = sorted({0, 1, max(world_size - 1, 1), 4099, 1_000_003})
    cases = []
    for dtype in CODE:
        # ~1e6 elements for one dtype per accumulation family (the rest stop at 4099: the GPU step has a budget).
        for numel in (sizes if dtype in (torch.float32, torch.bfloat16, torch.int64) else sizes[:-1]):
            for op in (["sum", "avg"] if dtype.is_floating_point else ["sum"]):
                cases.append((dtype, None, numel, op, None, False, None, 0))
    for wire in (torch.float16, torch.bfloat16):
        for numel in sizes:
            for op in ("sum", "avg"):
                cases.append((torch.float32, wire, numel, op, None, False, None, 0))
    # scale and found_inf: finite data (stays 0), one rank's inf (1 on every rank), uncompressed and compressed.
    for wire in (None, torch.bfloat16):
        cases.append((torch.float32, wire, 10007, "avg", 0.5, True, None, 0))
        cases.append((torch.float32, wire, 10007, "sum", 0.25, True, world_size - 1, 0))
    cases.append((torch.float16, None, 4099, "sum", None, True, 0, 0))
    # Small pieces: many pipelined steps (ring hops x chunks, direct's alternating receive slots).
    cases.append((torch.float32, None, 50007, "sum", None, False, None, 4096))
    cases.append((torch.float32, torch.bfloat16, 50007, "avg", None, True, None, 4096))
    cases.append((torch.bfloat16, None, 30011, "sum", None, False, None, 4096))
    cases.append((torch.int64, None, 20011, "sum", None, False, None, 4096))
    cases.append((torch.float64, None, 20011, "avg", 2.0, False, None, 8192))
    return cases


# ---------------------------------------------------------------------------------------------- rank functions
def _rank_every_algorithm(rank, world_size):
    import paracomm

    comm = _make_comm(rank, world_size)
    problems = []
    algorithms = [a for a in ALGORITHMS if a == "ring" or world_size <= 32]
    for algorithm in algorithms:
        for case_id, case in enumerate(_cases(world_size)):
            dtype, wire, numel, op, scale_value, want_found, inf_rank, chunk_bytes = case
            tag = f"rank {rank} {algorithm} case {case_id} {case}"
            xs_all = [_data(case_id, r, dtype, numel) for r in range(world_size)]
            if inf_rank is not None and numel > 0:
                xs_all[inf_rank][numel // 2] = float("inf")
            x = xs_all[rank].cuda()
            scale = None if scale_value is None else torch.tensor([scale_value], device="cuda")
            found = torch.zeros(1, device="cuda") if want_found else None
            _all_reduce(comm, x, op, wire, algorithm, scale, found, chunk_bytes=chunk_bytes)
            torch.cuda.synchronize()
            comm.check()
            got = x.cpu()
            # 1. the same bits on every rank
            digests = [None] * world_size
            dist.all_gather_object(digests, _digest(got))
            if len(set(digests)) != 1:
                problems.append(f"{tag}: ranks disagree")
            # 2. the CPU executor's bits for the same algorithm
            cpu_x = xs_all[rank].clone()
            cpu_found = torch.zeros(1) if want_found else None
            cpu_scale = None if scale_value is None else torch.tensor([scale_value])
            paracomm.all_reduce(cpu_x, op, wire_dtype=wire, algorithm=algorithm, scale=cpu_scale,
                                found_inf=cpu_found)
            if not torch.equal(_bits(got), _bits(cpu_x)):
                bad = (_bits(got) != _bits(cpu_x)).nonzero().flatten()
                problems.append(f"{tag}: {bad.numel()} elements differ from the CPU executor, first at "
                                f"{bad[0].item()}: {got[bad[0]].item()} vs {cpu_x[bad[0]].item()}")
            # 3. the float64 reference, within rounding (skipped where one rank holds an inf)
            if inf_rank is None and not _within_reference(got, xs_all, op, scale_value, wire, world_size):
                problems.append(f"{tag}: outside the float64 reference's bound")
            if found is not None:
                want = 1.0 if inf_rank is not None and numel > 0 else 0.0
                if found.item() != want or cpu_found.item() != want:
                    problems.append(f"{tag}: found_inf {found.item()} (CPU {cpu_found.item()}) != {want}")
    assert comm.last_enqueue_us > 0.0
    del comm  # clean shutdown: finalize + destroy within the timeout
    return problems


def _rank_streams_and_refusals(rank, world_size):
    comm = _make_comm(rank, world_size)
    problems = []
    n = world_size
    # Several calls in flight at once, on two streams and every algorithm, before a single synchronize.
    side = torch.cuda.Stream()
    xs_cpu = [[_data(2000 + k, r, torch.float32, 3000 + 17 * k) for r in range(n)] for k in range(9)]
    xs = [per_rank[rank].cuda() for per_rank in xs_cpu]
    side.wait_stream(torch.cuda.current_stream())
    for k, x in enumerate(xs):
        algorithm = list(ALGORITHMS)[k % 3]
        stream = side if k % 2 else torch.cuda.current_stream()
        if stream is side:
            x.record_stream(side)
        _all_reduce(comm, x, "avg" if k % 2 else "sum", torch.bfloat16 if k % 4 == 0 else None, algorithm,
                    stream=stream)
    torch.cuda.synchronize()
    comm.check()
    for k, x in enumerate(xs):
        digests = [None] * n
        dist.all_gather_object(digests, _digest(x))
        if len(set(digests)) != 1:
            problems.append(f"rank {rank}: in-flight call {k} differs across ranks")
        if not _within_reference(x.cpu(), xs_cpu[k], "avg" if k % 2 else "sum", None,
                                 torch.bfloat16 if k % 4 == 0 else None, n):
            problems.append(f"rank {rank}: in-flight call {k} is outside the reference's bound")

    # Refused calls raise, enqueue nothing, and leave the communicator usable (every rank refuses alike).
    x_cpu = _data(3000, rank, torch.float32, 5000)
    x = x_cpu.cuda()
    x_int = x.to(torch.int32)
    stream = torch.cuda.current_stream().cuda_stream
    refusals = {
        "wire_dtype": lambda: comm.all_reduce(x.data_ptr(), x.numel(), 3, 1.0, 1, 0, 0, 0, 1 << 30, stream, 0, 0),
        "divisor": lambda: comm.all_reduce(x_int.data_ptr(), x_int.numel(), CODE[torch.int32], 2.0, -1, 0, 0, 0,
                                           1 << 30, stream, 0, 0),
        "dtype": lambda: comm.all_reduce(x.data_ptr(), x.numel(), 9, 1.0, -1, 0, 0, 0, 0, stream, 0, 0),
        "algorithm": lambda: comm.all_reduce(x.data_ptr(), x.numel(), 0, 1.0, -1, 0, 0, 0, 0, stream, 7, 0),
        "workspace_bytes": lambda: _all_reduce(comm, x, workspace_bytes=16),
        "ptr": lambda: comm.all_reduce(0, x.numel(), 0, 1.0, -1, 0, 0, 0, 1 << 30, stream, 0, 0),
    }
    if world_size == 1:
        del refusals["workspace_bytes"]  # nothing travels: no workspace needed
    for needle, call in refusals.items():
        try:
            call()
            problems.append(f"rank {rank}: bad {needle} was not refused")
        except (RuntimeError, ValueError, TypeError) as e:
            if needle not in str(e):
                problems.append(f"rank {rank}: refusal of {needle} says {e}")
    # A capturing stream is refused before anything is enqueued, and the capture itself survives.
    g = torch.cuda.CUDAGraph()
    y = torch.ones(16, device="cuda")
    with torch.cuda.graph(g):
        try:
            _all_reduce(comm, x)
            problems.append(f"rank {rank}: all_reduce under graph capture was not refused")
        except RuntimeError as e:
            if "captur" not in str(e):
                problems.append(f"rank {rank}: capture refusal says {e}")
        y.mul_(2.0)
    g.replay()
    torch.cuda.synchronize()
    if not torch.equal(y.cpu(), torch.full((16,), 2.0)):
        problems.append(f"rank {rank}: the captured graph did not replay")
    if not torch.equal(x.cpu(), x_cpu):
        problems.append(f"rank {rank}: a refused call changed the data")
    comm.check()
    xs_all = [_data(3000, r, torch.float32, 5000) for r in range(n)]
    _all_reduce(comm, x, algorithm="direct" if n <= 32 else "ring")
    torch.cuda.synchronize()
    if not _within_reference(x.cpu(), xs_all, "sum", None, None, n):
        problems.append(f"rank {rank}: call after refusals is wrong")
    return problems


def _rank_watchdog_keeps_global_capture(rank, world_size):
    """A user captures a graph in global mode while an all_reduce is pending, so the watchdog is querying its
    completion event during the capture: with its capture mode relaxed, the capture must not be invalidated.
    torch.cuda.graph() synchronises the device first (nothing would be pending), so the capture is begun by hand
    on a side stream; rank 1 joins each call late, which keeps rank 0's call pending through the capture."""
    comm = _make_comm(rank, world_size)
    x = _data(4000, rank, torch.float32, 1 << 20).cuda()
    _all_reduce(comm, x, "avg")  # warm: later enqueues return at once
    torch.cuda.synchronize()
    results = []
    for _ in range(3):
        dist.barrier()
        if rank == 1:
            time.sleep(1.0)
            _all_reduce(comm, x, "avg")
            torch.cuda.synchronize()
            results.append((True, 50.0))
            continue
        _all_reduce(comm, x, "avg")
        pending = torch.cuda.Event()
        pending.record()
        was_pending = not pending.query()  # rank 1 has not joined yet
        g = torch.cuda.CUDAGraph()
        y = torch.zeros(1024, device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            g.capture_begin(capture_error_mode="global")
            for _ in range(50):
                y.add_(1.0)
                time.sleep(0.004)  # ~100 watchdog rounds (2 ms each while work is pending)
            g.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        g.replay()
        torch.cuda.synchronize()
        results.append((was_pending, float(y[0].item())))
    comm.check()
    return results


def _rank_steady_memory(rank, world_size):
    """2,000 back-to-back calls (synchronised every 100) allocate nothing that stays."""
    comm = _make_comm(rank, world_size)
    x_cpu = _data(4000, rank, torch.float32, 4096)
    x = x_cpu.cuda()
    dist.all_reduce(x_cpu)  # sum over ranks: equal everywhere, so avg leaves it unchanged up to rounding
    x = (x_cpu / world_size).cuda()

    def burst(calls):
        for k in range(calls):
            _all_reduce(comm, x, "avg", None, list(ALGORITHMS)[k % 3])
            if k % 100 == 99:
                torch.cuda.synchronize()
        torch.cuda.synchronize()

    def rss_bytes():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    burst(300)  # warm-up: NCCL connections, the event pool, the plan cache, torch's caching allocator
    rss0, alloc0 = rss_bytes(), torch.cuda.memory_allocated()
    burst(2000)
    rss1, alloc1 = rss_bytes(), torch.cuda.memory_allocated()
    comm.check()
    digests = [None] * world_size
    dist.all_gather_object(digests, _digest(x))
    return rss1 - rss0, alloc1 - alloc0, len(set(digests)) == 1, comm.last_enqueue_us


def _all_reduce_until_error(comm, x, timeout_s, algorithm="ring"):
    """Start an all-reduce a peer will never join and poll check() until the watchdog reports it (or give up
    30 s past the timeout). The blocking enqueue itself may be what raises (a peer never connected).
    Returns (the error text or None, seconds it took)."""
    start = time.monotonic()
    error = None
    try:
        _all_reduce(comm, x, algorithm=algorithm)
        while time.monotonic() - start < timeout_s + 30:
            comm.check()
            time.sleep(0.05)
    except RuntimeError as e:
        error = str(e)
    return error, time.monotonic() - start


def _rank_killed_peer(rank, world_size, timeout_s, algorithm):
    comm = _make_comm(rank, world_size, timeout_s)
    x = _data(5000, rank, torch.float32, 1 << 16).cuda()
    _all_reduce(comm, x, algorithm=algorithm)
    torch.cuda.synchronize()
    comm.check()
    dist.barrier()
    if rank == world_size - 1:
        os._exit(0)  # dies without a word: no destructor, no NCCL shutdown
    time.sleep(1.0)
    error, elapsed = _all_reduce_until_error(comm, x, timeout_s, algorithm)
    torch.cuda.synchronize()  # the abort released the kernels that waited for the dead peer
    try:
        _all_reduce(comm, x, algorithm=algorithm)
        later = None
    except RuntimeError as e:
        later = str(e)
    return error, elapsed, later


def _rank_stalled_peer(rank, world_size, timeout_s, warm):
    """Rank 1 is alive but skips an all_reduce. warm: a first call connected the peers, so rank 0's enqueue
    returns and its completion deadline expires; cold: rank 0's enqueue polls its in-progress NCCL group (rank 1
    never connects) and the enqueue deadline expires."""
    comm = _make_comm(rank, world_size, timeout_s)
    x = _data(6000, rank, torch.float32, 1 << 12).cuda()
    if warm:
        _all_reduce(comm, x)
        torch.cuda.synchronize()
    dist.barrier()
    if rank == 1:
        time.sleep(timeout_s + 6)
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


def _rank_destroy_with_pending_work(rank, world_size, timeout_s):
    """Rank 0 destroys its communicator while an all_reduce that rank 1 never joins is pending: destruction waits
    for it until its deadline (timeout_s after the enqueue), then aborts (failed work) and releases the GPU."""
    comm = _make_comm(rank, world_size, timeout_s)
    x = _data(7000, rank, torch.float32, 1 << 16).cuda()
    _all_reduce(comm, x)
    torch.cuda.synchronize()
    dist.barrier()
    if rank == 1:
        time.sleep(timeout_s + 8)  # absent from the next call
        dist.barrier()
        return None
    _all_reduce(comm, x)
    start = time.monotonic()
    del comm
    destroyed = time.monotonic() - start
    torch.cuda.synchronize()  # the abort released the kernel waiting for rank 1
    synced = time.monotonic() - start
    dist.barrier()
    return destroyed, synced


def _rank_destroy_healthy_pending(rank, world_size, timeout_s):
    """Every rank destroys its communicator right after enqueuing a large all_reduce: healthy pending work is
    waited for (not aborted), so every rank gets the right result."""
    comm = _make_comm(rank, world_size, timeout_s)
    xs_all = [_data(7100, r, torch.float32, 16 << 20) for r in range(world_size)]
    x = xs_all[rank].cuda()
    _all_reduce(comm, x)
    torch.cuda.synchronize()
    x = xs_all[rank].cuda()
    torch.cuda.synchronize()
    _all_reduce(comm, x, algorithm="ring")
    start = time.monotonic()
    del comm  # the call is (almost certainly) still running on the GPU
    destroyed = time.monotonic() - start
    torch.cuda.synchronize()
    return destroyed, bool(_within_reference(x.cpu(), xs_all, "sum", None, None, world_size))


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
@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_algorithm_matches_cpu_executor_and_reference(world_size):
    results = run_ranks(world_size, _rank_every_algorithm, timeout=1500, env=NCCL_ENV, pg_timeout_s=900)
    problems = [p for r in results for p in r]
    assert not problems, "\n".join(problems[:20])


@pytest.mark.parametrize("world_size", [1, 2, pytest.param(4, marks=pytest.mark.slow)])
def test_streams_in_flight_refusals_and_capture(world_size):
    results = run_ranks(world_size, _rank_streams_and_refusals, timeout=600, env=NCCL_ENV, pg_timeout_s=300)
    problems = [p for r in results for p in r]
    assert not problems, "\n".join(problems[:20])


def test_watchdog_does_not_break_a_global_mode_capture():
    results = run_ranks(2, _rank_watchdog_keeps_global_capture, timeout=300, env=NCCL_ENV)
    for rank, values in enumerate(results):
        assert values == [(True, 50.0)] * 3, f"rank {rank}: {values}"


@pytest.mark.slow
def test_back_to_back_calls_do_not_grow_memory():
    results = run_ranks(2, _rank_steady_memory, timeout=600, env=NCCL_ENV)
    for rank, (rss_growth, alloc_growth, same, enqueue_us) in enumerate(results):
        assert same, f"rank {rank}: ranks disagree after 2,300 calls"
        assert alloc_growth == 0, f"rank {rank}: CUDA memory grew by {alloc_growth} bytes"
        assert rss_growth < 16 << 20, f"rank {rank}: host memory grew by {rss_growth} bytes"
        assert enqueue_us > 0.0


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,world_size", [("ring", 4), ("direct", 3), ("one_shot", 2)])
def test_killed_rank_makes_the_others_raise_within_the_timeout(algorithm, world_size):
    timeout_s = 10.0
    results = run_ranks(world_size, _rank_killed_peer, timeout_s, algorithm, timeout=240, env=NCCL_ENV,
                        allow_missing=(world_size - 1,))
    for rank, result in enumerate(results[:-1]):
        error, elapsed, later = result
        assert error is not None, f"rank {rank} of {world_size} never raised"
        assert elapsed < timeout_s + 10, f"rank {rank} raised after {elapsed:.1f} s"
        assert later is not None and "unusable" in later, later


@pytest.mark.slow
@pytest.mark.parametrize("warm", [True, False])
def test_stalled_rank_times_out_and_abort_is_idempotent(warm):
    timeout_s = 8.0
    (error, elapsed), after_abort = run_ranks(2, _rank_stalled_peer, timeout_s, warm, timeout=240, env=NCCL_ENV)
    assert error is not None, "rank 0 never raised"
    assert elapsed < timeout_s + 10, f"rank 0 raised after {elapsed:.1f} s"
    assert "unusable" in error or "within" in error, error
    assert "unusable" in after_abort


@pytest.mark.slow
def test_destruction_waits_for_pending_work_then_aborts_at_its_deadline():
    timeout_s = 8.0
    (destroyed, synced), _ = run_ranks(2, _rank_destroy_with_pending_work, timeout_s, timeout=240, env=NCCL_ENV)
    assert timeout_s - 2 < destroyed < timeout_s + 10, f"the destructor took {destroyed:.1f} s"
    assert synced < destroyed + 10.0, f"the GPU stayed busy for {synced:.1f} s after the destructor"


def test_destruction_with_healthy_pending_work_completes_it():
    results = run_ranks(2, _rank_destroy_healthy_pending, 60.0, timeout=240, env=NCCL_ENV)
    for rank, (destroyed, correct) in enumerate(results):
        assert correct, f"rank {rank}: the result is wrong after destroying the communicator with work pending"
        assert destroyed < 60.0, f"rank {rank}: destruction took {destroyed:.1f} s"


def test_init_times_out_when_a_rank_never_joins():
    timeout_s = 5.0
    [(error, elapsed)] = run_ranks(1, _rank_init_without_peers, timeout_s, timeout=120, env=NCCL_ENV)
    assert error is not None and "did not complete within" in error, error
    assert elapsed < timeout_s + 30
