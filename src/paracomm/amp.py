"""``paracomm.amp.GradScaler``: torch's GradScaler with the fused unscale-and-check kernel.

Differences from :class:`torch.amp.GradScaler` (everything else, including the scale arithmetic, the
per-optimizer READY/UNSCALED/STEPPED state machine and its errors, is torch's own code):

* each device's gradients are unscaled and checked by ONE :func:`paracomm.unscale_and_check_` call, whatever
  their dtypes (torch makes one call per device and dtype);
* float16 gradients are accepted (torch raises "Attempting to unscale FP16 gradients.");
* ``unscale_(optimizer, norm=True)`` also returns the total L2 norm of the unscaled gradients, computed in the
  same pass (for gradient clipping without a second pass);
* :meth:`GradScaler.comm_hook_unscale` lets a DDP communication hook (``paracomm.hooks.ring_hook``) or any other
  code unscale a device's gradients itself, so that :meth:`GradScaler.unscale_` does not touch them again.

Gradients the kernel cannot take keep torch's path (``torch._amp_foreach_non_finite_check_and_unscale_``):
sparse gradients (their ``_values()``, fp16 ones coalesced first, exactly as torch), float64 gradients, strided
gradients that do not cover one dense block of memory, and devices other than cpu/cuda. Dense gradients in any
layout whose elements fill one block of memory (contiguous, channels_last, transposed) go to the kernel through
a permuted, contiguous alias of the same memory.

Arithmetic: the kernel computes ``float32(g) * inv_scale`` in fp32 and stores it in ``g``'s dtype, as torch's
kernel does, and ``inv_scale = scale.double().reciprocal().float()`` is torch's, so on an fp32 model this scaler
produces bitwise the same gradients, skipped steps, scales and parameters as torch's, step for step.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any, Optional, Union

import torch
from torch.amp.grad_scaler import OptState, _MultiDeviceReplicator

from ._ops import unscale_and_check_

__all__ = ["GradScaler", "OptState"]

# Device types paracomm's unscale_and_check_ has an implementation for.
_KERNEL_DEVICE_TYPES = ("cpu", "cuda")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dense_alias(t: torch.Tensor) -> Optional[torch.Tensor]:
    """A contiguous tensor sharing ``t``'s memory element for element (``t`` itself when contiguous), or None.

    An elementwise in-place op does not care about element order, only that the elements fill one block of
    memory without overlap. Permuting the dimensions by decreasing stride turns any such layout (channels_last,
    a transpose) into a contiguous view of the same memory; anything else (gaps, stride 0, overlap) stays
    non-contiguous and returns None.
    """
    if t.is_contiguous():
        return t
    order = sorted(range(t.dim()), key=lambda d: t.stride(d), reverse=True)
    permuted = t.permute(order)
    return permuted if permuted.is_contiguous() else None


def _copy_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of ``t`` on ``device``, without a host sync except where one is needed for correctness.

    A copy from a GPU to the CPU must be complete before a CPU kernel reads it on the host (a non_blocking
    device-to-host copy would race with it), so that one copy blocks. Every other copy is asynchronous.
    """
    blocking = device.type == "cpu" and t.device.type != "cpu"
    return t.to(device=device, non_blocking=not blocking, copy=True)


class _Replicator(_MultiDeviceReplicator):
    """torch's lazy per-device copies of the scale/flag tensors, with :func:`_copy_to`'s safe CPU copies."""

    def get(self, device: torch.device) -> torch.Tensor:
        copy = self._per_device_tensors.get(device)
        if copy is None:
            copy = self._per_device_tensors[device] = _copy_to(self.master, device)
        return copy


class _DeviceGrads:
    """One device's gradients of one optimizer, sorted by the path that will unscale them."""

    __slots__ = ("kernel", "dense_fallback", "sparse")

    def __init__(self) -> None:
        self.kernel: list[torch.Tensor] = []  # dense fp16/bf16/fp32 aliases: the one fused call
        self.dense_fallback: list[torch.Tensor] = []  # dense grads torch's op unscales (float64, gaps, ...)
        self.sparse: list[torch.Tensor] = []  # sparse grads: torch's op on _values(), never the hook


