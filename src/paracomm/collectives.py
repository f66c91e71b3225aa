"""paracomm's reduce-scatter and all-gather: :func:`reduce_scatter`, :func:`all_gather` (also as
:meth:`Communicator.reduce_scatter` / :meth:`Communicator.all_gather`), :func:`explain_reduce_scatter` and
:func:`explain_all_gather`.

They run on the same engine as the all-reduce: a plan (csrc/allreduce/plan.h) from the same generators --
reduce-scatter is the reduce-scatter half of ring or direct, or a one-shot variant for small messages; all-gather
the all-gather half of ring or direct -- executed by the same executor, which maps the plan's buffers (the
output, the input, the workspace) and knows neither algorithm nor collective. The signature every rank must
agree on, its signature check on gloo and the error path are the all-reduce's (paracomm._signature, comm.py).

Semantics follow ``torch.distributed.reduce_scatter_tensor`` / ``all_gather_into_tensor``:

* reduce-scatter: ``input.numel() == world_size * output.numel()``; rank r's output is the reduction over ranks
  of ``input[r n:(r + 1) n]`` (flat, n = output.numel()). A compressed wire (``wire_dtype``) rounds each input
  once, accumulates in float32 and writes float32: the shard is never rounded (direct, one_shot). The ring
  re-rounds its partial sum at every hop, as the all-reduce ring does.
* all-gather: ``output.numel() == world_size * input.numel()``; segment p of the output is rank p's input.
  ``input`` may be exactly this rank's segment of ``output`` (FSDP2 gathers in place like that).

Every call validates everything before anything is written (TypeError / ValueError naming the argument).
CPU tensors over a gloo group and CUDA tensors over an NCCL group are served: CUDA calls run on paracomm's NCCL
executor with the all-reduce's stream semantics (torch's WorkNCCL: paracomm's streams after the current one; a
synchronous call makes the current stream wait, an async one leaves it free until ``Work.wait()``; the tensors
are recorded on paracomm's stream and held by the Work).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from . import _C
from . import _topology
from . import comm as _comm
from ._signature import ALGORITHMS, DTYPE_CODES
from ._validate import check_op_and_wire, check_scalar_tensor, check_wire_dtype

__all__ = ["reduce_scatter", "all_gather", "explain_reduce_scatter", "explain_all_gather"]

_DTYPES_TEXT = "torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64"
_AG_ALGORITHMS = ("auto", "ring", "direct", "hierarchical")
_RS_ALGORITHMS = ALGORITHMS  # hierarchical: nodes of equal size (csrc/allreduce/hierarchical.h), CPU tensors


def _op_and_factor(op, name: str):
    """('sum' | 'avg', premul factor or None): strings, ReduceOp.SUM / AVG, and ReduceOp.PREMUL_SUM(f) (what
    FSDP2 passes for a gradient_divide_factor), whose factor becomes the call's scale."""
    reduce_op = dist.ReduceOp
    if isinstance(op, reduce_op) and op == reduce_op.PREMUL_SUM:
        try:
            factor = float(op.factor)
        except Exception as e:  # noqa: BLE001  (a tensor factor, or none)
            raise ValueError(f"{name}: op ReduceOp.PREMUL_SUM needs a Python float factor: {e}") from None
        return "sum", factor
    return _comm._op_name(op, name), None


