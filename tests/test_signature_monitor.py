"""The signature check's pieces without processes: the tag registry and the stall monitor's decisions.

The monitor is driven tick by tick (``CallMonitor.tick``) over an in-process ``HashStore`` that several
monitors share, one per simulated rank: the decisions (slow peer, stale record, mismatch, verdict) are pure
functions of the records in the store. tests/test_comm_safety.py runs the same mechanism on real processes.
"""
from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from paracomm import _signature as sig
from paracomm._monitor import CallMonitor

A = (0, 16, 0, 0, -1, 0, 0, 0, 0, 0)  # all_reduce of 16 float32, sum
B = (0, 8, 0, 0, -1, 0, 0, 0, 0, 0)  # the same with 8 elements


class _Executor:
    """Stands in for a CpuExecutor: counts interrupts."""

    def __init__(self):
        self.interrupts = 0

    def interrupt(self):
        self.interrupts += 1


def _monitors(n, store=None, timeout_s=8.0):
    store = store if store is not None else dist.HashStore()
    where = [lambda c, r=r: f"paracomm.{c} (rank {r} of {n})" for r in range(n)]
    return store, [CallMonitor(store, "pc/test/0", r, n, timeout_s, where[r]) for r in range(n)]


def _stalled(monitor, seq, signature):
    """Mark a call in flight since longer than the stall threshold; its executor."""
    ex = _Executor()
    monitor.inflight = (seq, signature, time.monotonic() - 10 * monitor.threshold, ex, "all_reduce")
    return ex


def test_stall_threshold_follows_the_timeout():
    assert sig.stall_threshold(300.0) == 1.0
    assert sig.stall_threshold(4.0) == 0.5


def test_records_round_trip_and_garbage_is_never_a_signature():
    assert sig.decode_record(sig.encode_record(7, A).encode()) == (7, A)
    assert sig.decode_record(b"not a record") == (-1, ())
    assert sig.decode_record(b"3|1,x") == (-1, ())


def test_mismatch_at_the_same_seq_found_by_the_second_publisher_and_told_to_the_first():
    _, (m0, m1) = _monitors(2)
    e0, e1 = _stalled(m0, 5, A), _stalled(m1, 5, B)
    m0.tick()  # rank 0 publishes first: rank 1 has no record yet, so no verdict
    assert e0.interrupts == 0
    m1.tick()  # rank 1 publishes second and reads rank 0's record: mismatch, verdict written
    assert e1.interrupts == 1
    m0.tick()  # rank 0 sees the verdict for seq 5
    assert e0.interrupts == 1
    for r, m in enumerate((m0, m1)):
        error = m.diagnose(5, (A, B)[r], "all_reduce", 0.0)
        assert f"(rank {r} of 2)" in str(error)
        assert "numel differs (rank 0: 16, rank 1: 8)" in str(error)


def test_three_ranks_two_agree_every_rank_finds_the_mismatch():
    _, ms = _monitors(3)
    calls = (A, A, B)
    executors = [_stalled(m, 0, s) for m, s in zip(ms, calls)]
    for m in ms:
        m.tick()
    for m in ms:  # the ranks that published before rank 2 learn it from the verdict
        m.tick()
    assert all(ex.interrupts >= 1 for ex in executors)
    for r, m in enumerate(ms):
        assert "numel differs (rank 0: 16, rank 1: 16, rank 2: 8)" in str(m.diagnose(0, calls[r], "all_reduce", 0.0))


def test_silent_peer_gets_one_more_tick_then_shows_as_unknown():
    _, (m0, m1, m2) = _monitors(3)
    e0, e2 = _stalled(m0, 1, A), _stalled(m2, 1, B)
    m0.tick()
    m2.tick()  # mismatch found, rank 1 silent: the verdict is out, the error waits one tick
    assert e2.interrupts == 0
    _stalled(m1, 1, A)
    m1.tick()  # rank 1 publishes in time (and finds the mismatch itself)
    m2.tick()
    assert e2.interrupts == 1
    assert "rank 0: 16, rank 1: 16, rank 2: 8" in str(m2.diagnose(1, B, "all_reduce", 0.0))
    # Rank 0 learns it from the verdict; a peer that never publishes is shown as "?" after one more tick.
    _, (n0, n1, n2) = _monitors(3)
    f0, f2 = _stalled(n0, 0, A), _stalled(n2, 0, B)
    n0.tick(), n2.tick(), n2.tick()
    assert f2.interrupts == 1
    assert "numel differs (rank 0: 16, rank 1: ?, rank 2: 8)" in str(n2.diagnose(0, B, "all_reduce", 0.0))
    n0.tick(), n0.tick()
    assert f0.interrupts == 1


def test_slow_peer_and_stale_records_never_make_a_mismatch():
    store, (m0, m1) = _monitors(2)
    # Call 3 stalled on both ranks with B (rank 1's record stays in the store, stale from now on).
    _stalled(m0, 3, B), _stalled(m1, 3, B)
    m0.tick(), m1.tick()
    assert m0.diagnose(3, B, "all_reduce", 0.0) is None
    m1.inflight = None
    # Call 4: rank 0 runs A and stalls; rank 1 has not reached call 4 (slow): its record is call 3's.
    ex = _stalled(m0, 4, A)
    for _ in range(3):
        m0.tick()
    assert ex.interrupts == 0
    assert m0.diagnose(4, A, "all_reduce", 0.0) is None
    # A verdict about another call does not count either.
    store.set("pc/test/0/sig/verdict", sig.encode_record(3, B))
    m0.tick()
    assert ex.interrupts == 0


