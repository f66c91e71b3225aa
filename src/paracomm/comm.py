"""paracomm's all-reduce: :class:`Communicator`, :func:`all_reduce` and :func:`explain_all_reduce`.

An all-reduce is a *plan* (csrc/allreduce/plan.h), data produced by one of three algorithms (ring, direct,
one_shot; :func:`explain_all_reduce` shows which and what it costs) and run by an executor that knows no
algorithm:

* CUDA tensors: paracomm's own NCCL communicator (``paracomm._C.NcclComm``, CUDA builds only), bootstrapped
  through the process group's store; one NCCL group per plan step, transfers and reductions on paracomm's own
  streams after the caller's current stream, no host synchronisation (csrc/allreduce/nccl_executor.h).
* CPU tensors: :class:`paracomm._cpu_executor.CpuExecutor`, gloo point-to-point on a private gloo group of the
  same ranks and the CPU reduction op.

Both give bitwise identical results on every rank and from run to run: every output element is computed by one
owner whose bits the others copy, or by every rank from identical inputs in the same order.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import os
import threading
import time
import weakref
from datetime import timedelta
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from . import _C
from ._cpu_executor import CpuExecutor, PreparedPlan, deadline_wait
from . import _monitor
from ._monitor import CallMonitor
from ._mixed import MixedExecutor
from ._shm import ShmExecutor, make_cpu_executor, peer_of as _shm_peer_of
from ._ops import reduce_
from ._validate import check_op_and_wire, check_process_group, check_scalar_tensor, check_wire_dtype

__all__ = ["Communicator", "Work", "all_reduce", "explain_all_reduce"]

from ._signature import ALGORITHMS, DTYPE_CODES as _DTYPE_CODES, OPS as _OPS
from . import _signature as _sig
from . import _topology

_ALGORITHM_CODES = {"ring": 0, "direct": 1, "one_shot": 2, "hierarchical": 3}  # paracomm::Algorithm
_MAX_REDUCE_RANKS = 32  # kMaxReduceInputs in csrc/allreduce/plan.h
_PLAN_CACHE_SIZE = 64  # plans kept per Communicator (one per signature in use; DDP uses a handful)
_INT64_MAX = (1 << 63) - 1
_environ_get = os.environ.get
# The shm fast path's key holds two environment values per call. os.environ.get encodes the key and decodes the
# value every time (~1.1 us each, measured: bench/NOTES.md, round 4); os.environ's own dict of raw values (bytes
# keys on POSIX) is kept in step by every os.environ write, so reading it directly changes the key exactly when
# os.environ.get's values change. Elsewhere (no such dict): os.environ.get.
_ENV_RAW = getattr(os.environ, "_data", None)
if isinstance(_ENV_RAW, dict) and isinstance(next(iter(_ENV_RAW), b""), bytes):
    _env_raw_get = _ENV_RAW.get
    _ENV_CHUNK, _ENV_CHECK = b"PARACOMM_CHUNK_BYTES", b"PARACOMM_CHECK_SHAPES"
else:
    _env_raw_get = _environ_get
    _ENV_CHUNK, _ENV_CHECK = "PARACOMM_CHUNK_BYTES", "PARACOMM_CHECK_SHAPES"

# Communicators created so far per process group name: the n-th Communicator over a group gets the same store
# prefix on every rank, as long as every rank creates its Communicators in the same order (as collectives).
_instance_counts: dict = {}
_instance_lock = threading.Lock()

# Said wherever a call can wait for peers that never come: the usual causes, named.
_ORDER_HINT = ("every rank must create its Communicators (and hook states, GradBucketers) in the same order and "
               "issue the same calls in the same order")


def _env_int(name: str, default: int, low: int, high: int, meaning: str) -> int:
    """An integer environment variable in [low, high], or ``default`` when unset/empty; ValueError naming it."""
    value = os.environ.get(name, "").strip()
    if value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"paracomm: {name} must be {meaning}, got {value!r}") from None
    if not low <= number <= high:
        raise ValueError(f"paracomm: {name} must be {meaning} in [{low}, {high}], got {number}")
    return number


def _check_shapes_mode() -> int:
    """PARACOMM_CHECK_SHAPES: 0 off; 1 (default) every call on gloo, every call on NCCL through the device
    header plus the store handshake at the first sight of a signature; 2 also the store handshake every call."""
    return _env_int("PARACOMM_CHECK_SHAPES", 1, 0, 2, "0 (off), 1 (default) or 2 (every call, NCCL too)")


def _group_timeout(group) -> timedelta:
    """The process group's own timeout (what ``init_process_group(timeout=...)`` / ``new_group`` set)."""
    for device in ("cpu", "cuda"):
        try:
            timeout = group._get_backend(torch.device(device)).options._timeout
        except Exception:  # noqa: BLE001  (no backend for that device, or no options on it)
            continue
        if isinstance(timeout, timedelta) and timeout.total_seconds() > 0:
            return timeout
    return c10d.default_pg_timeout


def check_timeout(timeout, name: str) -> Optional[timedelta]:
    """None (follow the process group) or a positive datetime.timedelta; TypeError/ValueError naming it."""
    if timeout is None:
        return None
    if not isinstance(timeout, timedelta):
        raise TypeError(f"{name}: timeout must be None or a datetime.timedelta, got {type(timeout).__name__}")
    if timeout.total_seconds() <= 0:
        raise ValueError(f"{name}: timeout must be positive, got {timeout}")
    return timeout


