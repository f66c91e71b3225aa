"""The stall monitor: turns a CPU call whose ranks disagree on the signature into a mismatch error on every rank.

The fast path sends nothing for the check (paracomm._signature says what is guaranteed). A call only stores
``inflight = (seq, signature, start, executor, collective)`` on the monitor before it runs and ``None`` after:
plain attribute writes (atomic under the GIL), no lock, no event. A daemon thread per :class:`CallMonitor`
wakes every :data:`TICK_S` seconds and, for a call in flight for longer than the stall threshold:

1. publishes ``seq|signature`` under ``<prefix>/sig/<rank>`` (once per call; overwritten by the next stalled
   call, so the store holds one record per rank) and reads every peer's record once;
2. on a later tick, reads the peers' records again only if the verdict key ``<prefix>/sig/verdict`` names
   this ``seq`` (one store read per tick otherwise).

A peer record at the same ``seq`` with a different signature is a mismatch: the monitor writes the verdict (if
it found it), records the error and interrupts the call's blocked waits (``executor.interrupt()``; again at
every later tick while the call is still in flight, for transfers posted after an earlier sweep). When some
peers have no record of this call yet, the monitor gives them one more tick to publish before it records the
error, so that it can show their values (ranks still silent then are shown as "?"). A record at
another ``seq`` is stale or early: that peer has not reached this call, or has not stalled long enough to say
so; it never makes a verdict. Why one read suffices to find every mismatch: of two ranks that disagree, the one
that publishes second (the store orders the two writes) reads the other's record right after publishing, so it
finds the mismatch and writes the verdict; every other rank then sees the verdict key. The first reader of a
pair may miss the second's record, which is why the verdict exists.

The call path asks :meth:`CallMonitor.diagnose` on any transport error of a call (including an interrupted
wait): the recorded error when there is one for this ``seq``, else one publish + read of its own. A peer that
gave up first (it found the mismatch and dropped its gloo group, closing the connection) has published its
record and read the disagreeing one, so this read finds the mismatch too.

A peer whose Communicator failed (a timeout, a closed peer, a failed rendezvous) never takes part in a call
again, but its process may live on, keeping its gloo connections open (torch 2.13's ProcessGroupGloo.abort()
does nothing, and the failed call's traceback keeps the group alive): its peers would otherwise wait for their
own timeout. So a failing Communicator publishes ``rank|seq|reason`` once under ``<prefix>/sig/failed``
(:func:`publish_failure`; the first failure wins, it is the root cause), where ``seq`` is the call it failed in
(it completes none from there on). A stalled call at ``seq`` or later reads that one key at each tick (one
store check) and, when a peer's record is there, interrupts its waits and fails naming that peer and its
reason (:meth:`CallMonitor.peer_failure`). A stalled call at an earlier ``seq`` may still complete (the failed
rank finished its part of it), so it is left alone.

Store failures inside the monitor are ignored (the call's own deadline still bounds it). The thread holds only
a weak reference to its monitor and ends when the monitor (its Communicator) is gone.
"""
from __future__ import annotations

import threading
import time
import weakref
from typing import Callable, Optional

from . import _signature as _sig

TICK_S = 0.25  # how often the monitor thread looks at the in-flight call


