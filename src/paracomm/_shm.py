"""The CPU transport choice, and the shared-memory executor for ranks that share a host.

``PARACOMM_CPU_TRANSPORT`` (read once per Communicator, when its CPU executor is created):

* ``auto`` (default): shared memory when every rank of the group is on this host, else gloo. "This host" is
  the node identity of :func:`paracomm._topology.host_identity` (hostname, the kernel's boot id and the network
  namespace, so the ranks of an emulated node stay on gloo), exchanged once through the group's store (the same
  answer on every rank: each compares every rank's identity with its own). Every collective and every plan
  runs on it, hierarchical ones over a node map (``PARACOMM_NODE_SIZE``) of this host's ranks included;
* ``shm``: shared memory, and an error when the ranks are not all on one host;
* ``gloo``: paracomm's private gloo group (:mod:`paracomm._cpu_executor`) whatever the placement;
* ``mixed``: shared memory inside each node of the node map, gloo between nodes (:mod:`paracomm._mixed`);
  ``auto`` picks it when the ranks are not all on this host and every node is one host with the same number
  (>= 2) of ranks; asked for, it raises when that does not hold.

Every rank must use the same setting; the store exchange carries it, so a difference raises on every rank.

:class:`ShmExecutor` wraps ``paracomm._C.ShmComm`` (csrc/shm/shm_comm.h): rank 0 creates a segment (mode 0600,
random name) and publishes its name through the store; every rank maps it, and once all have (a store
barrier) every rank unlinks it, so nothing is left in /dev/shm whatever happens later (a rank killed by
SIGKILL included). A call (all-reduce, reduce-scatter, all-gather) is then one C++ call that checks the call's
signature against every peer's, runs the plan (the gloo path's plans, so the same algorithm gives the same
bits) and its reductions, and raises naming the peer when one dies (noticed through its pid within ~20 ms of
sleeping), fails, or the timeout expires. What stays constant per signature (the plan, its analyses, the
codes) is prepared once (``ShmComm.prepare``) and cached here.
"""
from __future__ import annotations

import os
import re
import time
from datetime import timedelta

from . import _C, _topology

TRANSPORTS = ("auto", "shm", "gloo", "mixed")
_ALGORITHM_CODES = {"auto": -1, "ring": 0, "direct": 1, "one_shot": 2, "hierarchical": 3}
_COLLECTIVE_CODES = {"all_reduce": 0, "reduce_scatter": 1, "all_gather": 2}
_FIXED_CACHE_SIZE = 64
_PEER = re.compile(r"peer rank (\d+)")


def peer_of(error: BaseException):
    """The rank a transport error names ("peer rank r"), or None."""
    m = _PEER.search(str(error))
    return int(m.group(1)) if m else None


def _default_chunk_bytes() -> int:
    """PARACOMM_SHM_CHUNK_BYTES (default 256 KiB): the plan's piece size on shm when PARACOMM_CHUNK_BYTES is unset.

    Small enough that a direct piece's receive slots and its reduction's inputs stay in L2 (1 MiB here), large
    enough that the per-step handshake is amortised. Read once per Communicator; every rank must agree (the
    value is part of the signature every call checks)."""
    value = os.environ.get("PARACOMM_SHM_CHUNK_BYTES", "").strip()
    if not value:
        return 256 * 1024
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"paracomm: PARACOMM_SHM_CHUNK_BYTES must be a positive integer, got {value!r}")
    return int(value)


def transport_setting() -> str:
    """``PARACOMM_CPU_TRANSPORT``: "auto" (default), "shm", "gloo" or "mixed"; ValueError otherwise."""
    value = os.environ.get("PARACOMM_CPU_TRANSPORT", "").strip().lower() or "auto"
    if value not in TRANSPORTS:
        raise ValueError(f"paracomm: PARACOMM_CPU_TRANSPORT must be one of {', '.join(TRANSPORTS)}, got {value!r}")
    return value


