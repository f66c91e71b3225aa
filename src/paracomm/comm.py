"""paracomm's all-reduce: :class:`Communicator`, :func:`all_reduce` and :func:`explain_all_reduce`.

An all-reduce is a *plan* (csrc/allreduce/plan.h), data produced by one of three algorithms (ring, direct,
one_shot; :func:`explain_all_reduce` shows which and what it costs) and run by an executor that knows no
algorithm:

* CUDA tensors: paracomm's own NCCL communicator (``paracomm._C.NcclComm``, CUDA builds only), bootstrapped
  through the process group's store; one NCCL group per plan step, reductions on the caller's current stream,
  no host synchronisation (csrc/allreduce/nccl_executor.cpp).
* CPU tensors: :class:`paracomm._cpu_executor.CpuExecutor`, gloo point-to-point on a private gloo group of the
  same ranks and the CPU reduction op.

Both give bitwise identical results on every rank and from run to run: every output element is computed by one
owner whose bits the others copy, or by every rank from identical inputs in the same order.
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from datetime import timedelta
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from . import _C
from ._cpu_executor import CpuExecutor, PreparedPlan, deadline_wait
from ._shm import ShmExecutor, make_cpu_executor
from ._ops import reduce_
from ._validate import check_wire_dtype

__all__ = ["Communicator", "Work", "all_reduce", "explain_all_reduce"]

# torch dtype -> the core's DType code (csrc/dtype.h).
_DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
    torch.int32: 4,
    torch.int64: 5,
}
_OPS = ("sum", "avg")
ALGORITHMS = ("auto", "ring", "direct", "one_shot")
_ALGORITHM_CODES = {"ring": 0, "direct": 1, "one_shot": 2}
_MAX_REDUCE_RANKS = 32  # kMaxReduceInputs in csrc/allreduce/plan.h
_PLAN_CACHE_SIZE = 64  # plans kept per Communicator (one per signature in use; DDP uses a handful)

# Communicators created so far per process group name: the n-th Communicator over a group gets the same store
# prefix on every rank, as long as every rank creates its Communicators in the same order (as collectives).
_instance_counts: dict = {}
_instance_lock = threading.Lock()


def _check_shapes_mode() -> int:
    """PARACOMM_CHECK_SHAPES: 0 never, 1 on a signature's first sight (default), 2 on every call."""
    value = os.environ.get("PARACOMM_CHECK_SHAPES", "").strip()
    if value == "":
        return 1
    if value not in ("0", "1", "2"):
        raise ValueError(f"paracomm: PARACOMM_CHECK_SHAPES must be 0 (never), 1 (first sight) or 2 (every call), "
                         f"got {value!r}")
    return int(value)


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
    value = os.environ.get("PARACOMM_CHUNK_BYTES")
    if not value:
        return 0
    try:
        chunk = int(value)
    except ValueError:
        raise ValueError(f"paracomm: PARACOMM_CHUNK_BYTES must be an integer number of bytes, got {value!r}")
    if chunk < 1:
        raise ValueError(f"paracomm: PARACOMM_CHUNK_BYTES must be >= 1, got {chunk}")
    return chunk


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

    ``wait()`` blocks until the reduction is done (on CUDA: makes the current stream wait for it, without a host
    synchronisation) and returns what the synchronous call returns (the tensor, or the ``__dlpack__`` object that
    was passed in); it raises the all-reduce's error if the collective failed. ``get_future()`` returns a
    ``torch.futures.Future`` whose value is the reduced tensor (CUDA-aware on CUDA, as DDP comm hooks need).
    """

    def __init__(self, future: torch.futures.Future, result, done_event=None, check=None):
        self._future = future
        self._result = result
        self._done_event = done_event  # torch.cuda.Event recorded after the enqueue, or None
        self._check = check  # raises the communicator's asynchronous error (NCCL), or None

    def wait(self, timeout: Optional[timedelta] = None):
        """Wait for completion; return the reduced tensor (or the ``__dlpack__`` object given). Raises its error.

        ``timeout`` is accepted for compatibility with ``torch.distributed.Work.wait`` and not used: the
        Communicator's own timeout already bounds every call, and a call past it raises here.
        """
        del timeout
        self._future.wait()
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
    """One validated all-reduce: a flat view of the data plus everything the executors need."""

    __slots__ = ("flat", "result", "tensor", "op", "divisor", "wire_dtype", "scale", "found_inf", "algorithm")

    def __init__(self, flat, result, tensor, op, divisor, wire_dtype, scale, found_inf, algorithm):
        self.flat = flat
        self.result = result
        self.tensor = tensor
        self.op = op
        self.divisor = divisor
        self.wire_dtype = wire_dtype
        self.scale = scale
        self.found_inf = found_inf
        self.algorithm = algorithm

    @property
    def has_final_op(self) -> bool:
        return self.divisor != 1.0 or self.scale is not None or self.found_inf is not None


# The signature ranks must agree on, as the handshake sends it: (name, encode, decode) per field.
_SIGNATURE_FIELDS = ("numel", "dtype", "op", "wire_dtype", "scale", "found_inf", "algorithm")
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


def _signature(call: _Call) -> tuple:
    wire = -1 if call.wire_dtype is None else _DTYPE_CODES[call.wire_dtype]
    return (call.flat.numel(), _DTYPE_CODES[call.flat.dtype], _OPS.index(call.op), wire,
            int(call.scale is not None), int(call.found_inf is not None), ALGORITHMS.index(call.algorithm))


def _describe_field(field: str, value: int) -> str:
    if field in ("dtype", "wire_dtype"):
        return "none" if value < 0 else str(_CODE_DTYPES.get(value, value))
    if field == "op":
        return _OPS[value] if 0 <= value < len(_OPS) else str(value)
    if field in ("scale", "found_inf"):
        return "given" if value else "none"
    if field == "algorithm":
        return ALGORITHMS[value] if 0 <= value < len(ALGORITHMS) else str(value)
    return str(value)


def _mismatch_error(signatures: list) -> Optional[RuntimeError]:
    """None when every rank's signature agrees; else an error listing every field that differs, per rank."""
    if all(tuple(s) == tuple(signatures[0]) for s in signatures):
        return None
    parts = []
    for f, field in enumerate(_SIGNATURE_FIELDS):
        values = [s[f] for s in signatures]
        if any(v != values[0] for v in values):
            per_rank = ", ".join(f"rank {r}: {_describe_field(field, v)}" for r, v in enumerate(values))
            parts.append(f"{field} differs ({per_rank})")
    return RuntimeError("paracomm.all_reduce: ranks called all_reduce with different arguments (numel, dtype, op, "
                        "wire_dtype, scale/found_inf given or not, and algorithm must match on every rank): "
                        + "; ".join(parts))


