"""Typed wrappers over ``torch.ops.paracomm.*`` and a fake (meta) kernel for each op.

Importing this module loads ``paracomm._C``, which registers the schemas (csrc/ops.cpp) and the CPU and, in a
CUDA build, CUDA implementations. Argument checking happens in C++ (csrc/glue.h), before any write, so the
ops refuse bad input the same way whether called through these wrappers or through ``torch.ops.paracomm``.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch

from . import _C  # noqa: F401  (registers torch.ops.paracomm.*)

ops = torch.ops.paracomm

# --------------------------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only, for torch.compile / FakeTensor tracing and torch.library.opcheck.
# --------------------------------------------------------------------------------------------------------


def _check_one_device(op: str, named) -> None:
    """ValueError unless every tensor in ``named`` ((name, tensor-or-None) pairs) is on the first one's device.

    The fakes below are also the ops' Meta kernels, and Meta outranks every other backend in dispatch: a call
    mixing meta and CPU (or CUDA) tensors lands here, never reaching the C++ device checks, so check here.
    """
    device = None
    for name, t in named:
        if t is None:
            continue
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"paracomm.{op}: {name} is on {t.device}, expected {device}")


def _listed(name: str, tensors):
    return [(f"{name}[{i}]", t) for i, t in enumerate(tensors)]


@torch.library.register_fake("paracomm::unscale_and_check_")
def _unscale_and_check_fake(grads, inv_scale, found_inf, norm):
    _check_one_device(
        "unscale_and_check_",
        _listed("grads", grads) + [("inv_scale", inv_scale), ("found_inf", found_inf), ("norm", norm)],
    )
    return None


@torch.library.register_fake("paracomm::unscale_and_check_out")
def _unscale_and_check_out_fake(grads, inv_scale, found_inf, out, norm):
    _check_one_device(
        "unscale_and_check_out",
        _listed("grads", grads) + [("inv_scale", inv_scale), ("found_inf", found_inf), ("norm", norm)]
        + _listed("out", out),
    )
    return None


@torch.library.register_fake("paracomm::flatten")
def _flatten_fake(tensors, dtype, scale=1.0, scale_tensor=None):
    torch._check(len(tensors) > 0, lambda: "paracomm.flatten: tensors must not be empty")
    _check_one_device("flatten", _listed("tensors", tensors) + [("scale_tensor", scale_tensor)])
    numel = sum(t.numel() for t in tensors)
    return tensors[0].new_empty((numel,), dtype=dtype)


@torch.library.register_fake("paracomm::flatten_out")
def _flatten_out_fake(tensors, out, scale=1.0, scale_tensor=None):
    _check_one_device("flatten_out", _listed("tensors", tensors) + [("out", out), ("scale_tensor", scale_tensor)])
    return None


@torch.library.register_fake("paracomm::unflatten_")
def _unflatten_fake(flat, tensors, scale=1.0, scale_tensor=None):
    _check_one_device("unflatten_", _listed("tensors", tensors) + [("flat", flat), ("scale_tensor", scale_tensor)])
    return None


@torch.library.register_fake("paracomm::reduce_")
def _reduce_fake(out, inputs, divisor=1.0, scale=None, found_inf=None, wire_dtype=None, wire_out=None):
    _check_one_device("reduce_", [("out", out)] + _listed("inputs", inputs)
                      + [("scale", scale), ("found_inf", found_inf), ("wire_out", wire_out)])
    return None


# --------------------------------------------------------------------------------------------------------
# Autograd: flatten is differentiable like torch.cat (torch._utils._flatten_dense_tensors), so code that
# flattens parameters or activations inside a model can use it. The other ops write into their arguments and
# are not differentiable.
# --------------------------------------------------------------------------------------------------------


def _flatten_setup_context(ctx, inputs, output):
    tensors, _dtype, scale, scale_tensor = inputs
    ctx.shapes = [t.shape for t in tensors]
    ctx.dtypes = [t.dtype for t in tensors]
    ctx.scale = scale
    ctx.has_scale_tensor = scale_tensor is not None
    ctx.save_for_backward(*([scale_tensor] if scale_tensor is not None else []))


def _flatten_backward(ctx, grad):
    """d flatten(ts)/d ts[i]: the i-th segment of ``grad`` times the scale, in ``ts[i]``'s dtype."""
    scale_tensor = ctx.saved_tensors[0] if ctx.has_scale_tensor else None
    floating = [d.is_floating_point for d in ctx.dtypes]
    if not torch.is_grad_enabled() and all(floating):
        # The usual case: one unflatten_ (one launch on CUDA) casts and scales every segment. Under
        # create_graph it would hide the graph, so that case takes the torch path below.
        grads = [torch.empty(shape, dtype=dtype, device=grad.device) for shape, dtype in zip(ctx.shapes, ctx.dtypes)]
        ops.unflatten_(grad.contiguous(), grads, ctx.scale, scale_tensor)
        return _flatten_grads(ctx, grads)
    grads, offset = [], 0
    for shape, dtype, is_float in zip(ctx.shapes, ctx.dtypes, floating):
        numel = shape.numel()
        if not is_float:
            grads.append(None)  # integer inputs have no gradient
        else:
            # The kernels' arithmetic: float32, float64 when either side is float64.
            compute = torch.float64 if torch.float64 in (dtype, grad.dtype) else torch.float32
            g = grad[offset:offset + numel].to(compute)
            if ctx.scale != 1.0:
                g = g * ctx.scale
            if scale_tensor is not None:
                g = g * scale_tensor.to(compute)
            grads.append(g.to(dtype).reshape(shape))
        offset += numel
    return _flatten_grads(ctx, grads)


