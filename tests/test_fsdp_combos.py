"""FSDP2 combinations beyond tests/test_fsdp.py, on gloo with real processes (docs/ARCHITECTURE.md, "FSDP2",
lists every checked combination with its test):

* the Comm objects' ``async_op=True``: a ``dist.Work`` (paracomm.fsdp.TorchWork) whose wait / is_completed /
  get_future behave as torch's, results against float64, errors delivered by ``wait()``;
* HSDP (a 2-D (replicate, shard) DeviceMesh) with paracomm's reduce-scatter and all-gather on the shard dim,
  with gradient accumulation, and with ``all_reduce_hook`` after torch's replica all-reduce;
* 1-D FSDP over the shard dim with ``all_reduce_hook`` over the replicas post-reduce-scatter (HSDP built from
  paracomm's all-reduce), also with forced sum reduction and a divide factor;
* ``CPUOffloadPolicy`` with paracomm's collectives; ``unshard(async_op=True)`` with paracomm's all-gather.

The model is tests/test_fsdp.py's (paracomm.bench.fsdp.Net: 2 TransformerEncoderLayers, one ``fully_shard`` each
and one at the root), 6 SGD steps; every reference is torch's own FSDP2 run of the same configuration.
"""
import pytest
import torch

from dist_utils import run_ranks

STEPS = 6


def _rel(a, b):
    num = sum(((x - y) ** 2).sum() for x, y in zip(a, b)) ** 0.5
    den = sum((y ** 2).sum() for y in b) ** 0.5
    return float(num / den)


# ---------------------------------------------------------------------------------------------------------------
# The Comm objects called directly: sync returns None, async a dist.Work
# ---------------------------------------------------------------------------------------------------------------

def _inputs(world, numel, seed):
    return [torch.randn(world * numel, generator=torch.Generator().manual_seed(seed + r), dtype=torch.float64)
            for r in range(world)]