class _PlanCache:
    """Plans by (signature, world size, rank, backend, chunk bytes): plans are pure data, built once."""

    def __init__(self):
        self._plans: dict = {}
        self._lock = threading.Lock()

    def get(self, call: _Call, world_size: int, rank: int, backend: str, chunk_bytes: int) -> PreparedPlan:
        key = (_signature(call), world_size, rank, backend, chunk_bytes)
        with self._lock:
            plan = self._plans.get(key)
        if plan is None:
            wire = -1 if call.wire_dtype is None else _DTYPE_CODES[call.wire_dtype]
            plan = PreparedPlan(_C.all_reduce_plan(
                call.flat.numel(), _DTYPE_CODES[call.flat.dtype], wire, world_size, rank, call.algorithm, backend,
                call.found_inf is not None, call.has_final_op, chunk_bytes))
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
        timeout: bound on every call: a peer that stops answering (a dead rank) makes the call raise
            RuntimeError within about this time instead of hanging.
        algorithm: the default for calls that pass none: "auto" (a size-based choice, see
            :func:`explain_all_reduce`), "ring", "direct" or "one_shot". ``PARACOMM_ALGORITHM`` sets the default
            of communicators created without one.

    Every rank of the group must create its Communicators in the same order (like a collective) and issue
    the same sequence of ``all_reduce`` calls.

    Attributes: ``rank`` and ``world_size`` (in the group), ``backend`` ("nccl" or "gloo"; "nccl" for a group
    that has both), ``group``, ``timeout``, ``algorithm``.
    """

    def __init__(self, group=None, *, timeout: timedelta = timedelta(seconds=300), algorithm: Optional[str] = None):
        name = "paracomm.Communicator"
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"{name}: torch.distributed is not initialised "
                               "(call torch.distributed.init_process_group first)")
        if not isinstance(timeout, timedelta):
            raise TypeError(f"{name}: timeout must be a datetime.timedelta, got {type(timeout)}")
        if timeout.total_seconds() <= 0:
            raise ValueError(f"{name}: timeout must be positive, got {timeout}")
        self.algorithm = _default_algorithm() if algorithm is None else _check_algorithm(algorithm, name)
        self.group = group if group is not None else c10d._get_default_group()
        self.timeout = timeout
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        if self.rank < 0:
            raise ValueError(f"{name}: this process is not a member of group")
        self._serves_cpu, self._serves_cuda = _group_backends(self.group)
        if not (self._serves_cpu or self._serves_cuda):
            raise ValueError(f"{name}: group backend {dist.get_backend(self.group)!r} is not "
                             "supported (gloo for CPU tensors, nccl for CUDA tensors)")
        self.backend = "nccl" if self._serves_cuda else "gloo"
        with _instance_lock:
            key = self.group.group_name
            index = _instance_counts.get(key, 0)
            _instance_counts[key] = index + 1
        self._prefix = f"paracomm/{key}/{index}"
        self._store = None  # the group's store, fetched on first use
        self._plans = _PlanCache()
        self._seen: set = set()  # signatures already checked across ranks (PARACOMM_CHECK_SHAPES=1)
        self._cpu: Optional[CpuExecutor] = None  # private gloo group, created on the first CPU call
        self._nccl = None  # paracomm._C.NcclComm, created lazily on first CUDA call
        self._store_handshakes = 0  # handshakes through the store so far (key names)
        self._worker = None  # single background thread for CPU async calls (FIFO = same order on every rank)
        self._worker_lock = threading.Lock()
        self._failed: Optional[str] = None  # reason this communicator can no longer be used

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
            async_op: return a :class:`Work` handle instead of waiting.
            scale: optional 1-element float32 tensor on the tensor's device (floating dtypes): the result is
                multiplied by it (e.g. a GradScaler's inverse scale); pass the same value on every rank.
            found_inf: optional 1-element float32 tensor on the tensor's device: set to 1.0 if any result
                value is inf or nan (on every rank alike), never cleared.
            algorithm: "auto", "ring", "direct" or "one_shot"; None: the Communicator's default.

        Returns:
            ``tensor`` (the same object, also for ``__dlpack__`` inputs), or a :class:`Work` if ``async_op``.

        Raises:
            TypeError: unsupported dtype, a bad ``wire_dtype``/``op``/``algorithm`` type, ``scale``/``found_inf``
                not float32 tensors.
            ValueError: non-contiguous data, unknown op or algorithm, avg on integers, wire_dtype on a
                non-float32 tensor, a device this communicator does not serve, a bad ``scale``/``found_inf``
                shape or device, direct/one_shot on more than 32 ranks. Nothing is written when an argument is
                refused.
            RuntimeError: a peer failed or the timeout expired; or ranks disagree on the call's signature
                (numel, dtype, op, wire_dtype, scale/found_inf given, algorithm). ``PARACOMM_CHECK_SHAPES``
                decides when that is checked: 1 (default) the first time this Communicator sees a signature, 2
                on every call, 0 never. A mismatch caught by the check raises on every rank with each field
                that differs. One it does not catch (a signature seen before, or checking off) makes the ranks
                exchange different amounts of data, which the backends do not detect as such: over gloo a rank
                that receives more bytes than it posted for is aborted by gloo ("Received data size doesn't
                match expected size": the process dies, nothing can catch it) and its peers raise RuntimeError
                ("a peer may have died") when the connection closes or the timeout expires; over NCCL a receive
                waiting for more than was sent stalls until the timeout, when the watchdog aborts the
                communicator and the call (or the next one) raises on every rank, and a receive for less can
                complete with wrong values and no error. Keep the check on while developing.
        """
        call = self._validate(tensor, op, wire_dtype, scale, found_inf, algorithm)
        if call.flat.device.type == "cuda":
            return self._all_reduce_nccl(call, async_op)
        return self._all_reduce_cpu(call, async_op)

    # ------------------------------------------------------------------------------------------------------
    # Validation (everything checked before anything is written)
    # ------------------------------------------------------------------------------------------------------

    def _validate(self, tensor, op, wire_dtype, scale, found_inf, algorithm) -> _Call:
        name = "paracomm.all_reduce"
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
        if op == "avg" and not floating:
            raise ValueError(f"{name}: op='avg' needs a floating tensor, got {tensor.dtype}")
        if wire_dtype is not None:
            check_wire_dtype(wire_dtype, name)
            if tensor.dtype != torch.float32:
                raise ValueError(f"{name}: wire_dtype={wire_dtype} needs a float32 tensor, got {tensor.dtype}")
        _check_rank_limit(algorithm, self.world_size, name)
        device = tensor.device
        if device.type == "cpu":
            if not self._serves_cpu:
                raise ValueError(f"{name}: tensor is on cpu but this Communicator's group "
                                 f"({dist.get_backend(self.group)}) serves only CUDA tensors")
        elif device.type == "cuda":
            if not self._serves_cuda:
                raise ValueError(f"{name}: tensor is on {device} but this Communicator's group "
                                 f"({dist.get_backend(self.group)}) serves only CPU tensors")
            if not hasattr(_C, "NcclComm"):
                raise ValueError(f"{name}: tensor is on {device} but paracomm was built without CUDA/NCCL")
            if self._nccl is not None and self._nccl.device != device.index:
                raise ValueError(f"{name}: tensor is on {device} but this Communicator's NCCL communicator is "
                                 f"bound to cuda:{self._nccl.device}")
        else:
            raise ValueError(f"{name}: tensor is on {device}; only cpu (gloo) and cuda (nccl) are served")
        for arg, t in (("scale", scale), ("found_inf", found_inf)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: {arg} must be None or a 1-element float32 tensor, got {type(t)}")
            if t.numel() != 1:
                raise ValueError(f"{name}: {arg} must have exactly one element, got shape {tuple(t.shape)}")
            if t.dtype != torch.float32:
                raise TypeError(f"{name}: {arg} must be torch.float32, got {t.dtype}")
            if t.device != device:
                raise ValueError(f"{name}: {arg} is on {t.device} but tensor is on {device}")
        if scale is not None and not floating:
            raise ValueError(f"{name}: scale needs a floating tensor, got {tensor.dtype}")
        if self._failed is not None:
            raise RuntimeError(f"{name}: this Communicator failed earlier and cannot be used: {self._failed}")
        divisor = float(self.world_size) if op == "avg" else 1.0
        return _Call(tensor.view(-1), result, tensor, op, divisor, wire_dtype, scale, found_inf, algorithm)

    # ------------------------------------------------------------------------------------------------------
    # Signature handshake (first sight by default)
    # ------------------------------------------------------------------------------------------------------

    def _needs_handshake(self, call: _Call) -> bool:
        mode = _check_shapes_mode()
        if mode == 0:
            return False
        return mode == 2 or _signature(call) not in self._seen

    def _handshake_cpu(self, call: _Call, wait) -> None:
        """All ranks' signatures through an allgather on the private gloo group."""
        mine = torch.tensor(_signature(call), dtype=torch.int64)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        work = self._cpu.pg.allgather([gathered], [mine])
        wait(work, "the signature handshake")
        error = _mismatch_error([g.tolist() for g in gathered])
        if error is not None:
            raise error
        self._seen.add(_signature(call))

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
            raise self._fail(f"the signature handshake through the store did not complete within "
                             f"{self.timeout.total_seconds():g} s (a rank may have died): {e}") from e
        error = _mismatch_error([[int(v) for v in bytes(x).decode().split(",")] for x in values])
        if error is not None:
            raise error
        self._seen.add(_signature(call))

    # ------------------------------------------------------------------------------------------------------
    # CPU executor
    # ------------------------------------------------------------------------------------------------------

    def _all_reduce_cpu(self, call: _Call, async_op: bool):
        if not async_op and self._worker is None:
            self._run_cpu(call)
            return call.result
        with self._worker_lock:
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

        # Every call after the first async one goes through the same FIFO worker, so paracomm's calls keep the
        # issue order on every rank; they run on the private group, so torch collectives the main thread issues
        # on the user's group in the meantime never interleave with them.
        self._worker.submit(job)
        work = Work(future, call.result)
        if async_op:
            return work
        return work.wait()

    def _fail(self, reason: str) -> RuntimeError:
        self._failed = reason
        return RuntimeError(f"paracomm.all_reduce (rank {self.rank} of {self.world_size}): {reason}")

    def _cpu_executor(self) -> CpuExecutor:
        if self._cpu is None:
            try:
                # shared memory or gloo: PARACOMM_CPU_TRANSPORT and the ranks' placement (paracomm/_shm.py)
                self._cpu = make_cpu_executor(self._group_store(), self._prefix, self.rank, self.world_size,
                                              self.timeout)
            except ValueError:
                raise
            except Exception as e:  # noqa: BLE001
                raise self._fail(f"creating paracomm's CPU transport failed (a rank may have died or not "
                                 f"called all_reduce): {e}") from e
        return self._cpu

    def _run_cpu(self, call: _Call) -> None:
        if self._failed is not None:
            raise RuntimeError(f"paracomm.all_reduce: this Communicator failed earlier: {self._failed}")
        x = call.flat
        deadline = time.monotonic() + self.timeout.total_seconds()

        def on_error(what: str, e: BaseException) -> RuntimeError:
            return self._fail(f"{what} failed or timed out (timeout {self.timeout.total_seconds():g} s); "
                              f"a peer may have died: {e}")

        if self.world_size == 1:
            # Nothing travels (so the wire dtype rounds nothing); only avg/scale/found_inf touch the data.
            if call.has_final_op and x.numel() > 0:
                reduce_(x, [x], divisor=call.divisor, scale=call.scale, found_inf=call.found_inf)
            return
        executor = self._cpu_executor()
        if isinstance(executor, ShmExecutor):  # checks the signature in every call, before any data moves
            _check_shapes_mode()  # refuses a bad PARACOMM_CHECK_SHAPES as the gloo path does (shm ignores it)
            signature = _signature(call)
            executor.all_reduce(call, signature, _chunk_bytes(), deadline, _mismatch_error, on_error)
            self._seen.add(signature)
            return
        wait = deadline_wait(deadline, on_error)
        if self._needs_handshake(call):
            self._handshake_cpu(call, wait)
        plan = self._plans.get(call, self.world_size, self.rank, "gloo", _chunk_bytes())
        travel = call.wire_dtype if call.wire_dtype is not None else x.dtype
        executor.run(plan, x, travel=travel, divisor=call.divisor, scale=call.scale, found_inf=call.found_inf,
                     wire_dtype=call.wire_dtype, wait=wait)

    # ------------------------------------------------------------------------------------------------------
    # NCCL executor (CUDA builds)
    # ------------------------------------------------------------------------------------------------------

    def _group_store(self):
        if self._store is None:
            self._store = c10d._get_process_group_store(self.group)
        return self._store

    def _nccl_comm(self, device: torch.device):
        """paracomm's NCCL communicator for ``device``, created on first use (collective over the group)."""
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
            self._nccl = _C.NcclComm(unique_id, self.world_size, self.rank, device.index,
                                     self.timeout.total_seconds())
        return self._nccl

    def _all_reduce_nccl(self, call: _Call, async_op: bool):
        x = call.flat
        device = x.device
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device)
            if self.world_size == 1:
                if call.has_final_op and x.numel() > 0:
                    reduce_(x, [x], divisor=call.divisor, scale=call.scale, found_inf=call.found_inf)
            else:
                deadline = time.monotonic() + self.timeout.total_seconds()
                if self._needs_handshake(call):
                    self._handshake_store(call, deadline)
                comm = self._nccl_comm(device)
                chunk_bytes = _chunk_bytes()
                plan = self._plans.get(call, self.world_size, self.rank, "nccl", chunk_bytes)
                ws_bytes = plan.workspace_bytes
                # Allocated on the current stream: the executor makes that stream wait for its own before it
                # returns, so the caching allocator may reuse the workspace as soon as we return.
                workspace = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=device)
                wire_code = -1 if call.wire_dtype is None else _DTYPE_CODES[call.wire_dtype]
                comm.all_reduce(
                    x.data_ptr(), x.numel(), _DTYPE_CODES[x.dtype], call.divisor, wire_code,
                    call.scale.data_ptr() if call.scale is not None else 0,
                    call.found_inf.data_ptr() if call.found_inf is not None else 0,
                    workspace.data_ptr(), ws_bytes, stream.cuda_stream, _ALGORITHM_CODES[plan.algorithm],
                    chunk_bytes)
            if not async_op:
                return call.result
            # A CUDA-aware future: set_result records an event on the current stream, and whoever waits on
            # the future (wait(), then(), DDP) synchronises with that stream, never the host.
            future = torch.futures.Future(devices=[device])
            future.set_result(call.tensor)
            done = torch.cuda.Event()
            done.record(stream)
            check = self._nccl.check if self._nccl is not None else None
            return Work(future, call.result, done_event=done, check=check)