def _flatten_grads(ctx, grads):
    # One entry per argument the call passed: the dispatcher drops trailing arguments equal to their defaults
    # (scale=1.0, scale_tensor=None) before autograd sees them, and torch checks the count against what it saw.
    return (grads,) + (None,) * (len(ctx.needs_input_grad) - 1)


torch.library.register_autograd("paracomm::flatten", _flatten_backward, setup_context=_flatten_setup_context)


# --------------------------------------------------------------------------------------------------------
# Public wrappers
# --------------------------------------------------------------------------------------------------------


def _tensor_list(value, op: str, arg: str) -> list:
    """``value`` as a list of tensors; TypeError naming ``arg`` and the index of the first non-tensor.

    Without it a stray Python list inside the list fails deep in the dispatcher ("'list' object has no
    attribute 'dtype'") instead of naming what the caller got wrong.
    """
    if isinstance(value, torch.Tensor):
        raise TypeError(f"paracomm.{op}: {arg} must be a sequence of tensors, got a single tensor "
                        f"(wrap it in a list: [t])")
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"paracomm.{op}: {arg} must be a sequence of tensors, got {type(value).__name__}") from None
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"paracomm.{op}: {arg}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return items


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _split_scale(scale, op: str):
    """A user's ``scale`` (None, a number, or a 1-element float32 tensor) as the ops' (float, Tensor?) pair.

    A tensor scale stays on the device (no host synchronisation): the kernel reads it there.
    """
    if scale is None:
        return 1.0, None
    if isinstance(scale, torch.Tensor):
        return 1.0, scale
    if _is_number(scale):
        return float(scale), None
    raise TypeError(f"paracomm.{op}: scale must be None, a number or a 1-element float32 tensor, got {type(scale)}")


def unscale_and_check_(
    grads: Sequence[torch.Tensor],
    inv_scale,
    found_inf: torch.Tensor,
    *,
    out: Optional[Sequence[torch.Tensor]] = None,
    norm: Optional[torch.Tensor] = None,
) -> None:
    """Unscale gradients and check them for inf/nan in one fused pass (one launch on CUDA).

    Args:
        grads: tensors on one device, each float16, bfloat16 or float32 (dtypes may be mixed), contiguous.
        inv_scale: 1-element float32 tensor on that device, or a Python number: the factor applied to every
            value. A number is rounded to float32 and put in a new 1-element tensor on the grads' device (a
            host-to-device copy on CUDA; pass a tensor to keep the call free of it).
        found_inf: 1-element float32 tensor on that device; set to 1.0 if any value of ``grads`` is inf or
            nan, never cleared (torch's convention, so one flag can collect several calls).
        out: optional list of float32 tensors with the shapes of ``grads``. Given: ``out[i] =
            float32(grads[i]) * inv_scale`` and ``grads`` are left untouched (fp32 master gradients of fp16
            training). Not given: every grad is multiplied by ``inv_scale`` in place.
        norm: optional 1-element float32 tensor, overwritten with the L2 norm of all unscaled values,
            computed in the same pass (inf/nan when a value is non-finite).

    Raises:
        ValueError: list lengths or shapes differ, tensors on different devices, non-contiguous tensors,
            a scalar argument with more than one element.
        TypeError: ``grads``/``out`` not a sequence of tensors (the message names the index of the first
            non-tensor), a grad that is not fp16/bf16/fp32, an ``out`` tensor that is not fp32, ``inv_scale``
            neither a tensor nor a number, ``found_inf``/``norm`` not tensors, a scalar argument that is not fp32.
        Nothing is written when an error is raised.
    """
    op = "unscale_and_check_"
    grads = _tensor_list(grads, op, "grads")
    if out is not None:
        out = _tensor_list(out, op, "out")
    if not isinstance(found_inf, torch.Tensor):
        raise TypeError(f"paracomm.{op}: found_inf must be a 1-element float32 tensor, got {type(found_inf).__name__}")
    if norm is not None and not isinstance(norm, torch.Tensor):
        raise TypeError(f"paracomm.{op}: norm must be None or a 1-element float32 tensor, got {type(norm).__name__}")
    if not isinstance(inv_scale, torch.Tensor):
        if not _is_number(inv_scale):
            raise TypeError(f"paracomm.{op}: inv_scale must be a 1-element float32 tensor or a number, got "
                            f"{type(inv_scale).__name__}")
        device = grads[0].device if grads else found_inf.device
        inv_scale = torch.full((1,), float(inv_scale), dtype=torch.float32, device=device)
    if out is None:
        ops.unscale_and_check_(grads, inv_scale, found_inf, norm)
    else:
        ops.unscale_and_check_out(grads, inv_scale, found_inf, out, norm)