def _check_bool(value, arg: str, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: {arg} must be True or False, got {value!r}")
    return value


def _check_algorithm(algorithm, name: str) -> str:
    if not isinstance(algorithm, str):
        raise TypeError(f"{name}: algorithm must be one of {', '.join(map(repr, ALGORITHMS))}, got {algorithm!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{name}: algorithm must be one of {', '.join(map(repr, ALGORITHMS))}, got {algorithm!r}")
    return algorithm


def _check_rank_limit(algorithm: str, world_size: int, name: str) -> None:
    """direct and one_shot sum all N inputs in one reduction: at most _MAX_REDUCE_RANKS (kMaxReduceInputs)."""
    if algorithm in ("direct", "one_shot") and world_size > _MAX_REDUCE_RANKS:
        raise ValueError(f"{name}: algorithm={algorithm!r} serves at most {_MAX_REDUCE_RANKS} ranks (one reduction "
                         f"sums all of them), got world_size {world_size}; use 'ring' or 'auto'")


def _default_algorithm() -> str:
    """PARACOMM_ALGORITHM, or "auto"."""
    value = os.environ.get("PARACOMM_ALGORITHM", "").strip()
    if not value:
        return "auto"
    if value not in ALGORITHMS:
        raise ValueError(f"paracomm: PARACOMM_ALGORITHM must be one of {', '.join(ALGORITHMS)}, got {value!r}")
    return value


def _op_name(op, name: str) -> str:
    """'sum' | 'avg' from a string or a torch.distributed.ReduceOp (SUM, AVG); ValueError/TypeError otherwise."""
    if isinstance(op, str):
        if op in _OPS:
            return op
        raise ValueError(f"{name}: op must be 'sum', 'avg', ReduceOp.SUM or ReduceOp.AVG, got {op!r}")
    reduce_op = getattr(dist, "ReduceOp", None)
    if reduce_op is not None and isinstance(op, (reduce_op, reduce_op.RedOpType)):
        if op == reduce_op.SUM:
            return "sum"
        if op == reduce_op.AVG:
            return "avg"
        raise ValueError(f"{name}: op {op} is not supported (paracomm reduces with SUM or AVG)")
    raise TypeError(f"{name}: op must be 'sum', 'avg', ReduceOp.SUM or ReduceOp.AVG, got {type(op).__name__}")


def _chunk_bytes() -> int:
    """PARACOMM_CHUNK_BYTES (bytes of the travelling dtype per piece), or 0: the plan's chunk policy."""
    return _env_int("PARACOMM_CHUNK_BYTES", 0, 1, _INT64_MAX, "an integer number of bytes")


def _group_backends(group) -> tuple:
    """(serves_cpu_over_gloo, serves_cuda_over_nccl) for a process group's backend string.

    "gloo" -> CPU; "nccl" -> CUDA; "cpu:gloo,cuda:nccl" -> both.
    """
    name = str(dist.get_backend(group)).lower()
    if ":" in name:
        cpu = cuda = False
        for part in name.split(","):
            device, _, backend = part.partition(":")
            if device.strip() == "cpu" and backend.strip() == "gloo":
                cpu = True
            if device.strip() == "cuda" and backend.strip() == "nccl":
                cuda = True
        return cpu, cuda
    return name == "gloo", name == "nccl"


class Work:
    """Handle of an ``async_op=True`` all-reduce.

    ``wait()`` blocks until the reduction is done (on CUDA, as torch's NCCL work: makes the stream current at the
    time of ``wait()`` wait for the call's completion, without a host synchronisation; until then the caller's
    stream runs freely beside the all-reduce) and returns what the synchronous call returns (the tensor, or the
    ``__dlpack__`` object that was passed in); it raises the all-reduce's error if the collective failed.
    ``get_future()`` returns a ``torch.futures.Future`` whose value is the reduced tensor (CUDA-aware on CUDA,
    completed on paracomm's stream as torch's NCCL futures are: ``then()`` callbacks and DDP wait for it on their
    current stream).
    """

    def __init__(self, future: torch.futures.Future, result, done_event=None, check=None, keep=()):
        self._future = future
        self._result = result
        self._done_event = done_event  # torch.cuda.Event recorded after the call's last operation, or None
        self._check = check  # raises the communicator's asynchronous error (NCCL), or None
        self._keep = keep  # tensors the call uses (scale, found_inf), held until wait()

    def wait(self, timeout: Optional[timedelta] = None):
        """Wait for completion; return the reduced tensor (or the ``__dlpack__`` object given). Raises its error.

        ``timeout`` is accepted for compatibility with ``torch.distributed.Work.wait`` and not used: the
        Communicator's own timeout already bounds every call, and a call past it raises here.
        """
        del timeout
        self._future.wait()  # CUDA: the current stream waits for the call's completion event (no host sync)
        self._keep = ()
        if self._check is not None:
            self._check()
        return self._result

    def is_completed(self) -> bool:
        """True once the reduction has finished (successfully or not)."""
        if not self._future.done():
            return False
        if self._done_event is not None:
            return bool(self._done_event.query())
        return True

    def get_future(self) -> torch.futures.Future:
        """A ``torch.futures.Future`` completed with the reduced tensor (or with the all-reduce's error)."""
        return self._future


class _Call:
    """One validated collective call: a flat view of the data plus everything the executors need.

    ``collective`` names the collective (a :data:`paracomm._signature.COLLECTIVES` entry) and ``chunk_bytes``
    is PARACOMM_CHUNK_BYTES as read once for this call: both are part of the signature, like every input that
    changes the plan.
    """

    __slots__ = ("flat", "result", "tensor", "op", "divisor", "wire_dtype", "scale", "found_inf", "algorithm",
                 "collective", "chunk_bytes", "input", "node_map")

    def __init__(self, flat, result, tensor, op, divisor, wire_dtype, scale, found_inf, algorithm,
                 collective: str = "all_reduce", chunk_bytes: int = 0, input=None):
        self.flat = flat
        self.result = result
        self.tensor = tensor
        self.op = op
        self.divisor = divisor
        self.wire_dtype = wire_dtype
        self.scale = scale
        self.found_inf = found_inf
        self.algorithm = algorithm
        self.collective = collective
        self.chunk_bytes = chunk_bytes
        self.input = input  # out-of-place collectives (paracomm.collectives): the flat input; flat is the output
        self.node_map = ()  # rank -> node the plan is made for: set by the executor's path (() for one node)

    @property
    def plan_numel(self) -> int:
        """The plan's numel (plan.h): all-reduce / reduce-scatter the output's, all-gather the input's."""
        return self.input.numel() if self.collective == "all_gather" else self.flat.numel()

    @property
    def has_final_op(self) -> bool:
        return self.divisor != 1.0 or self.scale is not None or self.found_inf is not None


def _signature(call: _Call) -> tuple:
    """The call's signature: one int per field of paracomm._signature.FIELDS, in that order."""
    wire = -1 if call.wire_dtype is None else _DTYPE_CODES[call.wire_dtype]
    return (_sig.COLLECTIVES.index(call.collective), call.plan_numel, _DTYPE_CODES[call.flat.dtype],
            _OPS.index(call.op), wire, int(call.scale is not None), int(call.found_inf is not None),
            ALGORITHMS.index(call.algorithm), call.chunk_bytes,
            _topology.node_map_code(list(call.node_map)) if call.node_map else 0)


class _SignatureMismatch(Exception):
    """Carries a mismatch error out of a CPU call's wait (deadline_wait's on_error) to ``_run_cpu``, which
    replaces the private group before raising ``error``."""

    def __init__(self, error: RuntimeError):
        super().__init__(str(error))
        self.error = error


def _mismatch_error(signatures: list, where: str = "paracomm.all_reduce") -> Optional[RuntimeError]:
    """None when every rank's signature agrees; else an error listing every field that differs, per rank."""
    return _sig.mismatch_error(signatures, where)


class _PlanCache:
    """Plans by (signature incl. the node map, world size, rank, backend, chunk bytes): pure data, built once.

    Each plan also carries its call's ``signature`` (computed once) and, once the gloo path has run it,
    ``tag_base`` (the data tags' high bits, from the Communicator's paracomm._signature.TagRegistry).
    """

    def __init__(self):
        self._plans: dict = {}
        self._lock = threading.Lock()

    def get(self, call: _Call, world_size: int, rank: int, backend: str, chunk_bytes: int) -> PreparedPlan:
        signature = _signature(call)
        key = (signature, world_size, rank, backend, chunk_bytes)
        with self._lock:
            plan = self._plans.get(key)
        if plan is None:
            wire = -1 if call.wire_dtype is None else _DTYPE_CODES[call.wire_dtype]
            plan = PreparedPlan(_C.collective_plan(
                call.collective, call.plan_numel, _DTYPE_CODES[call.flat.dtype], wire, world_size, rank,
                call.algorithm, backend, call.found_inf is not None, call.has_final_op, chunk_bytes,
                list(call.node_map)))
            plan.signature = signature
            with self._lock:
                if len(self._plans) >= _PLAN_CACHE_SIZE:
                    self._plans.pop(next(iter(self._plans)))  # oldest first (dicts keep insertion order)
                self._plans[key] = plan
        return plan


class Communicator:
    """All-reduce over the ranks of a ``torch.distributed`` process group.

    Args:
        group: the process group (the default group when None). Its backend decides what is served: "gloo"
            -> CPU tensors (paracomm's private gloo group over the same ranks), "nccl" -> CUDA tensors
            (paracomm's own NCCL communicator, created on first use), "cpu:gloo,cuda:nccl" -> both.
        timeout: bound on every call: a peer that stops answering (a dead or stalled rank) makes the call
            raise RuntimeError within about this time instead of hanging. None (default): the process
            group's own timeout (``init_process_group(timeout=...)``), as torch's collectives use.
        algorithm: the default for calls that pass none: "auto" (a size- and topology-based choice, see
            :func:`explain_all_reduce`), "ring", "direct", "one_shot" or "hierarchical". ``PARACOMM_ALGORITHM``
            sets the default of communicators created without one.
        node_size: ranks per node (ranks [0, K) are node 0, ...), overriding ``PARACOMM_NODE_SIZE`` and the
            host identity paracomm otherwise finds through the group's store on the first call
            (src/paracomm/_topology.py). More than one node makes "auto" pick the hierarchical all-reduce for
            large messages, on CPU (gloo) and CUDA (NCCL) tensors alike.

    Every rank of the group must create its Communicators in the same order (like a collective) and issue
    the same sequence of ``all_reduce`` calls.

    Threads: a Communicator may be called from several threads. Its lazy state (the private gloo group, the
    NCCL communicator, the store) is created under a lock, and calls are issued one at a time, in the order
    they take the Communicator's call lock, which is the order they run in on this rank. Two threads racing
    on two ranks can still issue in different orders there; the signature check (CPU) then raises the
    mismatch on every rank instead of exchanging the wrong buffers. Give each thread its own
    Communicator (created in the same order on every rank) when their calls are independent.

    Errors: every transport failure (a peer closed the connection, no answer within the timeout, a failed
    rendezvous) raises ``RuntimeError("paracomm.all_reduce (rank r of n): ...")`` naming the peer when
    known, marks the Communicator failed and tells its peers (shared memory: at once; gloo: through the store,
    so a peer's call fails about a second after it began, naming this rank and its reason, rather than at the
    peer's timeout); every later call raises at once with that first reason.

    Attributes: ``rank`` and ``world_size`` (in the group), ``backend`` ("nccl" or "gloo"; "nccl" for a group
    that has both), ``group``, ``timeout``, ``algorithm``.
    """

    def __init__(self, group=None, *, timeout: Optional[timedelta] = None, algorithm: Optional[str] = None,
                 node_size: Optional[int] = None):
        name = "paracomm.Communicator"
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"{name}: torch.distributed is not initialised "
                               "(call torch.distributed.init_process_group first)")
        check_timeout(timeout, name)
        self.algorithm = _default_algorithm() if algorithm is None else _check_algorithm(algorithm, name)
        self.group = group if group is not None else c10d._get_default_group()
        if self.group not in c10d._world.pg_map:
            raise RuntimeError(f"{name}: group has been destroyed (destroy_process_group)")
        self.timeout = timeout if timeout is not None else _group_timeout(self.group)
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        if self.rank < 0:
            raise ValueError(f"{name}: this process is not a member of group")
        self._node_size = None if node_size is None else _topology.check_node_size(node_size, self.world_size, name)
        self._node_map: Optional[tuple] = None  # found on the first call, CPU or CUDA (_group_node_map)
        self._serves_cpu, self._serves_cuda = _group_backends(self.group)
        if not (self._serves_cpu or self._serves_cuda):
            raise ValueError(f"{name}: group backend {dist.get_backend(self.group)!r} is not "
                             "supported (gloo for CPU tensors, nccl for CUDA tensors)")
        self.backend = "nccl" if self._serves_cuda else "gloo"
        with _instance_lock:
            key = self.group.group_name
            index = _instance_counts.get(key, 0)
            _instance_counts[key] = index + 1
        self._index = index
        self._prefix = f"paracomm/{key}/{index}"
        self._store = None  # the group's store, fetched on first use
        self._plans = _PlanCache()
        self._seen: set = set()  # signatures already checked across ranks (NCCL path, PARACOMM_CHECK_SHAPES=1)
        self._nccl_headers: dict = {}  # signature -> header words of the NCCL per-call check (_nccl_header)
        self._cpu: Optional[CpuExecutor] = None  # private gloo group, created on the first CPU call
        self._cpu_generation = 0  # private groups made so far: a mismatch replaces the group (see _run_cpu)
        self._cpu_calls = 0  # CPU calls issued over the group so far: the seq of the monitor's records
        self._cpu_current = 0  # seq of the CPU call being run (or about to be): a failure's record names it
        self._monitor: Optional[CallMonitor] = None  # the stall monitor (paracomm._monitor), on first CPU call
        self._tags: Optional[_sig.TagRegistry] = None  # signature -> data tag base (paracomm._signature)
        self._nccl = None  # paracomm._C.NcclComm, created lazily on first CUDA call
        self._store_handshakes = 0  # handshakes through the store so far (key names)
        self._worker = None  # single background thread for CPU async calls (FIFO = same order on every rank)
        self._worker_lock = threading.Lock()
        # Lazy state (store, private group, NCCL communicator) is created under _state_lock; CPU calls are
        # issued under _call_lock (see the class docstring's "Threads").
        self._state_lock = threading.RLock()
        self._call_lock = threading.Lock()
        self._failed: Optional[str] = None  # reason this communicator can no longer be used (the first one)
        # The shared-memory fast path (_all_reduce_shm_fast): raw arguments -> prepared call, filled by the first
        # full call of each; _timeout_s is the timeout in seconds, computed once.
        self._shm_fast: dict = {}
        self._timeout_s = self.timeout.total_seconds()

    def __repr__(self) -> str:
        return (f"Communicator(rank={self.rank}, world_size={self.world_size}, backend={self.backend!r}, "
                f"algorithm={self.algorithm!r})")

    # ------------------------------------------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------------------------------------------

    def all_reduce(self, tensor, op: Union[str, "dist.ReduceOp"] = "sum", *, wire_dtype=None,
                   async_op: bool = False, scale=None, found_inf=None, algorithm: Optional[str] = None):
        """Reduce ``tensor`` over all ranks of the group, in place.

        Args:
            tensor: a contiguous ``torch.Tensor`` (any shape) or any object with ``__dlpack__`` (NumPy arrays,
                CuPy arrays), reduced in place through ``torch.from_dlpack``. dtype float32, float16, bfloat16,
                float64, int32 or int64; CPU tensors need a gloo group, CUDA tensors an NCCL group. Every rank
                passes the same numel and dtype.
            op: "sum" or "avg" (floating dtypes only; the division by the world size is fused into the owner's
                final reduction), or ``torch.distributed.ReduceOp.SUM`` / ``.AVG``.
            wire_dtype: None (data travels in its own dtype) or torch.float16 / torch.bfloat16 for a float32
                tensor: data travels compressed and every local reduction accumulates in float32. With
                "direct" and "one_shot" each input is rounded once and the result once, so the error does not
                grow with the number of ranks; "ring" re-rounds the partial sum at every hop.
            async_op: True or False: return a :class:`Work` handle instead of waiting.
            scale: optional 1-element float32 tensor on the tensor's device (floating dtypes): the result is
                multiplied by it (e.g. a GradScaler's inverse scale); pass the same value on every rank.
            found_inf: optional 1-element float32 tensor on the tensor's device: set to 1.0 if any result
                value is inf or nan (on every rank alike), never cleared.
            algorithm: "auto", "ring", "direct", "one_shot" or "hierarchical" (see the Communicator's
                ``node_size``); None: the Communicator's default.

        Returns:
            ``tensor`` (the same object, also for ``__dlpack__`` inputs), or a :class:`Work` if ``async_op``.

        Raises:
            TypeError: unsupported dtype, a bad ``wire_dtype``/``op``/``algorithm`` type, ``scale``/``found_inf``
                not float32 tensors.
            ValueError: non-contiguous data, unknown op or algorithm, avg on integers, wire_dtype on a
                non-float32 tensor, a device this communicator does not serve, a bad ``scale``/``found_inf``
                shape or device, direct/one_shot on more than 32 ranks. Nothing is written when an argument is
                refused.
            RuntimeError: a peer failed (closed the connection, or no answer within the timeout: the
                message says which and names the rank when known), this Communicator failed earlier, its group
                was destroyed; or ranks disagree on the call's signature (numel, dtype, op, wire_dtype,
                scale/found_inf given, algorithm, PARACOMM_CHUNK_BYTES). ``PARACOMM_CHECK_SHAPES`` decides
                when that is checked. gloo (CPU): every data transfer is tagged with the call's signature, so
                a mismatched call never exchanges data (it stalls); with 1 (default) and 2 a monitor thread
                compares the stalled call's signature across ranks through the store (paracomm._signature,
                paracomm._monitor) and every rank raises about 1 s later (min(1 s, timeout/8) plus a tick)
                naming each field that differs; the tensor is left untouched, and the Communicator stays usable
                (its private group is replaced on every rank); 0 turns the monitor off, and a mismatch then
                stalls until the timeout (raising "no answer"), never exchanging foreign bytes. Shared memory
                (CPU ranks of one host): checked in every call's entry handshake, at once. NCCL (CUDA): 1 and 2
                check every call on the device (the signature header travels in the call's first NCCL group and is compared by a
                kernel; the watchdog fails the communicator on a mismatch, on every rank: ``Work.wait()``, the
                next call or the next wait raises the error naming each field; a synchronous call has already
                returned, so its mismatch surfaces at the next call or wait, and its output may hold foreign
                bytes); in addition 1 checks the first sight of a signature and 2 every call through the store
                before anything is enqueued (the Communicator then stays usable); 0 checks nothing (a mismatch
                may stall until the timeout or return wrong values).
        """
        # The shared-memory fast path: a synchronous call without scale/found_inf whose raw arguments (and the
        # environment variables the validation reads) equal those of a call that passed every check before.
        # Everything that can differ between two such calls is re-checked here; anything unusual takes the full
        # path below, so every error is the full path's.
        fast_key = None
        if (type(tensor) is torch.Tensor and async_op is False and scale is None and found_inf is None
                and type(op) is str and (wire_dtype is None or type(wire_dtype) is torch.dtype)
                and (algorithm is None or type(algorithm) is str)):
            fast_key = (tensor.dtype, tensor.numel(), op, wire_dtype, algorithm, self.algorithm,
                        _env_raw_get(_ENV_CHUNK), _env_raw_get(_ENV_CHECK))
            prepared = self._shm_fast.get(fast_key)
            if prepared is not None and tensor.is_cpu and tensor.is_contiguous():
                if self._all_reduce_shm_fast(tensor, prepared):
                    return tensor
        _check_bool(async_op, "async_op", "paracomm.all_reduce")
        call = self._validate(tensor, op, wire_dtype, scale, found_inf, algorithm)
        result = self._run_call(call, async_op)
        if fast_key is not None and call.flat.device.type == "cpu" and isinstance(self._cpu, ShmExecutor):
            if len(self._shm_fast) >= _PLAN_CACHE_SIZE:
                self._shm_fast.clear()
            self._shm_fast[fast_key] = self._cpu.prepared(call, _signature(call), call.chunk_bytes)
        return result

    def _run_call(self, call: _Call, async_op: bool):
        """A validated call (any collective) to its executor: CUDA tensors to the NCCL path, CPU tensors to the
        CPU path. CUDA calls are issued under the call lock, like CPU calls: one at a time, in lock order (the
        NCCL communicator's lazy creation, the handshake counter and the enqueue order are per Communicator)."""
        if call.flat.device.type == "cuda":
            with self._call_lock:
                return self._all_reduce_nccl(call, async_op)
        return self._all_reduce_cpu(call, async_op)

    def _all_reduce_shm_fast(self, tensor: torch.Tensor, prepared) -> bool:
        """One all-reduce of a contiguous CPU tensor with a prepared shared-memory call (see all_reduce). False
        (nothing done) when the full path must run: an async worker exists, the Communicator failed, or its
        group was destroyed. Errors as the full path's (_run_cpu)."""
        with self._call_lock:
            cpu = self._cpu
            if (self._worker is not None or self._failed is not None or not isinstance(cpu, ShmExecutor)
                    or self.group not in c10d._world.pg_map):
                return False
            try:
                mismatch = cpu._comm.run(prepared, tensor.data_ptr(), 0, 0, 0, self._timeout_s)
            except RuntimeError as e:
                raise self._transport_error("the shared-memory all-reduce", e, _shm_peer_of(e)) from e
            if mismatch is not None:
                raise cpu.mismatch_error(mismatch, "all_reduce", lambda sigs: _mismatch_error(sigs, self._where()))
        return True

    def reduce_scatter(self, output, input, op: Union[str, "dist.ReduceOp"] = "sum", *, wire_dtype=None,
                       async_op: bool = False, scale=None, found_inf=None, algorithm: Optional[str] = None):
        """Reduce ``input`` over the group's ranks; rank r's ``output`` gets segment r of the result (as
        ``torch.distributed.reduce_scatter_tensor``). Arguments, returns and errors: see
        :func:`paracomm.reduce_scatter` (paracomm/collectives.py)."""
        from .collectives import run_reduce_scatter
        return run_reduce_scatter(self, output, input, op, wire_dtype=wire_dtype, async_op=async_op, scale=scale,
                                  found_inf=found_inf, algorithm=algorithm)

    def all_gather(self, output, input, *, async_op: bool = False, algorithm: Optional[str] = None):
        """Gather every rank's ``input`` into ``output`` on every rank (as
        ``torch.distributed.all_gather_into_tensor``). Arguments, returns and errors: see
        :func:`paracomm.all_gather` (paracomm/collectives.py)."""
        from .collectives import run_all_gather
        return run_all_gather(self, output, input, async_op=async_op, algorithm=algorithm)

    # ------------------------------------------------------------------------------------------------------
    # Validation (everything checked before anything is written)
    # ------------------------------------------------------------------------------------------------------

    def _check_device(self, device: torch.device, name: str, subject: str) -> None:
        """ValueError unless this Communicator serves tensors on ``device`` (its group's backend, the build, the
        device its NCCL communicator is bound to); ``subject`` starts the message ("tensor is", "the tensors
        are")."""
        if device.type == "cpu":
            if not self._serves_cpu:
                raise ValueError(f"{name}: {subject} on cpu but this Communicator's group "
                                 f"({dist.get_backend(self.group)}) serves only CUDA tensors")
        elif device.type == "cuda":
            if not self._serves_cuda:
                raise ValueError(f"{name}: {subject} on {device} but this Communicator's group "
                                 f"({dist.get_backend(self.group)}) serves only CPU tensors")
            if not hasattr(_C, "NcclComm"):
                raise ValueError(f"{name}: {subject} on {device} but paracomm was built without CUDA/NCCL")
            if self._nccl is not None and self._nccl.device != device.index:
                raise ValueError(f"{name}: {subject} on {device} but this Communicator's NCCL communicator is "
                                 f"bound to cuda:{self._nccl.device}")
        else:
            raise ValueError(f"{name}: {subject} on {device}; only cpu (gloo) and cuda (nccl) are served")

    def _validate(self, tensor, op, wire_dtype, scale, found_inf, algorithm) -> _Call:
        name = "paracomm.all_reduce"
        if self.group not in c10d._world.pg_map:
            raise RuntimeError(f"{name}: this Communicator's process group has been destroyed "
                               "(destroy_process_group); create a new Communicator after init_process_group")
        result = tensor
        if not isinstance(tensor, torch.Tensor):
            if not hasattr(tensor, "__dlpack__"):
                raise TypeError(f"{name}: tensor must be a torch.Tensor or support __dlpack__, got {type(tensor)}")
            flags = getattr(tensor, "flags", None)  # NumPy-style arrays: DLPack cannot say "read-only"
            if flags is not None and getattr(flags, "writeable", True) is False:
                raise ValueError(f"{name}: tensor is a read-only array; all_reduce writes in place")
            try:
                tensor = torch.from_dlpack(tensor)
            except Exception as e:  # noqa: BLE001  (unsupported dtypes/devices surface here)
                raise TypeError(f"{name}: tensor could not be imported through __dlpack__: {e}") from e
        if tensor.dtype not in _DTYPE_CODES:
            raise TypeError(f"{name}: tensor has unsupported dtype {tensor.dtype} "
                            "(torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64)")
        if not tensor.is_contiguous():
            raise ValueError(f"{name}: tensor must be contiguous")
        op = _op_name(op, name)
        algorithm = self.algorithm if algorithm is None else _check_algorithm(algorithm, name)
        floating = tensor.dtype.is_floating_point
        check_op_and_wire(op, wire_dtype, tensor.dtype, name)
        _check_rank_limit(algorithm, self.world_size, name)
        device = tensor.device
        self._check_device(device, name, "tensor is")
        check_scalar_tensor(scale, "scale", device, name)
        check_scalar_tensor(found_inf, "found_inf", device, name)
        if scale is not None and not floating:
            raise ValueError(f"{name}: scale needs a floating tensor, got {tensor.dtype}")
        chunk_bytes = _chunk_bytes()
        self._raise_if_failed()
        divisor = float(self.world_size) if op == "avg" else 1.0
        return _Call(tensor.view(-1), result, tensor, op, divisor, wire_dtype, scale, found_inf, algorithm,
                     "all_reduce", chunk_bytes)

    # ------------------------------------------------------------------------------------------------------
    # Signature checks: gloo's tags + stall monitor (_run_cpu), first sight or every call on NCCL (store)
    # ------------------------------------------------------------------------------------------------------

    def _needs_handshake(self, call: _Call) -> bool:
        """NCCL path: does this call need the store handshake? (CPU calls: data tags + monitor, see _run_cpu.)"""
        mode = _check_shapes_mode()
        if mode == 0:
            return False
        return mode == 2 or _signature(call) not in self._seen

    def _where(self, collective: str = "all_reduce") -> str:
        """The prefix of every error this Communicator raises: ``paracomm.<collective> (rank r of n)``."""
        return f"paracomm.{collective} (rank {self.rank} of {self.world_size})"

    def _handshake_store(self, call: _Call, deadline: float) -> None:
        """Handshake through the group's store (no GPU synchronisation).

        Handshake k writes key ``<prefix>/hs/<k>/<rank>``. A rank that reaches handshake k has read every rank's
        key of handshake k-1, so every rank has finished reading handshake k-2's keys: at handshake k each rank
        deletes its own key of k-2, keeping the store bounded.
        """
        k = self._store_handshakes
        self._store_handshakes += 1
        store = self._group_store()
        base = f"{self._prefix}/hs"
        if k >= 2:
            store.delete_key(f"{base}/{k - 2}/{self.rank}")
        store.set(f"{base}/{k}/{self.rank}", ",".join(str(v) for v in _signature(call)))
        keys = [f"{base}/{k}/{r}" for r in range(self.world_size)]
        remaining = deadline - time.monotonic()
        try:
            store.wait(keys, timedelta(seconds=max(remaining, 0.001)))
            values = [store.get(key) for key in keys]
        except Exception as e:  # noqa: BLE001
            missing = [r for r, key in enumerate(keys) if not _store_has(store, key)]
            raise self._fail(f"the signature handshake through the store got no answer from rank(s) "
                             f"{missing or '?'} within the timeout ({self.timeout.total_seconds():g} s): those "
                             f"ranks died, stalled or never made this call; {_ORDER_HINT}. ({e})") from e
        error = _mismatch_error([[int(v) for v in bytes(x).decode().split(",")] for x in values], self._where())
        if error is not None:
            raise error
        self._seen.add(_signature(call))

    # ------------------------------------------------------------------------------------------------------
    # The one error path
    # ------------------------------------------------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        if self._failed is not None:
            raise RuntimeError(f"{self._where()}: this Communicator failed earlier and cannot be used: "
                               f"{self._failed}")

    def _fail(self, reason: str, collective: str = "all_reduce") -> RuntimeError:
        """Mark the Communicator failed (the first reason is kept) and return the error to raise.

        Every transport failure of every path goes through here. Peers blocked on this rank must not wait for
        their timeout: the shared-memory transport is failed (its peers raise within one sleep slice); for gloo
        the failure is published to the store (paracomm._monitor.publish_failure), and a peer's stall monitor
        fails its call at this seq or later about one stall threshold after the call began, naming this rank
        and its reason. (gloo's connections only close when the process exits or the group is destroyed:
        torch 2.13's ProcessGroupGloo.abort() does nothing, and the failed call's traceback keeps the group
        alive.) A peer whose process exits sees "rank r closed the connection" at once.
        """
        with self._state_lock:
            first = self._failed is None
            if first:
                self._failed = reason
            cpu, store = self._cpu, self._store
        if cpu is not None:
            cpu.abort()
        if first and store is not None:
            _monitor.publish_failure(store, self._prefix, self.rank, self._cpu_current, reason)
        return RuntimeError(f"{self._where(collective)}: {reason}")

    def _transport_error(self, what: str, e: BaseException, peer: Optional[int],
                         collective: str = "all_reduce") -> RuntimeError:
        """A failed or timed-out wait, said the way it happened: the peer closed, or no answer in time."""
        text = str(e)
        who = f"rank {peer}" if peer is not None and peer >= 0 else "a peer"
        lowered = text.lower()
        if "closed by peer" in lowered or "connection reset" in lowered or "broken pipe" in lowered \
                or "connection refused" in lowered:
            reason = (f"{what}: {who} closed the connection (it died, was killed, or its Communicator failed "
                      f"and closed its group)")
        elif "timed out" in lowered or "timeout" in lowered or "no time left" in lowered:
            reason = (f"{what}: no answer from {who} within the timeout ({self.timeout.total_seconds():g} s): "
                      f"it is stalled or dead, or its calls differ from this rank's; {_ORDER_HINT}")
        else:
            reason = f"{what}: the transfer with {who} failed"
        return self._fail(f"{reason}. ({text.splitlines()[0] if text else type(e).__name__})", collective)

    # ------------------------------------------------------------------------------------------------------
    # CPU executor
    # ------------------------------------------------------------------------------------------------------

    def _all_reduce_cpu(self, call: _Call, async_op: bool):
        # The call lock fixes this rank's issue order: a sync call before any async one runs inline under it;
        # once the FIFO worker exists every call is submitted to it under the lock (submission order = run
        # order), so calls from several threads never overlap and never reorder after issue.
        with self._call_lock:
            if not async_op and self._worker is None:
                self._run_cpu(call)
                return call.result
            if self._worker is None:
                self._worker = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=f"paracomm-cpu-{self.rank}")
            future = torch.futures.Future()

            def job():
                try:
                    self._run_cpu(call)
                except BaseException as e:  # noqa: BLE001  (delivered through the future)
                    future.set_exception(e)
                else:
                    future.set_result(call.tensor)

            # Every call after the first async one goes through the same FIFO worker, so paracomm's calls keep
            # the issue order on every rank; they run on the private group, so torch collectives the main
            # thread issues on the user's group in the meantime never interleave with them.
            self._worker.submit(job)
        work = Work(future, call.result)
        if async_op:
            return work
        return work.wait()

    @property
    def node_map(self) -> Optional[list]:
        """rank -> node as this Communicator's CPU plans see it (None until the first CPU call has found it)."""
        return None if self._node_map is None else list(self._node_map)

    def _group_node_map(self) -> tuple:
        """The node map, found once (src/paracomm/_topology.py); () for one node, so flat plans stay as they were."""
        with self._state_lock:
            if self._node_map is None:
                try:
                    found = _topology.discover_node_map(self._group_store(), self._prefix, self.rank,
                                                        self.world_size, self.timeout, self._node_size)
                except RuntimeError as e:
                    raise self._fail(f"{e}; {_ORDER_HINT}") from e
                self._node_map = tuple(found)
        return self._node_map if max(self._node_map) > 0 else ()

    def _full_node_map(self) -> tuple:
        """rank -> node with every rank's entry (all zeros for one node), found once (_group_node_map)."""
        self._group_node_map()
        return self._node_map

    def _cpu_executor(self) -> CpuExecutor:
        with self._state_lock:
            if self._cpu is None:
                prefix = self._prefix if self._cpu_generation == 0 else f"{self._prefix}/g{self._cpu_generation}"
                try:
                    # shared memory, mixed or gloo: PARACOMM_CPU_TRANSPORT and the ranks' placement (_shm.py)
                    self._cpu = make_cpu_executor(self._group_store(), prefix, self.rank, self.world_size,
                                                  self.timeout, self._full_node_map)
                except ValueError:
                    raise
                except Exception as e:  # noqa: BLE001
                    raise self._fail(
                        f"creating paracomm's private gloo group failed within the timeout "
                        f"({self.timeout.total_seconds():g} s): a rank died, has not made this call yet, or "
                        f"created its Communicators in another order; {_ORDER_HINT}. ({e})") from e
            return self._cpu

    def _replace_cpu_group(self) -> None:
        """After a signature mismatch: drop the private group (its unmatched transfers die with it); the next
        call makes a new one under the next generation's prefix. Every rank raises the mismatch at the same
        call (the same seq: paracomm._monitor), so every rank does this at the same call."""
        with self._state_lock:
            cpu, self._cpu = self._cpu, None
            self._cpu_generation += 1
        if cpu is not None:
            cpu.abort()

    def _run_cpu(self, call: _Call) -> None:
        self._raise_if_failed()
        x = call.flat
        if self.world_size == 1:
            # Nothing travels (so the wire dtype rounds nothing); only avg/scale/found_inf touch the data. The
            # out-of-place collectives copy their input (the one reduction their one-rank plan holds).
            if call.input is not None:
                if x.numel() > 0:
                    reduce_(x, [call.input], divisor=call.divisor, scale=call.scale, found_inf=call.found_inf)
            elif call.has_final_op and x.numel() > 0:
                reduce_(x, [x], divisor=call.divisor, scale=call.scale, found_inf=call.found_inf)
            return
        checking = _check_shapes_mode() != 0  # refuses a bad PARACOMM_CHECK_SHAPES before anything happens
        self._cpu_current = self._cpu_calls  # the seq this call gets below (a failure before that names it too)
        deadline = time.monotonic() + self.timeout.total_seconds()
        executor = self._cpu_executor()
        call.node_map = self._group_node_map()  # part of the signature, so of the data tags and the records
        # The shared-memory transport runs every plan (every collective and algorithm, node map included) in one
        # C++ call and checks the signature in every call, before any data moves: no tags, no monitor.
        if isinstance(executor, ShmExecutor):
            executor.run(call, executor.prepared(call, _signature(call), call.chunk_bytes), deadline,
                         lambda sigs: _mismatch_error(sigs, self._where(call.collective)),
                         lambda what, e, peer: self._transport_error(what, e, peer, call.collective))
            return
        monitor = self._call_monitor() if checking else None
        # seq numbers the CPU calls of this Communicator alike on every rank (they issue the same calls in the
        # same order; a mismatch raises on every rank at the same seq), so the monitor's records of two ranks
        # are about the same call exactly when their seqs are equal.
        seq = self._cpu_calls
        self._cpu_calls = seq + 1
        plan = self._plans.get(call, self.world_size, self.rank, "gloo", call.chunk_bytes)
        signature = plan.signature
        mixed = isinstance(executor, MixedExecutor)
        if mixed and not executor.composes(call, plan.algorithm):
            executor, mixed = executor.flat, False  # every other call runs on the whole group's gloo
        if plan.tag_base is None:
            plan.tag_base = self._tag_base(signature, call.collective)
        started = time.monotonic()

        def on_error(what: str, e: BaseException, peer: Optional[int]) -> BaseException:
            # Any transport error (an interrupted wait, a peer that closed, the deadline) is first checked
            # against the ranks' records: a mismatch is reported as such on every rank.
            if monitor is not None:
                mismatch = monitor.diagnose(seq, signature, call.collective, started)
                if mismatch is not None:
                    return _SignatureMismatch(mismatch)
                failed = monitor.peer_failure(seq)  # a peer's Communicator failed: this call cannot complete
                if failed is not None:
                    return self._fail(f"{what}: {failed}", call.collective)
            return self._transport_error(what, e, peer, call.collective)

        def node_mismatch(signatures: list) -> BaseException:
            # The mixed transport's node stage found it before any data moved. The ranks of other nodes only
            # learn it through the monitor: the node's ranks publish their records and the verdict first.
            by_rank = [None] * self.world_size  # the node's ranks by global rank; other nodes' show as "?"
            for local, sig in enumerate(signatures):
                by_rank[executor.members[local]] = sig
            error = _mismatch_error(by_rank, self._where(call.collective))
            if monitor is not None and error is not None:
                monitor.announce_mismatch(seq, signature, executor.members, max(0.0, deadline - time.monotonic()))
            return _SignatureMismatch(error) if error is not None else None

        def cross_plan(stage) -> tuple:
            # Stage B's plan among the M ranks of this local index, and its tags: the whole call's (two calls
            # whose shards look alike still never match, on the inter-node group of their own).
            return (self._plans.get(stage, executor.nodes, executor.node_index, "gloo", stage.chunk_bytes),
                    plan.tag_base)

        mismatch = None
        if monitor is not None:
            monitor.inflight = (seq, signature, started, executor, call.collective)
        try:
            wait = deadline_wait(deadline, on_error)
            if mixed:
                executor.run(call, signature, deadline, wait, cross_plan, node_mismatch, on_error)
            else:
                travel = call.wire_dtype if call.wire_dtype is not None else x.dtype
                executor.run(plan, x, travel=travel, divisor=call.divisor, scale=call.scale,
                             found_inf=call.found_inf, wire_dtype=call.wire_dtype, wait=wait,
                             tag_base=plan.tag_base, input=call.input)
        except _SignatureMismatch as e:
            mismatch = e.error
        finally:
            if monitor is not None:
                monitor.inflight = None
        if mismatch is not None:
            # Raised outside the except clause and with the executor dropped, so nothing keeps the old private
            # group alive: dropping it closes its connections (peers still blocked on it wake at once).
            del executor
            self._replace_cpu_group()
            raise mismatch

    def _call_monitor(self) -> CallMonitor:
        """The stall monitor of this Communicator's CPU calls, started on first use (paracomm._monitor)."""
        monitor = self._monitor
        if monitor is None:
            with self._state_lock:
                if self._monitor is None:
                    rank, n = self.rank, self.world_size
                    # where() must not hold the Communicator (the monitor thread holds the monitor weakly only).
                    self._monitor = CallMonitor(self._group_store(), self._prefix, rank, n,
                                                self.timeout.total_seconds(),
                                                lambda collective: f"paracomm.{collective} (rank {rank} of {n})")
                    self._monitor.start()
                monitor = self._monitor
        return monitor

    def _tag_base(self, signature: tuple, collective: str) -> int:
        """The data tag base of a signature, from the store's registry on first sight (paracomm._signature)."""
        with self._state_lock:
            if self._tags is None:
                self._tags = _sig.TagRegistry(self._group_store(), self._prefix)
            try:
                return self._tags.tag_base(signature)
            except Exception as e:  # noqa: BLE001
                raise self._fail(f"claiming the data tag of this call's signature through the group's store "
                                 f"failed: {e}", collective) from e

    # ------------------------------------------------------------------------------------------------------
    # NCCL executor (CUDA builds)
    # ------------------------------------------------------------------------------------------------------

    def _group_store(self):
        if self._store is None:
            self._store = c10d._get_process_group_store(self.group)
        return self._store

    def _nccl_comm(self, device: torch.device):
        """paracomm's NCCL communicator for ``device``, created on first use (collective over the group).

        Also fixes, once per Communicator, paracomm's reduce stream as a torch stream (``_nccl_stream``, where
        async calls complete). The communicator is closed at interpreter exit
        (:func:`_close_nccl_at_exit`), while CUDA is still up, so pending work is waited for.
        """
        if self._nccl is None:
            store = self._group_store()
            key = f"{self._prefix}/nccl_unique_id"
            if self.rank == 0:
                unique_id = bytes(_C.nccl_unique_id())
                store.set(key, unique_id)
            else:
                try:
                    store.wait([key], self.timeout)
                except Exception as e:  # noqa: BLE001
                    raise self._fail(f"rank 0 did not publish the NCCL unique id within "
                                     f"{self.timeout.total_seconds():g} s: {e}") from e
                unique_id = bytes(store.get(key))
            nccl = _C.NcclComm(unique_id, self.world_size, self.rank, device.index, self.timeout.total_seconds())
            self._nccl_stream = torch.cuda.ExternalStream(nccl.reduce_stream, device=device)
            self._nccl = nccl
            _open_nccl.add(self)
        return self._nccl

    def _all_reduce_nccl(self, call: _Call, async_op: bool):
        """The CUDA path of every collective (all_reduce, reduce_scatter, all_gather; flat or hierarchical): one
        C++ call (csrc/cuda/nccl_tensor_call.cpp) after the handshake. Issued under the call lock.

        Stream semantics of torch's WorkNCCL (csrc/allreduce/nccl_executor.h): every transfer and reduction runs
        on paracomm's streams, after the caller's current stream; a synchronous call makes the current stream
        wait before returning; an async call leaves it free, and :meth:`Work.wait` (or the future DDP waits on)
        makes the then-current stream wait. The caller's tensors (output, input, scale, found_inf) are recorded
        on paracomm's stream in an async call and held by the Work until ``wait()``. World size 1 runs its one
        local reduction (the out-of-place collectives: the copy of the input) on the current stream.
        """
        x = call.flat
        if self.world_size == 1:
            with torch.cuda.device(x.device):
                if call.input is not None:
                    if x.numel() > 0:
                        reduce_(x, [call.input], divisor=call.divisor, scale=call.scale, found_inf=call.found_inf)
                elif call.has_final_op and x.numel() > 0:
                    reduce_(x, [x], divisor=call.divisor, scale=call.scale, found_inf=call.found_inf)
                if not async_op:
                    return call.result
                future = torch.futures.Future(devices=[x.device])
                future.set_result(call.tensor)  # records on the current stream, where the reduction ran
                done = torch.cuda.Event()
                done.record()
                return Work(future, call.result, done_event=done, keep=(call.input,))
        # The node map (found once through the store, as the CPU path does) is an input of the plan and part of
        # the signature; () for one node keeps flat plans as they were.
        call.node_map = self._group_node_map()
        if self._needs_handshake(call):
            self._handshake_store(call, time.monotonic() + self.timeout.total_seconds())
        comm = self._nccl if self._nccl is not None else self._nccl_comm(x.device)
        header = self._nccl_header(call) if _check_shapes_mode() != 0 else []
        try:
            _C.nccl_collective(comm, call.collective, x, call.input, call.divisor,
                               -1 if call.wire_dtype is None else _DTYPE_CODES[call.wire_dtype], call.scale,
                               call.found_inf, _ALGORITHM_CODES.get(call.algorithm, -1), call.chunk_bytes, async_op,
                               list(call.node_map), header)
        except RuntimeError as e:
            raise self._nccl_error(comm, e, call.collective) from e
        if not async_op:
            return call.result
        # The call's last operation is on paracomm's reduce stream R: a CUDA-aware future completed with R
        # current records its event there (as ProcessGroupNCCL completes its futures on its NCCL stream), so
        # wait(), then() and DDP make their current stream wait for R, never the host. The Work keeps the
        # tensors referenced too (torch's stashed_for_allocator_safety); record_stream already covers a free.
        future = torch.futures.Future(devices=[x.device])
        done = torch.cuda.Event()
        with torch.cuda.stream(self._nccl_stream):
            future.set_result(call.tensor)
            done.record()
        collective = call.collective
        return Work(future, call.result, done_event=done, check=lambda: self._nccl_check(comm, collective),
                    keep=(call.scale, call.found_inf, call.input))

    def _nccl_header(self, call: _Call) -> list:
        """The per-call signature header (paracomm._signature.header_words) as int64 words, cached per signature."""
        signature = _signature(call)
        words = self._nccl_headers.get(signature)
        if words is None:
            words = _sig.header_words(signature)
            if len(self._nccl_headers) >= _PLAN_CACHE_SIZE:
                self._nccl_headers.pop(next(iter(self._nccl_headers)))
            self._nccl_headers[signature] = words
        return words

    def _nccl_error(self, comm, error: BaseException, collective: str = "all_reduce") -> BaseException:
        """The error to raise for a failed NCCL call or check: paracomm's mismatch error naming each field when
        the per-call signature check failed the communicator (csrc/allreduce/nccl_comm.h), else ``error``."""
        try:
            headers = comm.mismatch_headers()
        except Exception:  # noqa: BLE001  (a closed communicator)
            headers = []
        if headers:
            mismatch = _mismatch_error([_sig.decode_header(h) for h in headers], self._where(collective))
            if mismatch is not None:
                return RuntimeError(f"{mismatch} (found by the per-call check on the device; the NCCL communicator "
                                    f"was aborted and this Communicator cannot run CUDA calls any more)")
        return error

    def _nccl_check(self, comm, collective: str = "all_reduce") -> None:
        """Work.wait()'s check on CUDA: raises the communicator's asynchronous error (a mismatch named by field)."""
        try:
            comm.check()
        except RuntimeError as e:
            raise self._nccl_error(comm, e, collective) from e