def test_a_call_shorter_than_the_threshold_touches_no_store():
    class _NoStore:
        def __getattr__(self, name):
            raise AssertionError(f"store.{name} used")

    _, (m0,) = _monitors(1, store=_NoStore())
    m0.inflight = (0, A, time.monotonic(), _Executor(), "all_reduce")
    m0.tick()
    m0.inflight = None
    m0.tick()


def test_diagnose_on_a_transport_error_finds_what_a_peer_published():
    _, (m0, m1) = _monitors(2)
    _stalled(m1, 2, B)
    m1.tick()  # rank 1 published (rank 0 had not stalled yet) and, say, gave up
    # A young call (its ranks cannot have published yet) and no verdict: one store read, no verdict.
    assert m0.diagnose(2, A, "reduce_scatter", time.monotonic()) is None
    # An old call (rank 0's wait failed, or its deadline passed, before its monitor looked): the records.
    error = m0.diagnose(2, A, "reduce_scatter", 0.0)
    assert "paracomm.reduce_scatter (rank 0 of 2)" in str(error) and "numel differs" in str(error)
    # A verdict for this call makes even a young call read the records.
    _, (k0, k1) = _monitors(2)
    _stalled(k0, 6, A), _stalled(k1, 6, B)
    k0.tick(), k1.tick()  # k1 finds it and writes the verdict
    fresh = CallMonitor(k0._store, "pc/test/0", 0, 2, 8.0, lambda c: "w")
    assert "numel differs" in str(fresh.diagnose(6, A, "all_reduce", time.monotonic()))


def test_tag_registry_same_base_everywhere_and_never_shared(monkeypatch):
    store = dist.HashStore()
    ranks = [sig.TagRegistry(store, "pc/x/0") for _ in range(3)]
    bases = {s: ranks[0].tag_base(s) for s in (A, B)}
    assert bases[A] != bases[B]
    assert all(r.tag_base(s) == bases[s] for r in ranks for s in (A, B))
    assert all(0 <= b < 2 ** 31 and b & sig.STEP_MASK == 0 for b in bases.values())
    # Force every signature's first candidate onto one number: the second signature probes on, and every
    # rank, in any order, ends at the same two distinct bases.
    real = sig.candidate_tag_base
    monkeypatch.setattr(sig, "candidate_tag_base", lambda s, probe: 1 << 12 if probe == 0 else real(s, probe))
    store = dist.HashStore()
    r0, r1 = sig.TagRegistry(store, "pc/y/0"), sig.TagRegistry(store, "pc/y/0")
    b_first = r1.tag_base(B)  # rank 1 claims the colliding number for B
    a_second = r0.tag_base(A)
    assert b_first == 1 << 12 and a_second != b_first
    assert r1.tag_base(A) == a_second and r0.tag_base(B) == b_first


def test_tag_registry_gives_up_with_a_clear_error_when_every_probe_is_taken(monkeypatch):
    monkeypatch.setattr(sig, "candidate_tag_base", lambda s, probe: 1 << 12)
    reg = sig.TagRegistry(dist.HashStore(), "pc/z/0")
    reg.tag_base(A)
    with pytest.raises(RuntimeError, match="no free data tag"):
        reg.tag_base(B)


def test_mismatch_error_with_unknown_ranks():
    error = sig.mismatch_error([A, None, B], "paracomm.all_reduce (rank 0 of 3)")
    assert "numel differs (rank 0: 16, rank 1: ?, rank 2: 8)" in str(error)
    assert sig.mismatch_error([A, None, A], "w") is None


def test_diagnose_gives_up_on_a_store_that_does_not_answer():
    class _Hanging:  # a store whose host is stopped: every operation blocks
        def set(self, *args):
            time.sleep(60)

        check = get = set

    monitor = CallMonitor(_Hanging(), "pc/h/0", 0, 2, 4.0, lambda c: "w")  # threshold 0.5 s: bound 2 s
    start = time.monotonic()
    assert monitor.diagnose(0, A, "all_reduce", 0.0) is None  # the transport error is reported, not a mismatch
    assert time.monotonic() - start < 30  # far below the 60 s the store would take


def test_a_peer_failure_stops_calls_at_its_seq_or_later_only():
    from paracomm import _monitor

    store, (m0, m1) = _monitors(2)
    assert _monitor.decode_failure(_monitor.encode_failure(1, 7, "a|b").encode()) == (1, 7, "a|b")
    assert _monitor.decode_failure(b"garbage") is None
    _monitor.publish_failure(store, "pc/test/0", 1, 7, "no answer from rank 2 within the timeout")
    deadline = time.monotonic() + 10
    while not store.check(["pc/test/0/sig/failed"]) and time.monotonic() < deadline:
        time.sleep(0.01)  # written on a daemon thread
    _monitor.publish_failure(store, "pc/test/0", 0, 3, "later failure")  # the first record stays
    time.sleep(0.2)
    # Call 6 began before rank 1 failed (rank 1 did its part of it): it may still complete, nothing happens.
    ex = _stalled(m0, 6, A)
    m0.tick()
    assert ex.interrupts == 0 and m0.peer_failure(6) is None
    # Call 7: rank 1 failed in it and takes part in nothing from there on.
    ex = _stalled(m0, 7, A)
    m0.tick()
    assert ex.interrupts == 1
    text = m0.peer_failure(7)
    assert "rank 1's Communicator failed" in text and "no answer from rank 2" in text, text
    assert m0.peer_failure(8) == text and m0.peer_failure(6) is None
    m0.tick()  # transfers posted since: interrupted again
    assert ex.interrupts == 2
    # Its own record never stops rank 1's calls.
    ex1 = _stalled(m1, 7, A)
    m1.tick()
    assert ex1.interrupts == 0 and m1.peer_failure(7) is None
