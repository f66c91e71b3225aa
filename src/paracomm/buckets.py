"""Bucketed gradient all-reduce without DDP: ``GradBucketer``.

``GradBucketer`` replaces a per-parameter ``dist.all_reduce(p.grad)`` loop after ``backward()``::

    bucketer = paracomm.GradBucketer(model, bucket_cap_mb=25)   # or model.parameters()
    for batch in data:
        loss = model(batch).sum()
        loss.backward()          # buckets are flattened and all-reduced while backward still runs
        bucketer.wait()          # every p.grad now holds the average over the ranks
        optimizer.step(); optimizer.zero_grad()

How it works (the same scheme as DDP's reducer):

* At construction, rank 0's parameters (and buffers, when a module is given) are broadcast to every rank, as
  DDP does, so replicas start equal (``broadcast_params=False`` skips it).
* Parameters are put into buckets in reverse order (gradients of the last layers are produced first), one
  bucket list per (dtype, device). The first bucket of each kind is capped at ``first_bucket_mb``, the others at
  ``bucket_cap_mb``; a bucket is closed as soon as it reaches its cap (so it may exceed it by its last tensor).
* A post-accumulate-grad hook on every parameter counts the gradients still missing in its bucket. When the
  count reaches zero the bucket's gradients are copied into a reused flat buffer by ``paracomm.flatten`` (one
  launch on CUDA) and an asynchronous ``Communicator.all_reduce`` of that buffer starts, overlapping the rest
  of backward.
* Buckets are launched strictly in bucket order, on every rank: a bucket that is ready early waits for the
  buckets before it. Collectives are therefore issued in the same order on every rank, whatever order the
  gradients arrive in (DDP's reducer does the same).
* At the end of backward (an autograd engine callback) the buckets still unlaunched (one holding a parameter
  that received no gradient, and the buckets after it) are launched, zeros standing in for missing gradients.
  ``wait()`` launches whatever is still left (no backward reached a parameter on this rank), waits for every
  bucket and writes the reduced values back with ``paracomm.unflatten_``.
* Each bucket's flat buffer ends with one "used" flag per parameter (1 where this rank produced a gradient,
  0 where zeros stood in), reduced with the gradients in the same all-reduce: a parameter whose flag sums to 0
  received a gradient on no rank and keeps ``.grad`` None, as with DDP's reducer (no extra collective).
* The model is followed like DDP's reducer: at the start of every iteration the parameters' identity, dtype,
  device and ``requires_grad`` are compared with the buckets' (for a module, its current ``parameters()``);
  any change (``model.double()``, a layer frozen or unfrozen, ``model.to(...)``) rebuilds the buckets. Every
  rank must change its model the same way (as with DDP).

Choices (documented in the class docstring): zeros for missing gradients, a second backward before
``wait()`` is refused, ``no_sync()`` for local gradient accumulation, compression left to the all-reduce.
"""
from __future__ import annotations

import contextlib
import numbers
import threading
from datetime import timedelta
from typing import Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist

from . import _ops
from .comm import Communicator, _check_algorithm, check_timeout
from ._validate import check_process_group, check_wire_dtype

__all__ = ["GradBucketer", "assign_buckets"]

_MB = 1024 * 1024
# The all-reduce's data types: floating-point gradients only.
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_OPS = ("avg", "sum")
_BROADCAST_BUCKET_BYTES = 250 * _MB  # DDP's broadcast_bucket_size


def _positive_mb(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"paracomm.GradBucketer: {name} must be a positive number of MiB, got {value!r}")
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"paracomm.GradBucketer: {name} must be a positive finite number of MiB, got {value!r}")
    return float(value)