# Communicators with an NCCL communicator; closed at interpreter exit (Python's atexit runs before the CUDA
# runtime's own exit handlers), so pending work is waited for (bounded by the timeout) and NCCL is finalized
# rather than torn down under running kernels.
_open_nccl: "weakref.WeakSet" = weakref.WeakSet()


def _close_nccl_at_exit() -> None:
    for c in list(_open_nccl):
        nccl = c._nccl
        if nccl is not None:
            nccl.close()


atexit.register(_close_nccl_at_exit)


def _store_has(store, key: str) -> bool:
    try:
        return bool(store.check([key]))
    except Exception:  # noqa: BLE001
        return False


# ----------------------------------------------------------------------------------------------------------
# Module-level convenience
# ----------------------------------------------------------------------------------------------------------

_communicators: dict = {}
_communicators_lock = threading.Lock()
# The last (group argument, timeout argument, Communicator) _communicator_for returned: the same arguments again
# (the same objects) while that Communicator's group is alive skip the lookup (the all_reduce fast path).
_last_communicator: list = [None]


def _communicator_for(group, timeout: Optional[timedelta] = None, where: str = "paracomm.all_reduce"
                      ) -> Communicator:
    """The cached Communicator of ``group`` (None: the default group) and ``timeout`` (None: the group's)."""
    last = _last_communicator[0]
    if last is not None and last[0] is group and last[1] is timeout and last[2].group in c10d._world.pg_map:
        return last[2]
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{where}: torch.distributed is not initialised (call "
                           "torch.distributed.init_process_group first)")
    check_process_group(group, where, "group")
    check_timeout(timeout, where)
    if group is None:
        group = c10d._get_default_group()
    if group not in c10d._world.pg_map:
        raise RuntimeError(f"{where}: group has been destroyed (destroy_process_group)")
    with _communicators_lock:
        # Communicators of destroyed groups are dropped (their groups cannot be used again).
        for key in [k for k in _communicators if k[0] not in c10d._world.pg_map]:
            del _communicators[key]
        comm = _communicators.get((group, timeout))
        if comm is None:
            comm = Communicator(group, timeout=timeout)
            _communicators[(group, timeout)] = comm
        _last_communicator[0] = (group, timeout, comm)
        return comm


