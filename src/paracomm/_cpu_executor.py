"""The CPU executor: runs any collective plan (csrc/allreduce/plan.h) over gloo point-to-point.

It knows no algorithm and no collective: it maps the plan's buffers (the output ``x``, an out-of-place
``input`` when the plan has one, and its workspace) and follows the steps. For each step of the plan it posts
the step's transfers (``send``/``recv`` on paracomm's *private* gloo process group, one tag per step) and, once
they and every earlier step's transfers have completed, runs the step's reductions with the CPU op
``paracomm::reduce_``. It posts step i+1's transfers
before running step i's reductions whenever the plan allows it (``transfers_after(i+1) < i``): that is the whole
pipelining mechanism, and the plan's dependencies are what make it safe. Before posting a step it waits for the
transfers of every step up to ``transfers_after`` (an all-gather forwards what it has just received); the NCCL
executor gets the same order from its single communication stream.

Why a private group: paracomm's transfers must never interleave with torch collectives that the user issues on
their own group (an ``async_op=True`` all-reduce runs on a worker thread while the main thread may call
``dist.all_reduce`` on the same group; two threads putting operations on one gloo group in different orders on
different ranks deadlocks). The private group is a ``ProcessGroupGloo`` built directly over a prefix of the
user group's store, so creating it is a rendezvous among the group's members only.

Threads: several ranks on one machine, each running OpenMP reductions on every core, fight for the cores. The
reductions of a call run with at most ``cores // local_ranks`` threads (local ranks: ``LOCAL_WORLD_SIZE``, else
the ranks of the group on this host, counted once through the store); torch's global setting is restored after.
"""
from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ._ops import ops
from . import _C
from ._signature import STEP_MASK

_DATA, _WIRE, _RECV, _INPUT, _STAGE = 0, 1, 2, 3, 4  # _STAGE: T-typed workspace (compressed hierarchical plans)
_ELEMENT_SIZE = {dt: torch.empty((), dtype=dt).element_size()
                 for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64)}


class PreparedPlan:
    """A plan from ``paracomm._C.all_reduce_plan`` / ``collective_plan`` in the shape the executor's loop reads
    fastest."""

    __slots__ = ("algorithm", "steps", "wire_elems", "recv_elems", "recv_offset_bytes", "stage_elems",
                 "stage_offset_bytes", "workspace_bytes", "raw", "bound", "signature", "tag_base", "data_elems",
                 "input_elems")

    def __init__(self, raw: dict):
        self.raw = raw
        self.signature = None  # the call's signature (paracomm._signature), set by the plan cache
        self.tag_base = None  # high bits of the data tags (paracomm._signature.TagRegistry), set on first use
        self.bound = None  # (workspace, travel dtype, steps with workspace spans as tensors): CpuExecutor._bind
        self.algorithm = raw["algorithm"]
        self.wire_elems = raw["wire_elems"]
        self.recv_elems = raw["recv_elems"]
        self.recv_offset_bytes = raw["recv_offset_bytes"]
        self.stage_elems = raw.get("stage_elems", 0)
        self.stage_offset_bytes = raw.get("stage_offset_bytes", 0)
        self.workspace_bytes = raw["workspace_bytes"]
        self.data_elems = raw.get("data_elems")
        self.input_elems = raw.get("input_elems", 0)
        steps = []
        for after, transfers, reductions in raw["steps"]:
            ts = tuple((is_send, peer, buf, off, off + count) for is_send, peer, buf, off, count in transfers)
            rs = []
            for count, inputs, out, final, round_to_wire, wire_out, check_inf in reductions:
                rs.append((
                    tuple((b, o, o + count) for b, o in inputs),
                    (out[0], out[1], out[1] + count),
                    final, round_to_wire,
                    None if wire_out is None else (wire_out[0], wire_out[1], wire_out[1] + count),
                    check_inf,
                ))
            steps.append((after, ts, tuple(rs)))
        self.steps = tuple(steps)


def _local_ranks(store, prefix: str, rank: int, world_size: int, timeout: timedelta) -> int:
    """Ranks of the group on this host: LOCAL_WORLD_SIZE when set (torchrun), else counted through the store."""
    env = os.environ.get("LOCAL_WORLD_SIZE")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    host = socket.gethostname()
    store.set(f"{prefix}/host/{rank}", host)
    keys = [f"{prefix}/host/{r}" for r in range(world_size)]
    store.wait(keys, timeout)
    return max(1, sum(1 for k in keys if bytes(store.get(k)).decode() == host))


