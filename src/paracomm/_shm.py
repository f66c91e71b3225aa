"""The CPU transport choice, and the shared-memory executor for ranks that share a host.

``PARACOMM_CPU_TRANSPORT`` (read once per Communicator, when its CPU executor is created):

* ``auto`` (default): shared memory when every rank of the group is on this host, else gloo. "This host" is
  the node identity of :func:`paracomm._topology.host_identity` (hostname, the kernel's boot id and the network
  namespace, so the ranks of an emulated node stay on gloo), exchanged once through the group's store (the same
  answer on every rank: each compares every rank's identity with its own). Calls over several nodes of the node
  map (``PARACOMM_NODE_SIZE``) and the out-of-place collectives run on the gloo fallback;
* ``shm``: shared memory, and an error when the ranks are not all on one host;
* ``gloo``: paracomm's private gloo group (:mod:`paracomm._cpu_executor`) whatever the placement.

Every rank must use the same setting; the store exchange carries it, so a difference raises on every rank.

:class:`ShmExecutor` wraps ``paracomm._C.ShmComm`` (csrc/shm/shm_comm.h): rank 0 creates a segment (mode 0600,
random name) and publishes its name through the store; every rank maps it, and once all have (a store
barrier) every rank unlinks it, so nothing is left in /dev/shm whatever happens later (a rank killed by
SIGKILL included). An all-reduce is then one C++ call that checks the call's signature against every peer's,
runs the plan (the gloo path's plans, so the same algorithm gives the same bits) and its reductions, and
raises when a peer dies (noticed through its pid within ~20 ms of sleeping), fails, or the timeout expires.
"""
from __future__ import annotations

import os
import time
from datetime import timedelta

from . import _C, _topology

TRANSPORTS = ("auto", "shm", "gloo")
_ALGORITHM_CODES = {"auto": -1, "ring": 0, "direct": 1, "one_shot": 2}
_FIXED_CACHE_SIZE = 64


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
    """``PARACOMM_CPU_TRANSPORT``: "auto" (default), "shm" or "gloo"; ValueError otherwise."""
    value = os.environ.get("PARACOMM_CPU_TRANSPORT", "").strip().lower() or "auto"
    if value not in TRANSPORTS:
        raise ValueError(f"paracomm: PARACOMM_CPU_TRANSPORT must be one of {', '.join(TRANSPORTS)}, got {value!r}")
    return value


def _exchange_placement(store, prefix: str, rank: int, world_size: int, timeout: timedelta, setting: str) -> bool:
    """True when every rank of the group is on this host. Raises on every rank when the settings differ."""
    base = f"{prefix}/transport"
    store.set(f"{base}/{rank}", f"{setting}|{_topology.host_identity()}")
    keys = [f"{base}/{r}" for r in range(world_size)]
    store.wait(keys, timeout)
    values = [bytes(store.get(k)).decode().split("|", 1) for k in keys]
    settings = [v[0] for v in values]
    if any(s != settings[0] for s in settings):
        per_rank = ", ".join(f"rank {r}: {s}" for r, s in enumerate(settings))
        raise ValueError(f"paracomm: PARACOMM_CPU_TRANSPORT differs between ranks ({per_rank})")
    return all(v[1] == values[rank][1] for v in values)


def make_cpu_executor(store, prefix: str, rank: int, world_size: int, timeout: timedelta):
    """The CPU executor of a Communicator: :class:`ShmExecutor` or the gloo ``CpuExecutor`` (module docstring).

    Collective over the group (a store exchange, then the executor's own rendezvous). Raises ValueError for a
    bad or inconsistent ``PARACOMM_CPU_TRANSPORT``, or ``shm`` with ranks on several hosts.
    """
    setting = transport_setting()
    if world_size > 1:
        local = _exchange_placement(store, prefix, rank, world_size, timeout, setting)
        if setting == "shm" and not local:
            raise ValueError("paracomm: PARACOMM_CPU_TRANSPORT=shm but the group's ranks are not all on one host "
                             "(hostname, boot id or network namespace differ); use auto or gloo")
        if setting != "gloo" and local:
            return ShmExecutor(store, prefix, rank, world_size, timeout)
    from ._cpu_executor import CpuExecutor

    return CpuExecutor(store, prefix, rank, world_size, timeout)