def all_reduce(tensor, op="sum", group=None, async_op: bool = False, *, wire_dtype=None, scale=None,
               found_inf=None, algorithm: Optional[str] = None, timeout: Optional[timedelta] = None):
    """``Communicator(group, timeout=timeout).all_reduce(...)`` with one cached :class:`Communicator` per
    (process group, timeout).

    A drop-in for ``torch.distributed.all_reduce(tensor, op, group, async_op)`` for SUM and AVG: the first four
    arguments may be passed positionally, as torch's. ``group`` None means the default group; ``timeout`` None
    the group's own timeout. Args, returns and errors: see :meth:`Communicator.all_reduce`; before
    ``init_process_group`` or after ``destroy_process_group`` it raises RuntimeError saying so.
    """
    _check_bool(async_op, "async_op", "paracomm.all_reduce")
    return _communicator_for(group, timeout).all_reduce(tensor, op, wire_dtype=wire_dtype, async_op=async_op,
                                                        scale=scale, found_inf=found_inf, algorithm=algorithm)


def _local_backend() -> str:
    """The backend a call would use on this machine: "nccl" where paracomm has CUDA and a GPU is visible."""
    return "nccl" if hasattr(_C, "NcclComm") and torch.cuda.is_available() else "gloo"


def explain_all_reduce(numel: int, dtype: torch.dtype, world_size: int, *, wire_dtype=None,
                       algorithm: Optional[str] = None, backend: Optional[str] = None,
                       node_size: Optional[int] = None, node_map=None) -> dict:
    """What an all-reduce of ``numel`` elements of ``dtype`` over ``world_size`` ranks would do (no communication).

    Args:
        numel: elements (>= 0). dtype: one of the six dtypes :meth:`Communicator.all_reduce` takes.
        world_size: ranks (>= 1). wire_dtype: None, torch.float16 or torch.bfloat16 (float32 data only).
        algorithm: None (as a Communicator created without one: ``PARACOMM_ALGORITHM``, else "auto"), "auto"
            (resolved as a call would resolve it), "ring", "direct" or "one_shot".
        backend: "nccl" (CUDA tensors) or "gloo" (CPU tensors): the chunk policy and the "auto" thresholds
            differ. None: the one this machine would use ("nccl" when paracomm has CUDA and a GPU is
            visible, else "gloo").
        node_size: None (``PARACOMM_NODE_SIZE`` when set, as a Communicator without ``node_size`` reads it; else
            one node, as before) or ranks per node (ranks [0, K) on node 0, ...; the last node may
            be smaller): "auto" is then topology-aware and the result also has ``nodes``, ``inter_node_bytes`` and
            ``intra_node_bytes`` (bytes one rank sends to other nodes / its own node; the busiest rank's),
            ``inter_node_steps`` (its steps with a transfer to another node) and ``choice_reason``.
        node_map: None or a list of world_size node labels, one per rank (any ints; e.g. ``[0, 1, 0, 1]``: ranks
            0 and 2 on one node, 1 and 3 on another), for placements that are not contiguous; the same keys as
            ``node_size`` (give one of the two). A ring plan with either also reports ``ring_order`` (the ranks
            in ring order: node by node) and ``ring_inter_node_hops`` (hops between two nodes: one per node).

    Returns:
        dict: ``algorithm`` (the resolved name), ``chunk_bytes`` (bytes of the travelling dtype per pipelined
        piece), ``num_chunks`` (pieces per segment), ``steps``, ``transfer_groups`` (NCCL group calls, or gloo
        transfer rounds), ``reductions`` (reduction launches), ``bytes_sent`` / ``bytes_received`` (per rank),
        ``workspace_bytes`` (device or host scratch per call); counted for rank 0 of a call without scale or
        found_inf. ``PARACOMM_CHUNK_BYTES`` is honoured as in a real call.

    Raises:
        TypeError / ValueError naming the argument.
    """
    name = "paracomm.explain_all_reduce"
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"{name}: numel must be an int >= 0, got {numel!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"{name}: world_size must be an int >= 1, got {world_size!r}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name}: dtype must be a torch.dtype, got {dtype!r}")
    if dtype not in _DTYPE_CODES:
        raise TypeError(f"{name}: dtype {dtype} is not supported (torch.float32, torch.float16, torch.bfloat16, "
                        "torch.float64, torch.int32, torch.int64)")
    check_wire_dtype(wire_dtype, name)
    if wire_dtype is not None and dtype != torch.float32:
        raise ValueError(f"{name}: wire_dtype={wire_dtype} needs dtype torch.float32, got {dtype}")
    algorithm = _default_algorithm() if algorithm is None else _check_algorithm(algorithm, name)
    if backend is None:
        backend = _local_backend()
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"{name}: backend must be 'nccl' or 'gloo', got {backend!r}")
    _check_rank_limit(algorithm, world_size, name)
    if node_map is not None:
        if node_size is not None:
            raise ValueError(f"{name}: give node_size or node_map, not both")
        if not isinstance(node_map, (list, tuple)) or len(node_map) != world_size or not all(
                isinstance(m, int) and not isinstance(m, bool) for m in node_map):
            raise ValueError(f"{name}: node_map must be a list of world_size={world_size} ints (a node label per "
                             f"rank), got {node_map!r}")
        node_map = _topology.canonical_node_map(list(node_map))
    else:
        node_map = _topology.explain_node_map(node_size, world_size, name)
    wire = -1 if wire_dtype is None else _DTYPE_CODES[wire_dtype]
    return dict(_C.plan_summary(numel, _DTYPE_CODES[dtype], wire, world_size, 0, algorithm, backend, False, False,
                                _chunk_bytes(), node_map=node_map))