def _check_tensor(t, arg: str, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPE_CODES:
        raise TypeError(f"{name}: {arg} has unsupported dtype {t.dtype} ({_DTYPES_TEXT})")
    if not t.is_contiguous():
        raise ValueError(f"{name}: {arg} must be contiguous")
    return t


def _byte_range(t: torch.Tensor) -> tuple:
    begin = t.data_ptr()
    return begin, begin + t.numel() * t.element_size()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, a1 = _byte_range(a)
    b0, b1 = _byte_range(b)
    return a0 < b1 and b0 < a1


def _check_common(comm, output, input, name: str) -> tuple:
    """Checks shared by both collectives: tensors, dtypes, devices, a live group. Returns (output, input)."""
    if comm.group not in c10d._world.pg_map:
        raise RuntimeError(f"{name}: this Communicator's process group has been destroyed "
                           "(destroy_process_group); create a new Communicator after init_process_group")
    output = _check_tensor(output, "output", name)
    input = _check_tensor(input, "input", name)
    if input.dtype != output.dtype:
        raise TypeError(f"{name}: input and output must have the same dtype, got input {input.dtype} and "
                        f"output {output.dtype}")
    if input.device != output.device:
        raise ValueError(f"{name}: input is on {input.device} but output is on {output.device}")
    comm._check_device(output.device, name, "the tensors are")
    return output, input


def _resolve_algorithm(comm, algorithm, name: str, allowed: tuple) -> str:
    if algorithm is None:
        algorithm = comm.algorithm
        # A communicator-wide "one_shot" default means "no pipelining": all-gather's direct exchange is that.
        if algorithm not in allowed:
            algorithm = "direct"
        return algorithm
    if not isinstance(algorithm, str):
        raise TypeError(f"{name}: algorithm must be one of {', '.join(map(repr, allowed))}, got {algorithm!r}")
    if algorithm not in allowed:
        raise ValueError(f"{name}: algorithm must be one of {', '.join(map(repr, allowed))}, got {algorithm!r}")
    return algorithm


def validate_reduce_scatter(comm, output, input, op, wire_dtype, scale, found_inf, algorithm) -> "_comm._Call":
    """Every check of :func:`reduce_scatter`, before anything is written; the validated call."""
    name = "paracomm.reduce_scatter"
    output, input = _check_common(comm, output, input, name)
    n = comm.world_size
    if input.numel() != n * output.numel():
        raise ValueError(f"{name}: input must have world_size x output.numel() = {n} x {output.numel()} = "
                         f"{n * output.numel()} elements, got {input.numel()}")
    if _overlap(input, output):
        raise ValueError(f"{name}: output overlaps input in memory; reduce_scatter needs separate buffers")
    op, factor = _op_and_factor(op, name)
    floating = output.dtype.is_floating_point
    check_op_and_wire(op, wire_dtype, output.dtype, name)
    algorithm = _resolve_algorithm(comm, algorithm, name, _RS_ALGORITHMS)
    _comm._check_rank_limit(algorithm, n, name)
    device = output.device
    check_scalar_tensor(scale, "scale", device, name)
    check_scalar_tensor(found_inf, "found_inf", device, name)
    if factor is not None:
        if scale is not None:
            raise ValueError(f"{name}: op ReduceOp.PREMUL_SUM and scale both scale the result; pass one")
        if not floating:
            raise ValueError(f"{name}: op ReduceOp.PREMUL_SUM needs a floating dtype, got {output.dtype}")
        scale = torch.tensor([factor], dtype=torch.float32, device=device)
    if scale is not None and not floating:
        raise ValueError(f"{name}: scale needs a floating dtype, got {output.dtype}")
    chunk_bytes = _comm._chunk_bytes()
    comm._raise_if_failed()
    divisor = float(n) if op == "avg" else 1.0
    return _comm._Call(output.view(-1), output, output, op, divisor, wire_dtype, scale, found_inf, algorithm,
                       "reduce_scatter", chunk_bytes, input=input.view(-1))


def validate_all_gather(comm, output, input, algorithm) -> "_comm._Call":
    """Every check of :func:`all_gather`, before anything is written; the validated call."""
    name = "paracomm.all_gather"
    output, input = _check_common(comm, output, input, name)
    n = comm.world_size
    if output.numel() != n * input.numel():
        raise ValueError(f"{name}: output must have world_size x input.numel() = {n} x {input.numel()} = "
                         f"{n * input.numel()} elements, got {output.numel()}")
    if _overlap(input, output):
        # In place (FSDP2's layout): input is exactly this rank's segment of output. Any other overlap would
        # let a receive overwrite what is still to be sent.
        segment = output.view(-1)[comm.rank * input.numel():(comm.rank + 1) * input.numel()]
        if input.data_ptr() != segment.data_ptr():
            raise ValueError(f"{name}: input overlaps output other than as this rank's segment "
                             f"output[{comm.rank} x {input.numel()} : {comm.rank + 1} x {input.numel()}]")
    algorithm = _resolve_algorithm(comm, algorithm, name, _AG_ALGORITHMS)
    chunk_bytes = _comm._chunk_bytes()
    comm._raise_if_failed()
    return _comm._Call(output.view(-1), output, output, "sum", 1.0, None, None, None, algorithm, "all_gather",
                       chunk_bytes, input=input.view(-1))


def run_reduce_scatter(comm, output, input, op="sum", *, wire_dtype=None, async_op: bool = False, scale=None,
                       found_inf=None, algorithm: Optional[str] = None):
    """:meth:`Communicator.reduce_scatter`'s body (documented there)."""
    _comm._check_bool(async_op, "async_op", "paracomm.reduce_scatter")
    call = validate_reduce_scatter(comm, output, input, op, wire_dtype, scale, found_inf, algorithm)
    return comm._run_call(call, async_op)


def run_all_gather(comm, output, input, *, async_op: bool = False, algorithm: Optional[str] = None):
    """:meth:`Communicator.all_gather`'s body (documented there)."""
    _comm._check_bool(async_op, "async_op", "paracomm.all_gather")
    call = validate_all_gather(comm, output, input, algorithm)
    return comm._run_call(call, async_op)


def reduce_scatter(output, input, op="sum", *, group=None, wire_dtype=None, async_op: bool = False, scale=None,
                   found_inf=None, algorithm: Optional[str] = None):
    """Reduce ``input`` over the ranks of ``group`` and leave segment ``rank`` of the result in ``output``.

    A drop-in for ``torch.distributed.reduce_scatter_tensor(output, input, op, group, async_op)`` for SUM, AVG
    and PREMUL_SUM, with one cached :class:`Communicator` per group (None: the default group).

    Args:
        output: contiguous tensor of n elements (any shape), written. dtype float32, float16, bfloat16,
            float64, int32 or int64 (CPU with a gloo group, CUDA with an NCCL group).
        input: contiguous tensor of the same dtype and device with world_size x n elements (any shape), read
            only; rank r's output is the reduction of the flat ``input[r n:(r + 1) n]`` over all ranks. It must
            not overlap ``output``.
        op: "sum", "avg" (floating dtypes: the division by the world size is fused into the owner's final
            reduction), ``ReduceOp.SUM`` / ``.AVG``, or ``ReduceOp.PREMUL_SUM(f)`` (floating dtypes), taken as
            ``scale = f`` applied to the result (FSDP2's gradient_divide_factor; the sum is the same, the
            rounding of the product may differ from torch's pre-multiplication in the last bit).
        wire_dtype: None or torch.float16 / torch.bfloat16 for float32 tensors: every input is rounded to it
            once, sums accumulate in float32 and the float32 shard is written unrounded (direct, one_shot);
            "ring" re-rounds the partial sum at every hop.
        async_op: return a :class:`paracomm.comm.Work` instead of waiting.
        scale: optional 1-element float32 tensor on the tensors' device: the shard is multiplied by it.
        found_inf: optional 1-element float32 tensor: set to 1.0 if any value of *this rank's* shard is inf or
            nan, never cleared. Ranks may differ (each sees its own shard): all-reduce it (max) for a global
            decision.
        algorithm: "auto", "ring", "direct" or "one_shot"; None: the Communicator's default.

    Returns:
        ``output``, or a Work whose ``wait()`` returns it.

    Raises:
        TypeError: non-tensor arguments, unsupported or different dtypes, a bad ``wire_dtype``/``op``/
            ``algorithm`` type, ``scale``/``found_inf`` not float32 tensors.
        ValueError: non-contiguous tensors, ``input.numel() != world_size * output.numel()``, overlapping
            buffers, different devices, unknown op or algorithm, avg/scale/PREMUL_SUM on integers, PREMUL_SUM
            with scale, wire_dtype on non-float32 tensors, a device the group does not serve, direct/one_shot
            on more than 32 ranks. Nothing is written when an argument is refused.
        RuntimeError: as :meth:`Communicator.all_reduce` (a failed peer; ranks disagreeing on the signature:
            collective, output numel, dtype, op, wire_dtype, scale/found_inf given, algorithm, chunk size).
    """
    _comm._check_bool(async_op, "async_op", "paracomm.reduce_scatter")
    return _comm._communicator_for(group, where="paracomm.reduce_scatter").reduce_scatter(
        output, input, op, wire_dtype=wire_dtype, async_op=async_op, scale=scale, found_inf=found_inf,
        algorithm=algorithm)


def all_gather(output, input, *, group=None, async_op: bool = False, algorithm: Optional[str] = None):
    """Gather every rank's ``input`` into ``output`` (segment p = rank p's input), on every rank.

    A drop-in for ``torch.distributed.all_gather_into_tensor(output, input, group, async_op)``, with one cached
    :class:`Communicator` per group (None: the default group).

    Args:
        output: contiguous tensor of world_size x n elements (any shape), written.
        input: contiguous tensor of n elements, the same dtype (any all_reduce takes) and device (CPU over
            gloo, CUDA over NCCL);
            read only. It may be exactly this rank's segment of ``output`` (in place), no other overlap.
        async_op: return a :class:`paracomm.comm.Work` instead of waiting.
        algorithm: "auto", "ring" or "direct"; None: the Communicator's default ("one_shot" there means
            "direct": all-gather's direct exchange is already one shot).

    Returns:
        ``output``, or a Work whose ``wait()`` returns it. Every rank's output is bitwise the same.

    Raises:
        TypeError / ValueError naming the argument (as :func:`reduce_scatter`; ``output.numel() != world_size *
        input.numel()``; ``algorithm="one_shot"``); nothing is written then. RuntimeError as
        :meth:`Communicator.all_reduce` (signature: collective, input numel, dtype, algorithm, chunk size).
    """
    _comm._check_bool(async_op, "async_op", "paracomm.all_gather")
    return _comm._communicator_for(group, where="paracomm.all_gather").all_gather(
        output, input, async_op=async_op, algorithm=algorithm)


def _check_equal_nodes(node_map: list, world_size: int, name: str) -> None:
    """hierarchical reduce_scatter / all_gather plan nodes of equal size only (csrc/allreduce/hierarchical.h):
    refuse another node map here with a ValueError naming node_size, instead of the generator's RuntimeError."""
    if node_map and world_size % (node_map.count(0)) != 0:
        raise ValueError(f"{name}: algorithm='hierarchical' needs nodes of equal size, but node_size "
                         f"{node_map.count(0)} does not divide world_size {world_size} (the last node would have "
                         f"{node_map.count(node_map[-1])} ranks)")


def _explain(collective: str, name: str, numel, dtype, world_size, wire_dtype, algorithm, backend,
             allowed: tuple, node_size) -> dict:
    """explain_reduce_scatter / explain_all_gather: the arguments checked as explain_all_reduce checks them, then
    the counts of rank 0's plan from the same pure generator a call uses (_C.plan_summary), for the node map of
    ``node_size`` / PARACOMM_NODE_SIZE (_topology.explain_node_map). Nothing is communicated."""
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"{name}: numel must be an int >= 0, got {numel!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"{name}: world_size must be an int >= 1, got {world_size!r}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name}: dtype must be a torch.dtype, got {dtype!r}")
    if dtype not in DTYPE_CODES:
        raise TypeError(f"{name}: dtype {dtype} is not supported ({_DTYPES_TEXT})")
    check_wire_dtype(wire_dtype, name)
    if wire_dtype is not None and dtype != torch.float32:
        raise ValueError(f"{name}: wire_dtype={wire_dtype} needs dtype torch.float32, got {dtype}")
    if algorithm is None:
        algorithm = _comm._default_algorithm()
        if algorithm not in allowed:
            algorithm = "direct"
    elif not isinstance(algorithm, str):
        raise TypeError(f"{name}: algorithm must be one of {', '.join(map(repr, allowed))}, got {algorithm!r}")
    elif algorithm not in allowed:
        raise ValueError(f"{name}: algorithm must be one of {', '.join(map(repr, allowed))}, got {algorithm!r}")
    if backend is None:
        backend = _comm._local_backend()
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"{name}: backend must be 'nccl' or 'gloo', got {backend!r}")
    if collective == "reduce_scatter":
        _comm._check_rank_limit(algorithm, world_size, name)
    node_map = _topology.explain_node_map(node_size, world_size, name)
    if algorithm == "hierarchical":
        _check_equal_nodes(node_map, world_size, name)
    wire = -1 if wire_dtype is None else DTYPE_CODES[wire_dtype]
    return dict(_C.plan_summary(numel, DTYPE_CODES[dtype], wire, world_size, 0, algorithm, backend, False, False,
                                _comm._chunk_bytes(), collective, node_map))