def transport_of(comm) -> str:
    """The CPU transport a Communicator uses ("shm" or "gloo"), creating its CPU executor if needed (collective:
    call it on every rank)."""
    if comm.world_size == 1:
        return "none (world size 1)"
    return "shm" if isinstance(comm._cpu_executor(), ShmExecutor) else "gloo"


class ShmExecutor:
    """Runs CPU all-reduces of one Communicator through a shared-memory segment (see the module docstring).

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
        self._gloo = None  # a CpuExecutor for what shm does not run (see __getattr__)
        self._gloo_args = (store, prefix, rank, world_size, timeout)
        self._fixed: dict = {}  # (signature, chunk_bytes) -> the call's constant arguments
        self._default_chunk = _default_chunk_bytes()

    def __getattr__(self, name):
        # Anything else a caller expects of the gloo CpuExecutor (its ``run(plan, ...)``, ``pg``: e.g. a
        # collective not yet ported to shm) goes to one, created on first use. Creating it is a rendezvous of
        # the group's ranks, which all make the same collective call.
        if name.startswith("_"):
            raise AttributeError(name)
        if self._gloo is None:
            from ._cpu_executor import CpuExecutor

            self._gloo = CpuExecutor(*self._gloo_args)
        return getattr(self._gloo, name)

    def all_reduce(self, call, signature: tuple, chunk_bytes: int, deadline: float, mismatch_error,
                   on_error) -> None:
        """All-reduce ``call.flat`` in place (one C++ call).

        ``signature``: the call's signature tuple (ranks must agree on it; checked on every call, before any data
        moves). ``mismatch_error(signatures)`` builds the error raised when they differ; ``on_error(what, e)``
        the one raised when the transport fails (a peer died or failed, or ``deadline`` passed).
        """
        # Unless PARACOMM_CHUNK_BYTES says otherwise, pieces sized for L2 (the chunking never changes a bit).
        chunk_bytes = chunk_bytes or self._default_chunk
        key = (signature, chunk_bytes)
        fixed = self._fixed.get(key)
        if fixed is None:
            x = call.flat
            wire = -1 if call.wire_dtype is None else self._dtype_codes[call.wire_dtype]
            fixed = (x.numel(), self._dtype_codes[x.dtype], wire, _ALGORITHM_CODES[call.algorithm], call.divisor,
                     call.has_final_op, chunk_bytes, list(signature) + [chunk_bytes])
            if len(self._fixed) >= _FIXED_CACHE_SIZE:
                self._fixed.clear()
            self._fixed[key] = fixed
        numel, dtype, wire, algo, divisor, final_op, chunk, published = fixed
        scale, found = call.scale, call.found_inf
        try:
            mismatch = self._comm.all_reduce(
                call.flat.data_ptr(), numel, dtype, wire, algo, divisor,
                0 if scale is None else scale.data_ptr(), 0 if found is None else found.data_ptr(),
                final_op, chunk, published, deadline - time.monotonic())
        except RuntimeError as e:
            raise on_error("the shared-memory all-reduce", e) from e
        if mismatch is None:
            return
        error = mismatch_error([s[:-1] for s in mismatch])
        if error is None:
            chunks = ", ".join(f"rank {r}: {s[-1]}" for r, s in enumerate(mismatch))
            error = RuntimeError("paracomm.all_reduce: ranks called all_reduce with different arguments: "
                                 f"PARACOMM_CHUNK_BYTES differs ({chunks})")
        raise error

    def fail(self) -> None:
        """Give up on the transport: this rank's peers raise in their current or next call."""
        self._comm.fail()

    def abort(self) -> None:
        """As the gloo executor's abort (the Communicator failed): fail the transport, so peers waiting on this
        rank raise within one sleep slice, and close the gloo fallback if one was made. Idempotent; never
        creates anything."""
        self._comm.fail()
        if self._gloo is not None:
            self._gloo.abort()