def assign_buckets(tensors: Sequence[torch.Tensor], first_bucket_bytes: int, bucket_cap_bytes: int) -> List[List[int]]:
    """Group ``tensors`` into buckets the way DDP does, in the order their gradients are expected.

    Tensors are visited in reverse order (backward produces the gradients of the last layers first). Each
    (dtype, device) pair has its own open bucket; a tensor joins the open bucket of its kind, and the bucket is
    closed once its size in bytes reaches its cap: ``first_bucket_bytes`` for the first bucket of each kind,
    ``bucket_cap_bytes`` for the rest. This is ``torch.distributed._compute_bucket_assignment_by_size`` with
    the limits ``[first_bucket_bytes, bucket_cap_bytes]`` and reversed tensor indices.

    Buckets are returned sorted by the position (in the reversed visit) of their last tensor, i.e. by when
    they are expected to become complete; with a single dtype and device this is the order they were closed.

    Args:
        tensors: the parameters, in definition (forward) order.
        first_bucket_bytes, bucket_cap_bytes: positive byte caps.

    Returns:
        A list of buckets, each a list of indices into ``tensors`` in the order they were added.
    """
    open_buckets = {}  # (dtype, device) -> [indices, size_bytes, number of buckets closed so far]
    closed = []  # (position of the last tensor in the reversed visit, indices)
    for position, index in enumerate(reversed(range(len(tensors)))):
        t = tensors[index]
        key = (t.dtype, t.device)
        entry = open_buckets.setdefault(key, [[], 0, 0])
        entry[0].append(index)
        entry[1] += t.numel() * t.element_size()
        cap = first_bucket_bytes if entry[2] == 0 else bucket_cap_bytes
        if entry[1] >= cap:
            closed.append((position, entry[0]))
            entry[0], entry[1], entry[2] = [], 0, entry[2] + 1
    last_position = len(tensors) - 1
    for indices, _, _ in open_buckets.values():
        if indices:
            # Position of the bucket's last tensor in the reversed visit.
            closed.append((last_position - indices[-1], indices))
    closed.sort(key=lambda item: item[0])
    return [indices for _, indices in closed]


def _broadcast_from_rank0(tensors: List[torch.Tensor], group) -> None:
    """Overwrite ``tensors`` with rank 0's values (rank 0 of ``group``), in the same coalesced broadcasts DDP's
    constructor uses; one call per device, since a coalesced broadcast packs its tensors into one buffer."""
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    by_device: dict = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    with torch.no_grad():  # parameters are leaves that require grad: an in-place copy must not be recorded
        for ts in by_device.values():
            dist._broadcast_coalesced(pg, ts, _BROADCAST_BUCKET_BYTES, 0)


class _Bucket:
    """One bucket's parameters, its reused flat buffer and this iteration's state."""

    __slots__ = ("params", "numel", "dtype", "device", "buffer", "pending", "grads", "created", "work")

    def __init__(self, params: List[torch.Tensor]):
        self.params = params
        self.numel = sum(p.numel() for p in params)  # gradient elements; the buffer has len(params) flags more
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.buffer: Optional[torch.Tensor] = None  # allocated at the first launch, reused afterwards
        self.pending = len(params)  # gradients not yet accumulated this iteration
        self.grads: Optional[List[torch.Tensor]] = None  # the gradients flattened at launch
        self.created: Optional[List[bool]] = None  # True where the gradient was missing and zeros were made
        self.work = None  # the all-reduce in flight

    def reset(self) -> None:
        self.pending = len(self.params)
        self.grads = self.created = self.work = None


def _sparse_modules(module: torch.nn.Module) -> dict:
    """id(parameter) -> its name, for the weights of sparse embeddings (they produce sparse gradients)."""
    names = {id(p): n for n, p in module.named_parameters()}
    out = {}
    for m in module.modules():
        if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and getattr(m, "sparse", False):
            out[id(m.weight)] = names.get(id(m.weight), "an embedding's weight")
    return out


