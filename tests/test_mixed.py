"""The mixed CPU transport (src/paracomm/_mixed.py): shared memory inside each node, gloo between nodes.

One host here, split into nodes by ``Communicator(node_size=)`` with ``PARACOMM_CPU_TRANSPORT=mixed``
(tests/test_emulate.py runs it where ``auto`` picks it by itself: one network namespace per node). Real
processes; every result is compared with the gloo transport's, bit for bit (the same summation order), and with
a float64 reference.
"""
import hashlib
import os
import re
import time
from datetime import timedelta

import pytest
import torch

from dist_utils import run_ranks, sigkill_after
from paracomm._mixed import mixed_refusal, node_members, stage_shard

NUMEL = 300_001  # above the one_shot thresholds (auto = hierarchical on several nodes); K never divides it


def _digest(t):
    return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _data(rank, numel, dtype, salt=0):
    g = torch.Generator().manual_seed(7919 * (rank + 1) + numel + salt)
    if dtype.is_floating_point:
        return torch.randn(numel, generator=g, dtype=torch.float64).to(dtype)
    return torch.randint(-50, 51, (numel,), generator=g).to(dtype)


def test_refusal_is_a_pure_function_of_the_map_and_the_hosts():
    hosts = ["a", "a", "b", "b"]
    assert mixed_refusal([0, 0, 1, 1], hosts) is None
    assert mixed_refusal([0, 1, 0, 1], ["a", "b", "a", "b"]) is None  # nodes need not be contiguous in rank
    assert "one node" in mixed_refusal([0, 0, 0, 0], ["a"] * 4)
    assert "one node" in mixed_refusal([], ["a"])
    assert "3+1" in mixed_refusal([0, 0, 0, 1], ["a", "a", "a", "b"])
    assert "one rank" in mixed_refusal([0, 1], ["a", "b"])
    why = mixed_refusal([0, 0, 1, 1], ["a", "c", "b", "b"])
    assert "node 0" in why and "0, 1" in why and "one host" in why
    assert node_members([0, 1, 0, 1]) == [[0, 2], [1, 3]] and node_members([]) == [[]]
    from paracomm import _C  # the stage-B algorithm's predicate: the hierarchical plan's own

    assert [_C.inter_node_ring(m) for m in (1, 2, 8, 9, 64)] == [False, False, False, True, True]
    with pytest.raises(Exception, match="nodes must be >= 1"):
        _C.inter_node_ring(0)
    assert [stage_shard(n, k) for n, k in ((8, 2), (9, 2), (1, 4), (300_001, 3))] == [4, 5, 1, 100_001]


