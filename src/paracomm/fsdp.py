"""paracomm inside FSDP2 (``torch.distributed.fsdp.fully_shard``): its reduce-scatter and all-gather as FSDP2's
custom Comm objects, and an all-reduce hook.

    from paracomm.fsdp import use_paracomm
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    use_paracomm(model, wire_dtype=torch.bfloat16)   # every FSDP unit's gradient reduce-scatter on paracomm

FSDP2's protocol (torch/distributed/fsdp/_fully_shard/_fsdp_api.py): a Comm has ``allocate(size, *, dtype,
device)`` and ``__call__(output_tensor, input_tensor, group, [op,] async_op=False)``. FSDP2 calls the
reduce-scatter once per FSDP unit per backward, synchronously, with ``op`` ReduceOp.AVG, SUM or
PREMUL_SUM(1/f) (``set_gradient_divide_factor``; torch's gloo backend refuses PREMUL_SUM, paracomm takes it as
a scale). The all-gather input is this rank's segment of the output (in place), which paracomm serves.

Why: with ``reduce_dtype=torch.float32`` and ``wire_dtype=torch.bfloat16`` the gradient travels in bf16 (half
the bytes) yet each input is rounded once and summed in fp32 at the owner, with the fp32 shard never rounded,
so the error does not grow with the number of ranks (a bf16 ring re-rounds at every hop). With
``reduce_dtype=torch.bfloat16`` the tensors are bf16 already and paracomm still accumulates in fp32 and rounds
once. Which combinations are checked (HSDP, all_reduce_hook, CPU offload, async unshard, mixed precision, ...):
the table in docs/ARCHITECTURE.md ("Which FSDP2 combinations are checked"); tests/test_fsdp.py and
tests/test_fsdp_combos.py.

``async_op=True`` returns a :class:`TorchWork` (a ``torch.distributed.Work``, which FSDP2 waits on); False, how
FSDP2 calls the reduce-scatter, runs the collective to completion and returns None.

AMP: ``use_paracomm(model, scaler=paracomm.amp.GradScaler("cpu"))`` unscales and checks every shard inside its
reduce-scatter; ``scaler.step`` skips on inf/nan on every rank alike, as with DDP's ``ring_hook``.

CPU (gloo) tensors only for now, like :func:`paracomm.reduce_scatter`.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather as _TorchAllGather
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter as _TorchReduceScatter

from . import collectives as _coll
from . import comm as _comm
from ._signature import DTYPE_CODES
from ._validate import check_wire_dtype

__all__ = ["ReduceScatter", "AllGather", "TorchWork", "use_paracomm", "all_reduce_hook"]


def _allocate(size: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
    # torch.empty draws from the device's caching allocator (CUDA) or the CPU allocator, on the device asked for.
    return torch.empty(*size, dtype=dtype, device=device)


class TorchWork(dist.Work):
    """A ``torch.distributed.Work`` over a :class:`paracomm.comm.Work`: what the Comm objects return with
    ``async_op=True``.

    FSDP2 waits on an asynchronous all-gather only when the Comm returns a ``dist.Work`` (``isinstance`` check in
    ``foreach_all_gather_copy_out``), so paracomm's own Work is wrapped in this subclass. ``wait()`` blocks until
    the collective is done, raises its error (a failed peer, a signature mismatch) and returns True, as torch's
    Work does; ``is_completed()`` and ``get_future()`` (a Future completed with the output tensor, or with the
    error) are paracomm's Work's.
    """

    def __init__(self, work: "_comm.Work"):
        super().__init__()
        self._work = work

    def wait(self, timeout=None) -> bool:  # noqa: D401  (torch's signature)
        """Block until done; raise the collective's error; True."""
        self._work.wait(timeout)
        return True

    def is_completed(self) -> bool:
        """True once the collective has finished (successfully or not)."""
        return self._work.is_completed()

    def is_success(self) -> bool:
        """True once the collective has finished without an error."""
        fut = self._work.get_future()
        if not fut.done():
            return False
        try:
            fut.value()
        except Exception:  # noqa: BLE001
            return False
        return True

    def get_future(self) -> torch.futures.Future:
        """A Future completed with the output tensor (or with the collective's error)."""
        return self._work.get_future()


def _check_algorithm(algorithm, allowed: tuple, name: str) -> str:
    if not isinstance(algorithm, str):
        raise TypeError(f"{name}: algorithm must be one of {', '.join(map(repr, allowed))}, got {algorithm!r}")
    if algorithm not in allowed:
        raise ValueError(f"{name}: algorithm must be one of {', '.join(map(repr, allowed))}, got {algorithm!r}")
    return algorithm


