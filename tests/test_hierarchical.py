"""The hierarchical all-reduce plan (csrc/allreduce/hierarchical.h) in one process, with test_plans.py's simulator.

Node layouts are lists of ranks per node ([2, 2] = 2 nodes x 2 ranks, [3, 2] = uneven); the node map numbers nodes
in rank order. Every plan runs with the simulator's two extreme timings, against a float64 reference (exact on
small integers), bitwise across ranks, for every dtype, sum/avg, scale, found_inf and the compressed wire. The
compressed result is also checked bit for bit against the formula the issue asks for (node-partials summed exactly
in fp32 and rounded once, fp32 accumulation across nodes, the result rounded once), which proves that the
intra-node hops are exact and only the inter-node hop travels compressed. Also: the invariants (a reduction sums
at most max(ranks per node, nodes) inputs, aligned pieces), the choice predicate and explain_all_reduce's per-node
byte counts.
"""
import itertools

import pytest
import torch

import paracomm
from paracomm import _C
from test_plans import CODES, _data, simulate

DATA, WIRE, RECV, STAGE = 0, 1, 2, 4


def node_map(layout):
    return [m for m, k in enumerate(layout) for _ in range(k)]


def plans(layout, numel, dtype, wire, *, found_inf=False, final=False, chunk_bytes=0, algo="hierarchical",
          backend="gloo"):
    nm, world = node_map(layout), sum(layout)
    wire_code = -1 if wire is None else CODES[wire]
    return [_C.all_reduce_plan(numel, CODES[dtype], wire_code, world, r, algo, backend, found_inf, final, chunk_bytes,
                               nm) for r in range(world)]