def explain_reduce_scatter(numel: int, dtype: torch.dtype, world_size: int, *, wire_dtype=None,
                           algorithm: Optional[str] = None, backend: Optional[str] = None,
                           node_size: Optional[int] = None) -> dict:
    """What a reduce-scatter with ``numel`` output elements per rank (input: world_size x numel) would do; no
    communication.

    Arguments and keys as :func:`paracomm.explain_all_reduce` (``algorithm``, ``chunk_bytes``, ``num_chunks``,
    ``steps``, ``transfer_groups``, ``reductions``, ``bytes_sent``, ``bytes_received``, ``workspace_bytes``;
    rank 0, without scale or found_inf). ``algorithm``: "auto", "ring", "direct", "one_shot" or "hierarchical";
    None: ``PARACOMM_ALGORITHM``, else "auto".

    ``node_size``: ranks per node (ranks [0, K) on node 0, ...); None: ``PARACOMM_NODE_SIZE`` when set, else one
    node. With a node map "auto" is topology-aware (hierarchical for nodes of equal size above the one-shot
    sizes) and the result also has ``nodes``, ``inter_node_bytes`` / ``intra_node_bytes`` (bytes one rank sends
    to other nodes / within its node, the busiest rank's; in the wire dtype where the plan sends it),
    ``inter_node_steps`` and ``choice_reason``, counted over the same plans the call would run.

    Raises:
        TypeError / ValueError naming the argument (``node_size`` outside [1, world_size]; "hierarchical" with
        nodes of different sizes).
    """
    return _explain("reduce_scatter", "paracomm.explain_reduce_scatter", numel, dtype, world_size, wire_dtype,
                    algorithm, backend, _RS_ALGORITHMS, node_size)


def explain_all_gather(numel: int, dtype: torch.dtype, world_size: int, *, algorithm: Optional[str] = None,
                       backend: Optional[str] = None, node_size: Optional[int] = None) -> dict:
    """What an all-gather of ``numel`` input elements per rank (output: world_size x numel) would do; no
    communication.

    Keys as :func:`paracomm.explain_all_reduce`; ``algorithm`` "auto", "ring", "direct" or "hierarchical" (None:
    ``PARACOMM_ALGORITHM``, "one_shot" there meaning "direct"). ``node_size`` as in
    :func:`explain_reduce_scatter` (None: ``PARACOMM_NODE_SIZE`` when set): the result then also has ``nodes``,
    ``inter_node_bytes``, ``intra_node_bytes``, ``inter_node_steps`` and ``choice_reason``.

    Raises:
        TypeError / ValueError naming the argument.
    """
    return _explain("all_gather", "paracomm.explain_all_gather", numel, dtype, world_size, None, algorithm,
                    backend, _AG_ALGORITHMS, node_size)