class ReduceScatter(_TorchReduceScatter):
    """FSDP2's reduce-scatter on :func:`paracomm.reduce_scatter`.

    Args:
        wire_dtype: None, torch.float16 or torch.bfloat16: float32 gradients (``reduce_dtype`` float32, or no
            mixed precision) travel in it, each input rounded once, summed in fp32, the fp32 shard unrounded.
            Gradients of another dtype (``reduce_dtype=torch.bfloat16``) travel in their own dtype.
        algorithm: "auto", "ring", "direct" or "one_shot" (see :func:`paracomm.explain_reduce_scatter`).
        scaler: None or a :class:`paracomm.amp.GradScaler`: the AMP fusion. Each call then multiplies the shard
            by the scaler's inverse scale and checks it for inf/nan inside the reduction
            (``scaler.comm_hook_unscale``, the protocol ``ring_hook`` uses for DDP); the per-shard flags are
            summed over the group (one 1-element all-reduce per call) so every rank's ``scaler.step`` skips
            alike. The scaler's ``unscale_`` / ``step`` then leave the gradients as they are. Every gradient
            the optimizer steps must come from an FSDP unit with this ReduceScatter (``use_paracomm(...,
            scaler=...)`` installs it on all of them): gradients outside would stay scaled.

    Raises:
        TypeError / ValueError naming the argument.
    """

    def __init__(self, wire_dtype: Optional[torch.dtype] = None, algorithm: str = "auto", scaler=None):
        name = "paracomm.fsdp.ReduceScatter"
        check_wire_dtype(wire_dtype, name)
        self.wire_dtype = wire_dtype
        self.algorithm = _check_algorithm(algorithm, ("auto", "ring", "direct", "one_shot"), name)
        if scaler is not None:
            from .amp import GradScaler

            if not isinstance(scaler, GradScaler):
                raise TypeError(f"{name}: scaler must be None or a paracomm.amp.GradScaler, got "
                                f"{type(scaler).__module__}.{type(scaler).__qualname__}")
        self.scaler = scaler
        self.calls = 0  # reduce-scatters run so far (FSDP2 calls one per unit per backward)
        self.fused_calls = 0  # of which unscaled and checked for the scaler

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor of ``size`` from the allocator of ``device``."""
        return _allocate(size, dtype, device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op=dist.ReduceOp.SUM, async_op: bool = False):
        """Reduce-scatter ``input_tensor`` into ``output_tensor`` over ``group`` with FSDP2's ``op``.

        Returns None once done (``async_op=False``, how FSDP2 calls it), or at once a :class:`TorchWork`
        (``async_op=True``, as ``dist.reduce_scatter_tensor``): ``output_tensor`` (and, with the scaler, its
        found_inf) is valid after ``wait()``. Errors as :func:`paracomm.reduce_scatter` (argument errors at the
        call; collective errors at the call or, asynchronously, in ``wait()``).
        """
        _comm._check_bool(async_op, "async_op", "paracomm.fsdp.ReduceScatter")
        wire = self.wire_dtype if output_tensor.dtype == torch.float32 else None
        if self.scaler is None or not self.scaler.is_enabled():
            work = _coll.reduce_scatter(output_tensor, input_tensor, op, group=group, wire_dtype=wire,
                                        algorithm=self.algorithm, async_op=async_op)
            self.calls += 1
            return TorchWork(work) if async_op else None
        # AMP fusion: the shard comes out unscaled and checked; PREMUL_SUM's factor joins the inverse scale.
        inv_scale, found_inf = self.scaler.comm_hook_unscale(output_tensor.device)
        scale = inv_scale.reshape(1)
        if isinstance(op, dist.ReduceOp) and op == dist.ReduceOp.PREMUL_SUM:
            scale = scale * float(op.factor)
            op = "sum"
        flag = torch.zeros(1, dtype=torch.float32, device=output_tensor.device)
        rs = _coll.reduce_scatter(output_tensor, input_tensor, op, group=group, wire_dtype=wire,
                                  algorithm=self.algorithm, scale=scale, found_inf=flag, async_op=async_op)
        self.calls += 1
        self.fused_calls += 1
        # Each rank checked its own shard: sum the flags so every rank skips the step alike. Both calls go to the
        # group's one Communicator, whose calls run in issue order (one FIFO worker once any call is async), so
        # the flag all-reduce always follows the reduce-scatter that set the flag.
        ar = _comm.all_reduce(flag, "sum", group, async_op)
        if not async_op:
            found_inf.add_(flag.reshape(found_inf.shape))
            return None

        def finish(both: torch.futures.Future):
            rs_done, ar_done = both.value()
            rs_done.value()  # raise the reduce-scatter's error first, then the all-reduce's
            ar_done.value()
            found_inf.add_(flag.reshape(found_inf.shape))
            return output_tensor

        future = torch.futures.collect_all([rs.get_future(), ar.get_future()]).then(finish)
        return TorchWork(_comm.Work(future, output_tensor, keep=(scale, flag, input_tensor)))


class AllGather(_TorchAllGather):
    """FSDP2's all-gather on :func:`paracomm.all_gather`.

    Args:
        algorithm: "auto", "ring" or "direct".

    FSDP2 gathers uint8 views when a unit mixes parameter dtypes; paracomm does not serve uint8, so those calls
    go to ``torch.distributed.all_gather_into_tensor`` (counted in ``fallbacks``).
    """

    def __init__(self, algorithm: str = "auto"):
        self.algorithm = _check_algorithm(algorithm, ("auto", "ring", "direct"), "paracomm.fsdp.AllGather")
        self.calls = 0  # all-gathers run so far (FSDP2: one per unit per unshard)
        self.async_calls = 0  # of which issued with async_op=True (returned a TorchWork)
        self.fallbacks = 0  # of which uint8 (torch's all_gather_into_tensor)

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor of ``size`` from the allocator of ``device``."""
        return _allocate(size, dtype, device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 async_op: bool = False):
        """All-gather ``input_tensor`` (this rank's segment of ``output_tensor``, or a separate tensor) into
        ``output_tensor`` over ``group``.

        Returns None once done (``async_op=False``), or at once a ``dist.Work`` (``async_op=True``, as
        ``FSDPModule.unshard(async_op=True)`` asks): a :class:`TorchWork`, or torch's own Work for the uint8
        fallback. FSDP2 waits on it before it reads the output.
        """
        _comm._check_bool(async_op, "async_op", "paracomm.fsdp.AllGather")
        if output_tensor.dtype not in DTYPE_CODES:
            work = dist.all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=async_op)
            self.calls += 1
            self.fallbacks += 1
            return work
        work = _coll.all_gather(output_tensor, input_tensor, group=group, algorithm=self.algorithm,
                                async_op=async_op)
        self.calls += 1
        if async_op:
            self.async_calls += 1
            return TorchWork(work)
        return None