def _comm_async_ranks(rank, world):
    import torch.distributed as dist

    import paracomm
    import paracomm.fsdp as pf
    from paracomm.amp import GradScaler

    failures = []
    group = dist.group.WORLD
    n = 1000

    def check(what, got, want, tol):
        err = float((got.double() - want).norm() / want.norm())
        if not err <= tol:
            failures.append((what, err))

    xs = _inputs(world, n, 11)
    exact = sum(x[rank * n:(rank + 1) * n] for x in xs)
    rs = pf.ReduceScatter()
    for async_op in (False, True):
        for op, want in ((dist.ReduceOp.AVG, exact / world), (dist.ReduceOp.SUM, exact),
                         (dist.ReduceOp.PREMUL_SUM(1 / 3), exact / 3)):
            out = torch.full((n,), 99.0)
            inp = xs[rank].float()
            w = rs(out, inp, group, op, async_op=async_op)
            if not async_op:
                if w is not None:
                    failures.append(("sync returned", type(w)))
            else:
                if not (isinstance(w, dist.Work) and isinstance(w, pf.TorchWork)):
                    failures.append(("async returned", type(w)))
                    continue
                if w.wait() is not True or not w.is_completed() or not w.is_success():
                    failures.append("wait/is_completed/is_success")
                if w.get_future().value() is not out:
                    failures.append("future value is not the output")
            check(("rs", async_op, str(op)), out, want, 1e-6)
    # A bf16 wire, async: each input rounded once, fp32 sums.
    out = torch.empty(n)
    pf.ReduceScatter(wire_dtype=torch.bfloat16)(out, xs[rank].float(), group, dist.ReduceOp.AVG,
                                                 async_op=True).wait()
    check("rs bf16 async", out, exact / world, 8e-3)
    # Several async calls in flight, waited in reverse order: paracomm runs them in issue order.
    outs = [torch.empty(n) for _ in range(3)]
    works = [rs(o, (xs[rank] * (k + 1)).float(), group, dist.ReduceOp.SUM, async_op=True)
             for k, o in enumerate(outs)]
    for w in reversed(works):
        w.wait()
    for k, o in enumerate(outs):
        check(("in flight", k), o, exact * (k + 1), 1e-6)

    # All-gather in place (FSDP2's layout), async; the uint8 fallback returns torch's own Work.
    ag = pf.AllGather()
    segs = [torch.randn(n, generator=torch.Generator().manual_seed(50 + r)) for r in range(world)]
    for async_op in (False, True):
        out = torch.full((world * n,), 99.0)
        mine = out[rank * n:(rank + 1) * n]
        mine.copy_(segs[rank])
        w = ag(out, mine, group, async_op=async_op)
        if async_op:
            if not isinstance(w, pf.TorchWork) or w.wait() is not True:
                failures.append(("ag async returned", type(w)))
        elif w is not None:
            failures.append(("ag sync returned", type(w)))
        if not torch.equal(out, torch.cat(segs)):
            failures.append(("ag values", async_op))
    out8 = torch.zeros(world * 4, dtype=torch.uint8)
    w = ag(out8, torch.full((4,), rank + 1, dtype=torch.uint8), group, async_op=True)
    if not isinstance(w, dist.Work):
        failures.append(("uint8 fallback returned", type(w)))
    else:
        w.wait()
    if not torch.equal(out8, torch.arange(1, world + 1, dtype=torch.uint8).repeat_interleave(4)):
        failures.append("uint8 fallback values")
    if (ag.calls, ag.async_calls, ag.fallbacks) != (3, 1, 1):
        failures.append(("ag counts", ag.calls, ag.async_calls, ag.fallbacks))

    # The AMP fusion, async: the shard unscaled; a nan in a segment rank 0 owns flags every rank's found_inf once
    # the Work is waited on.
    for poisoned in (False, True):
        scaler = GradScaler("cpu", init_scale=2.0 ** 8)
        scaler.scale(torch.ones(()))  # creates the scale
        inp = (xs[rank] * 2.0 ** 8).float()
        if poisoned and rank == world - 1:
            inp[0] = float("nan")
        out = torch.empty(n)
        w = pf.ReduceScatter(scaler=scaler)(out, inp, group, dist.ReduceOp.AVG, async_op=True)
        w.wait()
        _, found_inf = scaler.comm_hook_unscale("cpu")
        if float(found_inf) != (1.0 if poisoned else 0.0):
            failures.append(("found_inf", poisoned, float(found_inf)))
        if not poisoned:
            check("scaler async", out, exact / world, 1e-6)

    # paracomm's own functions: a paracomm Work, as all_reduce(async_op=True) returns.
    out = torch.empty(n)
    w = paracomm.reduce_scatter(out, xs[rank].float(), "avg", async_op=True)
    if not isinstance(w, paracomm.comm.Work) or w.get_future().wait() is not out or not w.is_completed():
        failures.append("paracomm.reduce_scatter Work")
    check("paracomm.reduce_scatter async", out, exact / world, 1e-6)

    # A collective error reaches wait(): rank 0 passes another size; the output stays as it was.
    if world > 1:
        m = n + 1 if rank == 0 else n
        out = torch.full((m,), 7.0)
        w = rs(out, torch.ones(world * m), group, dist.ReduceOp.SUM, async_op=True)
        try:
            w.wait()
        except RuntimeError as e:
            if "numel" not in str(e):
                failures.append(("mismatch message", str(e)))
        else:
            failures.append("mismatch not raised by wait()")
        if w.is_success() or not w.is_completed() or not torch.equal(out, torch.full((m,), 7.0)):
            failures.append("failed Work state or output written")
        out = torch.empty(n)
        rs(out, xs[rank].float(), group, dist.ReduceOp.SUM)  # the group still works afterwards
        check("after mismatch", out, exact, 1e-6)
    try:
        rs(torch.empty(n), xs[rank].float(), group, dist.ReduceOp.SUM, async_op=1)
    except TypeError as e:
        if "async_op" not in str(e):
            failures.append(("async_op message", str(e)))
    else:
        failures.append("async_op=1 accepted")
    return failures


@pytest.mark.parametrize("world", [2, 3])
def test_comm_objects_async_op(world):
    results = run_ranks(world, _comm_async_ranks, timeout=300)
    assert results == [[]] * world, results


# ---------------------------------------------------------------------------------------------------------------
# Training runs: HSDP, all_reduce_hook, CPU offload, async unshard
# ---------------------------------------------------------------------------------------------------------------