def _against_gloo(rank, world_size, node_size):
    import paracomm
    from paracomm._shm import transport_of

    timeout = timedelta(seconds=60)
    os.environ["PARACOMM_CPU_TRANSPORT"] = "mixed"
    mixed = paracomm.Communicator(timeout=timeout, node_size=node_size)
    assert transport_of(mixed) == "mixed"  # the transport is chosen at the first call: under this setting
    os.environ["PARACOMM_CPU_TRANSPORT"] = "gloo"
    gloo = paracomm.Communicator(timeout=timeout, node_size=node_size)
    assert transport_of(gloo) == "gloo"
    n = world_size
    out = {}
    composed = 0
    cases = [  # dtype, numel, op, wire, composed?
        (torch.float32, NUMEL, "sum", None, True),
        (torch.float32, NUMEL, "avg", None, True),
        (torch.float32, 1 << 18, "avg", torch.bfloat16, True),  # K divides it: no padding copy
        (torch.float32, NUMEL, "avg", torch.float16, True),
        (torch.float64, 200_003, "avg", None, True),
        (torch.bfloat16, NUMEL, "sum", None, True),
        (torch.int64, NUMEL, "sum", None, True),
        (torch.float32, 1000, "sum", None, False),  # small: auto = one_shot, on the whole group's gloo
        (torch.float32, NUMEL, "sum", torch.bfloat16, False),  # asked for direct: the whole group's gloo
    ]
    for i, (dtype, numel, op, wire, composes) in enumerate(cases):
        algorithm = "direct" if i == len(cases) - 1 else "auto"
        xs = [_data(r, numel, dtype) for r in range(n)]
        a, b = xs[rank].clone(), xs[rank].clone()
        mixed.all_reduce(a, op, wire_dtype=wire, algorithm=algorithm)
        gloo.all_reduce(b, op, wire_dtype=wire, algorithm=algorithm)
        composed += composes
        assert mixed._cpu.composed == composed, (dtype, numel, op, wire)
        key = (str(dtype), numel, op, str(wire))
        assert torch.equal(a, b), key  # the same bits as the gloo transport's hierarchical plan
        exact = sum(x.double() for x in xs) / (n if op == "avg" else 1)
        if wire is None and not dtype.is_floating_point:
            assert torch.equal(a.double(), exact), key
        else:
            err = ((a.double() - exact).norm() / exact.norm()).item()
            bound = {None: {torch.float32: 1e-6, torch.bfloat16: 8e-3}.get(dtype, 1e-6),
                     torch.bfloat16: 2.5e-3, torch.float16: 3.1e-4}[wire]
            assert err <= bound, (key, err)
        out[key] = _digest(a)
    # scale and found_inf: one rank's inf shows on every rank, the finite call leaves the flag at 0.
    for poison in (False, True):
        x = _data(rank, NUMEL, torch.float32, salt=5)
        if poison and rank == n - 1:
            x[NUMEL // 2] = float("inf")
        a, b = x.clone(), x.clone()
        fa, fb = torch.zeros(1), torch.zeros(1)
        scale = torch.tensor(0.25)
        mixed.all_reduce(a, "avg", scale=scale, found_inf=fa)
        gloo.all_reduce(b, "avg", scale=scale, found_inf=fb)
        composed += 1
        assert torch.equal(a, b) and fa.item() == fb.item() == float(poison), poison
        out[("found_inf", poison)] = _digest(a)
    # reduce_scatter and all_gather: hierarchical across nodes runs in stages too, with the gloo plan's bits.
    seg = 200_003  # (N-1) x seg x 2 bytes received: above the one_shot limit, so auto = hierarchical
    for dtype, op, wire, poison in ((torch.float32, "sum", None, False), (torch.float32, "avg", torch.bfloat16, True),
                                    (torch.int64, "sum", None, False), (torch.bfloat16, "sum", None, False)):
        xs = [_data(r, n * seg, dtype, salt=11) for r in range(n)]
        if poison:
            xs[0][seg * (n - 1) + 5] = float("inf")  # in the last rank's segment only
        a, b = torch.empty(seg, dtype=dtype), torch.empty(seg, dtype=dtype)
        extra = {}
        if dtype == torch.float32 and op == "avg":
            fa, fb = torch.zeros(1), torch.zeros(1)
            extra = {"scale": torch.tensor(2.0)}
        mixed.reduce_scatter(a, xs[rank], op, wire_dtype=wire, **extra, **({"found_inf": fa} if extra else {}))
        gloo.reduce_scatter(b, xs[rank], op, wire_dtype=wire, **extra, **({"found_inf": fb} if extra else {}))
        composed += 1
        key = ("reduce_scatter", str(dtype), op, str(wire))
        assert mixed._cpu.composed == composed, key
        assert torch.equal(a, b), key
        if extra:
            assert fa.item() == fb.item() == float(poison and rank == n - 1), key
        want = sum(x.double() for x in xs)[rank * seg:(rank + 1) * seg] * (2.0 / n if extra else 1.0)
        if wire is None and dtype != torch.bfloat16:
            assert torch.equal(a.double(), want) if not dtype.is_floating_point else \
                torch.allclose(a.double(), want, rtol=1e-5, atol=1e-5), key
        elif not poison:
            assert ((a.double() - want).norm() / want.norm()).item() <= 8e-3, key
        # (each rank holds its own segment: compared with the gloo transport's above, not across ranks)
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        x = _data(rank, seg, dtype, salt=13)
        a, b = torch.empty(n * seg, dtype=dtype), torch.empty(n * seg, dtype=dtype)
        mixed.all_gather(a, x)
        gloo.all_gather(b, x)
        composed += 1
        assert mixed._cpu.composed == composed, dtype
        assert torch.equal(a, torch.cat([_data(r, seg, dtype, salt=13) for r in range(n)])), dtype
        assert torch.equal(a, b), dtype
        out[("all_gather", str(dtype))] = _digest(a)
    # Another algorithm and the other collectives' small calls run on the whole group's gloo, correctly.
    x = _data(rank, NUMEL, torch.float32, salt=9)
    mixed.all_reduce(x, algorithm="ring")
    assert torch.allclose(x.double(), sum(_data(r, NUMEL, torch.float32, salt=9).double() for r in range(n)),
                          rtol=1e-5, atol=1e-4)
    rs_in = _data(rank, 64 * n, torch.float32, salt=3)
    rs_out = torch.empty(64)
    mixed.reduce_scatter(rs_out, rs_in)
    want = sum(_data(r, 64 * n, torch.float32, salt=3).double() for r in range(n))[64 * rank: 64 * (rank + 1)]
    assert torch.allclose(rs_out.double(), want, rtol=1e-5, atol=1e-5)
    assert mixed._cpu.composed == composed
    # async calls keep their order through the worker thread.
    ys = [_data(rank, NUMEL, torch.float32, salt=s) for s in range(3)]
    works = [mixed.all_reduce(y, async_op=True) for y in ys]
    for s, (y, w) in enumerate(zip(ys, works)):
        assert w.wait() is y
        assert torch.allclose(y.double(), sum(_data(r, NUMEL, torch.float32, salt=s).double() for r in range(n)),
                              rtol=1e-5, atol=1e-4)
    return out


@pytest.mark.parametrize("world,node_size", [(4, 2), (6, 3), (6, 2)], ids=["2x2", "2x3", "3x2"])
def test_same_bits_as_gloo_and_identical_on_every_rank(world, node_size):
    results = run_ranks(world, _against_gloo, node_size, timeout=400)
    for r, res in enumerate(results):
        assert res == results[0], f"rank {r} differs"


def _mismatches(rank, world_size):
    import paracomm

    os.environ["PARACOMM_CPU_TRANSPORT"] = "mixed"
    comm = paracomm.Communicator(timeout=timedelta(seconds=20), node_size=2)
    n = world_size
    # Across nodes (rank 2 differs: its node agrees within itself) and inside a node (rank 1): every rank
    # raises naming the argument, nothing is written, and the next matching call works on every rank.
    for odd in (2, 1):
        t = torch.ones(NUMEL + (rank == odd))
        before = t.clone()
        with pytest.raises(RuntimeError, match="different arguments"):
            comm.all_reduce(t)
        assert torch.equal(t, before), odd
        ok = _data(rank, NUMEL, torch.float32, salt=odd)
        comm.all_reduce(ok)
        assert torch.allclose(ok.double(), sum(_data(r, NUMEL, torch.float32, salt=odd).double()
                                               for r in range(n)), rtol=1e-5, atol=1e-4)
    return True


def test_a_mismatch_raises_on_every_rank_and_the_communicator_recovers():
    assert run_ranks(4, _mismatches, timeout=300) == [True] * 4


def _refused(rank, world_size):
    import paracomm

    os.environ["PARACOMM_CPU_TRANSPORT"] = "mixed"
    comm = paracomm.Communicator(timeout=timedelta(seconds=20))  # one host, no node_size: one node
    with pytest.raises(ValueError, match="PARACOMM_CPU_TRANSPORT=mixed but the group is on one node"):
        comm.all_reduce(torch.ones(10))
    return True


def test_mixed_refused_on_one_node_names_why():
    assert run_ranks(2, _refused, timeout=120) == [True, True]


def _killed(rank, world_size, stamp_file):
    import paracomm

    os.environ["PARACOMM_CPU_TRANSPORT"] = "mixed"
    comm = paracomm.Communicator(timeout=timedelta(seconds=60), node_size=2)
    x = torch.ones(1 << 21)
    comm.all_reduce(x)
    victim = world_size - 1
    if rank == victim:
        sigkill_after(0.5, stamp_file)
    calls = 0
    try:
        while True:  # back-to-back hierarchical calls: the kill lands inside one of their stages
            comm.all_reduce(x)
            calls += 1
    except RuntimeError as e:
        raised, message = time.time(), str(e)
    with pytest.raises(RuntimeError, match="failed earlier"):
        comm.all_reduce(x)
    return raised, message, calls, comm._cpu is None or comm._cpu.composed


def test_peer_killed_every_survivor_raises_naming_a_group_rank(tmp_path):
    stamp = str(tmp_path / "killed_at")
    results = run_ranks(4, _killed, stamp, timeout=300, allow_missing=(3,))
    assert results[-1] is None
    with open(stamp) as f:
        killed_at = float(f.read())
    # The victim's node peer (rank 2) sees it die in shared memory; rank 1 (stage B's peer of rank 3) sees its
    # connection close; every error names ranks of the group (0-3), never a rank of a stage's own group.
    messages = [m for _, m, _, _ in results[:-1]]
    assert any("rank 3" in m for m in messages), messages
    for raised, message, calls, composed in results[:-1]:
        assert "paracomm" in message and calls > 0, message
        assert all(0 <= int(r) < 4 for r in re.findall(r"\brank (\d+)", message)), message
        assert raised - killed_at < 20.0, f"took {raised - killed_at:.1f} s to notice the kill"