class CpuExecutor:
    """Runs plans on CPU tensors over a private gloo group of the communicator's ranks.

    Args:
        store: the user group's store; the private group rendezvous under ``prefix``.
        prefix: a key prefix unique to this communicator (the same on every rank).
        rank, world_size: this process in the group.
        timeout: the private group's timeout (the caller also bounds every wait by its own deadline).
    """

    def __init__(self, store, prefix: str, rank: int, world_size: int, timeout: timedelta):
        self.rank = rank
        self.world_size = world_size
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore(f"{prefix}/gloo", store), rank, world_size, timeout)
        cores = os.cpu_count() or 1
        self.reduction_threads = max(1, cores // _local_ranks(store, prefix, rank, world_size, timeout))
        self._workspace = torch.empty(0, dtype=torch.uint8)
        self._posted: list = []  # the running call's posted transfers, by step (what interrupt() aborts)

    def interrupt(self) -> None:
        """Abort every transfer the running call has posted: a wait blocked on one returns at once (and any
        later wait on them fails), so the caller can report what another thread found (paracomm._monitor).
        Callable from any thread; the group is unusable for that call afterwards (replace it). Idempotent."""
        for works in list(self._posted):
            for work, _peer in works or ():
                try:
                    _C.abort_work(work)
                except Exception:  # noqa: BLE001  (completed or already aborted)
                    pass

    def abort(self) -> None:
        """Interrupt the running call and ask gloo to close the group (torch 2.13's ProcessGroupGloo.abort does
        nothing; peers see the connections close when the group is dropped). Idempotent."""
        self.interrupt()
        try:
            self.pg.abort()
        except Exception:  # noqa: BLE001  (already closed or failed: nothing left to close)
            pass

    def _bind(self, plan: PreparedPlan, travel: torch.dtype, dtype: torch.dtype) -> tuple:
        """The plan's steps with every workspace span already a tensor view; spans of the caller's tensors stay
        (which, begin, end), which 0: the output/data, 1: the input. ``dtype``: the data's (kStage's) dtype.

        Views are made once per (plan, workspace): a call then slices only the user's tensor (a Python-level
        tensor op costs microseconds, and a small all-reduce has dozens of spans).
        """
        if self._workspace.numel() < plan.workspace_bytes:
            self._workspace = torch.empty(plan.workspace_bytes, dtype=torch.uint8)
        ws = self._workspace
        bound = plan.bound
        if bound is not None and bound[0] is ws and bound[1] == (travel, dtype):
            return bound[2]
        esize = _ELEMENT_SIZE[travel]
        views = {
            _WIRE: ws[: plan.wire_elems * esize].view(travel) if plan.wire_elems else None,
            _RECV: (ws[plan.recv_offset_bytes: plan.recv_offset_bytes + plan.recv_elems * esize].view(travel)
                    if plan.recv_elems else None),
            _STAGE: (ws[plan.stage_offset_bytes: plan.stage_offset_bytes + plan.stage_elems * _ELEMENT_SIZE[dtype]]
                     .view(dtype) if plan.stage_elems else None),
        }

        def span(buf, begin, end):
            if buf == _DATA:
                return (0, begin, end)
            if buf == _INPUT:
                return (1, begin, end)
            return views[buf][begin:end]

        steps = []
        for after, transfers, reductions in plan.steps:
            ts = tuple((is_send, peer, span(buf, b, e)) for is_send, peer, buf, b, e in transfers)
            rs = tuple((tuple(span(*i) for i in inputs), span(*out), final, round_to_wire,
                        None if wire_out is None else span(*wire_out), check_inf)
                       for inputs, out, final, round_to_wire, wire_out, check_inf in reductions)
            steps.append((after, ts, rs))
        plan.bound = (ws, (travel, dtype), tuple(steps))
        return plan.bound[2]

    def run(self, plan: PreparedPlan, x: torch.Tensor, *, travel: torch.dtype, divisor: float,
            scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor], wire_dtype: Optional[torch.dtype],
            wait: Callable, tag_base: int = 0, input: Optional[torch.Tensor] = None) -> None:
        """Execute ``plan``: ``x`` (flat) is its kData buffer, written in place; ``input`` (flat) its kInput
        buffer, only read (plans without one: None).

        ``wait(work, what, step, steps, peer)`` waits for one gloo work within the caller's deadline and raises
        the caller's error (``what`` is the plan's algorithm here). Step i's transfers carry the tag
        ``tag_base | (i & STEP_MASK)`` (the call's signature in the high bits: see paracomm._signature), so a
        transfer only ever matches one of a peer's call with the same signature. The posted transfers are kept
        in ``self._posted`` while the call runs, for :meth:`interrupt`.
        """
        n = len(plan.steps)
        if n == 0:
            return
        if plan.input_elems and (input is None or input.numel() != plan.input_elems):
            raise ValueError(f"CpuExecutor.run: the plan reads an input of {plan.input_elems} elements")
        steps = self._bind(plan, travel, x.dtype)
        users = (x, input)
        sizes = (x.numel(), 0 if input is None else input.numel())

        def t(sp):  # a bound span: a workspace view, or (which, begin, end) in the caller's tensors
            if type(sp) is tuple:
                w, b, e = sp
                return users[w] if b == 0 and e == sizes[w] else users[w][b:e]
            return sp

        pg = self.pg
        posted: list = [None] * n
        self._posted = posted
        waited = -1  # steps whose transfers have all completed

        def wait_through(k: int) -> None:
            """Wait for the transfers of every step <= k."""
            nonlocal waited
            if k < 0:
                return
            for j in range(waited + 1, k + 1):
                for work, peer in posted[j] or ():
                    wait(work, plan.algorithm, j, n, peer)
                posted[j] = ()
            waited = max(waited, k)

        def post(i: int) -> list:
            # What step i sends may have arrived by a receive of a step <= transfers_after (the all-gather
            # forwards what it received): those transfers must be complete, not just posted.
            wait_through(steps[i][0])
            tag = tag_base | (i & STEP_MASK)
            works = []
            for is_send, peer, sp in steps[i][1]:
                try:
                    works.append((pg.send([t(sp)], peer, tag) if is_send else pg.recv([t(sp)], peer, tag), peer))
                except Exception as e:  # noqa: BLE001  (gloo refuses to post on a closed pair)
                    raise _post_error(wait, f"step {i} of {n} ({plan.algorithm}): posting a transfer", e, peer)
            return works

        reduce = ops.reduce_
        saved_threads = torch.get_num_threads()
        limit = min(saved_threads, self.reduction_threads)
        if limit != saved_threads:
            torch.set_num_threads(limit)
        try:
            for i in range(n):
                if posted[i] is None:
                    posted[i] = post(i)
                # Overlap: step i+1's transfers go out before step i's reductions when they do not need them.
                if i + 1 < n and steps[i + 1][0] < i:
                    posted[i + 1] = post(i + 1)
                reductions = steps[i][2]
                if not reductions:
                    continue
                # A reduction runs once this step's transfers, and every earlier step's, have completed.
                wait_through(i)
                for inputs, out, final, round_to_wire, wire_out, check_inf in reductions:
                    reduce(
                        t(out),
                        [t(sp) for sp in inputs],
                        divisor if final else 1.0,
                        scale if final else None,
                        found_inf if check_inf else None,
                        wire_dtype if round_to_wire else None,
                        None if wire_out is None else t(wire_out),
                    )
            wait_through(n - 1)
        finally:
            self._posted = []
            if limit != saved_threads:
                torch.set_num_threads(saved_threads)


