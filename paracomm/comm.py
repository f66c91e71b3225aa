"""paracomm's ring all-reduce: :class:`Communicator` and :func:`all_reduce`.

One schedule (``paracomm._C.ring_schedule``, csrc/ring/schedule.h), two executors:

* CUDA tensors: paracomm's own NCCL communicator (``paracomm._C.NcclComm``, CUDA builds only), bootstrapped
  through the process group's store; send/recv per ring step and paracomm's reduction kernels, enqueued on the
  caller's current stream without a host synchronisation.
* CPU tensors: a Python loop over the same op list, moving chunks with ``torch.distributed`` point-to-point on
  the group (gloo) and reducing them with ``paracomm._ops.ring_reduce_``.

Both give bitwise identical results on every rank and from run to run: each segment is summed once, by its
owner, in ring order, and everybody copies the owner's bits (see csrc/ring/schedule.h).
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from . import _C
from ._ops import ring_reduce_
from ._validate import check_wire_dtype

__all__ = ["Communicator", "Work", "all_reduce"]

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

_GLOO_DEFAULT_CHUNK_BYTES = 4 << 20  # per-op Python overhead (~tens of us) stays small next to 4 MiB transfers
_NCCL_DEFAULT_CHUNK_BYTES = 1 << 20

# Communicators created so far per process group name: the n-th Communicator over a group gets the same store
# prefix on every rank, as long as every rank creates its Communicators in the same order (as collectives).
_instance_counts: dict = {}
_instance_lock = threading.Lock()


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def _chunk_bytes(default: int) -> int:
    value = os.environ.get("PARACOMM_CHUNK_BYTES")
    if not value:
        return default
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
    was passed in); it raises the ring's error if the collective failed. ``get_future()`` returns a
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
        """A ``torch.futures.Future`` completed with the reduced tensor (or with the ring's error)."""
        return self._future


class _Call:
    """One validated all-reduce: a flat view of the data plus everything the executors need."""

    __slots__ = ("flat", "result", "tensor", "op", "divisor", "wire_dtype", "scale", "found_inf")

    def __init__(self, flat, result, tensor, op, divisor, wire_dtype, scale, found_inf):
        self.flat = flat
        self.result = result
        self.tensor = tensor
        self.op = op
        self.divisor = divisor
        self.wire_dtype = wire_dtype
        self.scale = scale
        self.found_inf = found_inf


class Communicator:
    """Ring all-reduce over the ranks of a ``torch.distributed`` process group.

    Args:
        group: the process group (the default group when None). Its backend decides what is served: "gloo"
            -> CPU tensors (gloo point-to-point), "nccl" -> CUDA tensors (paracomm's own NCCL communicator,
            created on first use), "cpu:gloo,cuda:nccl" -> both.
        timeout: bound on every call: a peer that stops answering (a dead rank) makes the call raise
            RuntimeError within about this time instead of hanging.

    Every rank of the group must create its Communicators in the same order (like a collective) and issue
    the same sequence of ``all_reduce`` calls.

    Attributes: ``rank`` and ``world_size`` (in the group), ``backend`` ("nccl" or "gloo"; "nccl" for a group
    that has both), ``group``, ``timeout``.
    """

    def __init__(self, group=None, *, timeout: timedelta = timedelta(seconds=300)):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("paracomm.Communicator: torch.distributed is not initialised "
                               "(call torch.distributed.init_process_group first)")
        if not isinstance(timeout, timedelta):
            raise TypeError(f"paracomm.Communicator: timeout must be a datetime.timedelta, got {type(timeout)}")
        if timeout.total_seconds() <= 0:
            raise ValueError(f"paracomm.Communicator: timeout must be positive, got {timeout}")
        self.group = group if group is not None else c10d._get_default_group()
        self.timeout = timeout
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        if self.rank < 0:
            raise ValueError("paracomm.Communicator: this process is not a member of group")
        self._global_ranks = dist.get_process_group_ranks(self.group)
        self._serves_cpu, self._serves_cuda = _group_backends(self.group)
        if not (self._serves_cpu or self._serves_cuda):
            raise ValueError(f"paracomm.Communicator: group backend {dist.get_backend(self.group)!r} is not "
                             "supported (gloo for CPU tensors, nccl for CUDA tensors)")
        self.backend = "nccl" if self._serves_cuda else "gloo"
        with _instance_lock:
            key = self.group.group_name
            index = _instance_counts.get(key, 0)
            _instance_counts[key] = index + 1
        self._prefix = f"paracomm/{key}/{index}"
        self._store = None  # the group's store, fetched on first NCCL use
        self._nccl = None  # paracomm._C.NcclComm, created lazily on first CUDA call
        self._nccl_calls = 0  # NCCL calls issued (per-call handshake keys in the store)
        self._gloo_calls = 0
        self._worker = None  # single background thread for gloo async calls (FIFO = same order on every rank)
        self._worker_lock = threading.Lock()
        self._failed: Optional[str] = None  # reason this communicator can no longer be used

    def __repr__(self) -> str:
        return f"Communicator(rank={self.rank}, world_size={self.world_size}, backend={self.backend!r})"

    # ------------------------------------------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------------------------------------------

    def all_reduce(self, tensor, op: str = "sum", *, wire_dtype=None, async_op: bool = False, scale=None,
                   found_inf=None):
        """Reduce ``tensor`` over all ranks of the group, in place.

        Args:
            tensor: a contiguous ``torch.Tensor`` (any shape) or any object with ``__dlpack__`` (NumPy arrays,
                CuPy arrays), reduced in place through ``torch.from_dlpack``. dtype float32, float16, bfloat16,
                float64, int32 or int64; CPU tensors need a gloo group, CUDA tensors an NCCL group. Every rank
                passes the same numel and dtype.
            op: "sum" or "avg" (floating dtypes only; the division by the world size is fused into the last
                reduction of each segment).
            wire_dtype: None (data travels in its own dtype) or torch.float16 / torch.bfloat16 for a float32
                tensor: data travels compressed and every local reduction accumulates in float32.
            async_op: return a :class:`Work` handle instead of waiting.
            scale: optional 1-element float32 tensor on the tensor's device (floating dtypes): the result is
                multiplied by it (e.g. a GradScaler's inverse scale); pass the same value on every rank.
            found_inf: optional 1-element float32 tensor on the tensor's device: set to 1.0 if any result
                value is inf or nan (on every rank alike), never cleared.

        Returns:
            ``tensor`` (the same object, also for ``__dlpack__`` inputs), or a :class:`Work` if ``async_op``.

        Raises:
            TypeError: unsupported dtype, a bad ``wire_dtype``, ``scale``/``found_inf`` not float32 tensors.
            ValueError: non-contiguous data, unknown op, avg on integers, wire_dtype on a non-float32 tensor,
                a device this communicator does not serve, a bad ``scale``/``found_inf`` shape or device.
                Nothing is written when an argument is refused.
            RuntimeError: ranks disagree on numel/dtype/op/wire_dtype (raised on every rank; check with
                PARACOMM_CHECK_SHAPES=0 to skip it), or a peer failed / the timeout expired.
        """
        call = self._validate(tensor, op, wire_dtype, scale, found_inf)
        if call.flat.device.type == "cuda":
            return self._all_reduce_nccl(call, async_op)
        return self._all_reduce_gloo(call, async_op)

    # ------------------------------------------------------------------------------------------------------
    # Validation (everything checked before anything is written)
    # ------------------------------------------------------------------------------------------------------

    def _validate(self, tensor, op, wire_dtype, scale, found_inf) -> _Call:
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
                            "(float32, float16, bfloat16, float64, int32, int64)")
        if not tensor.is_contiguous():
            raise ValueError(f"{name}: tensor must be contiguous")
        if not isinstance(op, str) or op not in _OPS:
            raise ValueError(f"{name}: op must be 'sum' or 'avg', got {op!r}")
        floating = tensor.dtype.is_floating_point
        if op == "avg" and not floating:
            raise ValueError(f"{name}: op='avg' needs a floating tensor, got {tensor.dtype}")
        if wire_dtype is not None:
            check_wire_dtype(wire_dtype, name)
            if tensor.dtype != torch.float32:
                raise ValueError(f"{name}: wire_dtype={wire_dtype} needs a float32 tensor, got {tensor.dtype}")
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
                raise TypeError(f"{name}: {arg} must be float32, got {t.dtype}")
            if t.device != device:
                raise ValueError(f"{name}: {arg} is on {t.device} but tensor is on {device}")
        if scale is not None and not floating:
            raise ValueError(f"{name}: scale needs a floating tensor, got {tensor.dtype}")
        if self._failed is not None:
            raise RuntimeError(f"{name}: this Communicator failed earlier and cannot be used: {self._failed}")
        divisor = float(self.world_size) if op == "avg" else 1.0
        return _Call(tensor.view(-1), result, tensor, op, divisor, wire_dtype, scale, found_inf)

    # ------------------------------------------------------------------------------------------------------
    # Shape handshake
    # ------------------------------------------------------------------------------------------------------

    @staticmethod
    def _signature(call: _Call) -> list:
        wire = -1 if call.wire_dtype is None else _DTYPE_CODES[call.wire_dtype]
        return [call.flat.numel(), _DTYPE_CODES[call.flat.dtype], _OPS.index(call.op), wire,
                int(call.scale is not None), int(call.found_inf is not None)]

    def _mismatch_error(self, signatures: list) -> Optional[RuntimeError]:
        if all(s == signatures[0] for s in signatures):
            return None
        codes = {v: k for k, v in _DTYPE_CODES.items()}

        def describe(sig):
            numel, dt, op, wire, _, _ = sig
            wire_name = "none" if wire < 0 else str(codes.get(wire, wire)).replace("torch.", "")
            return (f"numel={numel} dtype={str(codes.get(dt, dt)).replace('torch.', '')} op={_OPS[op]} "
                    f"wire_dtype={wire_name}")

        lines = "; ".join(f"rank {r}: {describe(s)}" for r, s in enumerate(signatures))
        return RuntimeError(f"paracomm.all_reduce: ranks called all_reduce with different arguments "
                            f"(numel, dtype, op and wire_dtype must match on every rank): {lines}")

    def _handshake_gloo(self, call: _Call, deadline: float) -> None:
        mine = torch.tensor(self._signature(call), dtype=torch.int64)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        work = dist.all_gather(gathered, mine, group=self.group, async_op=True)
        self._wait(work, deadline, "the shape handshake")
        error = self._mismatch_error([g.tolist() for g in gathered])
        if error is not None:
            raise error

    def _handshake_store(self, call: _Call, deadline: float) -> None:
        """Handshake through the group's store (no GPU synchronisation).

        Call k writes key ``<prefix>/hs/<k>/<rank>``. A rank that reaches call k has read every rank's key of
        call k-1, so every rank has finished reading call k-2's keys: at call k each rank deletes its own key
        of call k-2, keeping the store bounded.
        """
        k = self._nccl_calls
        self._nccl_calls += 1
        store = self._group_store()
        base = f"{self._prefix}/hs"
        if k >= 2:
            store.delete_key(f"{base}/{k - 2}/{self.rank}")
        store.set(f"{base}/{k}/{self.rank}", ",".join(str(v) for v in self._signature(call)))
        keys = [f"{base}/{k}/{r}" for r in range(self.world_size)]
        remaining = deadline - time.monotonic()
        try:
            store.wait(keys, timedelta(seconds=max(remaining, 0.001)))
            values = [store.get(key) for key in keys]
        except Exception as e:  # noqa: BLE001
            raise self._fail(f"the shape handshake through the store did not complete within "
                             f"{self.timeout.total_seconds():g} s (a rank may have died): {e}") from e
        error = self._mismatch_error([[int(v) for v in bytes(x).decode().split(",")] for x in values])
        if error is not None:
            raise error

    # ------------------------------------------------------------------------------------------------------
    # gloo executor
    # ------------------------------------------------------------------------------------------------------

    def _all_reduce_gloo(self, call: _Call, async_op: bool):
        if not async_op and self._worker is None:
            self._run_gloo(call)
            return call.result
        with self._worker_lock:
            if self._worker is None:
                self._worker = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=f"paracomm-ring-{self.rank}")
        future = torch.futures.Future()

        def job():
            try:
                self._run_gloo(call)
            except BaseException as e:  # noqa: BLE001  (delivered through the future)
                future.set_exception(e)
            else:
                future.set_result(call.tensor)

        # Every call after the first async one goes through the same FIFO worker, so the collective order
        # is the issue order on every rank.
        self._worker.submit(job)
        work = Work(future, call.result)
        if async_op:
            return work
        return work.wait()

    def _wait(self, work, deadline: float, what: str, peers: str = "") -> None:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError("no time left")
            work.wait(timedelta(seconds=remaining))
        except Exception as e:  # noqa: BLE001
            raise self._fail(f"{what} failed or timed out (timeout {self.timeout.total_seconds():g} s{peers}); "
                             f"a peer may have died: {e}") from e

    def _fail(self, reason: str) -> RuntimeError:
        self._failed = reason
        return RuntimeError(f"paracomm.all_reduce (rank {self.rank} of {self.world_size}): {reason}")

    def _run_gloo(self, call: _Call) -> None:
        """The ring over gloo point-to-point, executing ring_schedule's ops (semantics: the executor brief)."""
        if self._failed is not None:
            raise RuntimeError(f"paracomm.all_reduce: this Communicator failed earlier: {self._failed}")
        x, n_ranks = call.flat, self.world_size
        deadline = time.monotonic() + self.timeout.total_seconds()
        if n_ranks == 1:
            # Nothing travels (so the wire dtype rounds nothing); only avg/scale/found_inf touch the data.
            if call.divisor != 1.0 or call.scale is not None or call.found_inf is not None:
                ring_reduce_(x, x, divisor=call.divisor, scale=call.scale, found_inf=call.found_inf)
            return
        if _env_flag("PARACOMM_CHECK_SHAPES", True):
            self._handshake_gloo(call, deadline)
        numel = x.numel()
        if numel == 0:
            return
        compressed = call.wire_dtype is not None
        travel_dtype = call.wire_dtype if compressed else x.dtype
        elem = torch.empty((), dtype=travel_dtype).element_size()
        chunk_elems = max(1, _chunk_bytes(_GLOO_DEFAULT_CHUNK_BYTES) // elem)
        ops = _C.ring_schedule(n_ranks, self.rank, numel, chunk_elems)
        largest = -(-numel // n_ranks)
        buf_elems = min(chunk_elems, largest)
        recv_bufs = [torch.empty(buf_elems, dtype=travel_dtype) for _ in range(2)]
        wire = torch.empty(numel, dtype=travel_dtype) if compressed else None
        send_src = wire if compressed else x
        next_peer = self._global_ranks[(self.rank + 1) % n_ranks]
        prev_peer = self._global_ranks[(self.rank - 1) % n_ranks]
        peers = f", peers: sends to rank {next_peer}, receives from rank {prev_peer}"
        reduce_scatter = _C.RingPhase.REDUCE_SCATTER

        def post(i):
            """Start op i's transfers. Caller guarantees: op send_after's local step is done, and receive
            buffer i % 2 is no longer read (op i-2's local step is done)."""
            op = ops[i]
            rs = op.phase == reduce_scatter
            works = []
            if op.send_count:
                s = slice(op.send_offset, op.send_offset + op.send_count)
                if compressed and rs and op.step == 0:
                    ring_reduce_(wire[s], x[s])  # the rank's own input, rounded once to the wire dtype
                works.append(dist.isend(send_src[s], next_peer, group=self.group, tag=i))
            if op.recv_count:
                if rs:
                    dst = recv_bufs[i % 2][:op.recv_count]
                else:  # all-gather lands in place
                    dst = send_src[op.recv_offset:op.recv_offset + op.recv_count]
                works.append(dist.irecv(dst, prev_peer, group=self.group, tag=i))
            return works

        def local_step(i):
            op = ops[i]
            if op.recv_count == 0:
                return
            r = slice(op.recv_offset, op.recv_offset + op.recv_count)
            if op.phase == reduce_scatter:
                received = recv_bufs[i % 2][:op.recv_count]
                if not op.final_reduce:
                    ring_reduce_(wire[r] if compressed else x[r], x[r], received)
                else:
                    # The owner completes its segment: average, scale, check, and (compressed) keep exactly
                    # the rounded bits it is about to send.
                    ring_reduce_(x[r], x[r], received, divisor=call.divisor, scale=call.scale,
                                 found_inf=call.found_inf, wire_out=wire[r] if compressed else None)
            elif compressed:
                ring_reduce_(x[r], wire[r], found_inf=call.found_inf)
            elif call.found_inf is not None:
                ring_reduce_(x[r], x[r], found_inf=call.found_inf)

        n_ops = len(ops)
        current = post(0)
        for i in range(n_ops):
            nxt = None
            # Overlap: op i+1's transfers go out before op i's reduction unless i+1 sends what op i produces.
            if i + 1 < n_ops and ops[i + 1].send_after != i:
                nxt = post(i + 1)
            for work in current:
                self._wait(work, deadline, f"ring op {i} of {n_ops}", peers)
            local_step(i)
            if i + 1 < n_ops and nxt is None:
                nxt = post(i + 1)
            current = nxt

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
                if call.divisor != 1.0 or call.scale is not None or call.found_inf is not None:
                    ring_reduce_(x, x, divisor=call.divisor, scale=call.scale, found_inf=call.found_inf)
            else:
                deadline = time.monotonic() + self.timeout.total_seconds()
                if _env_flag("PARACOMM_CHECK_SHAPES", True):
                    self._handshake_store(call, deadline)
                comm = self._nccl_comm(device)
                travel_dtype = call.wire_dtype if call.wire_dtype is not None else x.dtype
                elem = torch.empty((), dtype=travel_dtype).element_size()
                chunk_elems = max(1, _chunk_bytes(_NCCL_DEFAULT_CHUNK_BYTES) // elem)
                dtype_code = _DTYPE_CODES[x.dtype]
                wire_code = -1 if call.wire_dtype is None else _DTYPE_CODES[call.wire_dtype]
                ws_bytes = _C.nccl_workspace_bytes(x.numel(), dtype_code, wire_code, chunk_elems)
                # Allocated on the current stream: the ring makes that stream wait for its own, so the
                # caching allocator may reuse the workspace as soon as we return.
                workspace = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=device)
                comm.all_reduce(
                    x.data_ptr(), x.numel(), dtype_code, call.divisor, wire_code,
                    call.scale.data_ptr() if call.scale is not None else 0,
                    call.found_inf.data_ptr() if call.found_inf is not None else 0,
                    workspace.data_ptr(), ws_bytes, stream.cuda_stream, chunk_elems)
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


def all_reduce(tensor, op: str = "sum", *, group=None, wire_dtype=None, async_op: bool = False, scale=None,
               found_inf=None):
    """``Communicator(group).all_reduce(...)`` with one cached :class:`Communicator` per process group.

    Args, returns and errors: see :meth:`Communicator.all_reduce`. ``group`` None means the default group.
    """
    return _communicator_for(group).all_reduce(tensor, op, wire_dtype=wire_dtype, async_op=async_op,
                                               scale=scale, found_inf=found_inf)