def _combos_ranks(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy

    import paracomm.fsdp as pf
    from paracomm.bench.fsdp import train

    mesh2d = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    replicate = mesh2d.get_group("replicate")
    sharded = world // 2 > 1  # at 2 ranks the shard dim has one rank: FSDP2 copies instead of reduce-scattering
    out, calls = {}, []

    def counted(hook):
        def wrapped(t):
            calls.append(t.numel())
            hook(t)
        return wrapped

    init = train(steps=0, comms="torch")["params"]
    base = train(steps=STEPS, comms="torch")  # 1-D FSDP over the world
    hsdp = train(steps=STEPS, comms="torch", mesh=mesh2d)  # torch's own HSDP: the reference below
    out["moved"] = _rel(hsdp["params"], init)

    if sharded:  # paracomm's reduce-scatter and all-gather on the shard dim, torch's all-reduce on the replicas
        r = train(steps=STEPS, comms="paracomm", mesh=mesh2d)
        out["hsdp_paracomm"] = (_rel(r["params"], hsdp["params"]), r["rs_calls"], r["ag_calls"])
        ref = train(steps=STEPS, comms="torch", mesh=mesh2d, accumulate=2)
        r = train(steps=STEPS, comms="paracomm", mesh=mesh2d, accumulate=2)
        out["hsdp_accumulate"] = (_rel(r["params"], ref["params"]), _rel(ref["params"], hsdp["params"]),
                                  r["rs_calls"])

    # HSDP + all_reduce_hook: torch runs it after its replica all-reduce, on the replica-averaged shard. A sum
    # over the replicas doubles every gradient: the run must equal torch's HSDP at twice the learning rate.
    lr2 = train(steps=STEPS, comms="torch", mesh=mesh2d, lr=0.1)
    calls.clear()
    r = train(steps=STEPS, comms="paracomm" if sharded else "torch", mesh=mesh2d, lr=0.05,
              all_reduce_hook=counted(pf.all_reduce_hook(group=replicate, op="sum")))
    out["hsdp_hook"] = (_rel(r["params"], lr2["params"]), len(calls), _rel(lr2["params"], hsdp["params"]))

    # 1-D FSDP over the shard dim + all_reduce_hook averaging over the replicas post-reduce-scatter: HSDP with
    # paracomm's all-reduce, against torch's HSDP.
    calls.clear()
    r = train(steps=STEPS, comms="paracomm" if sharded else "torch", mesh=mesh2d["shard"],
              all_reduce_hook=counted(pf.all_reduce_hook(group=replicate)))
    out["fsdp1d_hook"] = (_rel(r["params"], hsdp["params"]), len(calls))
    if sharded:
        # ... with forced sum reduction: reduce-scatter SUM, the hook sums, FSDP2 divides by the factor after it.
        r = train(steps=STEPS, comms="paracomm", mesh=mesh2d["shard"], force_sum=True, divide_factor=float(world),
                  all_reduce_hook=pf.all_reduce_hook(group=replicate, op="sum"))
        out["fsdp1d_hook_sum"] = _rel(r["params"], hsdp["params"])

    # CPU offload (sharded parameters and gradients on the CPU, the optimizer there too).
    offload = CPUOffloadPolicy(pin_memory=False)
    ref = train(steps=STEPS, comms="torch", offload_policy=offload)
    r = train(steps=STEPS, comms="paracomm", offload_policy=offload)
    out["offload"] = (_rel(r["params"], ref["params"]), _rel(r["params"], base["params"]), r["rs_calls"])

    # unshard(async_op=True) on every unit before each forward: paracomm's all-gathers in flight together, FSDP2
    # waiting on each one's TorchWork.
    r = train(steps=STEPS, comms="paracomm", unshard_async=True)
    out["async_unshard"] = (_rel(r["params"], base["params"]), r["ag_async_calls"], r["ag_calls"])
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_combinations(world):
    results = run_ranks(world, _combos_ranks, timeout=600)
    r = results[0]
    units = 3  # two layers and the root
    assert r["moved"] > 1e-3, r  # training changes the parameters: every comparison below can fail
    if world == 4:
        rel, rs_calls, ag_calls = r["hsdp_paracomm"]
        assert rel <= 1e-5 and rs_calls == units * STEPS and ag_calls >= units * STEPS, r
        rel, moved, rs_calls = r["hsdp_accumulate"]
        assert rel <= 1e-5 and moved > 1e-4 and rs_calls == units * STEPS, r  # one RS per unit per step
        assert r["fsdp1d_hook_sum"] <= 1e-5, r
    rel, hook_calls, moved = r["hsdp_hook"]
    assert rel <= 1e-5 and hook_calls == units * STEPS and moved > 1e-3, r
    rel, hook_calls = r["fsdp1d_hook"]
    assert rel <= 1e-5 and hook_calls == units * STEPS, r
    rel, rel_base, rs_calls = r["offload"]
    assert rel <= 1e-5 and rel_base <= 1e-5 and rs_calls == units * STEPS, r
    rel, async_calls, ag_calls = r["async_unshard"]
    assert rel <= 1e-5 and async_calls >= STEPS and ag_calls > async_calls, r
    for other in results[1:]:  # every rank sees the same full parameters
        assert other["hsdp_hook"][0] == r["hsdp_hook"][0] and other["offload"][0] == r["offload"][0]
