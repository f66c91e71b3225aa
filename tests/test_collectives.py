"""paracomm.reduce_scatter / paracomm.all_gather on real processes over gloo (docs/ARCHITECTURE.md,
"Reduce-scatter and all-gather").

The big matrix (every algorithm x N = 1-8 x awkward sizes x every dtype x sum/avg/scale, both timings) runs in
process through the plan simulator (tests/test_plans.py); here a representative matrix runs on real ranks: one
spawn per world size, every case inside it. Each rank regenerates every rank's input from seeds, so it checks
its own result against a float64 reference without communicating (exact for integers, which every dtype sums
exactly at these magnitudes). Bitwise: all-gather outputs are identical on every rank; the direct and one_shot
reduce-scatter sum in the same rank order, so their shards are identical; a repeated call gives the same bits.
"""
import hashlib
import itertools

import pytest
import torch

from dist_utils import run_ranks

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64)
SIZES = (0, 1, 37, 4099)  # 37 odd, 4099 x 4 B not a multiple of 128 B
BIG = 1 << 20  # ~1e6 elements per rank, float32 only


def _input(rank, numel, dtype, integer, seed=0):
    g = torch.Generator().manual_seed(7919 * rank + 31 * numel + seed)
    if integer or not dtype.is_floating_point:
        return torch.randint(-8, 9, (numel,), generator=g).to(dtype)
    return torch.randn(numel, generator=g, dtype=torch.float64).to(dtype)


def _digest(t):
    return hashlib.sha1(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() if t.numel() else ""


def _rs_cases(world):
    sizes = SIZES + ((BIG,) if world in (2, 4) else ())
    for numel, dtype, algo in itertools.product(sizes, DTYPES, ("ring", "direct", "one_shot")):
        if numel == BIG and dtype != torch.float32:
            continue
        if dtype not in (torch.float32, torch.int64) and numel not in (37, 4099):
            continue
        ops = ("sum", "avg", "scale") if dtype.is_floating_point else ("sum",)
        for op in ops:
            yield numel, dtype, algo, op


def _reduce_scatter_ranks(rank, world):
    import paracomm

    failures, digests = [], {}
    scale = torch.tensor([0.375])
    for i, (numel, dtype, algo, op) in enumerate(_rs_cases(world)):
        integer = op == "sum"  # sums of small integers are exact in every dtype: the result must be exact
        seed = 10 * DTYPES.index(dtype) + ("sum", "avg", "scale").index(op)  # the same data for every algorithm
        xs = [_input(r, world * numel, dtype, integer, seed=seed) for r in range(world)]
        exact = sum(x[rank * numel:(rank + 1) * numel].double() for x in xs)
        want = {"sum": exact, "avg": exact / world, "scale": exact * 0.375}[op]
        out = torch.full((numel,), 99, dtype=dtype)
        inp = xs[rank].clone()
        kwargs = dict(scale=scale) if op == "scale" else {}
        async_op = i % 2 == 1
        result = paracomm.reduce_scatter(out, inp, "avg" if op == "avg" else "sum", algorithm=algo,
                                         async_op=async_op, **kwargs)
        if async_op:
            result = result.wait()
        if result is not out:
            failures.append(("result is not output", numel, dtype, algo, op))
        if not torch.equal(inp, xs[rank]):
            failures.append(("input modified", numel, dtype, algo, op))
        if integer:
            ok = torch.equal(out.double(), want)
        else:
            tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
            ok = bool(((out.double() - want).abs() <= tol * (want.abs() + 1)).all())
        if not ok:
            failures.append(("wrong values", numel, dtype, algo, op))
        digests[(numel, str(dtype), algo, op)] = _digest(out)
    # direct and one_shot sum in rank order: identical shards.
    for (numel, dt, algo, op), d in digests.items():
        if algo == "direct" and d != digests[(numel, dt, "one_shot", op)]:
            failures.append(("direct != one_shot bitwise", numel, dt, op))
    # A repeated call gives the same bits (deterministic order of every sum).
    x = _input(rank, world * 4099, torch.float32, False, seed=99)
    a, b = torch.empty(4099), torch.empty(4099)
    paracomm.reduce_scatter(a, x, "avg", algorithm="ring")
    paracomm.reduce_scatter(b, x, "avg", algorithm="ring")
    if not torch.equal(a, b):
        failures.append("ring not deterministic")
    return failures


def _all_gather_ranks(rank, world):
    import paracomm

    failures, digests = [], []
    sizes = SIZES + ((BIG,) if world in (2, 4) else ())
    for i, (numel, dtype, algo) in enumerate(itertools.product(sizes, DTYPES, ("ring", "direct"))):
        if (numel == BIG and dtype != torch.float32) or (dtype not in (torch.float32, torch.int32)
                                                         and numel not in (37,)):
            continue
        xs = [_input(r, numel, dtype, False, seed=i) for r in range(world)]
        async_op = i % 2 == 0
        for in_place in (False, True):
            out = torch.full((world * numel,), 99, dtype=dtype)
            if in_place:  # FSDP2's layout: the input is this rank's segment of the output
                inp = out[rank * numel:(rank + 1) * numel]
                inp.copy_(xs[rank])
            else:
                inp = xs[rank].clone()
            w = paracomm.all_gather(out, inp, algorithm=algo, async_op=async_op)
            if async_op:
                w.wait()
            if not torch.equal(out, torch.cat(xs)):
                failures.append(("wrong values", numel, dtype, algo, in_place))
            digests.append(_digest(out))
    return failures, digests


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 7, 8])
def test_reduce_scatter_matrix(world):
    results = run_ranks(world, _reduce_scatter_ranks, timeout=600)
    assert results == [[]] * world, results


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_all_gather_matrix(world):
    results = run_ranks(world, _all_gather_ranks, timeout=600)
    assert all(f == [] for f, _ in results), results
    assert all(d == results[0][1] for _, d in results), "ranks' outputs differ"