class GradBucketer:
    """All-reduce the gradients of ``params`` in buckets that start while backward is still running.

    Args:
        params: an ``nn.Module`` (its parameters; its buffers are broadcast too) or an iterable of tensors
            (e.g. ``model.parameters()``). Tensors with ``requires_grad=False`` (frozen) get no bucket, a tensor
            given twice is used once. Every trainable tensor must be a leaf, strided, and float32, float16,
            bfloat16 or float64; tensors of different dtypes or devices go into separate buckets. A module's
            sparse embeddings (``nn.Embedding(sparse=True)``, ``nn.EmbeddingBag(sparse=True)``) are refused
            here, naming the parameter: their gradients are sparse (use DDP, whose reducer has a sparse path).
        bucket_cap_mb: size cap of a bucket in MiB (default 25, as DDP).
        first_bucket_mb: size cap of the first bucket of each (dtype, device) in MiB (default 1, as DDP), so
            the all-reduce of the last layers' gradients starts early.
        group: the process group (default: the world group); ``torch.distributed`` must be initialized.
        wire_dtype: None, torch.float16 or torch.bfloat16: float32 buckets travel in this dtype and every
            local reduction still accumulates in float32 (the flat buffer stays float32; the all-reduce
            compresses and decompresses on the way, which is more accurate than casting the buffer first and
            adds no pass).
            Buckets of other dtypes travel in their own dtype.
        op: "avg" (default: the gradient average, as DDP) or "sum".
        algorithm: None (the Communicator's default: "auto", or ``PARACOMM_ALGORITHM``), "auto", "ring",
            "direct" or "one_shot": the all-reduce algorithm of every bucket (see ``paracomm.all_reduce``).
        broadcast_params: True (default): the constructor copies rank 0's values of every tensor in
            ``params`` (frozen ones included) and, for a module, of its buffers to every rank, as DDP's
            constructor does, so ranks that initialised their weights differently (another seed, a checkpoint
            loaded on rank 0 only) start equal instead of silently training apart. It is a collective: every
            rank of ``group`` constructs its bucketer at the same point. False: the weights are left as they
            are (the caller guarantees they are equal).
        timeout: None (the process group's timeout) or a datetime.timedelta bounding every bucket's
            all-reduce: a dead or stalled rank makes ``wait()`` raise within about this time.

    Behaviour:
        * Every rank must call ``backward()`` and ``wait()`` in the same pattern. ``wait()`` always completes
          one all-reduce of every bucket, in bucket order, so all ranks issue the same collectives.
        * A parameter that received no gradient in an iteration contributes zeros, like DDP with
          ``find_unused_parameters=True``. After ``wait()`` it holds the reduced gradient of the other ranks
          (a new tensor when its ``grad`` was None); a parameter that received a gradient on no rank keeps
          ``grad`` None, as with DDP, so weight decay and momentum leave it alone.
        * The buckets follow the model: a change of the parameters' dtype, device or ``requires_grad`` (or,
          for a module, of its parameter set) rebuilds them at the next iteration; frozen parameters keep
          ``grad`` None. Every rank must make the same change.
        * A second backward that reaches these parameters before ``wait()`` is refused with a RuntimeError
          (its buckets are already on the wire). To accumulate gradients over several backward passes, run
          all but the last inside ``with bucketer.no_sync():``.
        * Do not modify or replace the gradients between ``backward()`` and ``wait()``.
        * ``remove()`` detaches the hooks.

    Raises:
        TypeError: ``params`` holds a non-tensor or an unsupported dtype, a cap that is not a number,
            ``group`` that is not a ProcessGroup, ``wire_dtype`` that is not a torch.dtype,
            ``broadcast_params`` that is not a bool, ``timeout`` that is not a timedelta.
        ValueError: no trainable parameter, a non-leaf or non-strided parameter, a sparse embedding, a cap
            <= 0, an unknown ``op``, ``wire_dtype`` or ``algorithm``, a timeout <= 0.
        RuntimeError: ``torch.distributed`` is not initialized.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        *,
        bucket_cap_mb: float = 25,
        first_bucket_mb: float = 1,
        group: Optional[dist.ProcessGroup] = None,
        wire_dtype: Optional[torch.dtype] = None,
        op: str = "avg",
        algorithm: Optional[str] = None,
        broadcast_params: bool = True,
        timeout: Optional[timedelta] = None,
    ):
        name = "paracomm.GradBucketer"
        buffers: List[torch.Tensor] = []
        self._module: Optional[torch.nn.Module] = None
        self._sparse: dict = {}
        if isinstance(params, torch.nn.Module):
            self._module = params
            self._sparse = _sparse_modules(params)
            buffers = list(params.buffers())
            params = params.parameters()
        if isinstance(params, torch.Tensor):
            params = [params]
        try:
            params = list(params)
        except TypeError:
            raise TypeError(f"{name}: params must be an iterable of tensors, got {type(params).__name__}") from None
        given = self._given_params(params, name)
        self._names = {id(p): n for n, p in self._module.named_parameters()} if self._module is not None else {
            id(p): f"params[{i}]" for i, p in enumerate(given)}
        trainable = self._trainable(given, name)
        if not trainable:
            raise ValueError(f"{name}: params holds no tensor with requires_grad=True")
        cap_bytes = int(_positive_mb(bucket_cap_mb, "bucket_cap_mb") * _MB)
        first_bytes = int(_positive_mb(first_bucket_mb, "first_bucket_mb") * _MB)
        check_process_group(group, name, "group")
        check_wire_dtype(wire_dtype, name)
        if op not in _OPS:
            raise ValueError(f"{name}: op must be 'avg' or 'sum', got {op!r}")
        if algorithm is not None:
            _check_algorithm(algorithm, name)
        if not isinstance(broadcast_params, bool):
            raise TypeError(f"{name}: broadcast_params must be True or False, got {broadcast_params!r}")
        check_timeout(timeout, name)
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"{name}: torch.distributed is not initialized; call "
                               "torch.distributed.init_process_group first")
        if broadcast_params:
            seen = {id(p) for p in given}
            _broadcast_from_rank0(given + [b for b in buffers if id(b) not in seen], group)

        self._comm = Communicator(group, algorithm=algorithm, timeout=timeout)
        self._op = op
        self._wire_dtype = wire_dtype
        self.bucket_cap_bytes = cap_bytes
        self.first_bucket_bytes = first_bytes
        self._given = given  # every tensor given (frozen ones too), for a parameter list
        self._next_bucket = 0  # buckets [0, _next_bucket) are on the wire this iteration
        self._backward_seen = False  # a hook ran this iteration (end-of-backward callback queued)
        self._backward_done = False  # that backward has finished
        self._sync = True
        # Autograd runs CPU and each CUDA device's backward work on different threads: hooks of parameters
        # on different devices may run concurrently.
        self._lock = threading.Lock()
        self._handles: dict = {}  # id(param) -> hook handle
        self._removed = False
        self._build(given, trainable)

    # ---------------------------------------------------------------------------------------------------
    # Buckets, and following the model
    # ---------------------------------------------------------------------------------------------------

    @staticmethod
    def _given_params(params: list, name: str) -> List[torch.Tensor]:
        given, seen = [], set()
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{name}: params[{i}] must be a torch.Tensor, got {type(p).__name__}")
            if id(p) not in seen:
                seen.add(id(p))
                given.append(p)
        return given

    def _trainable(self, given: List[torch.Tensor], name: str) -> List[torch.Tensor]:
        names = self._names
        trainable = []
        for i, p in enumerate(given):
            if not p.requires_grad:
                continue
            label = names.get(id(p), f"params[{i}]")
            if id(p) in self._sparse:
                raise ValueError(f"{name}: parameter {self._sparse[id(p)]!r} belongs to a sparse embedding "
                                 "(sparse=True): its gradients are sparse, which GradBucketer does not reduce; "
                                 "use sparse=False, or DDP (whose reducer has a sparse path)")
            if not p.is_leaf:
                raise ValueError(f"{name}: {label} is not a leaf tensor (gradients accumulate only on leaves)")
            if p.layout != torch.strided:
                raise ValueError(f"{name}: {label} has layout {p.layout}; only strided tensors are supported")
            if p.dtype not in _SUPPORTED_DTYPES:
                raise TypeError(f"{name}: {label} has dtype {p.dtype}; supported: float32, float16, "
                                "bfloat16, float64")
            trainable.append(p)
        return trainable

    def _layout(self, given: List[torch.Tensor]) -> tuple:
        """What the buckets depend on: every tensor's identity, dtype, device and requires_grad."""
        return tuple((id(p), p.dtype, p.device, p.requires_grad) for p in given)

    def _build(self, given: List[torch.Tensor], trainable: List[torch.Tensor]) -> None:
        """(Re)make the buckets of ``trainable`` and hook every trainable tensor (once)."""
        self._given = given
        self._layout_key = self._layout(given)
        self._params = trainable
        self._buckets = [_Bucket([trainable[i] for i in indices])
                         for indices in assign_buckets(trainable, self.first_bucket_bytes, self.bucket_cap_bytes)]
        # id(param) -> (bucket index, position in the bucket)
        self._where = {}
        for b, bucket in enumerate(self._buckets):
            for k, p in enumerate(bucket.params):
                self._where[id(p)] = (b, k)
        self._ready = [[False] * len(bucket.params) for bucket in self._buckets]
        for p in trainable:
            if id(p) not in self._handles:
                self._handles[id(p)] = p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _follow_model(self) -> None:
        """At an iteration's start: rebuild the buckets if the parameters changed (DDP's reducer rule)."""
        given = self._given
        if self._module is not None:
            given = self._given_params(list(self._module.parameters()), "paracomm.GradBucketer")
        if self._layout(given) == self._layout_key:
            return
        if self._module is not None:
            self._names = {id(p): n for n, p in self._module.named_parameters()}
        trainable = self._trainable(given, "paracomm.GradBucketer")
        if not trainable:
            raise RuntimeError("paracomm.GradBucketer: the model has no parameter with requires_grad=True any "
                               "more; remove() this bucketer")
        self._build(given, trainable)

    # ---------------------------------------------------------------------------------------------------
    # Introspection
    # ---------------------------------------------------------------------------------------------------

    @property
    def buckets(self) -> List[List[torch.Tensor]]:
        """The parameters of each bucket, in launch order."""
        return [list(b.params) for b in self._buckets]

    @property
    def launched_buckets(self) -> int:
        """How many buckets of the current iteration have started their all-reduce (0 after ``wait()``)."""
        return self._next_bucket

    # ---------------------------------------------------------------------------------------------------
    # The iteration
    # ---------------------------------------------------------------------------------------------------

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        """Post-accumulate-grad hook: ``param.grad`` now holds this backward's gradient."""
        if not self._sync or self._removed:
            return
        with self._lock:
            self._grad_ready(param)

    def _grad_ready(self, param: torch.Tensor) -> None:
        if not self._in_iteration():
            self._follow_model()
        where = self._where.get(id(param))
        if where is None:
            return  # not in a bucket (frozen when the buckets were built): its gradient stays local
        b, k = where
        if self._backward_done or self._ready[b][k]:
            raise RuntimeError(
                "paracomm.GradBucketer: a second backward reached the parameters before wait(); their buckets "
                "are already being all-reduced. Call wait() after every backward, or run the backward passes "
                "that only accumulate inside `with bucketer.no_sync():`. Call wait() now to finish this "
                "iteration's all-reduce on every rank.")
        if param.grad is not None and param.grad.layout != torch.strided:
            raise RuntimeError(f"paracomm.GradBucketer: sparse gradients are not supported: parameter "
                               f"{self._names.get(id(param), '?')!r} received a {param.grad.layout} gradient "
                               "(nn.Embedding(sparse=True)?); the bucketer cannot reduce it")
        if not self._backward_seen:
            self._backward_seen = True
            # Runs once the whole backward has finished (DDP's reducer uses the same engine callback).
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)
        self._ready[b][k] = True
        self._buckets[b].pending -= 1
        # Launch in bucket order only: the same collective order on every rank.
        while self._next_bucket < len(self._buckets) and self._buckets[self._next_bucket].pending == 0:
            self._launch(self._next_bucket)

    def _on_backward_end(self) -> None:
        with self._lock:
            self._backward_done = True
            self._launch_remaining()

    def _launch_remaining(self) -> None:
        while self._next_bucket < len(self._buckets):
            self._launch(self._next_bucket)

    def _launch(self, b: int) -> None:
        """Flatten bucket ``b``'s gradients (zeros for missing ones) and its used flags; start its all-reduce."""
        bucket = self._buckets[b]
        grads, created = [], []
        for p in bucket.params:
            g = p.grad
            created.append(g is None)
            if g is None:
                g = torch.zeros_like(p)
            grads.append(g)
        count = len(bucket.params)
        if bucket.buffer is None:
            bucket.buffer = torch.empty(bucket.numel + count, dtype=bucket.dtype, device=bucket.device)
        # Non-contiguous gradients (channels_last or transposed parameters) are copied contiguous first.
        _ops.flatten([g if g.is_contiguous() else g.contiguous() for g in grads], out=bucket.buffer[:bucket.numel])
        # 1 where this rank has a gradient: after the reduction, 0 means no rank had one (the grad stays None).
        bucket.buffer[bucket.numel:].copy_(torch.tensor([0.0 if c else 1.0 for c in created], dtype=bucket.dtype))
        wire = self._wire_dtype if bucket.dtype == torch.float32 else None
        bucket.work = self._comm.all_reduce(bucket.buffer, self._op, wire_dtype=wire, async_op=True)
        bucket.grads, bucket.created = grads, created
        self._next_bucket = b + 1

    def wait(self) -> None:
        """Finish this iteration: all-reduce every bucket not yet launched, wait, write the results back.

        After it returns, every parameter's ``grad`` holds the reduced gradient ("avg" or "sum" over the
        ranks; a new tensor for parameters whose ``grad`` was None and that some rank had a gradient for;
        None stays None where no rank had one). Every rank must call it once per iteration, also when its
        backward did not reach the parameters. On CUDA it does not block the host: the current stream waits
        for the all-reduces and then runs the unflatten (the used flags are read on the host when a bucket
        had a missing gradient on this rank, which synchronises with that bucket's all-reduce).

        Raises:
            RuntimeError: after ``remove()``, or inside ``no_sync()``; the all-reduce's error (a dead or
                stalled peer, past the timeout).
        """
        if self._removed:
            raise RuntimeError("paracomm.GradBucketer: wait() after remove()")
        if not self._sync:
            raise RuntimeError("paracomm.GradBucketer: wait() inside no_sync(); leave the context first")
        try:
            with self._lock:
                if not self._in_iteration():
                    self._follow_model()
                self._launch_remaining()
            for bucket in self._buckets:
                bucket.work.wait()
                targets = [g if g.is_contiguous() else torch.empty_like(g, memory_format=torch.contiguous_format)
                           for g in bucket.grads]
                _ops.unflatten_(bucket.buffer[:bucket.numel], targets)
                used = bucket.buffer[bucket.numel:].tolist() if any(bucket.created) else None
                for k, (p, g, t, made) in enumerate(zip(bucket.params, bucket.grads, targets, bucket.created)):
                    if t is not g:
                        g.copy_(t)
                    if made and used[k] != 0:
                        p.grad = g
        finally:
            self._reset()

    def _reset(self) -> None:
        for bucket, ready in zip(self._buckets, self._ready):
            bucket.reset()
            ready[:] = [False] * len(ready)
        self._next_bucket = 0
        self._backward_seen = self._backward_done = False

    def _in_iteration(self) -> bool:
        return self._backward_seen or self._next_bucket > 0

    @contextlib.contextmanager
    def no_sync(self):
        """Context in which backward passes only accumulate gradients locally (like DDP's ``no_sync``).

        The first backward after the context exits all-reduces the accumulated gradients as usual.

        Raises:
            RuntimeError: entered while an iteration is in progress (a backward ran and wait() was not called).
        """
        if self._in_iteration():
            raise RuntimeError("paracomm.GradBucketer: no_sync() entered after a backward; call wait() first")
        self._sync = False
        try:
            yield self
        finally:
            self._sync = True

    def remove(self) -> None:
        """Detach the gradient hooks; the bucketer cannot be used afterwards. Idempotent.

        Raises:
            RuntimeError: an iteration is in progress (call wait() first: other ranks expect its all-reduces).
        """
        if self._removed:
            return
        if self._in_iteration():
            raise RuntimeError("paracomm.GradBucketer: remove() while an iteration is in progress; call wait() "
                               "first (the other ranks expect its all-reduces)")
        for handle in self._handles.values():
            handle.remove()
        self._handles = {}
        self._removed = True
