"""paracomm inside FSDP2 on gloo (docs/ARCHITECTURE.md, "FSDP2"): a small transformer (2 layers, one
``fully_shard`` per layer and one at the root), 10 steps of SGD, 2 and 4 real ranks, one spawn per world size
running every configuration:

* fp32, reshard_after_forward=True: paracomm's reduce-scatter and all-gather vs torch's -> parameters equal to
  <= 1e-5 relative;
* reshard_after_forward=False, 2 micro-batches (set_requires_gradient_sync(False) on the first),
  set_gradient_divide_factor(3): paracomm gets PREMUL_SUM(1/3) (which torch's gloo refuses), and with
  set_force_sum_reduction_for_comms SUM; both vs torch with forced sum -> parameters <= 1e-5;
* a bf16 wire: the final loss within 1% of the fp32 run's;
* MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): paracomm vs torch -> losses within 1%;
* MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16): on every reduce-scatter of the run, the same
  gradients reduced by torch and by paracomm, each against a float64 reduction: paracomm's error is lower at
  N = 4 (at N = 2 both round the exact sum of two bf16 values once: equal, and the test says so). Run with -s to
  see both figures.
"""
import pytest
import torch

from dist_utils import run_ranks


def _rel(a, b):
    num = sum(((x - y) ** 2).sum() for x, y in zip(a, b)) ** 0.5
    den = sum((y ** 2).sum() for y in b) ** 0.5
    return float(num / den)


def _fsdp_ranks(rank, world):
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import paracomm.fsdp as pf
    from paracomm.bench.fsdp import train

    out = {}
    steps = 10
    base = train(steps=steps, comms="torch")
    para = train(steps=steps, comms="paracomm")
    out["units"] = para["units"]
    out["fp32"] = _rel(para["params"], base["params"])
    bf16 = train(steps=steps, comms="paracomm", wire_dtype=torch.bfloat16)
    out["bf16_loss"] = (bf16["losses"][-1], para["losses"][-1])
    out["bf16_params"] = _rel(bf16["params"], para["params"])

    knobs = dict(steps=steps, reshard_after_forward=False, accumulate=2, divide_factor=3.0)
    ref = train(comms="torch", force_sum=True, **knobs)
    premul = train(comms="paracomm", **knobs)  # PREMUL_SUM(1/3): a scale in paracomm
    summed = train(comms="paracomm", force_sum=True, **knobs)
    out["premul"] = _rel(premul["params"], ref["params"])
    out["force_sum"] = _rel(summed["params"], ref["params"])
    out["moved"] = _rel(ref["params"], base["params"])  # the knobs change the run (the check can fail)

    mp32 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    t32 = train(steps=steps, comms="torch", mp_policy=mp32)
    p32 = train(steps=steps, comms="paracomm", mp_policy=mp32)
    out["mp_fp32_loss"] = (p32["losses"][-1], t32["losses"][-1])
    out["mp_fp32_params"] = _rel(p32["params"], t32["params"])

    class Recording(pf.ReduceScatter):
        """paracomm's reduce-scatter for FSDP2, also measuring torch's on the same gradients."""

        def __init__(self):
            super().__init__()
            self.err = {"paracomm": 0.0, "torch": 0.0, "norm": 0.0}

        def __call__(self, output_tensor, input_tensor, group, op=dist.ReduceOp.SUM, async_op=False):
            n = output_tensor.numel()
            exact = input_tensor.double()
            dist.all_reduce(exact, group=group)  # float64: exact enough to be the reference
            exact = exact[rank * n:(rank + 1) * n]
            if op == dist.ReduceOp.AVG:
                exact = exact / group.size()
            theirs = torch.empty_like(output_tensor)
            dist.reduce_scatter_tensor(theirs, input_tensor.clone(), op=op, group=group)
            super().__call__(output_tensor, input_tensor, group, op, async_op)
            self.err["paracomm"] += float(((output_tensor.double() - exact) ** 2).sum())
            self.err["torch"] += float(((theirs.double() - exact) ** 2).sum())
            self.err["norm"] += float((exact ** 2).sum())

    rec = Recording()
    mp16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    train(steps=steps, comms="torch", mp_policy=mp16, reduce_scatter_comm=rec)
    out["mp_bf16_err"] = rec.err
    out["mp_bf16_calls"] = rec.calls
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_with_paracomm(world):
    results = run_ranks(world, _fsdp_ranks, timeout=900)
    r = results[0]
    assert r["units"] == 3  # two layers and the root
    assert r["fp32"] <= 1e-5, r
    assert r["premul"] <= 1e-5 and r["force_sum"] <= 1e-5, r
    assert r["moved"] > 1e-3, r
    loss16, loss32 = r["bf16_loss"]
    assert abs(loss16 - loss32) <= 0.01 * abs(loss32), r
    assert r["bf16_params"] > 0, r  # the bf16 wire did round something
    a, b = r["mp_fp32_loss"]
    assert abs(a - b) <= 0.01 * abs(b) and r["mp_fp32_params"] <= 1e-2, r
    # The bf16 reduce-scatter: each rank's shard errors, summed over the ranks and the run's calls.
    num = {k: sum(x["mp_bf16_err"][k] for x in results) for k in ("paracomm", "torch", "norm")}
    e_para, e_torch = (num["paracomm"] / num["norm"]) ** 0.5, (num["torch"] / num["norm"]) ** 0.5
    print(f"N={world}: bf16 reduce-scatter normwise error vs float64: paracomm {e_para:.3g}, torch {e_torch:.3g}")
    assert r["mp_bf16_calls"] == 3 * 10
    if world == 2:
        # Two bf16 inputs: their fp32 sum is exact and both round it to bf16 once: the same bits.
        assert e_para <= e_torch, (e_para, e_torch)
    else:
        assert e_para < e_torch, (e_para, e_torch)