def _common_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    # Promote over the distinct dtypes only: a bucket holds thousands of tensors but a handful of dtypes.
    dtypes = list(dict.fromkeys(t.dtype for t in tensors))
    dtype = dtypes[0]
    for other in dtypes[1:]:
        dtype = torch.promote_types(dtype, other)
    return dtype


def flatten(
    tensors: Sequence[torch.Tensor],
    *,
    out: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
    scale=None,
) -> torch.Tensor:
    """Copy ``tensors``, in order, into one 1-D buffer, scaling and casting on the way (one launch on CUDA).

    Args:
        tensors: contiguous tensors on one device, of any shapes; float32, float16, bfloat16, float64,
            int32 or int64 (mixed dtypes allowed).
        out: optional 1-D contiguous buffer on the same device with exactly ``sum(t.numel())`` elements.
        dtype: dtype of a new buffer (default: the tensors' promoted common dtype); must match ``out``'s
            dtype when both are given.
        scale: None, a number, or a 1-element float32 tensor on the device: every value is multiplied by it
            before the cast, in float32 (float64 when a source or the buffer is float64 or an integer type).
            Without a scale the copy is a plain cast (exact for equal dtypes).

    Returns:
        The 1-D buffer (``out`` when given) of ``sum(t.numel())`` elements.

    Autograd: without ``out`` the result is differentiable with respect to the floating tensors (as
    ``torch.cat``): the gradient of ``tensors[i]`` is its segment of the result's gradient, multiplied by
    ``scale`` and cast to ``tensors[i].dtype``. ``scale`` itself gets no gradient. ``out=`` writes into an
    existing buffer and is not differentiable.

    Raises:
        ValueError: empty ``tensors`` without ``out``, devices differ, non-contiguous input, ``out`` of the
            wrong size or not 1-D and contiguous.
        TypeError: ``tensors`` not a sequence of tensors (the message names the index of the first
            non-tensor), unsupported dtypes, ``dtype`` different from ``out.dtype``, a scale of the wrong kind.
    """
    tensors = _tensor_list(tensors, "flatten", "tensors")
    scale_value, scale_tensor = _split_scale(scale, "flatten")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"paracomm.flatten: out must be None or a torch.Tensor, got {type(out).__name__}")
        if dtype is not None and dtype != out.dtype:
            raise TypeError(f"paracomm.flatten: dtype={dtype} differs from out.dtype={out.dtype}")
        ops.flatten_out(tensors, out, scale_value, scale_tensor)
        return out
    if not tensors:
        raise ValueError("paracomm.flatten: tensors must not be empty (pass out= to flatten nothing)")
    if dtype is None:
        dtype = _common_dtype(tensors)
    return ops.flatten(tensors, dtype, scale_value, scale_tensor)


def unflatten_(flat: torch.Tensor, tensors: Sequence[torch.Tensor], *, scale=None) -> list:
    """Copy consecutive segments of ``flat`` back into ``tensors`` (the inverse of :func:`flatten`).

    Args:
        flat: 1-D contiguous buffer with exactly ``sum(t.numel())`` elements, on the tensors' device.
        tensors: contiguous destination tensors; each receives its segment cast to its own dtype.
        scale: None, a number, or a 1-element float32 tensor: each value is multiplied by it first.

    Returns:
        ``tensors``, as a list.

    Raises:
        ValueError / TypeError as :func:`flatten` (also when ``flat`` is not a tensor); nothing is written when
        an error is raised.
    """
    tensors = _tensor_list(tensors, "unflatten_", "tensors")
    if not isinstance(flat, torch.Tensor):
        raise TypeError(f"paracomm.unflatten_: flat must be a torch.Tensor, got {type(flat).__name__}")
    scale_value, scale_tensor = _split_scale(scale, "unflatten_")
    ops.unflatten_(flat, tensors, scale_value, scale_tensor)
    return tensors


def reduce_(out, inputs, *, divisor=1.0, scale=None, found_inf=None, wire_dtype=None, wire_out=None) -> None:
    """The all-reduce's local reduction (internal; formula in csrc/ops.cpp and csrc/kernels/reduce.h).

    ``out = cast((inputs[0] + inputs[1] + ...) / divisor * scale)``, summed left to right in float32 (float64
    for float64, int64 for integers); with ``wire_dtype`` the value is rounded through it first (and kept in
    ``wire_out``); ``found_inf`` is set to 1 if a stored value is inf/nan. An input may be ``out`` or
    ``wire_out`` itself. Raises TypeError/ValueError naming the argument; nothing is written then.
    """
    ops.reduce_(out, list(inputs), float(divisor), scale, found_inf, wire_dtype, wire_out)