class CallMonitor:
    """Per-Communicator signature diagnosis of stalled CPU calls (module docstring).

    Args:
        store: the group's store. prefix: the Communicator's key prefix (the same on every rank).
        rank, world_size: this process in the group.
        timeout_s: the Communicator's timeout; the stall threshold is :func:`paracomm._signature.stall_threshold`.
        where: ``where(collective)`` -> the prefix of the Communicator's errors ("paracomm.all_reduce (rank r of n)").
    """

    def __init__(self, store, prefix: str, rank: int, world_size: int, timeout_s: float,
                 where: Callable[[str], str]):
        self.inflight = None  # (seq, signature, start, executor, collective): written by the call path only
        self._store = store
        self._base = f"{prefix}/sig"
        self._rank = rank
        self._world_size = world_size
        self.threshold = _sig.stall_threshold(timeout_s)
        self._where = where
        self._published = -1  # seq of the last record this rank published
        self._mismatch: Optional[tuple] = None  # (seq, RuntimeError) once found
        self._peer_failed: Optional[tuple] = None  # (rank, seq, reason) of a peer's published failure
        self._provisional = -1  # seq of a mismatch found while some peers had no record of that call yet
        self._lock = threading.Lock()  # store traffic of the monitor thread and diagnose() one at a time
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Start the monitor thread (once; called on the first CPU call that can stall)."""
        if self._thread is None:
            self._thread = threading.Thread(target=_run, args=(weakref.ref(self),), daemon=True,
                                            name=f"paracomm-monitor-{self._rank}")
            self._thread.start()

    # ---- the monitor thread ----

    def tick(self) -> None:
        """One look at the in-flight call (the thread calls this every TICK_S; tests may call it directly)."""
        current = self.inflight
        if current is None:
            return
        seq, signature, start, executor, collective = current
        if time.monotonic() - start < self.threshold:
            return
        found = self._mismatch
        if (found is not None and found[0] == seq) or self.peer_failure(seq) is not None:
            _interrupt(executor)  # transfers posted since the last sweep
            return
        with self._lock:
            try:
                failed = self._read_failure(seq)
            except Exception:  # noqa: BLE001  (store trouble: try again next tick)
                failed = None
            if failed is not None:
                if self.inflight is current:
                    _interrupt(executor)
                return
            try:
                if self._published != seq:
                    error, complete = self._publish_and_read(seq, signature, collective)
                elif self._provisional == seq or self._verdict_is(seq):
                    error, complete = self._read(seq, signature, collective)
                else:
                    error, complete = None, True
            except Exception:  # noqa: BLE001  (store trouble: try again next tick; the deadline still holds)
                return
            if error is None:
                return
            if not complete and self._provisional != seq:
                self._provisional = seq  # one more tick for the silent peers' records (the verdict is out)
                return
            self._mismatch = (seq, error)
        if self.inflight is current:
            _interrupt(executor)

    # ---- a peer that failed ----

    def peer_failure(self, seq: int) -> Optional[str]:
        """What to say when call ``seq`` cannot complete because a peer's Communicator failed at ``seq`` or
        earlier (found by the monitor thread in the store), else None. Never touches the store."""
        failed = self._peer_failed
        if failed is None or failed[1] > seq:
            return None
        rank, _, reason = failed
        return (f"rank {rank}'s Communicator failed (at this call or an earlier one) and takes part in no call "
                f"again; its error: {reason}")

    def _read_failure(self, seq: int) -> Optional[tuple]:
        """One store check for a peer's failure record (module docstring); keeps it when it stops ``seq``."""
        key = f"{self._base}/failed"
        if not self._store.check([key]):
            return None
        record = decode_failure(self._store.get(key))
        if record is None or record[0] == self._rank or record[1] > seq:
            return None
        self._peer_failed = record
        return record

    # ---- the call path ----

    def diagnose(self, seq: int, signature: tuple, collective: str, started: float) -> Optional[RuntimeError]:
        """The mismatch error of call ``seq`` if the ranks' records show one (the recorded one when the monitor
        found it), else None. Called once on a call's transport error; never raises. Bounded in time: the store
        may be unreachable too (its host stopped), and then the transport error must not wait for the store's
        own timeout; the records are read on a helper thread given at most ``2 x threshold + 1`` seconds.
        Cheap for the common transport error (a peer died): the records are read only when the verdict key names
        this call (a peer that gave up because of a mismatch wrote it first) or the call (begun at ``started``,
        time.monotonic()) is old enough for the ranks to have published records; else one store read."""
        found = self._mismatch
        if found is not None and found[0] == seq:
            return found[1]
        result: list = []
        old = time.monotonic() - started >= self.threshold
        reader = threading.Thread(target=lambda: result.append(self._diagnose_now(seq, signature, collective, old)),
                                  daemon=True, name=f"paracomm-diagnose-{self._rank}")
        reader.start()
        reader.join(2 * self.threshold + 1.0)
        return result[0] if result else None

    def _diagnose_now(self, seq: int, signature: tuple, collective: str, old: bool) -> Optional[RuntimeError]:
        with self._lock:
            found = self._mismatch
            if found is not None and found[0] == seq:
                return found[1]
            try:
                if not old and not self._verdict_is(seq):
                    return None
                if self._published != seq:
                    error, _ = self._publish_and_read(seq, signature, collective)
                else:
                    error, _ = self._read(seq, signature, collective)
            except Exception:  # noqa: BLE001  (the store is gone too: report the transport error)
                return None
            if error is not None:
                self._mismatch = (seq, error)
            return error

    def announce_mismatch(self, seq: int, signature: tuple, peers: list, timeout_s: float) -> None:
        """Call ``seq`` failed a signature check among ``peers`` (ranks, this one included) that every one of them
        made itself, before any data moved (the mixed transport's node stage). Publish this rank's record and the
        verdict, then wait (at most ``timeout_s``) until every peer's record of ``seq`` is in the store, so that
        when these ranks drop their groups, a rank elsewhere that sees its connection close reads the records
        and reports the mismatch, not a closed connection. Never raises (store errors end the wait)."""
        with self._lock:
            try:
                self._store.set(f"{self._base}/{self._rank}", _sig.encode_record(seq, signature))
                self._published = seq
                self._store.set(f"{self._base}/verdict", _sig.encode_record(seq, signature))
            except Exception:  # noqa: BLE001  (the store is gone: peers report what they see)
                return
        deadline = time.monotonic() + timeout_s
        waiting = [p for p in peers if p != self._rank]
        while waiting and time.monotonic() < deadline:
            try:
                waiting = [p for p in waiting if not (self._store.check([f"{self._base}/{p}"]) and
                                                      _sig.decode_record(self._store.get(f"{self._base}/{p}"))[0]
                                                      == seq)]
            except Exception:  # noqa: BLE001
                return
            if waiting:
                time.sleep(0.002)

    # ---- store records (callers hold self._lock) ----

    def _publish_and_read(self, seq: int, signature: tuple, collective: str) -> tuple:
        self._store.set(f"{self._base}/{self._rank}", _sig.encode_record(seq, signature))
        self._published = seq
        return self._read(seq, signature, collective)

    def _verdict_is(self, seq: int) -> bool:
        key = f"{self._base}/verdict"
        return self._store.check([key]) and _sig.decode_record(self._store.get(key))[0] == seq

    def _read(self, seq: int, signature: tuple, collective: str) -> tuple:
        """Read every peer's record: (the mismatch error at ``seq`` or None, whether every rank had a record of
        ``seq``). On a mismatch the verdict key is written, so every rank learns it at its next tick."""
        signatures: list = [None] * self._world_size
        signatures[self._rank] = tuple(signature)
        for peer in range(self._world_size):
            if peer == self._rank:
                continue
            key = f"{self._base}/{peer}"
            if not self._store.check([key]):  # never a blocking get of a key that may not exist
                continue
            peer_seq, peer_signature = _sig.decode_record(self._store.get(key))
            if peer_seq == seq:
                signatures[peer] = peer_signature
        error = _sig.mismatch_error(signatures, self._where(collective))
        if error is not None:
            self._store.set(f"{self._base}/verdict", _sig.encode_record(seq, signature))
        return error, all(s is not None for s in signatures)