def _compressed_error_ranks(rank, world, numel):
    import paracomm

    errors = {}
    x = _input(rank, world * numel, torch.float32, False, seed=5)
    xs = [_input(r, world * numel, torch.float32, False, seed=5) for r in range(world)]
    ref = sum(y[rank * numel:(rank + 1) * numel].double() for y in xs) / world
    for wire in (torch.bfloat16, torch.float16):
        for algo in ("direct", "one_shot"):
            out = torch.empty(numel)
            paracomm.reduce_scatter(out, x, "avg", wire_dtype=wire, algorithm=algo)
            # Normwise over the whole result: every rank returns its shard's squared error and norm.
            errors[(str(wire), algo)] = (((out.double() - ref) ** 2).sum().item(), (ref ** 2).sum().item())
    return errors


def test_compressed_reduce_scatter_error_on_real_processes():
    """The issue's bounds on gloo: avg of random normal data, bf16 <= 1.8e-3, fp16 <= 2.3e-4 at N = 2, 4, 8 and
    the N = 8 value <= 1.05 x the N = 2 value (the simulator checks the same at larger sizes)."""
    numel = 1 << 15
    per_world = {}
    for world in (2, 4, 8):
        results = run_ranks(world, _compressed_error_ranks, numel, timeout=600)
        for key in results[0]:
            num = sum(r[key][0] for r in results)
            den = sum(r[key][1] for r in results)
            per_world[(world,) + key] = (num / den) ** 0.5
    for wire, bound in (("torch.bfloat16", 1.8e-3), ("torch.float16", 2.3e-4)):
        for algo in ("direct", "one_shot"):
            e = [per_world[(w, wire, algo)] for w in (2, 4, 8)]
            assert max(e) <= bound, (wire, algo, e)
            assert e[2] <= 1.05 * e[0], (wire, algo, e)