def _exchange_placement(store, prefix: str, rank: int, world_size: int, timeout: timedelta, setting: str) -> list:
    """Every rank's host identity (paracomm._topology.host_identity), by rank. Raises on every rank when the
    settings differ."""
    base = f"{prefix}/transport"
    store.set(f"{base}/{rank}", f"{setting}|{_topology.host_identity()}")
    keys = [f"{base}/{r}" for r in range(world_size)]
    store.wait(keys, timeout)
    values = [bytes(store.get(k)).decode().split("|", 1) for k in keys]
    settings = [v[0] for v in values]
    if any(s != settings[0] for s in settings):
        per_rank = ", ".join(f"rank {r}: {s}" for r, s in enumerate(settings))
        raise ValueError(f"paracomm: PARACOMM_CPU_TRANSPORT differs between ranks ({per_rank})")
    return [v[1] for v in values]


def make_cpu_executor(store, prefix: str, rank: int, world_size: int, timeout: timedelta, node_map=None):
    """The CPU executor of a Communicator: :class:`ShmExecutor`, :class:`paracomm._mixed.MixedExecutor` or the
    gloo ``CpuExecutor`` (module docstring). ``node_map()``: the group's node map (rank -> node, every rank's
    entry), asked only when the mixed transport is considered.

    Collective over the group (a store exchange, then the executor's own rendezvous). Raises ValueError for a
    bad or inconsistent ``PARACOMM_CPU_TRANSPORT``, ``shm`` with ranks on several hosts, or ``mixed`` where a
    node spans hosts or the nodes differ in size.
    """
    setting = transport_setting()
    if world_size > 1:
        identities = _exchange_placement(store, prefix, rank, world_size, timeout, setting)
        local = all(i == identities[rank] for i in identities)
        if setting == "shm" and not local:
            raise ValueError("paracomm: PARACOMM_CPU_TRANSPORT=shm but the group's ranks are not all on one host "
                             "(hostname, boot id or network namespace differ); use auto or gloo")
        if setting == "mixed" or (setting == "auto" and not local):
            from ._mixed import MixedExecutor, mixed_refusal

            nodes = list(node_map()) if node_map is not None else [0] * world_size
            why = mixed_refusal(nodes, identities)
            if why is None:
                return MixedExecutor(store, prefix, rank, world_size, timeout, nodes)
            if setting == "mixed":
                raise ValueError(f"paracomm: PARACOMM_CPU_TRANSPORT=mixed but {why}; use auto or gloo")
        elif setting != "gloo" and local:
            return ShmExecutor(store, prefix, rank, world_size, timeout)
    from ._cpu_executor import CpuExecutor

    return CpuExecutor(store, prefix, rank, world_size, timeout)


def transport_of(comm) -> str:
    """The CPU transport a Communicator uses ("shm", "mixed" or "gloo"), creating its CPU executor if needed
    (collective: call it on every rank)."""
    if comm.world_size == 1:
        return "none (world size 1)"
    return getattr(comm._cpu_executor(), "transport", "gloo")