def encode_failure(rank: int, seq: int, reason: str) -> str:
    """The store record of a failed Communicator: ``"rank|seq|reason"``."""
    return f"{rank}|{seq}|{reason}"


def decode_failure(value) -> Optional[tuple]:
    """(rank, seq, reason) of a failure record; None for anything else (never a false failure)."""
    try:
        rank, seq, reason = bytes(value).decode().split("|", 2)
        return int(rank), int(seq), reason
    except (ValueError, UnicodeDecodeError):
        return None


def publish_failure(store, prefix: str, rank: int, seq: int, reason: str) -> None:
    """Publish that this rank's Communicator failed in call ``seq`` (module docstring), on a daemon thread:
    the caller is already on an error path and the store may be unreachable too (its host stopped), so nothing
    waits for it. The first record stays (``compare_set`` on an absent key); store errors are ignored."""
    def write():
        try:
            store.compare_set(f"{prefix}/sig/failed", "", encode_failure(rank, seq, reason))
        except Exception:  # noqa: BLE001  (best effort: peers still have their own timeout)
            pass

    threading.Thread(target=write, daemon=True, name=f"paracomm-failed-{rank}").start()


def _interrupt(executor) -> None:
    """Make the call's blocked waits return (gloo: its pending works are aborted; shared memory: the transport
    fails, so its local peers raise within one sleep slice). The call then reports the recorded mismatch."""
    interrupt = getattr(type(executor), "interrupt", None)
    try:
        if interrupt is not None:
            interrupt(executor)
        else:
            executor.abort()
    except Exception:  # noqa: BLE001  (already closed)
        pass


def _run(ref: "weakref.ref") -> None:
    while True:
        time.sleep(TICK_S)
        monitor = ref()
        if monitor is None:
            return
        try:
            monitor.tick()
        except Exception:  # noqa: BLE001  (a monitor must never kill its thread on a transient error)
            pass
        del monitor
