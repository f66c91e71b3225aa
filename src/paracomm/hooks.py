"""DDP communication hooks on paracomm's all-reduce (ring, direct or one_shot: ``paracomm.all_reduce``).

Drop-in replacements for ``torch.distributed.algorithms.ddp_comm_hooks.default_hooks``::

    from paracomm import hooks
    ddp.register_comm_hook(None, hooks.allreduce_hook)          # or a ProcessGroup as the state
    ddp.register_comm_hook(None, hooks.bf16_compress_hook)
    ddp.register_comm_hook(state, hooks.fp16_compress_wrapper(some_hook))

and paracomm's own hook, which fuses compression, averaging and AMP unscaling into one all-reduce::

    scaler = paracomm.amp.GradScaler("cuda")
    ddp.register_comm_hook(hooks.FusedHookState(wire_dtype=torch.bfloat16, scaler=scaler), hooks.fused_hook)

(``fused_hook`` runs whichever all-reduce algorithm ``FusedHookState.algorithm`` or "auto" picks: ring, direct or
one_shot. ``ring_hook`` / ``RingHookState`` are its former names, kept as deprecated aliases.)

Differences from torch's hooks (results agree within rounding):

* The average is taken inside the reduction (op "avg"), not by dividing the bucket before sending it.
* The compress hooks send float16/bfloat16 on the wire but accumulate in float32 in every local reduction
  (torch's add in the low precision) and leave the result in the bucket's own float32 buffer.
* torch refuses hooks whose ``__name__`` is ``bf16_compress_hook`` or ``bf16_compress_wrapper_hook`` unless
  it has CUDA and NCCL >= 2.10; paracomm's bf16 hooks are named ``paracomm_bf16_compress_hook`` and
  ``paracomm_bf16_compress_wrapper_hook`` so that they also run on CPU over gloo.
* Sparse buckets (``nn.Embedding(sparse=True)``, which DDP gives a bucket of their own) take torch's path:
  ``torch.distributed.all_reduce`` of the sparse tensor divided by the world size, as torch's
  ``allreduce_hook`` does (the compress hooks send sparse buckets uncompressed); paracomm reduces dense
  buffers only.

Timeouts: every hook's all-reduce follows the process group's timeout (``init_process_group(timeout=...)``);
``FusedHookState(timeout=...)`` overrides it.

Errors: a failed all-reduce (a dead peer, a timeout, ranks that disagree on the bucket) completes the hook's
future with an error that DDP raises from ``backward()`` as a RuntimeError carrying paracomm's message.
"""
# No ``from __future__ import annotations`` here: DDP's register_comm_hook compares the hook's annotations
# with dist.GradBucket and torch.futures.Future[torch.Tensor] as objects; string annotations would fail.

import threading
import warnings
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .comm import Communicator, _check_algorithm, all_reduce, check_timeout
from ._validate import check_process_group, check_wire_dtype

__all__ = [
    "allreduce_hook",
    "fp16_compress_hook",
    "bf16_compress_hook",
    "fp16_compress_wrapper",
    "bf16_compress_wrapper",
    "FusedHookState",
    "fused_hook",
    "RingHookState",
    "ring_hook",
]


def _bucket_buffer(bucket) -> torch.Tensor:
    # torch's compress hooks also accept a (tensor, ...) tuple in place of a GradBucket (compiled DDP).
    return bucket[0] if isinstance(bucket, tuple) else bucket.buffer()


def _check_group(process_group, where: str) -> None:
    check_process_group(process_group, f"paracomm.hooks.{where}", "the state")


def _value(fut: torch.futures.Future):
    return fut.value()


def _surfaced(fut: torch.futures.Future) -> torch.futures.Future:
    """``fut`` as DDP can consume it, also when it failed.

    A Python-side ``Future.set_exception`` stores the exception as the future's *value* (only Python's
    ``wait()``/``value()`` re-raise it); DDP's reducer reads the value in C++ and fails with "Unable to cast
    <the exception> to Tensor", hiding the message. A ``then`` callback that reads the value re-raises it,
    and torch marks the child future as failed in C++, so the reducer raises a RuntimeError that carries
    paracomm's message.
    """
    return fut.then(_value)


def _avg_future(process_group, tensor: torch.Tensor, wire_dtype) -> torch.futures.Future:
    """Start ``tensor <- mean over ranks`` in place; the future's value is ``tensor`` itself."""
    if tensor.layout != torch.strided:
        return _sparse_avg_future(process_group, tensor)
    work = all_reduce(tensor, "avg", group=process_group, wire_dtype=wire_dtype, async_op=True)
    return _surfaced(work.get_future())


