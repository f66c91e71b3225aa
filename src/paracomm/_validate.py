"""Argument checks shared by the Python-facing modules (comm, hooks, buckets), so each refuses the same input
with the same error type and wording: TypeError when the argument is not even of the right kind, ValueError
when it is of the right kind but not an allowed value."""
from __future__ import annotations

import torch
import torch.distributed as dist

WIRE_DTYPES = (torch.float16, torch.bfloat16)


def check_wire_dtype(wire_dtype, name: str) -> None:
    """Accept None, torch.float16 or torch.bfloat16; ``name`` prefixes the error (e.g. "paracomm.all_reduce")."""
    if wire_dtype is None:
        return
    if not isinstance(wire_dtype, torch.dtype):
        raise TypeError(f"{name}: wire_dtype must be None, torch.float16 or torch.bfloat16, got {wire_dtype!r}")
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"{name}: wire_dtype must be None, torch.float16 or torch.bfloat16, got {wire_dtype}")


def check_op_and_wire(op: str, wire_dtype, dtype: torch.dtype, name: str) -> None:
    """The data-type rules of a reducing collective (all_reduce, reduce_scatter): op "avg" needs floating data,
    a wire dtype needs float32 data. ValueError naming the argument; a bad wire_dtype itself is
    :func:`check_wire_dtype`'s TypeError/ValueError."""
    if op == "avg" and not dtype.is_floating_point:
        raise ValueError(f"{name}: op='avg' needs a floating dtype, got {dtype}")
    if wire_dtype is not None:
        check_wire_dtype(wire_dtype, name)
        if dtype != torch.float32:
            raise ValueError(f"{name}: wire_dtype={wire_dtype} needs float32 data, got {dtype}")


def check_scalar_tensor(t, arg: str, device: torch.device, name: str) -> None:
    """Accept None or a 1-element float32 tensor on ``device`` (the data's) for argument ``arg`` (``scale``,
    ``found_inf``): TypeError for a non-tensor or another dtype, ValueError for another shape or device."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: {arg} must be None or a 1-element float32 tensor, got {type(t).__name__}")
    if t.numel() != 1:
        raise ValueError(f"{name}: {arg} must have exactly one element, got shape {tuple(t.shape)}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name}: {arg} must be torch.float32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: {arg} is on {t.device} but the data is on {device}")


def check_process_group(group, name: str, arg: str) -> None:
    """Accept None or a torch.distributed ProcessGroup for argument ``arg``."""
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name}: {arg} must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