def _refusals_ranks(rank, world):
    import torch.distributed as dist

    import paracomm

    failures = []
    n = 6
    good_out, good_in = torch.full((n,), 5.0), torch.ones(world * n)

    def refused(fn, err, match, *tensors):
        before = [t.clone() for t in tensors]
        try:
            fn()
        except err as e:
            if match not in str(e):
                failures.append((match, str(e)))
        except Exception as e:  # noqa: BLE001
            failures.append((match, f"raised {type(e).__name__}: {e}"))
        else:
            failures.append((match, "did not raise"))
        for b, t in zip(before, tensors):
            if not torch.equal(b, t):
                failures.append((match, "wrote to a tensor"))

    rs, ag = paracomm.reduce_scatter, paracomm.all_gather
    o = good_out
    refused(lambda: rs([1.0], good_in), TypeError, "output", o)
    refused(lambda: rs(o, "x"), TypeError, "input", o)
    refused(lambda: rs(o, torch.ones(world * n, dtype=torch.float64)), TypeError, "same dtype", o)
    refused(lambda: rs(torch.zeros(n, dtype=torch.uint8), torch.zeros(world * n, dtype=torch.uint8)), TypeError,
            "dtype", o)
    refused(lambda: rs(o, torch.ones(world * n + 1)), ValueError, "input must have", o)
    refused(lambda: rs(o, torch.ones(world * n, 2)[:, 0]), ValueError, "contiguous", o)
    refused(lambda: rs(o, good_in, "max"), ValueError, "op", o)
    refused(lambda: rs(o, good_in, 3), TypeError, "op", o)
    refused(lambda: rs(o, good_in, dist.ReduceOp.MAX), ValueError, "op", o)
    refused(lambda: rs(torch.zeros(n, dtype=torch.int32), torch.zeros(world * n, dtype=torch.int32), "avg"),
            ValueError, "avg", o)
    refused(lambda: rs(o, good_in, wire_dtype=torch.int8), ValueError, "wire_dtype", o)
    refused(lambda: rs(o, good_in, wire_dtype="bf16"), TypeError, "wire_dtype", o)
    refused(lambda: rs(torch.zeros(n, dtype=torch.float64), torch.zeros(world * n, dtype=torch.float64),
                       wire_dtype=torch.bfloat16), ValueError, "wire_dtype", o)
    refused(lambda: rs(o, good_in, algorithm="tree"), ValueError, "algorithm", o)
    refused(lambda: rs(o, good_in, scale=torch.ones(2)), ValueError, "scale", o)
    refused(lambda: rs(o, good_in, scale=torch.ones(1, dtype=torch.float64)), TypeError, "scale", o)
    refused(lambda: rs(o, good_in, found_inf=1.0), TypeError, "found_inf", o)
    refused(lambda: rs(o, good_in, dist.ReduceOp.PREMUL_SUM(0.5), scale=torch.ones(1)), ValueError, "PREMUL_SUM", o)
    refused(lambda: rs(o, good_in, async_op=1), TypeError, "async_op", o)
    big = torch.ones(world * n)
    refused(lambda: rs(big[:n], big), ValueError, "overlaps", big)
    refused(lambda: ag(torch.zeros(world * n), torch.ones(n + 1)), ValueError, "output must have")
    refused(lambda: ag(torch.zeros(world * n), torch.ones(n), algorithm="one_shot"), ValueError, "algorithm")
    refused(lambda: ag(torch.zeros(world * n), torch.ones(n, dtype=torch.int64)), TypeError, "same dtype")
    if world > 1:
        out = torch.zeros(world * n)
        other = (rank + 1) % world
        refused(lambda: ag(out, out[other * n:(other + 1) * n]), ValueError, "segment", out)
    refused(lambda: paracomm.explain_reduce_scatter(-1, torch.float32, 2), ValueError, "numel")
    refused(lambda: paracomm.explain_all_gather(4, torch.float32, 2, algorithm="one_shot"), ValueError,
            "algorithm")
    # PREMUL_SUM(f) is a scale: the same result as scale=f.
    x = torch.arange(world * n, dtype=torch.float32) + rank
    a, b = torch.empty(n), torch.empty(n)
    rs(a, x, dist.ReduceOp.PREMUL_SUM(0.25))
    rs(b, x, scale=torch.tensor([0.25]))
    if not torch.equal(a, b):
        failures.append("PREMUL_SUM differs from scale")
    # A mismatch across ranks (rank 0 passes another numel) raises on every rank, naming the field; the
    # Communicator stays usable (its private group is replaced) and the output is untouched.
    if world > 1:
        m = n + 1 if rank == 0 else n
        out = torch.full((m,), 7.0)
        try:
            rs(out, torch.ones(world * m))
        except RuntimeError as e:
            if "numel" not in str(e):
                failures.append(("mismatch message", str(e)))
        else:
            failures.append("mismatch not caught")
        if not torch.equal(out, torch.full((m,), 7.0)):
            failures.append("mismatch wrote the output")
        out = torch.empty(world * 3)
        try:
            ag(out, torch.ones(3), algorithm="ring" if rank == 0 else "direct")
        except RuntimeError as e:
            if "algorithm" not in str(e):
                failures.append(("mismatch message", str(e)))
        else:
            failures.append("all_gather mismatch not caught")
        c = torch.empty(n)
        rs(c, x)
        want = sum(torch.arange(world * n, dtype=torch.float32)[rank * n:(rank + 1) * n] + r for r in range(world))
        if not torch.equal(c, want):
            failures.append("call after a mismatch")
    # The Communicator methods are the same calls.
    comm = paracomm.Communicator()
    d = torch.empty(world * n)
    comm.all_gather(d, torch.full((n,), float(rank)))
    if not torch.equal(d, torch.arange(world).repeat_interleave(n).float()):
        failures.append("Communicator.all_gather")
    return failures