def _sparse_avg_future(process_group, tensor: torch.Tensor) -> torch.futures.Future:
    """torch's ``allreduce_hook`` path for a sparse bucket: divide by the world size, then
    ``torch.distributed.all_reduce`` (gloo reduces sparse tensors; the result is a new sparse tensor)."""
    group = process_group if process_group is not None else dist.group.WORLD
    tensor.div_(dist.get_world_size(group))
    work = dist.all_reduce(tensor, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def allreduce_hook(process_group: dist.ProcessGroup, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket over the ranks with paracomm's all-reduce (in place; same results as DDP without a hook).

    Replaces ``default_hooks.allreduce_hook``. The division by the world size happens inside the reduction.
    A sparse bucket (sparse gradients) takes torch's path, ``torch.distributed.all_reduce`` of the bucket
    divided by the world size, as torch's hook does.

    Args:
        process_group: the ProcessGroup to reduce over, or None for the world group.
        bucket: the DDP GradBucket; its buffer (any dtype paracomm.all_reduce supports) is reduced in place.

    Returns:
        A future whose value is the bucket's buffer holding the average (for a sparse bucket: a new sparse
        tensor). A failed all-reduce fails the future; DDP raises it from ``backward()`` as a RuntimeError.

    Example::
        >>> ddp_model.register_comm_hook(None, paracomm.hooks.allreduce_hook)
    """
    _check_group(process_group, "allreduce_hook")
    return _avg_future(process_group, bucket.buffer(), None)


def _compress_hook(dtype: torch.dtype, process_group, bucket, where: str) -> torch.futures.Future:
    _check_group(process_group, where)
    buffer = _bucket_buffer(bucket)
    if buffer.layout != torch.strided:
        # A sparse bucket travels as it is (indices and values; gloo's sparse all-reduce has no 16-bit path).
        return _sparse_avg_future(process_group, buffer)
    if buffer.dtype == torch.float32:
        # The all-reduce casts to ``dtype`` for the wire and back for each float32 accumulation.
        return _avg_future(process_group, buffer, dtype)
    if buffer.dtype == dtype:
        return _avg_future(process_group, buffer, None)
    # Other dtypes (float64, or the other 16-bit type): torch's path, cast, reduce, cast back in place.
    compressed = buffer.to(dtype)

    def decompress(fut):
        buffer.copy_(fut.value())
        return buffer

    return _avg_future(process_group, compressed, None).then(decompress)


def fp16_compress_hook(process_group: dist.ProcessGroup,
                       bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket over the ranks, sending it as float16 (replaces ``default_hooks.fp16_compress_hook``).

    A float32 bucket travels as float16 and every local reduction accumulates in float32; the result is written
    back into the bucket's float32 buffer, which is the future's value. Values beyond float16's range
    (65504) become inf on the wire, as with torch's hook. A float16 bucket is averaged as it is; other dtypes
    are cast to float16, averaged and cast back into the buffer.

    Args:
        process_group: the ProcessGroup to reduce over, or None for the world group.
        bucket: the DDP GradBucket (or a tuple whose first element is the buffer).

    Example::
        >>> ddp_model.register_comm_hook(None, paracomm.hooks.fp16_compress_hook)
    """
    return _compress_hook(torch.float16, process_group, bucket, "fp16_compress_hook")


def bf16_compress_hook(process_group: dist.ProcessGroup,
                       bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket over the ranks, sending it as bfloat16 (replaces ``default_hooks.bf16_compress_hook``).

    As :func:`fp16_compress_hook` with bfloat16 on the wire (float32's range, 8 bits of mantissa). Works on
    any backend paracomm's all-reduce runs on, CPU/gloo included: the function's ``__name__`` is
    ``paracomm_bf16_compress_hook``, which DDP's NCCL-version check does not single out.

    Example::
        >>> ddp_model.register_comm_hook(None, paracomm.hooks.bf16_compress_hook)
    """
    return _compress_hook(torch.bfloat16, process_group, bucket, "bf16_compress_hook")


bf16_compress_hook.__name__ = bf16_compress_hook.__qualname__ = "paracomm_bf16_compress_hook"


def _compress_wrapper(dtype: torch.dtype, hook, where: str, inner_name: str):
    if not callable(hook):
        raise TypeError(f"paracomm.hooks.{where}: hook must be a callable (state, bucket) -> Future, "
                        f"got {type(hook).__name__}")

    def wrapper_hook(hook_state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        if hook is allreduce_hook:
            # The common case gets the all-reduce's compressed wire with float32 accumulation (and no extra copy);
            # torch documents fp16_compress_wrapper(allreduce_hook) as equal to fp16_compress_hook.
            return _compress_hook(dtype, hook_state, bucket, where)
        buffer = bucket.buffer()
        bucket.set_buffer(buffer.to(dtype))
        fut = hook(hook_state, bucket)

        def decompress(fut):
            # Into the original buffer, so the result is left in the bucket's own (uncompressed) buffer.
            buffer.copy_(fut.value())
            return buffer

        return fut.then(decompress)

    wrapper_hook.__name__ = wrapper_hook.__qualname__ = inner_name
    wrapper_hook.__doc__ = f"{where}({getattr(hook, '__name__', 'hook')}): see paracomm.hooks.{where}."
    return wrapper_hook


def fp16_compress_wrapper(
    hook: Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]],
) -> Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]:
    """Wrap a DDP comm hook so it runs on a float16 copy of the bucket.

    Replaces ``default_hooks.fp16_compress_wrapper``.

    The returned hook casts the bucket's buffer to float16 (``bucket.set_buffer``), runs ``hook`` on it, and
    copies the hook's result back into the original buffer, which is the future's value. Wrapping
    :func:`allreduce_hook` gives exactly :func:`fp16_compress_hook` (float32 accumulation in paracomm's all-reduce).

    Args:
        hook: a callable ``(state, bucket) -> torch.futures.Future[torch.Tensor]``.

    Raises:
        TypeError: ``hook`` is not callable.

    Example::
        >>> ddp_model.register_comm_hook(state, paracomm.hooks.fp16_compress_wrapper(powerSGD_hook))
    """
    return _compress_wrapper(torch.float16, hook, "fp16_compress_wrapper", "fp16_compress_wrapper_hook")


def bf16_compress_wrapper(
    hook: Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]],
) -> Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]:
    """As :func:`fp16_compress_wrapper` with bfloat16 (replaces ``default_hooks.bf16_compress_wrapper``).

    The returned function is named ``paracomm_bf16_compress_wrapper_hook`` so that DDP accepts it on CPU/gloo.

    Raises:
        TypeError: ``hook`` is not callable.
    """
    return _compress_wrapper(torch.bfloat16, hook, "bf16_compress_wrapper", "paracomm_bf16_compress_wrapper_hook")


class FusedHookState:
    """State of :func:`fused_hook`: the group, the wire dtype, the algorithm, an optional AMP scaler, the timeout.

    Args:
        process_group: the ProcessGroup to reduce over, or None for the world group (resolved at the first
            bucket, so the state may be built before ``init_process_group``).
        wire_dtype: None (send the buffer's own dtype), torch.float16 or torch.bfloat16: float32 buckets
            travel in this dtype and every local reduction accumulates in float32. Buckets of other dtypes travel
            as they are.
        algorithm: None (the Communicator's default: "auto", or ``PARACOMM_ALGORITHM``), "auto", "ring",
            "direct" or "one_shot": the all-reduce algorithm of every bucket (see ``paracomm.all_reduce``).
        scaler: None or a :class:`paracomm.amp.GradScaler`. With an enabled scaler the hook multiplies the
            averaged gradients by the scaler's inverse scale and checks them for inf/nan in the same pass as
            the reduction (``scaler.comm_hook_unscale(device)``); the scaler's ``unscale_``/``step`` then
            leave those gradients alone and ``step`` skips the optimizer step when an inf/nan was found, on
            every rank alike. No host synchronisation happens in the hook.
        timeout: None (the process group's timeout) or a datetime.timedelta bounding every bucket's
            all-reduce.

    Pickling (checkpoints), like torch's PowerSGDState: the process group and the communicator are not
    saved; an unpickled state reduces over the default group (a warning says so) and makes a new communicator
    at its first bucket, on every rank in the same order.

    Raises:
        TypeError: ``process_group`` is not a ProcessGroup, ``wire_dtype`` is not a torch.dtype, ``scaler``
            is not a paracomm.amp.GradScaler (torch's own GradScaler cannot fuse its unscale into the hook),
            ``timeout`` is not a timedelta.
        ValueError: ``wire_dtype`` is a dtype other than float16/bfloat16, an unknown ``algorithm``, a
            timeout <= 0.
    """

    _NAME = "paracomm.hooks.FusedHookState"

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None, *,
                 wire_dtype: Optional[torch.dtype] = None, scaler=None, algorithm: Optional[str] = None,
                 timeout: Optional[timedelta] = None):
        name = self._NAME
        check_process_group(process_group, name, "process_group")
        check_wire_dtype(wire_dtype, name)
        if algorithm is not None:
            _check_algorithm(algorithm, name)
        check_timeout(timeout, name)
        if scaler is not None:
            from .amp import GradScaler

            if not isinstance(scaler, GradScaler):
                raise TypeError(f"{name}: scaler must be None or a paracomm.amp.GradScaler, got "
                                f"{type(scaler).__module__}.{type(scaler).__qualname__} (torch's GradScaler "
                                "cannot unscale inside the hook)")
        self.process_group = process_group
        self.wire_dtype = wire_dtype
        self.scaler = scaler
        self.algorithm = algorithm
        self.timeout = timeout
        self._comm: Optional[Communicator] = None
        self._lock = threading.Lock()

    def communicator(self) -> Communicator:
        """The paracomm Communicator over ``process_group`` (created at the first call, under a lock)."""
        with self._lock:
            if self._comm is None:
                self._comm = Communicator(self.process_group, algorithm=self.algorithm, timeout=self.timeout)
            return self._comm

    def __getstate__(self) -> dict:
        # As torch's PowerSGDState: a process group (and what is built over it) cannot be pickled.
        state = {k: v for k, v in self.__dict__.items() if k not in ("process_group", "_comm", "_lock")}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.process_group = None
        self._comm = None
        self._lock = threading.Lock()
        warnings.warn(f"{type(self).__name__} was unpickled: its process group is not saved and is set to the "
                      "default group", stacklevel=2)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(process_group={self.process_group!r}, wire_dtype={self.wire_dtype}, "
                f"algorithm={self.algorithm!r}, timeout={self.timeout}, "
                f"scaler={type(self.scaler).__name__ if self.scaler is not None else None})")


class RingHookState(FusedHookState):
    """Deprecated alias of :class:`FusedHookState` (the hook runs any algorithm, not only the ring)."""

    _NAME = "paracomm.hooks.RingHookState"

    def __init__(self, *args, **kwargs):
        warnings.warn("paracomm.hooks.RingHookState is deprecated: use paracomm.hooks.FusedHookState (same "
                      "arguments)", DeprecationWarning, stacklevel=2)
        super().__init__(*args, **kwargs)


def fused_hook(state: FusedHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket with paracomm's all-reduce, with optional compression and fused AMP unscale (see
    FusedHookState).

    One all-reduce per bucket, with ``state.algorithm`` (or "auto": ring, direct or one_shot by size): the
    buffer travels as ``state.wire_dtype`` (float32 buckets only), is accumulated in float32, divided by the
    world size, multiplied by the scaler's inverse scale and checked for inf/nan (the scaler's ``found_inf``
    for the bucket's device is set on every rank alike). The result is left in the bucket's buffer, which is
    the future's value.

    A sparse bucket takes torch's path (see :func:`allreduce_hook`); with an enabled scaler it is refused,
    since the unscale and inf/nan check cannot be fused into torch's sparse all-reduce.

    Raises:
        TypeError: ``state`` is not a FusedHookState.
        ValueError: a sparse bucket with an enabled scaler.

    A failed all-reduce fails the returned future; DDP raises it from ``backward()`` as a RuntimeError.

    Example::
        >>> state = paracomm.hooks.FusedHookState(wire_dtype=torch.bfloat16, scaler=scaler)
        >>> ddp_model.register_comm_hook(state, paracomm.hooks.fused_hook)
    """
    return _fused(state, bucket, "fused_hook")


def ring_hook(state: FusedHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Deprecated alias of :func:`fused_hook` (it runs any algorithm, not only the ring)."""
    return _fused(state, bucket, "ring_hook")


def _fused(state, bucket, where: str) -> torch.futures.Future:
    if not isinstance(state, FusedHookState):
        raise TypeError(f"paracomm.hooks.{where}: state must be a FusedHookState, got {type(state).__name__}")
    buffer = bucket.buffer()
    scaler_on = state.scaler is not None and state.scaler.is_enabled()
    if buffer.layout != torch.strided:
        if scaler_on:
            raise ValueError(f"paracomm.hooks.{where}: a sparse bucket (sparse gradients) cannot be unscaled "
                             "inside the hook; use FusedHookState without a scaler (or allreduce_hook) and let "
                             "the GradScaler unscale after backward")
        return _sparse_avg_future(state.process_group, buffer)
    wire = state.wire_dtype if buffer.dtype == torch.float32 else None
    scale = found_inf = None
    if scaler_on:
        scale, found_inf = state.scaler.comm_hook_unscale(buffer.device)
    work = state.communicator().all_reduce(buffer, "avg", wire_dtype=wire, async_op=True,
                                           scale=scale, found_inf=found_inf)
    return _surfaced(work.get_future())