class GradScaler(torch.amp.GradScaler):
    """:class:`torch.amp.GradScaler` on paracomm's fused unscale-and-check kernel.

    The constructor and every method are torch's (see :class:`torch.amp.GradScaler`); only gradient
    unscaling differs (see the module docstring): one fused kernel call per device for all dtypes, float16
    gradients accepted, an optional gradient norm from the same pass, and the comm-hook protocol below.

    Args:
        device (str): ``"cuda"`` (default) or ``"cpu"``: where the scale lives (torch's meaning).
        init_scale, growth_factor, backoff_factor, growth_interval, enabled: as torch's.

    Comm-hook protocol (how ``paracomm.hooks.ring_hook`` unscales gradients inside the all-reduce):

    1. During backward, after ``scaler.scale(loss).backward()`` started (so the scale exists), the hook calls
       ``inv_scale, found_inf = scaler.comm_hook_unscale(grad_device)``. Every call in one iteration for one
       device returns the same two tensors: ``inv_scale`` is this iteration's ``1 / scale`` (0-dim fp32 on
       ``grad_device``, computed as torch does) and ``found_inf`` a 0-dim fp32 accumulator on ``grad_device``,
       zero at the first call of the iteration. The call records that **all dense gradients on that device**
       are unscaled by the hook this iteration.
    2. The hook multiplies every dense gradient on that device by ``inv_scale`` exactly once and sets
       ``found_inf`` to a nonzero value if it saw inf/nan (e.g. ``paracomm.unscale_and_check_`` on the reduced
       bucket). For DDP the flag must come out the same on every rank: checking the *reduced* values does that,
       since an inf/nan on any rank reaches every rank's sum. The writes must be ordered before the optimizer
       step on the current stream (DDP waits for the hook's future at the end of backward, which does this).
    3. ``unscale_(optimizer)`` (or ``step`` doing it) then leaves those gradients as they are and reports a copy
       of the hook's ``found_inf`` as the optimizer's flag for that device, so ``step`` skips exactly when the
       hook saw inf/nan; ``unscale_(optimizer, norm=True)`` still returns the norm, computed from the already
       unscaled gradients (a kernel pass with inv_scale 1, values unchanged). Sparse gradients never go through
       the hook: the scaler unscales them as usual. Gradients on devices the hook did not record are unscaled
       by the scaler as usual.
    4. ``update()`` forgets the hook state; the next iteration starts fresh.

    With the hook, the inf/nan flag is per device rather than per optimizer: every optimizer with gradients on
    a recorded device sees the hook's flag.

    No call synchronises the host with a CUDA device, except where a value must cross from a GPU to the CPU
    (CPU gradients with the scale on a GPU, or a GPU norm for a scaler on the CPU): that copy blocks, since a
    CPU kernel or the caller reads it on the host.
    """

    def __init__(
        self,
        device: str = "cuda",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
    ) -> None:
        super().__init__(device, init_scale, growth_factor, backoff_factor, growth_interval, enabled)
        # device -> (inv_scale, found_inf) handed to a comm hook this iteration; cleared by update().
        self._comm_hook_state: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        # DDP may call hooks from autograd worker threads; the lock makes the lazy per-device creation atomic.
        self._comm_hook_lock = threading.Lock()

    # ----------------------------------------------------------------------------------------------------
    # Comm-hook protocol
    # ----------------------------------------------------------------------------------------------------

    def comm_hook_unscale(self, device: Union[str, torch.device]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hand this iteration's unscaling of ``device``'s dense gradients to the caller (a DDP comm hook).

        See the class docstring for the whole protocol. The caller must multiply every dense gradient on
        ``device`` by ``inv_scale`` once and flag inf/nan in ``found_inf`` (set it nonzero, never clear it).

        Args:
            device: the gradients' device (``torch.device`` or string; ``"cuda"`` means the current CUDA device).

        Returns:
            ``(inv_scale, found_inf)``: 0-dim float32 tensors on ``device``; the same pair for every call on
            that device until :meth:`update`. ``inv_scale = scale.double().reciprocal().float()``; ``found_inf``
            starts at 0. A disabled scaler returns a fresh ``(1.0, 0.0)`` pair and records nothing.

        Raises:
            TypeError: ``device`` is not a string or ``torch.device``.
            ValueError: ``device`` is not a cpu or cuda device (or not a device name at all).
            AssertionError: the scale does not exist yet (``scale()`` was not called), as torch's methods.

        Does not synchronise the host with a CUDA device (except a CPU ``device`` with the scale on a GPU).
        """
        device = self._hook_device(device)
        if not self._enabled:
            return (torch.ones((), dtype=torch.float32, device=device),
                    torch.zeros((), dtype=torch.float32, device=device))
        scale, _ = self._check_scale_growth_tracker("comm_hook_unscale")
        with self._comm_hook_lock:
            entry = self._comm_hook_state.get(device)
            if entry is None:
                inv_scale = _copy_to(scale.double().reciprocal().float(), device)
                found_inf = torch.zeros((), dtype=torch.float32, device=device)
                entry = (inv_scale, found_inf)
                self._comm_hook_state[device] = entry
        return entry

    @staticmethod
    def _hook_device(device) -> torch.device:
        where = "paracomm.amp.GradScaler.comm_hook_unscale"
        if isinstance(device, str):
            try:
                device = torch.device(device)
            except RuntimeError as e:
                raise ValueError(f"{where}: device {device!r} is not a device name ({e})") from None
        elif not isinstance(device, torch.device):
            raise TypeError(f"{where}: device must be a str or torch.device, got {type(device).__name__}")
        if device.type not in _KERNEL_DEVICE_TYPES:
            raise ValueError(f"{where}: device must be a cpu or cuda device, got {device}")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    # ----------------------------------------------------------------------------------------------------
    # Unscaling
    # ----------------------------------------------------------------------------------------------------

    def _group_grads(self, optimizer: torch.optim.Optimizer) -> dict[torch.device, _DeviceGrads]:
        """The optimizer's gradients by device and path, in parameter order (torch's loop, no fp16 refusal)."""
        per_device: dict[torch.device, _DeviceGrads] = defaultdict(_DeviceGrads)
        for group in optimizer.param_groups:
            for param in group["params"]:
                if not isinstance(param, torch.Tensor):
                    raise AssertionError(f"expected param to be torch.Tensor, got {type(param).__name__}")
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    # As torch: fp16 values with duplicate indices could overflow when coalesced later, so
                    # coalesce first and check the coalesced values.
                    if grad.dtype is torch.float16:
                        param.grad = grad = grad.coalesce()
                    per_device[grad.device].sparse.append(grad)
                    continue
                slot = per_device[grad.device]
                alias = None
                if grad.device.type in _KERNEL_DEVICE_TYPES and grad.dtype in _KERNEL_DTYPES:
                    alias = _dense_alias(grad)
                if alias is not None:
                    slot.kernel.append(alias)
                else:
                    slot.dense_fallback.append(grad)
        return per_device

    def _fused_unscale_grads_(
        self,
        optimizer: torch.optim.Optimizer,
        inv_scale: torch.Tensor,
        found_inf: torch.Tensor,
        want_norm: bool,
    ) -> tuple[dict[torch.device, torch.Tensor], dict[torch.device, torch.Tensor]]:
        """Unscale and check the optimizer's gradients: one kernel call per device (plus torch's op for the
        gradients the kernel cannot take), skipping dense gradients a comm hook already unscaled.

        Returns ``(found_inf_per_device, norm_per_device)``; the latter is empty unless ``want_norm``.
        """
        per_device_inv_scale = _Replicator(inv_scale)
        per_device_found_inf = _Replicator(found_inf)
        norms: dict[torch.device, torch.Tensor] = {}
        with torch.no_grad():
            for device, grads in self._group_grads(optimizer).items():
                hook = self._comm_hook_state.get(device)
                if hook is not None:
                    # The hook already unscaled the dense grads and collected their flag: start from a copy
                    # of it (a copy, so update()'s in-place sum and other optimizers cannot change the hook's).
                    device_found_inf = hook[1].clone()
                    per_device_found_inf._per_device_tensors[device] = device_found_inf
                else:
                    device_found_inf = per_device_found_inf.get(device)
                sumsq_parts: list[torch.Tensor] = []
                if grads.kernel and (hook is None or want_norm):
                    norm = torch.zeros((), dtype=torch.float32, device=device) if want_norm else None
                    if hook is None:
                        unscale_and_check_(grads.kernel, per_device_inv_scale.get(device), device_found_inf,
                                           norm=norm)
                    else:
                        # Measure only: multiplying by exactly 1 leaves every value as it is; the flag is the
                        # hook's, so this pass writes a scratch one.
                        one = torch.ones((), dtype=torch.float32, device=device)
                        scratch = torch.zeros((), dtype=torch.float32, device=device)
                        unscale_and_check_(grads.kernel, one, scratch, norm=norm)
                    if norm is not None:
                        norms[device] = norm
                if grads.dense_fallback:
                    if hook is None:
                        self._torch_unscale(grads.dense_fallback, per_device_found_inf.get(device),
                                            per_device_inv_scale.get(device))
                    if want_norm:
                        sumsq_parts.append(self._sumsq(grads.dense_fallback))
                if grads.sparse:
                    self._torch_unscale([g._values() for g in grads.sparse], device_found_inf,
                                        per_device_inv_scale.get(device))
                    if want_norm:
                        # Uncoalesced values may repeat an index; the gradient's norm is that of the sums.
                        sumsq_parts.append(self._sumsq([g.coalesce()._values() for g in grads.sparse]))
                if want_norm and sumsq_parts:
                    if device in norms:
                        sumsq_parts.append(norms[device].square())
                    norms[device] = torch.stack(sumsq_parts).sum().sqrt()
        return per_device_found_inf._per_device_tensors, norms

    @staticmethod
    def _torch_unscale(tensors: list[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor) -> None:
        """torch's own unscale for the gradients the kernel cannot take, one call per dtype as torch does."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
        for t in tensors:
            by_dtype[t.dtype].append(t)
        for group in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, inv_scale)

    @staticmethod
    def _sumsq(tensors: list[torch.Tensor]) -> torch.Tensor:
        """Sum of squares of all values (fp32; float64 tensors reduced in float64 first)."""
        parts = [
            torch.linalg.vector_norm(t, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
            .float()
            .square()
            for t in tensors
        ]
        return torch.stack(parts).sum()

    def _unscale_grads_(
        self,
        optimizer: torch.optim.Optimizer,
        inv_scale: torch.Tensor,
        found_inf: torch.Tensor,
        allow_fp16: bool,
    ) -> dict[torch.device, torch.Tensor]:
        # torch's hook point (also used by _check_inf_per_device with inv_scale 1). fp16 is always allowed.
        return self._fused_unscale_grads_(optimizer, inv_scale, found_inf, want_norm=False)[0]

    def unscale_(self, optimizer: torch.optim.Optimizer, norm: bool = False) -> Optional[torch.Tensor]:
        """Divide ("unscale") the optimizer's gradients by the scale, in place, and check them for inf/nan.

        As :meth:`torch.amp.GradScaler.unscale_` (call at most once per optimizer between updates, before
        :meth:`step`), with these differences: one fused kernel call per device for all dtypes; float16
        gradients are accepted; dense gradients on a device recorded by :meth:`comm_hook_unscale` this
        iteration are not touched (the hook unscaled them) and the hook's inf/nan flag is used for them.

        Args:
            optimizer: the optimizer owning the gradients.
            norm: if True, also return the L2 norm of all the optimizer's unscaled gradients (dense and sparse,
                every device), computed in the same kernel pass.

        Returns:
            None when ``norm`` is False (as torch). With ``norm=True``: a 0-dim float32 tensor on the scale's
            device, ``sqrt(sum over devices of norm_d ** 2)`` (inf/nan when a gradient is non-finite; 0 when
            no parameter has a gradient). A disabled scaler returns the norm of the gradients as they are.

        Raises:
            RuntimeError: unscale_ already called for this optimizer since the last update, or called after
                step (torch's errors).
            AssertionError: the scale does not exist yet (torch's).
            TypeError: ``norm`` is not a bool.

        Does not synchronise the host with a CUDA device (see the class docstring for the GPU-to-CPU case).
        """
        if not isinstance(norm, bool):
            raise TypeError(f"paracomm.amp.GradScaler.unscale_: norm must be a bool, got {type(norm).__name__}")
        if not self._enabled:
            if not norm:
                return None
            return self._norm_only(optimizer)

        self._check_scale_growth_tracker("unscale_")

        optimizer_state = self._per_optimizer_states[id(optimizer)]

        if optimizer_state["stage"] is OptState.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        elif optimizer_state["stage"] is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")

        # torch: "FP32 division can be imprecise for certain compile options, so we carry out the reciprocal
        # in FP64". The same expression, so inv_scale is bitwise torch's.
        assert self._scale is not None
        inv_scale = (
            self._scale.double().reciprocal().float()
            if self._scale.device != torch.device("mps:0")
            else self._scale.reciprocal()
        )
        found_inf = torch.full((), 0.0, dtype=torch.float32, device=self._scale.device)

        found_inf_per_device, norms = self._fused_unscale_grads_(optimizer, inv_scale, found_inf, want_norm=norm)
        optimizer_state["found_inf_per_device"] = found_inf_per_device
        optimizer_state["stage"] = OptState.UNSCALED
        if not norm:
            return None
        return self._combine_norms(norms, self._scale.device)

    def _norm_only(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """The gradient norm with no unscaling and no state change (a disabled scaler's ``unscale_(norm=True)``)."""
        # With inv_scale 1 the values stay as they are; found_inf goes to a scratch flag nobody reads. A
        # disabled scaler never records comm-hook state, so every dense gradient goes through the kernel.
        one = torch.ones((), dtype=torch.float32)
        _, norms = self._fused_unscale_grads_(optimizer, one, torch.zeros((), dtype=torch.float32), True)
        return self._combine_norms(norms, torch.device("cpu") if not norms else next(iter(norms)))

    @staticmethod
    def _combine_norms(norms: dict[torch.device, torch.Tensor], device: torch.device) -> torch.Tensor:
        if not norms:
            return torch.zeros((), dtype=torch.float32, device=device)
        moved = [n if n.device == device else _copy_to(n, device) for n in norms.values()]
        if len(moved) == 1:
            return moved[0]
        squares = [n.square() for n in moved]
        return torch.stack(squares).sum().sqrt()

    # ----------------------------------------------------------------------------------------------------
    # Step, update, pickling
    # ----------------------------------------------------------------------------------------------------

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any):
        """As :meth:`torch.amp.GradScaler.step`: unscale (unless done), then ``optimizer.step()`` unless an
        inf/nan was found. Returns what ``optimizer.step`` returned (None when skipped).

        An optimizer that unscales inside its own step (``_step_supports_amp_scaling``, e.g. fused Adam) would
        divide comm-hook-unscaled gradients by the scale a second time, so while a comm hook has recorded a
        device this iteration such an optimizer is first passed through :meth:`unscale_` (torch then hands it
        no scale, only the inf/nan flag).
        """
        if (
            self._enabled
            and self._comm_hook_state
            and "closure" not in kwargs
            and getattr(optimizer, "_step_supports_amp_scaling", False)
            and self._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY
        ):
            self.unscale_(optimizer)
        return super().step(optimizer, *args, **kwargs)

    def update(self, new_scale: Union[float, torch.Tensor, None] = None) -> None:
        """As :meth:`torch.amp.GradScaler.update`; also ends the iteration of the comm-hook protocol."""
        super().update(new_scale)
        self._comm_hook_state = {}

    def __getstate__(self) -> dict[str, Any]:
        if self._comm_hook_state:
            raise AssertionError(
                "A GradScaler instance may only be pickled at the beginning "
                "of an iteration, or at the end after scaler.update()."
            )
        state = super().__getstate__()
        state.pop("_comm_hook_lock", None)
        state["_comm_hook_state"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._comm_hook_lock = threading.Lock()
