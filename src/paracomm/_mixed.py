"""The mixed CPU transport: shared memory inside each node, paracomm's gloo between nodes.

``PARACOMM_CPU_TRANSPORT=auto`` picks it when the group spans several hosts and every node of the node map
(paracomm._topology) is one host holding the same number K >= 2 of ranks (real nodes, or the namespaces of an
emulated cluster); ``mixed`` asks for it whatever the placement allows (one host split by ``PARACOMM_NODE_SIZE``:
how the tests run it) and raises when a node spans hosts. :func:`mixed_refusal` is that decision, a pure function.

What runs where (:class:`MixedExecutor`):

* a **hierarchical all-reduce** (the algorithm the whole group's plan resolves to: ``auto`` on several nodes, or
  asked for) runs as three calls of existing plans, one after another:

  A. a ``direct`` reduce-scatter of the tensor over the node's shared memory: the rank of local index l keeps
     shard l, the sum of the node's K contributions in local-index order (the node-partial), exact;
  B. a ``direct`` all-reduce of that shard over gloo among the M ranks with local index l, one per node, in node
     order (a ring beyond the hierarchical plan's direct limit, ``_C.inter_node_ring``), in pieces of
     :func:`stage_chunk_bytes`: the divisor, the scale
     and the wire dtype apply there, so a compressed call rounds each node-partial once, accumulates in fp32
     and rounds the result once: the inter-node hop is the only compressed one;
  C. an all-gather of the shards over the node's shared memory (exact: the shards already hold the result);

  then found_inf, when asked, is set from one pass over the whole result on every rank. Every element is summed
  in the hierarchical plan's order (local index within the node, then node order, fp32 accumulation), so the
  result has the gloo transport's bits: tests/test_mixed.py compares them. Pipelining between the stages is
  given up: on shared memory A and C take ~0.1 ms per MiB, where the shaped inter-node link takes ~8 ms;
* a **hierarchical reduce-scatter** (input: N segments): stage A reduce-scatters, over the node's shared
  memory, the input's rows regrouped so that block l holds the M segments the ranks of local index l own (one
  per node, in node order: :meth:`MixedExecutor._block_order`); stage B reduce-scatters block l among the M
  ranks of local index l over gloo, with the final fusions, the wire dtype and found_inf (each rank checks its
  segment, as the plan does). A **hierarchical all-gather** is the reverse: across nodes first (block l, a ring
  in pieces of :func:`stage_chunk_bytes`), then inside the node, then every row to its rank's place. Both give
  the hierarchical plans' bits;
* everything else (other algorithms, empty calls) runs on ``flat``, the whole group's gloo executor, exactly as
  the gloo transport runs it.

Failures: a peer's death or a timeout in any stage raises the Communicator's transport error; the monitor
(paracomm._monitor) sees the whole call (the outer signature and seq), so a signature mismatch between nodes
raises on every rank as on gloo. A mismatch inside a node is found by the shared-memory stage before any data
moves.
"""
from __future__ import annotations

from datetime import timedelta
from typing import List, Optional, Sequence

import torch

from . import _C
from ._cpu_executor import CpuExecutor
from ._shm import ShmExecutor


def node_members(node_map: Sequence[int]) -> List[List[int]]:
    """node -> its ranks in rank order (= by local index), for a canonical node map ([] = one node of none)."""
    members: List[List[int]] = [[] for _ in range((max(node_map) + 1) if len(node_map) else 1)]
    for r, m in enumerate(node_map):
        members[m].append(r)
    return members