@pytest.mark.parametrize("world", [1, 2])
def test_refusals_and_mismatches(world):
    results = run_ranks(world, _refusals_ranks, timeout=300)
    assert results == [[]] * world, results


def test_explain_matches_the_calls_plans():
    """explain_* answer without communicating (no process group here) with explain_all_reduce's keys."""
    import paracomm

    keys = set(paracomm.explain_all_reduce(1000, torch.float32, 4, backend="gloo"))
    rs = paracomm.explain_reduce_scatter(1 << 20, torch.float32, 8, backend="gloo")
    ag = paracomm.explain_all_gather(1 << 20, torch.float32, 8, backend="gloo")
    assert set(rs) == keys == set(ag)
    # nccl-tests' bus bytes: each rank sends and receives (N-1)/N of the reduce-scatter input / all-gather output.
    assert rs["bytes_sent"] == rs["bytes_received"] == 7 * (4 << 20)
    assert ag["bytes_sent"] == ag["bytes_received"] == 7 * (4 << 20)
    assert (rs["algorithm"], ag["algorithm"]) == ("direct", "direct")
    small = paracomm.explain_reduce_scatter(1000, torch.float32, 8, backend="gloo")
    assert (small["algorithm"], small["transfer_groups"], small["reductions"]) == ("one_shot", 1, 1)
    assert paracomm.explain_reduce_scatter(1 << 20, torch.float32, 16, backend="gloo")["algorithm"] == "ring"
    half = paracomm.explain_reduce_scatter(1 << 20, torch.float32, 8, wire_dtype=torch.bfloat16, backend="gloo")
    assert half["bytes_sent"] * 2 == rs["bytes_sent"]
    assert paracomm.explain_all_gather(0, torch.float32, 4)["transfer_groups"] == 0
    with pytest.raises(ValueError, match="32 ranks"):
        paracomm.explain_reduce_scatter(10, torch.float32, 33, algorithm="direct")
    with pytest.raises(TypeError, match="dtype"):
        paracomm.explain_all_gather(10, torch.uint8, 2)


MIB = 1 << 20