def _post_error(wait, what: str, e: BaseException, peer: int) -> BaseException:
    """The caller's error for a transfer gloo refused to post (``wait.on_error``), or ``e`` itself."""
    on_error = getattr(wait, "on_error", None)
    return e if on_error is None else on_error(what, e, peer)


def deadline_wait(deadline: float, on_error: Callable[[str, BaseException, Optional[int]], BaseException]):
    """A ``wait(work, what, step=-1, steps=0, peer=None)`` bounded by ``deadline`` (time.monotonic()); ``what``
    (and, for a plan's transfers, ``step`` of ``steps``) names the wait in the error, ``peer`` the rank the
    transfer is with (None: a collective or unknown). ``on_error(what, exception, peer)`` makes the error.
    A work aborted by :meth:`CpuExecutor.interrupt` (its wait returns False) is an error too."""

    def wait(work, what: str, step: int = -1, steps: int = 0, peer: Optional[int] = None) -> None:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError("timed out: no time left before the call's deadline")
            if not work.wait(timedelta(seconds=remaining)):
                raise RuntimeError("the wait was interrupted (the transfer was aborted on this rank)")
        except Exception as e:  # noqa: BLE001
            raise on_error(f"step {step} of {steps} ({what})" if step >= 0 else what, e, peer) from e

    wait.on_error = on_error  # posting errors take the same path (CpuExecutor: _post_error)
    return wait