def mixed_refusal(node_map: Sequence[int], identities: Sequence[str]) -> Optional[str]:
    """Why the mixed transport cannot serve this group (None when it can). ``node_map``: rank -> node
    (canonical, every rank's entry; [] or all zeros for one node); ``identities``: each rank's host identity
    (paracomm._topology.host_identity). A pure function of both, so every rank reaches the same answer."""
    members = node_members(node_map)
    if len(members) < 2:
        return "the group is on one node"
    sizes = [len(ms) for ms in members]
    if len(set(sizes)) != 1:
        return f"its nodes have different numbers of ranks ({'+'.join(map(str, sizes))})"
    if sizes[0] < 2:
        return "every node has one rank (nothing to share memory with)"
    for m, ms in enumerate(members):
        if len({identities[r] for r in ms}) != 1:
            return f"node {m}'s ranks ({', '.join(map(str, ms))}) are not all on one host"
    return None


def stage_shard(numel: int, node_size: int) -> int:
    """Elements of each rank's shard in stage A (ceil(numel / K)); the last shards cover padding when K does not
    divide numel."""
    return -(-numel // node_size)


# Stage B's piece (bytes of the travel dtype) unless PARACOMM_CHUNK_BYTES is set. Measured on the emulated 2 x 2
# cluster at 1 Gbit/s (bench/NOTES.md, issue 19 round 2): one piece per peer (the direct plan's gloo default)
# ran 64 MiB at half the link's rate; 512 KiB pieces (the hierarchical plan's) reached it from 8 MiB up but not
# at 2-4 MiB (1.20-1.34x gloo); 128 KiB pieces kept the link busy at every size from 1 MiB (1.42-1.51x).
STAGE_B_PIECE_BYTES = 128 * 1024


def stage_chunk_bytes(chunk_bytes: int) -> int:
    """Stage B's piece size: PARACOMM_CHUNK_BYTES when set (``chunk_bytes`` > 0), else
    :data:`STAGE_B_PIECE_BYTES`. Small pieces keep a shaped link busy: the direct plan overlaps piece c's
    all-gather and piece c+1's exchange, and a TCP flow never goes idle long enough to restart slowly."""
    return chunk_bytes if chunk_bytes > 0 else STAGE_B_PIECE_BYTES


def _in_group_ranks(wait, ranks: Sequence[int]):
    """``wait`` (paracomm._cpu_executor.deadline_wait) for stage B: its errors name the peer by its rank in the
    Communicator's group (``ranks[peer]``), not in the inter-node group, and say which stage failed."""

    def stage_wait(work, what: str, step: int = -1, steps: int = 0, peer: Optional[int] = None) -> None:
        wait(work, f"the inter-node stage: {what}" if step < 0 else f"{what}, the inter-node stage", step, steps,
             None if peer is None else ranks[peer])

    stage_wait.on_error = lambda what, e, peer: wait.on_error(f"the inter-node stage: {what}", e,
                                                              None if peer is None else ranks[peer])
    return stage_wait


class MixedExecutor:
    """The executors of the mixed transport (module docstring) for one Communicator.

    Args:
        store, prefix, rank, world_size, timeout: as :class:`paracomm._cpu_executor.CpuExecutor`'s.
        node_map: rank -> node, canonical; :func:`mixed_refusal` must have returned None for it.

    Creating it is collective: the whole group's gloo group first, then the node's shared memory (its ranks
    only), then the gloo group of the ranks with this rank's local index (one per node).
    """

    transport = "mixed"

    def __init__(self, store, prefix: str, rank: int, world_size: int, timeout: timedelta,
                 node_map: Sequence[int]):
        members = node_members(node_map)
        nodes, node = len(members), node_map[rank]
        self.world_size = world_size
        self.nodes, self.node_size = nodes, len(members[node])
        self.node_index, self.local_index = node, members[node].index(rank)
        self.members = members[node]  # this node's ranks by local index
        self.all_members = members  # node -> its ranks by local index
        self._order = None  # _block_order(), made on first use
        self.cross_ranks = [ms[self.local_index] for ms in members]  # stage B's group: its ranks by node
        self.cross_algorithm = "ring" if _C.inter_node_ring(nodes) else "direct"
        self.flat = CpuExecutor(store, prefix, rank, world_size, timeout)
        self.node = ShmExecutor(store, f"{prefix}/node{node}", self.local_index, self.node_size, timeout)
        self.cross = CpuExecutor(store, f"{prefix}/cross{self.local_index}", node, nodes, timeout)
        self._shard = torch.empty(0)
        self._padded = torch.empty(0)
        self.composed = 0  # calls run as the three stages (the rest ran on flat): for tests and benchmarks

    def composes(self, call, algorithm: str) -> bool:
        """Whether ``call`` runs in stages (:meth:`run`; else on :attr:`flat`); ``algorithm``: what the whole
        group's plan resolved the call's algorithm to."""
        return algorithm == "hierarchical" and call.plan_numel > 0

    def _buffer(self, name: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """A reused workspace of at least ``numel`` elements of ``dtype`` (``name``: _shard or _padded)."""
        buf = getattr(self, name)
        if buf.dtype != dtype or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype)
            setattr(self, name, buf)
        return buf[:numel]

    def run(self, call, signature: tuple, deadline: float, wait, cross_plan, mismatch_error, on_error) -> None:
        """Run a call :meth:`composes` accepted, in the stages of the module docstring.

        ``cross_plan(stage_call)`` returns the inter-node stage's plan (a PreparedPlan) for this rank of the
        M-rank inter-node group and the data tags' base; ``wait``, ``mismatch_error`` and ``on_error`` are the
        transports' (see :meth:`ShmExecutor.run` and :meth:`CpuExecutor.run`); errors name group ranks.
        """
        self.composed += 1

        def node_error(what: str, e: BaseException, peer: Optional[int]) -> BaseException:
            # The shared memory numbers the node's ranks by local index; the caller's errors use group ranks.
            return on_error(f"{what} inside the node", e, None if peer is None else self.members[peer])

        def on_node(stage_call, stage: str) -> None:
            prepared = self.node.prepared(stage_call, signature, stage_call.chunk_bytes,
                                          key=(stage, stage_call.collective, stage_call.plan_numel) + signature)
            self.node.run(stage_call, prepared, deadline, mismatch_error, node_error)

        def across(stage_call, output, input=None) -> None:
            plan, tag_base = cross_plan(stage_call)
            travel = call.wire_dtype if call.wire_dtype is not None else output.dtype
            self.cross.run(plan, output, travel=travel, divisor=stage_call.divisor, scale=stage_call.scale,
                           found_inf=stage_call.found_inf, wire_dtype=stage_call.wire_dtype,
                           wait=_in_group_ranks(wait, self.cross_ranks), tag_base=tag_base, input=input)

        {"all_reduce": self._all_reduce, "reduce_scatter": self._reduce_scatter,
         "all_gather": self._all_gather}[call.collective](call, on_node, across)

    def _stage(self, flat, collective: str, algorithm: str, chunk_bytes: int, input=None, call=None,
               found_inf=None):
        """A stage's call: exact (sum, no wire, no final op) unless ``call`` lends its op, divisor, wire dtype
        and scale (the inter-node stage, where the hierarchical plan applies them; ``found_inf`` there too when
        the plan checks in that stage)."""
        from .comm import _Call  # a runtime import: comm imports this module

        if call is None:
            return _Call(flat, None, None, "sum", 1.0, None, None, None, algorithm, collective, chunk_bytes,
                         input=input)
        return _Call(flat, None, None, call.op, call.divisor, call.wire_dtype, call.scale, found_inf, algorithm,
                     collective, stage_chunk_bytes(call.chunk_bytes), input=input)

    def _all_reduce(self, call, on_node, across) -> None:
        x = call.flat
        n, k = x.numel(), self.node_size
        shard_n = stage_shard(n, k)
        if shard_n * k == n:
            whole = x
        else:  # padding: zeros reduce to zeros and are never copied back
            whole = self._buffer("_padded", x.dtype, shard_n * k)
            whole[:n].copy_(x)
            whole[n:].zero_()
        shard = self._buffer("_shard", x.dtype, shard_n)
        # A: the node-partial of shard l, summed in local-index order (direct: each owner sums the K inputs).
        on_node(self._stage(shard, "reduce_scatter", "direct", call.chunk_bytes, input=whole), "A")
        # B: across nodes, in node order, with the call's final fusions and wire dtype.
        across(self._stage(shard, "all_reduce", self.cross_algorithm, 0, call=call), shard)
        # C: every rank of the node gets every shard (copies only).
        on_node(self._stage(whole, "all_gather", "auto", call.chunk_bytes, input=shard), "C")
        if whole is not x:
            x.copy_(whole[:n])
        if call.found_inf is not None:  # the plan's last pass: every rank checks the whole result
            from ._ops import reduce_

            reduce_(x, [x], found_inf=call.found_inf)

    def _reduce_scatter(self, call, on_node, across) -> None:
        # Input: N segments of n. Rank (m, l) ends with segment members[m][l] summed over every rank. Stage A
        # reduces, inside the node, the M segments that the ranks of local index l own (one per node), laid
        # out as block l = [segment of cross rank 0, ..., of cross rank M-1] (a gather of the input's rows);
        # stage B reduce-scatters that block among the M ranks of local index l, in node order, with the final
        # fusions (and found_inf: each rank checks its own segment, as the plan does).
        out, n = call.flat, call.flat.numel()
        rows = call.input.view(self.world_size, n)
        arranged = self._buffer("_padded", out.dtype, self.world_size * n).view(self.world_size, n)
        torch.index_select(rows, 0, self._block_order(), out=arranged)
        block = self._buffer("_shard", out.dtype, self.nodes * n)
        on_node(self._stage(block, "reduce_scatter", "direct", call.chunk_bytes, input=arranged.view(-1)), "A")
        across(self._stage(out, "reduce_scatter", "direct", 0, input=block, call=call, found_inf=call.found_inf),
               out, input=block)

    def _all_gather(self, call, on_node, across) -> None:
        # The reverse: gather the M segments of this local index across nodes (block l), then the K blocks
        # inside the node, then put every row where its rank's segment goes.
        out, n = call.flat, call.input.numel()
        block = self._buffer("_shard", out.dtype, self.nodes * n)
        # A ring, not direct: the direct all-gather is one transfer per peer whatever the piece size, and one
        # large gloo transfer crawls over a shaped link (stage B's pieces); the ring's pieces all go out at
        # once. (Copies only: any algorithm gives these bits.)
        across(self._stage(block, "all_gather", "ring", 0, input=call.input, call=call), block,
               input=call.input)
        arranged = self._buffer("_padded", out.dtype, self.world_size * n)
        on_node(self._stage(arranged, "all_gather", "auto", call.chunk_bytes, input=block), "C")
        out.view(self.world_size, n).index_copy_(0, self._block_order(), arranged.view(self.world_size, n))

    def _block_order(self) -> torch.Tensor:
        """Row i of the stages' K x M layout holds the segment of rank order[i]: local index i // M of node i % M
        (block l = the segments of the ranks of local index l, in node order)."""
        if self._order is None:
            self._order = torch.tensor([self.all_members[m][l] for l in range(self.node_size)
                                        for m in range(self.nodes)], dtype=torch.int64)
        return self._order

    def wait_stats(self) -> dict:
        """The node's shared-memory waits (:meth:`ShmExecutor.wait_stats`)."""
        return self.node.wait_stats()

    def interrupt(self) -> None:
        """Abort the running call's gloo transfers and fail the node's shared memory (its peers raise): the
        caller replaces the executor afterwards, as the gloo transport's (CpuExecutor.interrupt)."""
        self.flat.interrupt()
        self.cross.interrupt()
        self.node.fail()

    def abort(self) -> None:
        """Abort all three (the Communicator failed). Idempotent."""
        self.flat.abort()
        self.cross.abort()
        self.node.abort()