def test_explain_node_size_hand_counted():
    """explain_reduce_scatter / explain_all_gather(node_size=K): explain_all_reduce's topology keys, counted over
    the plans the call would run, against byte counts worked out by hand. N ranks, K per node, M = N / K nodes;
    reduce-scatter: S = 16 MiB of fp32 input per rank, seg = S / N per destination rank; all-gather: seg = the
    per-rank input."""
    import paracomm

    rs, ag = paracomm.explain_reduce_scatter, paracomm.explain_all_gather
    n = 1 << 20  # output elements per rank at N = 4: S = 4 x n x 4 B = 16 MiB, seg = 4 MiB
    seg = 4 * MIB
    # 2 x 2, hierarchical, fp32: phase A sends the peer's column (M segments) inside the node, phase B the
    # other node's segment (M - 1) of this rank's column across.
    h = rs(n, torch.float32, 4, node_size=2, backend="gloo")
    assert (h["algorithm"], h["nodes"]) == ("hierarchical", 2), h
    assert h["inter_node_bytes"] == 1 * seg and h["intra_node_bytes"] == 1 * 2 * seg, h
    assert h["inter_node_bytes"] + h["intra_node_bytes"] == h["bytes_sent"] == 3 * seg
    assert h["inter_node_steps"] == h["num_chunks"]  # one exchange between the nodes per piece
    assert h["choice_reason"].startswith("more than one node")
    # bf16 wire: only the hop between the nodes travels in the wire: S / 8 bytes per rank.
    hb = rs(n, torch.float32, 4, node_size=2, wire_dtype=torch.bfloat16, backend="gloo")
    assert hb["algorithm"] == "hierarchical" and hb["inter_node_bytes"] == 16 * MIB // 8 == seg // 2, hb
    # Flat plans on the same map: direct sends N - K segments across, K - 1 inside; ring: every hop of the
    # busiest rank crosses.
    d = rs(n, torch.float32, 4, node_size=2, algorithm="direct", wire_dtype=torch.bfloat16, backend="gloo")
    assert (d["inter_node_bytes"], d["intra_node_bytes"], d["choice_reason"]) == (2 * seg // 2, seg // 2,
                                                                                   "requested"), d
    r = rs(n, torch.float32, 4, node_size=2, algorithm="ring", backend="gloo")
    assert r["inter_node_bytes"] == 3 * seg and r["inter_node_steps"] == 3, r
    # 4 x 2 (n = 256 Ki, seg = 1 MiB): phase B sends M - 1 = 3 segments across, phase A K - 1 columns of M.
    h8 = rs(1 << 18, torch.float32, 8, node_size=2, algorithm="hierarchical", backend="gloo")
    assert (h8["nodes"], h8["inter_node_bytes"], h8["intra_node_bytes"]) == (4, 3 * MIB, 4 * MIB), h8
    # 2 x 8, bf16: (M - 1) x seg in the 2-byte wire between the nodes.
    h16 = rs(n, torch.float32, 16, node_size=8, wire_dtype=torch.bfloat16, backend="gloo")
    assert h16["algorithm"] == "hierarchical" and h16["inter_node_bytes"] == seg // 2, h16

    # all-gather, 2 x 2 (seg = the 4 MiB input): across the nodes first (M - 1 segments), then inside the node
    # the M segments now held, to the K - 1 peers.
    g = ag(n, torch.float32, 4, node_size=2, backend="gloo")
    assert (g["algorithm"], g["inter_node_bytes"], g["intra_node_bytes"]) == ("hierarchical", seg, 2 * seg), g
    gd = ag(n, torch.float32, 4, node_size=2, algorithm="direct", backend="gloo")
    assert (gd["inter_node_bytes"], gd["intra_node_bytes"]) == (2 * seg, seg), gd
    g8 = ag(1 << 18, torch.float32, 8, node_size=2, algorithm="hierarchical", backend="gloo")
    assert (g8["inter_node_bytes"], g8["intra_node_bytes"]) == (3 * MIB, 4 * MIB), g8

    # No node_size (and no PARACOMM_NODE_SIZE): one node, the keys as before.
    flat = rs(n, torch.float32, 4, backend="gloo")
    assert flat["algorithm"] == "direct" and "nodes" not in flat
    assert "nodes" not in ag(n, torch.float32, 4, backend="gloo")
    # Nodes of different sizes: auto falls back to the flat choice and says why; hierarchical is refused.
    uneven = rs(n, torch.float32, 4, node_size=3, backend="gloo")
    assert uneven["algorithm"] == "direct" and "different sizes" in uneven["choice_reason"], uneven
    for fn in (rs, ag):
        with pytest.raises(ValueError, match="node_size 3"):
            fn(n, torch.float32, 4, node_size=3, algorithm="hierarchical")
        with pytest.raises(ValueError, match="node_size"):
            fn(10, torch.float32, 4, node_size=0)
        with pytest.raises(ValueError, match="node_size"):
            fn(10, torch.float32, 4, node_size=5)
        with pytest.raises(TypeError, match="node_size"):
            fn(10, torch.float32, 4, node_size="2")


