"""The CPU executor: runs any all-reduce plan (csrc/allreduce/plan.h) over gloo point-to-point.

It knows no algorithm. For each step of the plan it posts the step's transfers (``send``/``recv`` on
paracomm's *private* gloo process group, one tag per step) and, once they and every earlier step's transfers
have completed, runs the step's reductions with the CPU op ``paracomm::reduce_``. It posts step i+1's transfers
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
from ._signature import HEADER_TAG, STEP_MASK

_DATA, _WIRE, _RECV = 0, 1, 2
_ELEMENT_SIZE = {dt: torch.empty((), dtype=dt).element_size()
                 for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64)}


class PreparedPlan:
    """A plan from ``paracomm._C.all_reduce_plan`` in the shape the executor's loop reads fastest."""

    __slots__ = ("algorithm", "steps", "wire_elems", "recv_elems", "recv_offset_bytes", "workspace_bytes", "raw",
                 "bound", "header", "tag_base")

    def __init__(self, raw: dict):
        self.raw = raw
        self.header = None  # the call's signature header (int64 tensor), set by the plan cache
        self.tag_base = 0  # high bits of the data tags (paracomm._signature.tag_base)
        self.bound = None  # (workspace, travel dtype, steps with workspace spans as tensors): CpuExecutor._bind
        self.algorithm = raw["algorithm"]
        self.wire_elems = raw["wire_elems"]
        self.recv_elems = raw["recv_elems"]
        self.recv_offset_bytes = raw["recv_offset_bytes"]
        self.workspace_bytes = raw["workspace_bytes"]
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