# ----------------------------------------------------------------------------------------------------------
# Module-level convenience
# ----------------------------------------------------------------------------------------------------------

_communicators: dict = {}
_communicators_lock = threading.Lock()


def _communicator_for(group) -> Communicator:
    if group is None:
        group = c10d._get_default_group()
    with _communicators_lock:
        comm = _communicators.get(group)
        if comm is None:
            comm = Communicator(group)
            _communicators[group] = comm
        return comm


def all_reduce(tensor, op="sum", *, group=None, wire_dtype=None, async_op: bool = False, scale=None,
               found_inf=None, algorithm: Optional[str] = None):
    """``Communicator(group).all_reduce(...)`` with one cached :class:`Communicator` per process group.

    A drop-in for ``torch.distributed.all_reduce(tensor, op, group, async_op)`` for SUM and AVG.
    Args, returns and errors: see :meth:`Communicator.all_reduce`. ``group`` None means the default group.
    """
    return _communicator_for(group).all_reduce(tensor, op, wire_dtype=wire_dtype, async_op=async_op,
                                               scale=scale, found_inf=found_inf, algorithm=algorithm)


def explain_all_reduce(numel: int, dtype: torch.dtype, world_size: int, *, wire_dtype=None,
                       algorithm: str = "auto", backend: str = "nccl") -> dict:
    """What an all-reduce of ``numel`` elements of ``dtype`` over ``world_size`` ranks would do (no communication).

    Args:
        numel: elements (>= 0). dtype: one of the six dtypes :meth:`Communicator.all_reduce` takes.
        world_size: ranks (>= 1). wire_dtype: None, torch.float16 or torch.bfloat16 (float32 data only).
        algorithm: "auto" (resolved as a call would resolve it), "ring", "direct" or "one_shot".
        backend: "nccl" (CUDA tensors) or "gloo" (CPU tensors): the chunk policy and the "auto" thresholds differ.

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
    _check_algorithm(algorithm, name)
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"{name}: backend must be 'nccl' or 'gloo', got {backend!r}")
    _check_rank_limit(algorithm, world_size, name)
    wire = -1 if wire_dtype is None else _DTYPE_CODES[wire_dtype]
    return dict(_C.plan_summary(numel, _DTYPE_CODES[dtype], wire, world_size, 0, algorithm, backend, False, False,
                                _chunk_bytes()))