def test_explain_intra_node_bytes_of_the_exact_input_hop():
    """Hierarchical reduce-scatter with a bf16 wire keeps the intra-node hop exact: phase A sends the fp32 input
    (M segments of the peer's column), so intra_node_bytes = (K - 1) x M x seg in 4-byte elements, and inter +
    intra = bytes_sent (every rank of equal nodes sends the same)."""
    import paracomm

    seg = 4 * MIB
    hb = paracomm.explain_reduce_scatter(1 << 20, torch.float32, 4, node_size=2, wire_dtype=torch.bfloat16,
                                         backend="gloo")
    assert hb["inter_node_bytes"] + hb["intra_node_bytes"] == hb["bytes_sent"], hb
    assert hb["intra_node_bytes"] == 2 * seg, hb


def test_explain_collectives_honour_the_environment(monkeypatch):
    """algorithm=None / node_size=None read PARACOMM_ALGORITHM / PARACOMM_NODE_SIZE as a Communicator does, for
    all three explain functions alike."""
    import paracomm

    n = 1 << 20
    monkeypatch.setenv("PARACOMM_NODE_SIZE", "2")
    for fn in (paracomm.explain_reduce_scatter, paracomm.explain_all_gather, paracomm.explain_all_reduce):
        env = fn(n, torch.float32, 4, backend="gloo")
        assert env == fn(n, torch.float32, 4, node_size=2, backend="gloo"), fn
        assert env["nodes"] == 2 and env["algorithm"] == "hierarchical", (fn, env)
        assert fn(n, torch.float32, 4, node_size=4, backend="gloo")["nodes"] == 1  # the argument wins
    # Clamped to the world size, as a Communicator on a subgroup reads it.
    assert paracomm.explain_reduce_scatter(n, torch.float32, 2, backend="gloo")["nodes"] == 1
    monkeypatch.setenv("PARACOMM_NODE_SIZE", "two")
    with pytest.raises(ValueError, match="PARACOMM_NODE_SIZE"):
        paracomm.explain_all_gather(n, torch.float32, 4)
    monkeypatch.delenv("PARACOMM_NODE_SIZE")
    monkeypatch.setenv("PARACOMM_ALGORITHM", "ring")
    assert paracomm.explain_reduce_scatter(n, torch.float32, 4, backend="gloo")["algorithm"] == "ring"
    assert paracomm.explain_all_gather(n, torch.float32, 4, backend="gloo")["algorithm"] == "ring"
    monkeypatch.setenv("PARACOMM_ALGORITHM", "one_shot")  # all-gather's direct exchange is its one shot
    assert paracomm.explain_all_gather(n, torch.float32, 4, backend="gloo")["algorithm"] == "direct"
    assert paracomm.explain_reduce_scatter(n, torch.float32, 4, backend="gloo")["algorithm"] == "one_shot"
