"""What a Communicator guarantees when things go wrong (CPU, gloo, real processes).

* Ranks whose call differs in anything that changes the plan raise on every rank, at once, naming the field,
  also for signatures each rank has seen before; no rank returns and no data of the other call lands in the
  tensor (signature-tagged transfers and the stall monitor on gloo, paracomm/_signature.py and _monitor.py;
  the entry handshake on shared memory), on both transports; a slow peer is not a mismatch.
* Two threads making their first calls together: no failure, or a mismatch on every rank, never a hang.
* Timeouts follow the process group; a stopped (SIGSTOP) peer is reported by every hook and GradBucketer
  after the group's timeout, naming the rank; later calls fail at once with the first reason.
* A pending async call survives its Communicator being dropped and the process group being destroyed.
* Drop-in signatures and refused inputs.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks

PG_TIMEOUT_S = 30.0


def _values(rank, n, salt=0):
    g = torch.Generator().manual_seed(1000 * salt + rank)
    return torch.randint(-50, 50, (n,), generator=g).to(torch.float32)


# ------------------------------------------------------------------------------------------------------------
# Mismatches in signatures seen before: every field that changes the plan
# ------------------------------------------------------------------------------------------------------------

# field -> (rank 0's call, the other ranks' call): (numel, dtype, op, kwargs, PARACOMM_CHUNK_BYTES or None)
_CASES = {
    "numel": ((16, torch.float32, "sum", {}, None), (8, torch.float32, "sum", {}, None)),
    "dtype": ((64, torch.float64, "sum", {}, None), (64, torch.float32, "sum", {}, None)),
    "op": ((64, torch.float32, "avg", {}, None), (64, torch.float32, "sum", {}, None)),
    "wire_dtype": ((64, torch.float32, "sum", {"wire_dtype": torch.bfloat16}, None),
                   (64, torch.float32, "sum", {}, None)),
    "scale": ((64, torch.float32, "sum", {"scale": True}, None), (64, torch.float32, "sum", {}, None)),
    "found_inf": ((64, torch.float32, "sum", {"found_inf": True}, None), (64, torch.float32, "sum", {}, None)),
    "algorithm": ((64, torch.float32, "sum", {"algorithm": "ring"}, None),
                  (64, torch.float32, "sum", {"algorithm": "direct"}, None)),
    # Ring pieces of 1 KiB against the plan's default: the two plans move different byte counts per transfer.
    "chunk_bytes": ((20_000, torch.float32, "sum", {"algorithm": "ring"}, "1024"),
                    (20_000, torch.float32, "sum", {"algorithm": "ring"}, None)),
}


def _call(comm, rank, spec, salt):
    numel, dtype, op, kwargs, chunk = spec
    if chunk is None:
        os.environ.pop("PARACOMM_CHUNK_BYTES", None)
    else:
        os.environ["PARACOMM_CHUNK_BYTES"] = chunk
    kw = dict(kwargs)
    if kw.pop("scale", False):
        kw["scale"] = torch.tensor([0.5])
    if kw.pop("found_inf", False):
        kw["found_inf"] = torch.zeros(1)
    t = _values(rank, numel, salt).to(dtype)
    before = t.clone()
    try:
        comm.all_reduce(t, op, **kw)
    finally:
        os.environ.pop("PARACOMM_CHUNK_BYTES", None)
    return t, before


def _seen_mismatch(rank, world_size):
    import paracomm

    comm = paracomm.Communicator()
    assert comm.timeout == timedelta(seconds=PG_TIMEOUT_S)  # the process group's
    out = {}
    for field, (first, other) in _CASES.items():
        # Both signatures seen by every rank, results checked against torch's own all-reduce.
        for salt, spec in enumerate((first, other)):
            t, before = _call(comm, rank, spec, salt)
            expected = before.double()
            dist.all_reduce(expected)
            if spec[2] == "avg":
                expected /= world_size
            if spec[3].get("scale"):
                expected *= 0.5
            tol = 1e-2 if spec[3].get("wire_dtype") is not None else 1e-6
            assert torch.allclose(t.double(), expected, rtol=tol, atol=tol), (field, spec)
        # Now rank 0 makes the first call and the others the second.
        spec = first if rank == 0 else other
        start = time.monotonic()
        try:
            t, before = _call(comm, rank, spec, 7)
            out[field] = ("returned", time.monotonic() - start, t.tolist()[:4])
        except RuntimeError as e:
            out[field] = ("raised", time.monotonic() - start, str(e))
        # The Communicator stays usable: the next matching call is exact.
        ok = _values(rank, 33, 3)
        comm.all_reduce(ok)
        assert torch.equal(ok, sum(_values(r, 33, 3) for r in range(world_size))), field
    return out


@pytest.mark.parametrize("transport", ["gloo", "shm"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_mismatch_in_seen_signature_raises_on_every_rank_naming_the_field(world_size, transport):
    # gloo: the stall monitor finds it (paracomm/_monitor.py); shm: the entry handshake of every call.
    results = run_ranks(world_size, _seen_mismatch, timeout=300, pg_timeout_s=PG_TIMEOUT_S,
                        env={"PARACOMM_CPU_TRANSPORT": transport})
    for rank, out in enumerate(results):
        assert set(out) == set(_CASES)
        for field, (what, elapsed, message) in out.items():
            assert what == "raised", (rank, field, message)
            assert f"{field} differs" in message, (rank, field, message)
            assert f"rank {rank} of {world_size}" in message, message
            # "At once": far below the 30 s timeout even on a loaded machine.
            assert elapsed < PG_TIMEOUT_S / 2, (rank, field, elapsed)


def _mismatch_leaves_tensor(rank, world_size):
    import paracomm

    comm = paracomm.Communicator()
    for n in (16, 8):
        comm.all_reduce(torch.ones(n))
    t = _values(rank, 16 if rank == 0 else 8, 9)
    before = t.clone()
    try:
        comm.all_reduce(t)
        return "returned"
    except RuntimeError as e:
        assert "numel differs (rank 0: 16, rank 1: 8)" in str(e), str(e)
    # No stale workspace, no foreign bytes: the tensor is exactly what this rank passed in.
    return torch.equal(t, before)


@pytest.mark.parametrize("transport", ["gloo", "shm"])
def test_mismatch_never_writes_foreign_or_stale_bytes(transport):
    assert run_ranks(2, _mismatch_leaves_tensor, timeout=120, env={"PARACOMM_CPU_TRANSPORT": transport}) == [True, True]


def _chunk_only(rank, world_size):
    import paracomm

    os.environ["PARACOMM_CHUNK_BYTES"] = "4096" if rank == 0 else "8192"
    comm = paracomm.Communicator()
    start = time.monotonic()
    try:
        comm.all_reduce(torch.ones(50_000), algorithm="ring")  # first sight
        return "returned", 0.0
    except RuntimeError as e:
        return str(e), time.monotonic() - start


@pytest.mark.parametrize("transport", ["gloo", "shm"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_differing_only_in_chunk_bytes_raise_at_once(world_size, transport):
    for message, elapsed in run_ranks(world_size, _chunk_only, timeout=120, pg_timeout_s=PG_TIMEOUT_S,
                                      env={"PARACOMM_CPU_TRANSPORT": transport}):
        assert "chunk_bytes differs" in message and "4096 bytes" in message and "8192 bytes" in message, message
        assert elapsed < PG_TIMEOUT_S / 2


def _slow_peer_stale_record(rank, world_size):
    import paracomm

    comm = paracomm.Communicator()
    threshold = comm.timeout.total_seconds() / 8 if comm.timeout.total_seconds() < 8 else 1.0
    results = []
    # Call 0 (8 elements): rank 0 arrives late, so rank 1 stalls, and publishes a record of it. Call 1 (16
    # elements): rank 1 arrives late, so rank 0 stalls and finds rank 1's record of call 0, another signature:
    # stale, not a mismatch. Both calls must complete exactly.
    for seq, (numel, late) in enumerate(((8, 0), (16, 1))):
        if rank == late:
            time.sleep(4 * threshold + 1.0)
        t = _values(rank, numel, seq)
        comm.all_reduce(t)
        results.append(torch.equal(t, sum(_values(r, numel, seq) for r in range(world_size))))
    return results


def test_slow_peer_with_a_stale_record_of_another_signature_is_not_a_mismatch():
    assert run_ranks(2, _slow_peer_stale_record, timeout=180, pg_timeout_s=PG_TIMEOUT_S,
                     env={"PARACOMM_CPU_TRANSPORT": "gloo"}) == [[True, True], [True, True]]


def _unchecked_mismatch(rank, world_size):
    import paracomm

    comm = paracomm.Communicator(timeout=timedelta(seconds=4))
    t = _values(rank, 16 if rank == 0 else 8, 5)
    before = t.clone()
    start = time.monotonic()
    try:
        comm.all_reduce(t)
        return "returned"
    except RuntimeError as e:
        return str(e), time.monotonic() - start, torch.equal(t, before)


def test_check_shapes_0_mismatch_stalls_until_the_timeout_never_exchanging_data():
    results = run_ranks(2, _unchecked_mismatch, timeout=120, pg_timeout_s=PG_TIMEOUT_S,
                        env={"PARACOMM_CPU_TRANSPORT": "gloo", "PARACOMM_CHECK_SHAPES": "0"})
    # The rank whose deadline passes first says "no answer"; gloo then closes the pair, so the other may see
    # "closed the connection" instead. Never a mismatch (nothing compares signatures), never data.
    assert any("no answer from rank" in message for message, _, _ in results), results
    for message, elapsed, untouched in results:
        assert ("no answer from rank" in message or "closed the connection" in message), message
        assert "differs" not in message and elapsed >= 3.5 and untouched, message


def _collective_mismatch(rank, world_size):
    import paracomm

    comm = paracomm.Communicator()
    n = 64 * world_size
    # A matching reduce-scatter first: with the shared-memory transport it makes the gloo fallback (a
    # rendezvous of every rank, which a rank on the shared-memory path would never join during the mismatch).
    out = torch.empty(64)
    comm.reduce_scatter(out, _values(rank, n, 0))
    assert torch.equal(out, sum(_values(r, n, 0) for r in range(world_size))[64 * rank:64 * (rank + 1)])
    start = time.monotonic()
    try:
        if rank == 0:  # the shared-memory transport runs this one (auto, ranks on one host) ...
            comm.all_reduce(_values(rank, n, 1))
        else:  # ... and its gloo fallback this one, so no entry handshake sees both
            comm.reduce_scatter(torch.empty(64), _values(rank, n, 1))
        out = ("returned", 0.0)
    except RuntimeError as e:
        out = (str(e), time.monotonic() - start)
    ok = _values(rank, 40, 2)
    comm.all_reduce(ok)  # still usable on every rank
    assert torch.equal(ok, sum(_values(r, 40, 2) for r in range(world_size)))
    return out


@pytest.mark.parametrize("transport", ["gloo", "auto"])
def test_different_collectives_raise_on_every_rank_also_across_transport_paths(transport):
    for message, elapsed in run_ranks(3, _collective_mismatch, timeout=180, pg_timeout_s=PG_TIMEOUT_S,
                                      env={"PARACOMM_CPU_TRANSPORT": transport}):
        # Each rank's value where its record was there in time ("?" for one that had not said yet).
        assert "collective differs (rank 0: all_reduce, rank 1: " in message and "reduce_scatter" in message, message
        assert elapsed < PG_TIMEOUT_S / 2, elapsed


# ------------------------------------------------------------------------------------------------------------
# Two threads, first call, two ranks
# ------------------------------------------------------------------------------------------------------------


def _two_threads(rank, world_size, reps):
    import paracomm

    outcomes = []
    for rep in range(reps):
        comm = paracomm.Communicator(timeout=timedelta(seconds=20))
        go = threading.Barrier(2)
        results = [None, None]

        def worker(k):
            t = _values(rank, 16 + 8 * k, rep * 2 + k)  # the two threads' calls differ in numel
            go.wait()
            try:
                comm.all_reduce(t)
                expected = sum(_values(r, 16 + 8 * k, rep * 2 + k) for r in range(world_size))
                results[k] = "ok" if torch.equal(t, expected) else "WRONG"
            except RuntimeError as e:
                results[k] = "mismatch" if "differs" in str(e) else f"error: {e}"

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not any(th.is_alive() for th in threads), "a thread hung"
        outcomes.append(tuple(results))
        dist.barrier()  # the next repetition starts together
    return outcomes


@pytest.mark.slow
def test_two_threads_first_call_never_fail_or_hang():
    reps = 20
    per_rank = run_ranks(2, _two_threads, reps, timeout=600)
    for rep in range(reps):
        seen = [per_rank[r][rep] for r in range(2)]
        for outcome in seen:
            # Same order on both ranks: both calls exact; different orders: a mismatch error on every rank.
            assert outcome in (("ok", "ok"), ("mismatch", "mismatch")), (rep, seen)
        assert seen[0] == seen[1], (rep, seen)


# ------------------------------------------------------------------------------------------------------------
# A pending async call outlives its Communicator and the process group (issue 15, item 3, CPU)
# ------------------------------------------------------------------------------------------------------------


def _pending_survives(rank, world_size):
    import gc

    import paracomm

    comm = paracomm.Communicator()
    t = _values(rank, 100_003, 1)
    expected = sum(_values(r, 100_003, 1) for r in range(world_size))
    w = comm.all_reduce(t, async_op=True)
    del comm
    gc.collect()
    assert w.wait() is t and torch.equal(t, expected)

    u = _values(rank, 50_001, 2)
    expected = sum(_values(r, 50_001, 2) for r in range(world_size))
    w = paracomm.all_reduce(u, async_op=True)
    dist.destroy_process_group()
    gc.collect()
    assert w.wait() is u and torch.equal(u, expected)
    return True


@pytest.mark.parametrize("world_size", [2, 3])
def test_pending_async_call_survives_del_and_destroy_process_group(world_size):
    assert run_ranks(world_size, _pending_survives, timeout=180) == [True] * world_size


# ------------------------------------------------------------------------------------------------------------
# Drop-in signatures, refused inputs, creation order
# ------------------------------------------------------------------------------------------------------------


def _drop_in(rank, world_size):
    import paracomm

    # torch's positional order: (tensor, op, group, async_op).
    t = _values(rank, 40, 4)
    expected = sum(_values(r, 40, 4) for r in range(world_size))
    assert paracomm.all_reduce(t, dist.ReduceOp.SUM, dist.group.WORLD) is t and torch.equal(t, expected)
    u = _values(rank, 40, 5)
    w = paracomm.all_reduce(u, "sum", None, True)
    assert w.wait() is u and torch.equal(u, sum(_values(r, 40, 5) for r in range(world_size)))
    errors = {}
    for label, call in {
        "async_str": lambda: paracomm.all_reduce(torch.ones(3), async_op="yes"),
        "async_int": lambda: paracomm.Communicator().all_reduce(torch.ones(3), async_op=1),
        "group_str": lambda: paracomm.all_reduce(torch.ones(3), "sum", "world"),
        "timeout_int": lambda: paracomm.Communicator(timeout=5),
    }.items():
        try:
            call()
            errors[label] = "accepted"
        except TypeError as e:
            errors[label] = str(e)
    for var, value in (("PARACOMM_CHUNK_BYTES", "9223372036854775808"), ("PARACOMM_CHUNK_BYTES", "0"),
                       ("PARACOMM_CHECK_SHAPES", "3"), ("PARACOMM_CHECK_SHAPES", "x")):
        os.environ[var] = value
        x = torch.ones(3)
        try:
            paracomm.all_reduce(x)
            errors[f"{var}={value}"] = "accepted"
        except ValueError as e:
            errors[f"{var}={value}"] = str(e)
        finally:
            del os.environ[var]
        assert torch.equal(x, torch.ones(3))  # refused before anything was written
    comm = paracomm.Communicator()
    dist.destroy_process_group()
    for label, call in {"after_destroy.module": lambda: paracomm.all_reduce(torch.ones(3)),
                        "after_destroy.comm": lambda: comm.all_reduce(torch.ones(3)),
                        "after_destroy.new": lambda: paracomm.Communicator()}.items():
        try:
            call()
            errors[label] = "accepted"
        except RuntimeError as e:
            errors[label] = str(e)
    return errors


def test_drop_in_signatures_and_refusals():
    for errors in run_ranks(2, _drop_in, timeout=120):
        assert "async_op must be True or False" in errors["async_str"]
        assert "async_op must be True or False" in errors["async_int"]
        assert "group" in errors["group_str"] and "ProcessGroup" in errors["group_str"]
        assert "timeout" in errors["timeout_int"]
        assert "PARACOMM_CHUNK_BYTES" in errors["PARACOMM_CHUNK_BYTES=9223372036854775808"]
        assert "PARACOMM_CHUNK_BYTES" in errors["PARACOMM_CHUNK_BYTES=0"]
        assert "PARACOMM_CHECK_SHAPES" in errors["PARACOMM_CHECK_SHAPES=3"]
        assert "PARACOMM_CHECK_SHAPES" in errors["PARACOMM_CHECK_SHAPES=x"]
        assert "not initialised" in errors["after_destroy.module"]
        assert "destroyed" in errors["after_destroy.comm"]
        assert "not initialised" in errors["after_destroy.new"]


def test_module_level_all_reduce_before_init_is_a_paracomm_runtime_error():
    import paracomm

    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="paracomm.all_reduce: torch.distributed is not initialised"):
        paracomm.all_reduce(torch.ones(2))


def test_explain_follows_paracomm_algorithm_and_this_machines_backend(monkeypatch):
    import paracomm

    monkeypatch.setenv("PARACOMM_ALGORITHM", "ring")
    assert paracomm.explain_all_reduce(1 << 10, torch.float32, 4)["algorithm"] == "ring"
    monkeypatch.delenv("PARACOMM_ALGORITHM")
    here = "nccl" if hasattr(paracomm._C, "NcclComm") and torch.cuda.is_available() else "gloo"
    # The default backend is this machine's: the same plan as asking for it by name.
    for numel in (1 << 8, 1 << 16, 1 << 22):
        assert (paracomm.explain_all_reduce(numel, torch.float32, 4)
                == paracomm.explain_all_reduce(numel, torch.float32, 4, backend=here))


def _creation_order(rank, world_size):
    import paracomm

    a = paracomm.Communicator(timeout=timedelta(seconds=3))
    b = paracomm.Communicator(timeout=timedelta(seconds=3))
    try:
        (b if rank == 0 else a).all_reduce(torch.ones(4))  # different Communicators: never meet
        return "returned"
    except RuntimeError as e:
        return str(e)


def test_communicators_used_in_different_orders_time_out_naming_creation_order():
    for message in run_ranks(2, _creation_order, timeout=120):
        assert "same order" in message and "Communicators" in message, message


# ------------------------------------------------------------------------------------------------------------
# A SIGSTOPped peer: every hook and GradBucketer raise after the process group's timeout, naming the rank
# ------------------------------------------------------------------------------------------------------------

STOP_PG_TIMEOUT_S = 10.0


def _stopped_peer(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel as DDP

    import paracomm
    from paracomm import hooks

    # Subgroups with the same timeout for the module-level hooks: each has its own cached Communicator,
    # so one hook's failure does not pre-empt the next.
    subgroups = [dist.new_group([0, 1], timeout=timedelta(seconds=STOP_PG_TIMEOUT_S)) for _ in range(2)]
    setups = {
        "allreduce_hook": (None, hooks.allreduce_hook),
        "fp16_compress_hook": (subgroups[0], hooks.fp16_compress_hook),
        "bf16_compress_hook": (subgroups[1], hooks.bf16_compress_hook),
        "fused_hook": (hooks.FusedHookState(), hooks.fused_hook),
    }
    models = {}
    for name, (state, hook) in setups.items():
        torch.manual_seed(0)
        ddp = DDP(torch.nn.Linear(8, 8))
        ddp.register_comm_hook(state, hook)
        models[name] = ddp
    torch.manual_seed(0)
    plain = torch.nn.Linear(8, 8)
    bucketer = paracomm.GradBucketer(plain)
    x = torch.randn(4, 8)
    for _ in range(2):  # healthy steps first (DDP rebuilds its buckets after the first)
        for ddp in models.values():
            ddp(x).sum().backward()
        plain(x).sum().backward()
        bucketer.wait()
    pids = [None] * world_size
    dist.all_gather_object(pids, os.getpid())
    store = dist.distributed_c10d._get_default_store()
    dist.barrier()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # stays stopped until rank 0 has seen every timeout
        # Resumed: rank 0 gave up on this rank and closed its groups. The next call fails through paracomm's
        # error path (prefix, Communicator failed), not with gloo's raw "Connection closed by peer".
        out = {}
        for key in ("resumed", "again"):
            start = time.monotonic()
            try:
                plain(x).sum().backward()
                bucketer.wait()
                out[key] = ("no error", 0.0)
            except RuntimeError as e:
                out[key] = (str(e), time.monotonic() - start)
        store.set("stopped_peer/done", "1")
        return out
    try:
        return _against_stopped(models, plain, bucketer, x)
    finally:
        os.kill(pids[1], signal.SIGCONT)
        # Rank 0 stays alive (its gloo connections open) until rank 1 is done: rank 1 must learn of rank 0's
        # failure from the failure record, not from the connection closing when rank 0 exits.
        store.wait(["stopped_peer/done"], timedelta(seconds=120))


def _against_stopped(models, plain, bucketer, x):
    out = {}
    for name, ddp in models.items():
        start = time.monotonic()
        try:
            ddp(x).sum().backward()
            out[name] = ("no error", time.monotonic() - start)
        except RuntimeError as e:
            out[name] = (str(e), time.monotonic() - start)
    start = time.monotonic()
    try:
        plain(x).sum().backward()
        bucketer.wait()
        out["GradBucketer"] = ("no error", time.monotonic() - start)
    except RuntimeError as e:
        out["GradBucketer"] = (str(e), time.monotonic() - start)
    # Later calls on a failed Communicator raise at once with the first reason.
    start = time.monotonic()
    try:
        plain(x).sum().backward()
        bucketer.wait()
        out["again"] = ("no error", 0.0)
    except RuntimeError as e:
        out["again"] = (str(e), time.monotonic() - start)
    return out


@pytest.mark.slow
def test_stopped_peer_reported_after_the_group_timeout_by_every_hook_and_gradbucketer():
    # gloo: this test follows gloo's error path (a closed pair after SIGCONT); tests/test_shm.py has the stalled
    # peer on the shared-memory transport.
    results = run_ranks(2, _stopped_peer, timeout=300, pg_timeout_s=STOP_PG_TIMEOUT_S,
                        env={"PARACOMM_CPU_TRANSPORT": "gloo"})
    out = results[0]
    for name in ("allreduce_hook", "fp16_compress_hook", "bf16_compress_hook", "fused_hook", "GradBucketer"):
        message, elapsed = out[name]
        assert "paracomm.all_reduce (rank 0 of 2)" in message, (name, message)
        assert "no answer from rank 1" in message, (name, message)
        # The group's 10 s, not paracomm's old 300 s; the upper bound leaves room for a loaded machine.
        assert STOP_PG_TIMEOUT_S - 0.5 <= elapsed <= 2 * STOP_PG_TIMEOUT_S + 5, (name, elapsed)
    message, elapsed = out["again"]
    assert "failed earlier" in message and "no answer from rank 1" in message and elapsed < 2.0, out["again"]
    resumed = results[1]
    # Rank 0 is alive. Whichever of its two timeouts fired first (gloo's closes the pair, paracomm's deadline
    # leaves it open), rank 1 learns of its failure at once: from the closed connection, or from the failure
    # record about one stall threshold (1 s) after its call began; never at its own timeout.
    told = ("rank 0 closed the connection", "rank 0's Communicator failed")
    message, elapsed = resumed["resumed"]
    assert "paracomm.all_reduce (rank 1 of 2)" in message and any(t in message for t in told), message
    assert elapsed < STOP_PG_TIMEOUT_S / 2, resumed
    message, elapsed = resumed["again"]
    assert "failed earlier" in message and any(t in message for t in told) and elapsed < 2.0, message


def _failed_peer_with_open_connections(rank, world_size):
    import paracomm

    store = dist.distributed_c10d._get_default_store()
    comm = paracomm.Communicator()
    torch.manual_seed(rank)
    x = torch.randn(1000)
    expected = x.clone()
    dist.all_reduce(expected)
    torch.testing.assert_close(comm.all_reduce(x.clone()), expected)  # call 0 completes on both ranks
    if rank == 0:
        # A failure that leaves the gloo connections open (paracomm's own deadline, a failed store step): the
        # same error path as every transport failure.
        error = comm._fail("injected: no answer from rank 1 within the timeout")
        assert "injected" in str(error)
        store.wait(["failed_peer/done"], timedelta(seconds=120))  # alive, connections open, until rank 1 is done
        return None
    y = x.clone()
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        comm.all_reduce(y)
    elapsed = time.monotonic() - start
    store.set("failed_peer/done", "1")
    return str(info.value), elapsed, torch.equal(y, x)


def test_a_failed_peer_is_reported_within_the_stall_threshold_while_its_connections_stay_open():
    results = run_ranks(2, _failed_peer_with_open_connections, timeout=120, pg_timeout_s=30.0,
                        env={"PARACOMM_CPU_TRANSPORT": "gloo"})
    message, elapsed, untouched = results[1]
    assert "paracomm.all_reduce (rank 1 of 2)" in message and "rank 0's Communicator failed" in message, message
    assert "injected: no answer from rank 1" in message, message  # rank 0's reason travels with it
    assert elapsed < 10.0, elapsed  # about 1 s (the stall threshold) plus a tick; the timeout is 30 s
    assert untouched  # nothing arrived from rank 0, so nothing was written