class ShmExecutor:
    """Runs every CPU collective of one Communicator through a shared-memory segment (the module docstring).

    Args:
        store: the group's store; keys under ``prefix + "/shm"``.
        prefix: unique to the Communicator and the same on every rank.
        rank, world_size: this process in the group (all on this host).
        timeout: bound on the rendezvous.
    """

    transport = "shm"

    def __init__(self, store, prefix: str, rank: int, world_size: int, timeout: timedelta):
        from .comm import _DTYPE_CODES  # comm imports this module lazily, through make_cpu_executor

        self._dtype_codes = _DTYPE_CODES
        self.rank = rank
        self.world_size = world_size
        base = f"{prefix}/shm"
        if rank == 0:
            comm = _C.ShmComm("", True, 0, world_size)
            store.set(f"{base}/name", comm.name)
        else:
            store.wait([f"{base}/name"], timeout)
            comm = _C.ShmComm(bytes(store.get(f"{base}/name")).decode(), False, rank, world_size)
        self.name = comm.name
        try:
            store.set(f"{base}/mapped/{rank}", "1")
            store.wait([f"{base}/mapped/{r}" for r in range(world_size)], timeout)
        finally:
            # Every rank unlinks (the first one wins) once all have mapped it, or when the rendezvous failed.
            _C.ShmComm.unlink(self.name)
        comm.attach_peers(timeout.total_seconds())
        self._comm = comm
        self._fixed: dict = {}  # (signature, chunk_bytes) -> the prepared call (ShmComm.prepare)
        self._default_chunk = _default_chunk_bytes()
        self._barrier = None

    def prepared(self, call, signature: tuple, chunk_bytes: int, key=None):
        """The call's constant part (its plan and analyses, ``_C.ShmPrepared``), made once per signature (or per
        ``key`` when given: the mixed transport's stages run other calls under their caller's signature)."""
        # Unless PARACOMM_CHUNK_BYTES says otherwise, pieces sized for L2 (the chunking never changes a bit).
        chunk_bytes = chunk_bytes or self._default_chunk
        key = (signature if key is None else key, chunk_bytes)
        fixed = self._fixed.get(key)
        if fixed is None:
            wire = -1 if call.wire_dtype is None else self._dtype_codes[call.wire_dtype]
            fixed = self._comm.prepare(
                _COLLECTIVE_CODES[call.collective], call.plan_numel, self._dtype_codes[call.flat.dtype], wire,
                _ALGORITHM_CODES[call.algorithm], call.divisor, call.found_inf is not None, call.has_final_op,
                chunk_bytes, list(call.node_map), list(signature) + [chunk_bytes])
            if len(self._fixed) >= _FIXED_CACHE_SIZE:
                self._fixed.clear()
            self._fixed[key] = fixed
        return fixed

    def run(self, call, prepared, deadline: float, mismatch_error, on_error) -> None:
        """Run ``call`` (any collective; ``call.flat`` the output, ``call.input`` the out-of-place input) with
        its ``prepared`` part (:meth:`prepared`), one C++ call.

        ``mismatch_error(signatures)`` builds the error raised when the ranks' signatures differ (checked on
        every call, before any data moves); ``on_error(what, e, peer)`` the one raised when the transport fails
        (a peer died or failed, or ``deadline`` passed; ``peer`` the rank the error names, or None).
        """
        scale, found, inp = call.scale, call.found_inf, call.input
        try:
            mismatch = self._comm.run(prepared, call.flat.data_ptr(), 0 if inp is None else inp.data_ptr(),
                                      0 if scale is None else scale.data_ptr(),
                                      0 if found is None else found.data_ptr(), deadline - time.monotonic())
        except RuntimeError as e:
            raise on_error(f"the shared-memory {call.collective.replace('_', '-')}", e, peer_of(e)) from e
        if mismatch is not None:
            raise self.mismatch_error(mismatch, call.collective, mismatch_error)

    @staticmethod
    def mismatch_error(signatures: list, collective: str, mismatch_error) -> RuntimeError:
        """The error of a signature mismatch: ``signatures`` as ``ShmComm.run`` returns them (each rank's, the
        chunk size last), ``mismatch_error`` as :meth:`run` takes it."""
        error = mismatch_error([s[:-1] for s in signatures])
        if error is None:
            chunks = ", ".join(f"rank {r}: {s[-1]}" for r, s in enumerate(signatures))
            error = RuntimeError(f"paracomm.{collective}: ranks called {collective} with different "
                                 f"arguments: PARACOMM_CHUNK_BYTES differs ({chunks})")
        return error

    def barrier(self, timeout_s: float) -> None:
        """The transport's entry barrier alone (a zero-element call with a signature no collective has): every
        rank returns once all have entered. For benchmarks (one common barrier before every iteration)."""
        if self._barrier is None:
            self._barrier = self._comm.prepare(0, 0, 0, -1, 2, 1.0, False, False, 0, [], [-1])
        if self._comm.run(self._barrier, 0, 0, 0, 0, timeout_s) is not None:
            raise RuntimeError("paracomm: shm barrier: a peer made another call")

    def wait_stats(self) -> dict:
        """This rank's waits over the transport's life: ``{'sleeps': int, 'slept_s': float, 'wakes': int,
        'moves': int}``: futex sleeps entered after the spin budget ran out, seconds in them, wakes made for
        sleeping peers, moves off a CPU shared with a peer (csrc/shm/shm_comm.cpp, wait_until)."""
        return self._comm.wait_stats()

    def fail(self) -> None:
        """Give up on the transport: this rank's peers raise in their current or next call."""
        self._comm.fail()

    def abort(self) -> None:
        """As the gloo executor's abort (the Communicator failed): fail the transport, so peers waiting on this
        rank raise within one sleep slice. Idempotent; never creates anything."""
        self._comm.fail()