def _scaler_ranks(rank, world):
    import math

    from paracomm.amp import GradScaler
    from paracomm.bench.fsdp import train

    out = {}
    plain = train(steps=6, comms="paracomm-rs")
    # A power-of-two scale is exact: scaling the loss and unscaling inside the reduce-scatter changes no bit.
    fused = train(steps=6, comms="paracomm-rs", scaler=GradScaler("cpu", init_scale=2.0 ** 10), fuse_scaler=True)
    out["fused_vs_plain"] = _rel(fused["params"], plain["params"])
    out["scales"] = fused["scales"]
    out["fused_calls"] = fused["fused_calls"]

    def poison(r, data):  # a nan in rank 1's batch of step 2: every shard of that step's gradients is nan
        if r == 1:
            data[2][0][0, 0, 0] = float("nan")

    skipped = train(steps=6, comms="paracomm-rs", scaler=GradScaler("cpu", init_scale=2.0 ** 10),
                    fuse_scaler=True, data_hook=poison)
    out["skip_scales"] = skipped["scales"]
    out["finite"] = all(bool(p.isfinite().all()) for p in skipped["params"])
    out["nan_loss"] = math.isnan(skipped["losses"][2])
    return out


def test_fsdp2_scaler_fusion():
    """use_paracomm(model, scaler=...): unscale and check inside the reduce-scatter. With a power-of-two scale the
    parameters are those of the unscaled run; a nan on one rank makes every rank skip the step (the scale halves
    on every rank, the parameters stay finite)."""
    results = run_ranks(2, _scaler_ranks, timeout=600)
    for r in results:
        assert r["fused_vs_plain"] <= 1e-6, r
        assert r["scales"] == [1024.0] * 6, r
        assert r["fused_calls"] == 3 * 6, r  # every unit's reduce-scatter of every step unscaled
        assert r["skip_scales"] == [1024.0] * 3 + [512.0] * 3, r
        assert r["finite"], r
    assert results[1]["nan_loss"] and not results[0]["nan_loss"]