class HeaderMismatch(Exception):
    """The per-call headers differ: ``headers[r]`` is rank r's header (a list of ints; this rank's own included).
    Raised before any data of the call has been waited for or written; the caller reports it."""

    def __init__(self, headers: list):
        super().__init__("signature headers differ")
        self.headers = headers


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
        self._header_in: dict = {}  # header length -> receive buffers, one per peer (reused: one call at a time)

    def abort(self) -> None:
        """Close the private group's connections (peers blocked on this rank fail at once). Idempotent."""
        try:
            self.pg.abort()
        except Exception:  # noqa: BLE001  (already closed or failed: nothing left to close)
            pass

    def post_header(self, header: torch.Tensor, wait: Callable) -> Callable[[], None]:
        """Send this call's signature header to every other rank and post the receives of theirs.

        Returns the check to run before the call's first wait on data: it waits for every header (within the
        caller's deadline, through ``wait``) and raises :class:`HeaderMismatch` when any differs from ours.
        Headers have a fixed size and their own tag, so they can never be mistaken for data. Every rank sends
        to every rank, so every rank sees the same set of headers and raises the same mismatch.
        """
        rank, n, pg = self.rank, self.world_size, self.pg
        length = header.numel()
        buffers = self._header_in.get(length)
        if buffers is None:
            buffers = self._header_in[length] = [torch.empty(length, dtype=torch.int64) for _ in range(n)]
        recvs, sends = [], []
        for p in range(n):
            if p == rank:
                continue
            try:
                recvs.append((pg.recv([buffers[p]], p, HEADER_TAG), p))
                sends.append((pg.send([header], p, HEADER_TAG), p))
            except Exception as e:  # noqa: BLE001  (gloo refuses to post on a closed pair)
                raise _post_error(wait, "posting the signature header", e, p)

        def check() -> None:
            for work, peer in recvs:
                wait(work, "the signature header", peer=peer)
            for work, peer in sends:
                wait(work, "the signature header", peer=peer)
            if not all(torch.equal(buffers[p], header) for p in range(n) if p != rank):
                raise HeaderMismatch([header.tolist() if p == rank else buffers[p].tolist() for p in range(n)])

        return check

    def _bind(self, plan: PreparedPlan, travel: torch.dtype) -> tuple:
        """The plan's steps with every workspace span already a tensor view; data spans stay (begin, end).

        Views are made once per (plan, workspace): a call then slices only the user's tensor (a Python-level
        tensor op costs microseconds, and a small all-reduce has dozens of spans).
        """
        if self._workspace.numel() < plan.workspace_bytes:
            self._workspace = torch.empty(plan.workspace_bytes, dtype=torch.uint8)
        ws = self._workspace
        bound = plan.bound
        if bound is not None and bound[0] is ws and bound[1] == travel:
            return bound[2]
        esize = _ELEMENT_SIZE[travel]
        views = {
            _WIRE: ws[: plan.wire_elems * esize].view(travel) if plan.wire_elems else None,
            _RECV: (ws[plan.recv_offset_bytes: plan.recv_offset_bytes + plan.recv_elems * esize].view(travel)
                    if plan.recv_elems else None),
        }

        def span(buf, begin, end):
            return (begin, end) if buf == _DATA else views[buf][begin:end]

        steps = []
        for after, transfers, reductions in plan.steps:
            ts = tuple((is_send, peer, span(buf, b, e)) for is_send, peer, buf, b, e in transfers)
            rs = tuple((tuple(span(*i) for i in inputs), span(*out), final, round_to_wire,
                        None if wire_out is None else span(*wire_out), check_inf)
                       for inputs, out, final, round_to_wire, wire_out, check_inf in reductions)
            steps.append((after, ts, rs))
        plan.bound = (ws, travel, tuple(steps))
        return plan.bound[2]

    def run(self, plan: PreparedPlan, x: torch.Tensor, *, travel: torch.dtype, divisor: float,
            scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor], wire_dtype: Optional[torch.dtype],
            wait: Callable, tag_base: int = 0, before_wait: Optional[Callable[[], None]] = None) -> None:
        """Execute ``plan`` on the flat tensor ``x`` in place.

        ``wait(work, what, step, steps, peer)`` waits for one gloo work within the caller's deadline and raises
        the caller's error (``what`` is the plan's algorithm here). Step i's transfers carry the tag
        ``tag_base | (i & STEP_MASK)`` (the call's signature in the high bits: see paracomm._signature).
        ``before_wait`` (the header check) runs once, after step 0's transfers are posted and before the
        first wait for any transfer or the first reduction, so a mismatch raises before anything is written.
        """
        n = len(plan.steps)
        if n == 0:
            if before_wait is not None:
                before_wait()
            return
        steps = self._bind(plan, travel)
        numel = x.numel()

        def t(sp):  # a bound span: a workspace view, or (begin, end) in the user's tensor
            if type(sp) is tuple:
                return x if sp[0] == 0 and sp[1] == numel else x[sp[0]:sp[1]]
            return sp

        pg = self.pg
        posted: list = [None] * n
        waited = -1  # steps whose transfers have all completed
        pending_check = [before_wait]

        def wait_through(k: int) -> None:
            """Wait for the transfers of every step <= k (the header check first, once)."""
            nonlocal waited
            if k < 0:
                return
            if pending_check[0] is not None:
                check, pending_check[0] = pending_check[0], None
                check()
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
            if limit != saved_threads:
                torch.set_num_threads(saved_threads)


def _post_error(wait, what: str, e: BaseException, peer: int) -> BaseException:
    """The caller's error for a transfer gloo refused to post (``wait.on_error``), or ``e`` itself."""
    on_error = getattr(wait, "on_error", None)
    return e if on_error is None else on_error(what, e, peer)


def deadline_wait(deadline: float, on_error: Callable[[str, BaseException, Optional[int]], BaseException]):
    """A ``wait(work, what, step=-1, steps=0, peer=None)`` bounded by ``deadline`` (time.monotonic()); ``what``
    (and, for a plan's transfers, ``step`` of ``steps``) names the wait in the error, ``peer`` the rank the
    transfer is with (None: a collective or unknown). ``on_error(what, exception, peer)`` makes the error."""

    def wait(work, what: str, step: int = -1, steps: int = 0, peer: Optional[int] = None) -> None:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError("timed out: no time left before the call's deadline")
            work.wait(timedelta(seconds=remaining))
        except Exception as e:  # noqa: BLE001
            raise on_error(f"step {step} of {steps} ({what})" if step >= 0 else what, e, peer) from e

    wait.on_error = on_error  # posting errors take the same path (CpuExecutor: _post_error)
    return wait