EVEN = [[1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [2, 3], [2, 4], [3, 1], [3, 2], [3, 3], [3, 4], [4, 1], [4, 2],
        [4, 3], [4, 4]]
LAYOUTS = [[1]] + [[k] * m for m, k in EVEN] + [[2] * 8, [3, 2], [4, 1], [1, 3], [2, 1, 3]]
SIZES = (0, 1, 5, 37, 1000, 4099)


def _id(layout):
    return "+".join(map(str, layout))


@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
def test_hierarchical_reduces_exactly_and_identically(layout):
    world = sum(layout)
    for numel, dtype, timing in itertools.product(SIZES, CODES, ("early", "late")):
        if dtype != torch.float32 and numel not in (0, 5, 4099):
            continue
        if world > 8 and (numel not in (37, 4099) or dtype not in (torch.float32, torch.int64)):
            continue  # 16 simulated ranks are slow: the awkward sizes on two dtypes
        for op in ("sum", "avg") if dtype.is_floating_point else ("sum",):
            xs = _data(world, numel, dtype, integer=True)
            exact = sum(x.double() for x in xs)
            ps = plans(layout, numel, dtype, None, final=op == "avg")
            outs, _ = simulate(ps, xs, dtype=dtype, wire=None, divisor=float(world) if op == "avg" else 1.0,
                               timing=timing)
            for r, y in enumerate(outs):
                assert torch.equal(y, outs[0]), (layout, numel, dtype, op, timing, f"rank {r} differs")
            want = exact if op == "sum" else (exact / world).to(dtype).double()
            assert torch.equal(outs[0].double(), want), (layout, numel, dtype, op, timing)


def _hier_reference(xs, layout, wire, divisor, scale=1.0):
    """What hierarchical must return bit for bit with a compressed wire (the CPU op's formula, reduce.h):
    node-partials summed left to right in fp32 in local order and rounded to W once, summed in fp32 in node order,
    divided, scaled, rounded to W once."""
    nm = node_map(layout)
    total = None
    for m in range(len(layout)):
        part = None
        for r in (r for r in range(len(nm)) if nm[r] == m):
            part = xs[r].float().clone() if part is None else part + xs[r].float()
        part = part.to(wire).float()
        total = part if total is None else total + part
    if divisor != 1.0:
        total = total / divisor
    if scale != 1.0:
        total = total * scale
    return total.to(wire).float()


@pytest.mark.parametrize("layout", [[2, 2], [3, 3], [4, 2], [3, 2], [4, 1], [1, 4], [2] * 8, [2, 1, 3]], ids=_id)
def test_random_data_wire_scale_found_inf(layout):
    world, numel = sum(layout), 3001
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        xs = _data(world, numel, dtype, integer=False, seed=3)
        ref = sum(x.double() for x in xs) / world
        tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
        outs, _ = simulate(plans(layout, numel, dtype, None, final=True), xs, dtype=dtype, wire=None, divisor=world)
        assert all(torch.equal(y, outs[0]) for y in outs), (layout, dtype)
        assert ((outs[0].double() - ref).norm() / ref.norm()).item() < tol, dtype
    xs = _data(world, numel, torch.float32, integer=False, seed=4)
    scale = torch.tensor([0.5])
    for wire, chunk, timing in itertools.product((torch.float16, torch.bfloat16), (0, 256), ("early", "late")):
        ps = plans(layout, numel, torch.float32, wire, found_inf=True, final=True, chunk_bytes=chunk)
        outs, flags = simulate(ps, xs, dtype=torch.float32, wire=wire, divisor=world, scale=scale, found_inf=True,
                               timing=timing)
        assert all(torch.equal(y, outs[0]) for y in outs), (layout, wire, chunk)
        assert all(f.item() == 0.0 for f in flags)
        # Bit for bit the formula: exact intra-node sums, one rounding per node-partial, one for the result.
        assert torch.equal(outs[0], _hier_reference(xs, layout, wire, float(world), 0.5)), (layout, wire, chunk)
    for pos, bad in ((0, float("nan")), (numel // 2, float("inf")), (numel - 1, float("-inf"))):
        for wire in (None, torch.bfloat16):
            ys = [x.clone() for x in xs]
            ys[world - 1][pos] = bad
            _, flags = simulate(plans(layout, numel, torch.float32, wire, found_inf=True), ys, dtype=torch.float32,
                                wire=wire, found_inf=True)
            assert all(f.item() == 1.0 for f in flags), (layout, pos, wire)


def test_ring_among_many_nodes():
    """More than 8 nodes: phases B/C run as a ring over the nodes (2 inputs per reduction), still exact."""
    layout = [2] * 10
    world = sum(layout)
    for numel in (37, 4099):
        xs = _data(world, numel, torch.int64, integer=True)
        ps = plans(layout, numel, torch.int64, None)
        outs, _ = simulate(ps, xs, dtype=torch.int64, wire=None, timing="late")
        assert all(torch.equal(y, outs[0]) for y in outs)
        assert torch.equal(outs[0], sum(xs))
        for p in ps:
            assert max(len(red[1]) for _, _, reds in p["steps"] for red in reds) <= 2
    xs = _data(world, 3001, torch.float32, integer=False, seed=5)
    outs, _ = simulate(plans(layout, 3001, torch.float32, torch.bfloat16, final=True), xs, dtype=torch.float32,
                       wire=torch.bfloat16, divisor=world)
    assert all(torch.equal(y, outs[0]) for y in outs)
    ref = sum(x.double() for x in xs) / world
    assert ((outs[0].double() - ref).norm() / ref.norm()).item() < 1e-2  # the ring re-rounds at every node hop


def test_compressed_error_is_flat_in_world_size():
    """Normwise error of a compressed avg on random normal data: the issue's bounds at every layout, flat in N."""
    numel = 1 << 16
    for wire, bound in ((torch.bfloat16, 2.5e-3), (torch.float16, 3.1e-4)):
        errors = {}
        for layout in ([2, 2], [4, 4], [2, 2, 2, 2], [4] * 4, [2] * 8):
            world = sum(layout)
            xs = _data(world, numel, torch.float32, integer=False, seed=11)
            ref = sum(x.double() for x in xs) / world
            outs, _ = simulate(plans(layout, numel, torch.float32, wire, final=True), xs, dtype=torch.float32,
                               wire=wire, divisor=world, timing="late")
            errors[_id(layout)] = ((outs[0].double() - ref).norm() / ref.norm()).item()
        assert max(errors.values()) <= bound, (wire, errors)
        assert max(errors.values()) <= 1.1 * min(errors.values()), (wire, errors)


def test_plan_invariants():
    for layout, numel, wire in itertools.product(([2, 2], [4, 2], [3, 2], [4, 1], [2] * 8, [2] * 10),
                                                 (1, 1000, 1 << 16, 1_000_003), (None, torch.bfloat16)):
        nm = node_map(layout)
        most = max(max(layout), len(layout) if len(layout) <= 8 else 2)
        ps = plans(layout, numel, torch.float32, wire, found_inf=True)
        assert len({len(p["steps"]) for p in ps}) == 1
        for r, p in enumerate(ps):
            for i, (after, transfers, reductions) in enumerate(p["steps"]):
                assert -1 <= after < i
                for is_send, peer, buf, off, count in transfers:
                    assert count > 0 and 0 <= peer < len(nm) and peer != r
                    size = 4 if buf in (DATA, STAGE) or wire is None else 2
                    assert (off * size) % 128 == 0, (layout, numel, i, buf, off)
                    if wire is not None and nm[peer] != nm[r]:
                        assert buf in (WIRE, RECV), "across nodes only the wire dtype travels"
                    if wire is not None and buf == DATA:
                        assert nm[peer] == nm[r]
                for count, inputs, out, *_ in reductions:
                    assert count > 0 and 1 <= len(inputs) <= most, (layout, len(inputs))
            assert p["workspace_bytes"] >= p["stage_offset_bytes"] + p["stage_elems"] * 4 - 1
            if wire is None:
                assert p["stage_elems"] == 0  # uncompressed plans use the format every executor knew before


def test_choice_predicate():
    ex = paracomm.explain_all_reduce
    mib = 1 << 18  # float32 elements per MiB
    big = ex(64 * mib, torch.float32, 8, node_size=4, backend="gloo")
    assert big["algorithm"] == "hierarchical" and big["nodes"] == 2, big
    assert ex(64 * mib, torch.float32, 8, node_size=8)["algorithm"] == "direct"  # one node: the flat choice
    assert ex(64 * mib, torch.float32, 8, node_size=1)["algorithm"] == "direct"  # one rank per node: flat
    assert ex(256, torch.float32, 8, node_size=4)["algorithm"] == "one_shot"  # latency-bound
    assert ex(64 * mib, torch.float32, 16, node_size=8)["algorithm"] == "hierarchical"
    assert ex(64 * mib, torch.float32, 64, node_size=8)["algorithm"] == "hierarchical"  # past the flat 32-rank limit
    wide = ex(64 * mib, torch.float32, 80, node_size=40)  # a node of 40 ranks: phase A cannot sum them
    assert wide["algorithm"] == "ring" and "32" in wide["choice_reason"], wide
    many = ex(64 * mib, torch.float32, 40, node_size=2)  # 20 nodes: a ring among them
    assert many["algorithm"] == "hierarchical" and "ring" in many["choice_reason"], many
    direct_nodes = ex(64 * mib, torch.float32, 16, node_size=2)
    assert many["inter_node_steps"] > direct_nodes["inter_node_steps"]
    assert ex(64 * mib, torch.float32, 8)["algorithm"] == "direct"  # no node_size: as before
    with pytest.raises(ValueError, match="node_size"):
        ex(10, torch.float32, 8, node_size=0)
    with pytest.raises(TypeError, match="node_size"):
        ex(10, torch.float32, 8, node_size="4")
    with pytest.raises(ValueError, match="node_size"):
        ex(10, torch.float32, 8, node_size=16)


def test_explain_inter_node_bytes():
    """The issue's target: 64 Mi fp32 elements, 16 ranks as 2 x 8, bf16 wire: <= 16.8 MiB per rank between nodes."""
    ex = paracomm.explain_all_reduce
    numel, size = 64 << 20, (64 << 20) * 4
    hier = ex(numel, torch.float32, 16, node_size=8, wire_dtype=torch.bfloat16)
    assert hier["algorithm"] == "hierarchical"
    assert hier["inter_node_bytes"] <= 16.8 * (1 << 20), hier
    assert hier["inter_node_bytes"] == 2 * 1 * (size // 8) // 2 // 2  # 2(M-1)/M x S/K in the 2-byte wire
    exact = ex(numel, torch.float32, 16, node_size=8)
    assert exact["inter_node_bytes"] == 2 * hier["inter_node_bytes"]
    assert exact["intra_node_bytes"] == 2 * 7 * size // 8  # phase A: 7 columns out, phase D: one column to 7
    ring = ex(numel, torch.float32, 16, node_size=8, algorithm="ring")
    assert ring["inter_node_bytes"] == 2 * 15 * size // 16  # 480 MiB: the flat ring's busiest rank, all fp32
    for key in ("nodes", "inter_node_bytes", "intra_node_bytes", "inter_node_steps", "choice_reason"):
        assert key in hier
    assert "nodes" not in ex(numel, torch.float32, 16)


def test_bad_node_maps_raise():
    for nm, match in (([0, 1], "world_size"), ([1, 0, 0, 0], "first appearance"), ([0, 2, 1, 1], "first appearance"),
                      ([0, -1, 0, 0], "first appearance")):
        with pytest.raises(RuntimeError, match=match):
            _C.all_reduce_plan(10, 0, -1, 4, 0, "hierarchical", "gloo", False, False, 0, nm)
    # A node of 33 ranks cannot be reduced in one phase-A reduction.
    with pytest.raises(RuntimeError, match="33 ranks"):
        _C.all_reduce_plan(10, 0, -1, 34, 0, "hierarchical", "gloo", False, False, 0, [0] * 33 + [1])


# ---------------------------------------------------------------------------------------------------------------
# reduce_scatter / all_gather (nodes of equal size)
# ---------------------------------------------------------------------------------------------------------------

EQUAL = [[2, 2], [3, 3], [2, 2, 2], [4, 4], [2] * 4, [1, 1, 1], [3] * 2 + [3]]


def coll_plans(collective, layout, numel, dtype, wire, *, found_inf=False, final=False, chunk_bytes=0,
               algo="hierarchical"):
    nm, world = node_map(layout), sum(layout)
    wire_code = -1 if wire is None else CODES[wire]
    return [_C.collective_plan(collective, numel, CODES[dtype], wire_code, world, r, algo, "gloo", found_inf, final,
                               chunk_bytes, nm) for r in range(world)]


@pytest.mark.parametrize("layout", EQUAL, ids=_id)
def test_hierarchical_reduce_scatter_and_all_gather_exact(layout):
    world = sum(layout)
    for numel, dtype, timing, chunk in itertools.product((0, 1, 5, 37, 1000, 4099), CODES, ("early", "late"),
                                                         (0, 256)):
        if (dtype != torch.float32 and numel not in (0, 5, 4099)) or (chunk and numel < 1000):
            continue
        for op in ("sum", "avg") if dtype.is_floating_point else ("sum",):
            xs = _data(world, world * numel, dtype, integer=True, seed=numel)
            ps = coll_plans("reduce_scatter", layout, numel, dtype, None, final=op == "avg", chunk_bytes=chunk)
            outs, _ = simulate(ps, xs, dtype=dtype, wire=None, divisor=float(world) if op == "avg" else 1.0,
                               timing=timing)
            for r, y in enumerate(outs):
                exact = sum(x[r * numel:(r + 1) * numel].double() for x in xs)
                want = exact if op == "sum" else (exact / world).to(dtype).double()
                assert torch.equal(y.double(), want), (layout, numel, dtype, op, timing, chunk, r)
        xs = _data(world, numel, dtype, integer=False, seed=numel + 1)
        outs, _ = simulate(coll_plans("all_gather", layout, numel, dtype, None), xs, dtype=dtype, wire=None,
                           timing=timing)
        want = torch.cat(xs) if world * numel else torch.empty(0, dtype=dtype)
        assert all(torch.equal(y, want) for y in outs), (layout, numel, dtype, timing)


@pytest.mark.parametrize("layout", [[2, 2], [4, 4], [2] * 4, [4] * 4, [2] * 8], ids=_id)
def test_hierarchical_reduce_scatter_compressed(layout):
    """bf16/fp16 on the inter-node hop only: exact node-partials rounded once, summed in fp32 in node order (never
    rounded after: nothing travels), so the shard is bit for bit that formula; the error is within the bounds."""
    world, numel = sum(layout), 3001
    nm = node_map(layout)
    xs = _data(world, world * numel, torch.float32, integer=False, seed=7)
    scale = torch.tensor([0.5])
    for wire, bound in ((torch.bfloat16, 2.5e-3), (torch.float16, 3.1e-4)):
        ps = coll_plans("reduce_scatter", layout, numel, torch.float32, wire, found_inf=True, final=True)
        outs, flags = simulate(ps, xs, dtype=torch.float32, wire=wire, divisor=world, scale=scale, found_inf=True)
        assert all(f.item() == 0.0 for f in flags)
        for r, y in enumerate(outs):
            seg = [x[r * numel:(r + 1) * numel] for x in xs]
            total = None
            for m in range(len(layout)):
                part = None
                for p in (p for p in range(world) if nm[p] == m):
                    part = seg[p].clone() if part is None else part + seg[p]
                part = part.to(wire).float()
                total = part if total is None else total + part
            assert torch.equal(y, total / world * 0.5), (layout, wire, r)
            ref = sum(s.double() for s in seg) / world * 0.5
            assert ((y.double() - ref).norm() / ref.norm()).item() <= bound
        for p in ps:  # only the wire dtype crosses nodes; intra-node hops send the input (T)
            me = ps.index(p)
            for _, transfers, _ in p["steps"]:
                for is_send, peer, buf, _, _ in transfers:
                    if is_send:
                        assert (buf == WIRE) == (nm[peer] != nm[me]), (layout, me, peer, buf)


def test_hierarchical_collectives_choice_and_refusals():
    nm = node_map([4, 4])
    big = 1 << 20
    for coll in ("reduce_scatter", "all_gather"):
        p = _C.collective_plan(coll, big, 0, -1, 8, 0, "auto", "gloo", False, False, 0, nm)
        assert p["algorithm"] == "hierarchical", coll
        assert _C.collective_plan(coll, big, 0, -1, 8, 0, "auto", "gloo", False, False, 0, [])["algorithm"] != \
            "hierarchical"
        uneven = node_map([3, 2])
        assert _C.collective_plan(coll, big, 0, -1, 5, 0, "auto", "gloo", False, False, 0, uneven)["algorithm"] != \
            "hierarchical"
        with pytest.raises(RuntimeError, match="equal size"):
            _C.collective_plan(coll, big, 0, -1, 5, 0, "hierarchical", "gloo", False, False, 0, uneven)
    # Bytes across nodes: the hierarchical all-gather sends (M - 1) n per rank, the flat direct (N - K) n.
    def inter(algo):
        s = _C.plan_summary(big, 0, -1, 8, 0, algo, "gloo", False, False, 0, "all_gather", node_map=nm)
        return s["inter_node_bytes"]
    assert inter("hierarchical") == big * 4 and inter("direct") == 4 * big * 4


# ---------------------------------------------------------------------------------------------------------------
# The flat ring under a node map that is not contiguous (issue 19, item 4): node by node
# ---------------------------------------------------------------------------------------------------------------

# Canonical maps (nodes numbered by first appearance) whose nodes interleave in rank order.
INTERLEAVED = [[0, 1, 0, 1], [0, 1, 1, 0], [0, 1, 2, 0, 1, 2], [0, 0, 1, 0, 1, 1], [0, 1, 0, 2, 1], [0, 1, 0]]


def _map_id(nm):
    return "".join(map(str, nm))


def _expected_order(nm):
    return sorted(range(len(nm)), key=lambda r: (nm[r], r))


def test_ring_order_is_a_node_by_node_permutation():
    assert _C.ring_order([], 5) == [0, 1, 2, 3, 4]
    assert _C.ring_order([0, 0, 1, 1], 4) == [0, 1, 2, 3]  # contiguous: the identity (plans unchanged)
    assert _C.ring_order([0, 1, 0, 1], 4) == [0, 2, 1, 3]
    assert _C.ring_order([0, 1, 2, 0, 1, 2], 6) == [0, 3, 1, 4, 2, 5]
    g = torch.Generator().manual_seed(19)
    for _ in range(200):
        world = int(torch.randint(1, 17, (1,), generator=g))
        labels = torch.randint(0, int(torch.randint(1, 5, (1,), generator=g)), (world,), generator=g).tolist()
        nm = paracomm._topology.canonical_node_map(labels)
        order = _C.ring_order(nm, world)
        assert sorted(order) == list(range(world))
        assert order == _expected_order(nm)  # nodes in order, ranks of a node ascending
        nodes = len(set(nm))
        hops = sum(nm[order[p]] != nm[order[(p + 1) % world]] for p in range(world))
        assert hops == (nodes if nodes > 1 else 0)  # one crossing per node, the fewest a ring can have
    with pytest.raises(RuntimeError, match="first appearance"):
        _C.ring_order([1, 0], 2)


def _map_plans(collective, nm, numel, dtype, wire, algo, *, found_inf=False, final=False, chunk_bytes=0):
    wire_code = -1 if wire is None else CODES[wire]
    return [_C.collective_plan(collective, numel, CODES[dtype], wire_code, len(nm), r, algo, "gloo", found_inf, final,
                               chunk_bytes, nm) for r in range(len(nm))]


@pytest.mark.parametrize("nm", INTERLEAVED, ids=_map_id)
def test_ring_follows_the_node_order_and_crosses_nodes_once_per_node(nm):
    world, order = len(nm), _expected_order(nm)
    pos = {r: p for p, r in enumerate(order)}
    for collective in ("all_reduce", "reduce_scatter", "all_gather"):
        for r, p in enumerate(_map_plans(collective, nm, 4099, torch.float32, None, "ring")):
            peers = {(is_send, peer) for _, transfers, _ in p["steps"] for is_send, peer, *_ in transfers}
            next_rank, prev_rank = order[(pos[r] + 1) % world], order[(pos[r] - 1) % world]
            assert peers == {(True, next_rank), (False, prev_rank)}, (collective, nm, r, peers)
    summary = paracomm.explain_all_reduce(1 << 20, torch.float32, world, algorithm="ring", node_map=nm)
    assert summary["ring_order"] == order
    assert summary["ring_inter_node_hops"] == len(set(nm))
    # The contiguous map of the same node sizes: same plan size, identity order.
    sizes = sorted(nm.count(m) for m in set(nm))
    contiguous = [m for m, k in enumerate(sizes) for _ in range(k)]
    same = paracomm.explain_all_reduce(1 << 20, torch.float32, world, algorithm="ring", node_map=contiguous)
    assert same["ring_order"] == list(range(world))
    assert same["ring_inter_node_hops"] == summary["ring_inter_node_hops"]
    assert summary["inter_node_bytes"] == same["inter_node_bytes"]
    # Before: rank order around the ring crossed between nodes at every hop where the map changes.
    assert summary["ring_inter_node_hops"] <= sum(nm[r] != nm[(r + 1) % world] for r in range(world))


@pytest.mark.parametrize("nm", INTERLEAVED, ids=_map_id)
def test_ring_all_reduce_exact_and_identical_with_interleaved_nodes(nm):
    world = len(nm)
    for numel, dtype, timing in itertools.product((1, 37, 4099), CODES, ("early", "late")):
        if dtype != torch.float32 and numel != 4099:
            continue
        for op in ("sum", "avg") if dtype.is_floating_point else ("sum",):
            xs = _data(world, numel, dtype, integer=True, seed=numel)
            exact = sum(x.double() for x in xs)
            ps = _map_plans("all_reduce", nm, numel, dtype, None, "ring", final=op == "avg", chunk_bytes=256)
            outs, _ = simulate(ps, xs, dtype=dtype, wire=None, divisor=float(world) if op == "avg" else 1.0,
                               timing=timing)
            assert all(torch.equal(y, outs[0]) for y in outs), (nm, numel, dtype, op, timing)
            want = exact if op == "sum" else (exact / world).to(dtype).double()
            assert torch.equal(outs[0].double(), want), (nm, numel, dtype, op, timing)
    # Random data against a float64 reference, the compressed wire, scale and found_inf.
    xs = _data(world, 3001, torch.float32, integer=False, seed=7)
    ref = sum(x.double() for x in xs) / world * 0.5
    for wire in (None, torch.float16, torch.bfloat16):
        ps = _map_plans("all_reduce", nm, 3001, torch.float32, wire, "ring", found_inf=True, final=True)
        outs, flags = simulate(ps, xs, dtype=torch.float32, wire=wire, divisor=world, scale=torch.tensor([0.5]),
                               found_inf=True)
        assert all(torch.equal(y, outs[0]) for y in outs), (nm, wire)
        tol = {None: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[wire]
        assert ((outs[0].double() - ref).norm() / ref.norm()).item() < tol, (nm, wire)
        assert all(f.item() == 0.0 for f in flags)
    ys = [x.clone() for x in xs]
    ys[world - 1][1500] = float("inf")
    _, flags = simulate(_map_plans("all_reduce", nm, 3001, torch.float32, None, "ring", found_inf=True), ys,
                        dtype=torch.float32, wire=None, found_inf=True)
    assert all(f.item() == 1.0 for f in flags)


@pytest.mark.parametrize("nm", INTERLEAVED, ids=_map_id)
def test_ring_reduce_scatter_and_all_gather_with_interleaved_nodes(nm):
    world = len(nm)
    for numel, dtype, timing in itertools.product((5, 1000), (torch.float32, torch.int64, torch.bfloat16),
                                                  ("early", "late")):
        xs = _data(world, world * numel, dtype, integer=True, seed=numel)
        exact = [sum(x[r * numel:(r + 1) * numel].double() for x in xs) for r in range(world)]
        outs, _ = simulate(_map_plans("reduce_scatter", nm, numel, dtype, None, "ring", chunk_bytes=256), xs,
                           dtype=dtype, wire=None, timing=timing)
        for r, y in enumerate(outs):
            assert torch.equal(y.double(), exact[r]), (nm, numel, dtype, timing, r)  # rank r gets segment r
        ins = _data(world, numel, dtype, integer=False, seed=numel + 1)
        outs, _ = simulate(_map_plans("all_gather", nm, numel, dtype, None, "ring", chunk_bytes=256), ins,
                           dtype=dtype, wire=None, timing=timing)
        assert all(torch.equal(y, torch.cat(ins)) for y in outs), (nm, numel, dtype, timing)
    xs = _data(world, world * 3001, torch.float32, integer=False, seed=9)
    ref = [sum(x[r * 3001:(r + 1) * 3001].double() for x in xs) for r in range(world)]
    outs, _ = simulate(_map_plans("reduce_scatter", nm, 3001, torch.float32, torch.bfloat16, "ring"), xs,
                       dtype=torch.float32, wire=torch.bfloat16)
    for r, y in enumerate(outs):
        assert ((y.double() - ref[r]).norm() / ref[r].norm()).item() < 1.5e-2, (nm, r)


@pytest.mark.parametrize("nm", [[0, 1, 0, 1], [0, 1, 1, 0], [0, 1, 2, 0, 1, 2], [0, 0, 1, 0, 1, 1]], ids=_map_id)
def test_hierarchical_with_interleaved_nodes_exact_and_identical(nm):
    world = len(nm)
    for numel, dtype in itertools.product((37, 4099), (torch.float32, torch.int64)):
        xs = _data(world, numel, dtype, integer=True, seed=numel)
        ps = _map_plans("all_reduce", nm, numel, dtype, None, "hierarchical")
        outs, _ = simulate(ps, xs, dtype=dtype, wire=None, timing="late")
        assert all(torch.equal(y, outs[0]) for y in outs), (nm, numel, dtype)
        assert torch.equal(outs[0].double(), sum(x.double() for x in xs)), (nm, numel, dtype)


def test_explain_node_map_argument_is_checked():
    ex = paracomm.explain_all_reduce
    with pytest.raises(ValueError, match="node_size or node_map"):
        ex(10, torch.float32, 4, node_size=2, node_map=[0, 1, 0, 1])
    for bad in ([0, 1], "0101", [0, 1, 0, True], [0.0, 1, 0, 1]):
        with pytest.raises(ValueError, match="node_map"):
            ex(10, torch.float32, 4, node_map=bad)
    # Any labels: canonicalised (numbered by first appearance).
    assert ex(1 << 20, torch.float32, 4, algorithm="ring", node_map=[7, 3, 7, 3])["ring_order"] == [0, 2, 1, 3]