def use_paracomm(module: torch.nn.Module, *, reduce_scatter: bool = True, all_gather: bool = False,
                 wire_dtype: Optional[torch.dtype] = None, scaler=None) -> int:
    """Install paracomm's collectives on every FSDPModule in ``module`` (itself included).

    Args:
        module: a module already sharded with ``fully_shard`` (one or more FSDP units).
        reduce_scatter: install :class:`ReduceScatter` (``set_custom_reduce_scatter``).
        all_gather: install :class:`AllGather` (``set_custom_all_gather``).
        wire_dtype: the ReduceScatter's wire dtype (None, torch.float16, torch.bfloat16).
        scaler: None or a paracomm.amp.GradScaler: the ReduceScatter's AMP fusion (see :class:`ReduceScatter`).

    Returns:
        int: the number of FSDP units configured.

    Raises:
        TypeError: ``module`` is not an nn.Module, flags not bools, a bad wire_dtype type.
        ValueError: no FSDPModule in ``module`` (call fully_shard first), both flags False, a bad wire_dtype.
    """
    name = "paracomm.fsdp.use_paracomm"
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{name}: module must be a torch.nn.Module, got {type(module).__name__}")
    for arg, value in (("reduce_scatter", reduce_scatter), ("all_gather", all_gather)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: {arg} must be a bool, got {type(value).__name__}")
    if not (reduce_scatter or all_gather):
        raise ValueError(f"{name}: reduce_scatter and all_gather are both False: nothing to install")
    check_wire_dtype(wire_dtype, name)
    if scaler is not None and not reduce_scatter:
        raise ValueError(f"{name}: scaler needs reduce_scatter=True (the fusion happens in the reduce-scatter)")
    ReduceScatter(wire_dtype=wire_dtype, scaler=scaler)  # argument checks before anything is installed
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not units:
        raise ValueError(f"{name}: module contains no FSDPModule (call torch.distributed.fsdp.fully_shard on it "
                         "first)")
    for unit in units:
        if reduce_scatter:
            unit.set_custom_reduce_scatter(ReduceScatter(wire_dtype=wire_dtype, scaler=scaler))
        if all_gather:
            unit.set_custom_all_gather(AllGather())
    return len(units)


def all_reduce_hook(wire_dtype: Optional[torch.dtype] = None, *, group=None, op="avg",
                    algorithm: Optional[str] = None) -> Callable[[torch.Tensor], None]:
    """A hook for ``FSDPModule.set_all_reduce_hook``: all-reduces FSDP2's reduce-scatter output (1-D FSDP) or
    HSDP all-reduce output in place with :func:`paracomm.all_reduce` over ``group``.

    Args:
        wire_dtype: None, torch.float16 or torch.bfloat16 (float32 gradients only; others travel as they are).
        group: the replica group to reduce over (None: the default group).
        op: "avg" (default: average over the replicas, on top of FSDP2's own reduction) or "sum" (with
            ``set_force_sum_reduction_for_comms``, as torch's docs ask of custom hooks).
        algorithm: as :func:`paracomm.all_reduce`.

    Returns:
        ``hook(tensor) -> None``.

    Raises:
        TypeError / ValueError naming the argument (here for wire_dtype and op; the rest at the first call).
    """
    name = "paracomm.fsdp.all_reduce_hook"
    check_wire_dtype(wire_dtype, name)
    op = _comm._op_name(op, name)

    def hook(tensor: torch.Tensor) -> None:
        wire = wire_dtype if tensor.dtype == torch.float32 else None
        _comm.all_reduce(tensor, op, group, wire_dtype=wire, algorithm=algorithm)

    return hook
