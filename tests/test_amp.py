"""paracomm.amp.GradScaler against torch.amp.GradScaler, step for step, and its own additions.

Side-by-side tests run two identical models, one with torch's scaler and one with paracomm's, through the same
data and the same injected inf/nan gradients, and require bitwise equal scales, skipped steps, gradients and
parameters after every step.
"""
import copy
import math
import pickle

import pytest
import torch

import paracomm
from paracomm.amp import GradScaler

INF, NAN = float("inf"), float("nan")


def _assert_bitwise(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------------------------------------
# A model whose gradients take every path: fp32 contiguous, a transposed and a channels_last layout (kernel
# through a permuted alias), bf16 (kernel, mixed dtypes in one call) and float64 (torch's fallback).
# --------------------------------------------------------------------------------------------------------


class _MixedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 16)
        self.w_t = torch.nn.Parameter(torch.randn(8, 16).t() * 0.3)  # shape (16, 8), strides (1, 16)
        self.b16 = torch.nn.Parameter(torch.randn(8).bfloat16())
        self.f64 = torch.nn.Parameter(torch.randn(8, dtype=torch.float64) * 0.1)
        self.conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)

    def forward(self, x, img):
        h = torch.tanh(self.fc1(x)) @ self.w_t
        h = h * self.b16.float() + self.f64.float()
        c = self.conv(img).mean(dim=(2, 3))
        return h.sum(1) + c.sum(1)


def _mixed_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(5, 6, generator=g)
    img = torch.randn(5, 3, 5, 5, generator=g).to(memory_format=torch.channels_last)
    y = torch.randn(5, generator=g)
    return x, img, y


# step -> (parameter name, flat index, value): inf/-inf/nan in the first, middle and last parameters.
_INJECT = {2: ("fc1.weight", 0, INF), 6: ("b16", 7, NAN), 7: ("conv.weight", 50, -INF), 13: ("f64", 3, NAN),
           14: ("w_t", 127, INF)}


def _inject(model, step):
    if step in _INJECT:
        name, index, value = _INJECT[step]
        grad = dict(model.named_parameters())[name].grad
        grad[torch.unravel_index(torch.tensor(index), grad.shape)] = value


def _make_opt(kind, model):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def _check_layouts(model):
    assert not model.w_t.grad.is_contiguous()
    assert model.conv.weight.grad.is_contiguous(memory_format=torch.channels_last)
    assert not model.conv.weight.grad.is_contiguous()


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
def test_fp32_side_by_side_with_torch(opt_kind):
    torch.manual_seed(0)
    ref_model = _MixedNet()
    our_model = copy.deepcopy(ref_model)
    ref_opt, our_opt = _make_opt(opt_kind, ref_model), _make_opt(opt_kind, our_model)
    kw = dict(init_scale=2.0**10, growth_factor=2.0, backoff_factor=0.5, growth_interval=3)
    ref_scaler, our_scaler = torch.amp.GradScaler("cpu", **kw), GradScaler("cpu", **kw)
    scales, skipped = [], []
    for step in range(20):
        x, img, y = _mixed_batch(step)
        before = _params(our_model)
        for model, opt, scaler in ((ref_model, ref_opt, ref_scaler), (our_model, our_opt, our_scaler)):
            opt.zero_grad(set_to_none=True)
            loss = ((model(x, img) - y) ** 2).mean()
            scaler.scale(loss).backward()
            _inject(model, step)
            if step % 3 == 1:  # explicit unscale_ on some steps, implicit in step() on the others
                if scaler is our_scaler:
                    result = scaler.unscale_(opt, norm=step % 2 == 1)
                    assert (result is None) == (step % 2 == 0)
                else:
                    scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        _check_layouts(our_model)
        for ref_p, our_p in zip(ref_model.parameters(), our_model.parameters()):
            _assert_bitwise(our_p.grad, ref_p.grad)
            _assert_bitwise(our_p, ref_p)
        assert our_scaler.get_scale() == ref_scaler.get_scale()
        assert our_scaler._get_growth_tracker() == ref_scaler._get_growth_tracker()
        was_skipped = all(torch.equal(b, p) for b, p in zip(before, our_model.parameters()))
        assert was_skipped == (step in _INJECT), step
        scales.append(our_scaler.get_scale())
        skipped.append(was_skipped)
    # Both growth and backoff happened.
    assert any(b > a for a, b in zip(scales, scales[1:])) and any(b < a for a, b in zip(scales, scales[1:]))
    assert our_scaler.state_dict() == ref_scaler.state_dict()


def test_one_fused_call_per_device_for_mixed_dtypes_and_layouts(monkeypatch):
    import paracomm.amp as amp_module

    kernel_calls, torch_calls = [], []
    real_kernel = amp_module.unscale_and_check_
    real_torch = torch._amp_foreach_non_finite_check_and_unscale_

    def counting_kernel(grads, *args, **kwargs):
        kernel_calls.append([g.dtype for g in grads])
        return real_kernel(grads, *args, **kwargs)

    def counting_torch(grads, *args):
        torch_calls.append([g.dtype for g in grads])
        return real_torch(grads, *args)

    monkeypatch.setattr(amp_module, "unscale_and_check_", counting_kernel)
    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", counting_torch)
    torch.manual_seed(4)
    model = _MixedNet()
    model.f64.requires_grad_(False)  # the one dtype the kernel does not take
    x, img, y = _mixed_batch(0)
    params = [p for p in model.parameters() if p.requires_grad]
    params.append(torch.nn.Parameter(torch.randn(5).half()))
    params[-1].grad = torch.randn(5).half()
    for norm in (False, True):
        scaler = GradScaler("cpu")
        opt = torch.optim.SGD(params, lr=0.1)
        for p in params[:-1]:
            p.grad = None
        scaler.scale(((model(x, img) - y) ** 2).mean()).backward()
        _check_layouts(model)
        kernel_calls.clear()
        scaler.unscale_(opt, norm=norm)
        assert len(kernel_calls) == 1 and len(kernel_calls[0]) == len(params)
        assert set(kernel_calls[0]) == {torch.float32, torch.bfloat16, torch.float16}
        assert torch_calls == []


# --------------------------------------------------------------------------------------------------------
# fp16
# --------------------------------------------------------------------------------------------------------


def test_fp16_grads_are_accepted_and_unscaled_like_fp32_math():
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(n).half()) for n in (1, 33, 257)]
    grads = [torch.randn(p.shape).half() * 100 for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    ref = torch.amp.GradScaler("cpu", init_scale=256.0)
    ref.scale(torch.ones(()))
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients."):
        ref.unscale_(torch.optim.SGD(params, lr=0.1))

    scaler = GradScaler("cpu", init_scale=256.0)
    scaler.scale(torch.ones(()))
    opt = torch.optim.SGD(params, lr=0.1)
    norm = scaler.unscale_(opt, norm=True)
    inv = torch.tensor(256.0).double().reciprocal().float()
    for p, g in zip(params, grads):
        _assert_bitwise(p.grad, (g.float() * inv).half())
    expected = math.sqrt(sum((g.double() / 256.0).square().sum().item() for g in grads))
    assert norm.dtype == torch.float32 and norm.numel() == 1
    assert norm.item() == pytest.approx(expected, rel=1e-6)
    assert scaler._found_inf_per_device(opt)[torch.device("cpu")].item() == 0.0


def _fp16_problem():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 8, generator=g)
    w_true = torch.randn(8, 4, generator=g)
    y = x @ w_true
    return x.half(), y


def _fp16_model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).half()


def test_fp16_model_with_fp32_master_weights_trains_through_out_path():
    """Master-weight training: fp16 grads are unscaled straight into the fp32 master grads (out=), one pass,
    under the comm-hook protocol, so the scaler neither unscales again nor misses an overflow."""
    x, y = _fp16_problem()
    model = _fp16_model()
    model_params = list(model.parameters())
    master = [torch.nn.Parameter(p.detach().float()) for p in model_params]
    for m in master:
        m.grad = torch.zeros_like(m)
    opt = torch.optim.SGD(master, lr=0.05)
    # init_scale 2**20: scaled fp16 grads overflow at first, so the scaler must skip and back off.
    scaler = GradScaler("cpu", init_scale=2.0**20, growth_interval=5)
    losses, skips = [], 0
    for step in range(40):
        model.zero_grad(set_to_none=True)
        loss = ((model(x).float() - y) ** 2).mean()
        losses.append(loss.item())
        scaler.scale(loss).backward()
        assert all(p.grad.dtype == torch.float16 for p in model_params)
        inv_scale, found_inf = scaler.comm_hook_unscale("cpu")
        paracomm.unscale_and_check_([p.grad for p in model_params], inv_scale, found_inf,
                                    out=[m.grad for m in master])
        before = _params(torch.nn.ParameterList(master))
        expect_skip = bool(found_inf.item())
        scaler.step(opt)
        scaler.update()
        skipped = all(torch.equal(b, m) for b, m in zip(before, master))
        assert skipped == expect_skip
        skips += skipped
        with torch.no_grad():
            for p, m in zip(model_params, master):
                p.copy_(m)
    assert skips >= 1 and scaler.get_scale() < 2.0**20
    assert losses[-1] < 0.3 * losses[0]


def test_fp16_model_trains_with_scaler_unscaling_fp16_grads():
    x, y = _fp16_problem()
    model = _fp16_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = GradScaler("cpu", init_scale=2.0**20, growth_interval=5)
    losses = []
    for _ in range(40):
        opt.zero_grad(set_to_none=True)
        loss = ((model(x).float() - y) ** 2).mean()
        losses.append(loss.item())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() < 2.0**20  # overflowed and backed off at least once
    assert losses[-1] < 0.5 * losses[0]


# --------------------------------------------------------------------------------------------------------
# norm
# --------------------------------------------------------------------------------------------------------


def _norm_setup(seed=5):
    """Params whose grads take every path (incl. a sparse embedding grad with repeated indices)."""
    g = torch.Generator().manual_seed(seed)
    params = [
        torch.nn.Parameter(torch.randn(40, 7, generator=g)),
        torch.nn.Parameter(torch.randn(33, generator=g).half()),
        torch.nn.Parameter(torch.randn(9, 5, generator=g).bfloat16()),
        torch.nn.Parameter(torch.randn(6, 10, generator=g).t()),  # transposed: kernel via alias
        torch.nn.Parameter(torch.randn(12, generator=g, dtype=torch.float64)),  # torch's fallback
        torch.nn.Parameter(torch.randn(4, 8, generator=g)),  # grad with gaps: torch's fallback
        torch.nn.Parameter(torch.randn(10, 3, generator=g)),  # sparse grad
        torch.nn.Parameter(torch.randn(3, generator=g)),  # no grad
    ]
    for p in params[:4]:
        p.grad = (torch.randn(p.shape, generator=g) * 300).to(p.dtype)
    params[3].grad = (torch.randn(6, 10, generator=g) * 300).t()
    params[4].grad = torch.randn(12, generator=g, dtype=torch.float64) * 300
    params[5].grad = (torch.randn(4, 16, generator=g) * 300)[:, ::2]
    idx = torch.tensor([[1, 4, 1, 9]])
    params[6].grad = torch.sparse_coo_tensor(idx, torch.randn(4, 3, generator=g) * 300, (10, 3), check_invariants=True)
    assert not params[3].grad.is_contiguous() and not params[5].grad.is_contiguous()
    assert not params[6].grad.is_coalesced()
    return params


def _reference_norm(grads, inv):
    total = 0.0
    for grad in grads:
        dense = grad.to_dense() if grad.is_sparse else grad
        total += (dense.double() * inv).square().sum().item()
    return math.sqrt(total)


def test_unscale_norm_matches_float64_reference_and_grads_match_torch():
    params = _norm_setup()
    ref_params = []
    for i, p in enumerate(params):
        ref = torch.nn.Parameter(p.detach().clone())
        # torch's scaler refuses fp16 grads: the fp16 one (index 1) is compared by hand.
        ref.grad = None if p.grad is None or i == 1 else p.grad.clone()
        ref_params.append(ref)
    scale = 512.0
    inv = float(torch.tensor(scale).double().reciprocal().float())
    fp16_before = params[1].grad.clone()
    grads_before = [p.grad.clone() for p in params if p.grad is not None]
    grad_objects = [p.grad for p in params]

    scaler = GradScaler("cpu", init_scale=scale)
    scaler.scale(torch.ones(()))
    opt = torch.optim.SGD(params, lr=0.1)
    norm = scaler.unscale_(opt, norm=True)
    ref = torch.amp.GradScaler("cpu", init_scale=scale)
    ref.scale(torch.ones(()))
    ref.unscale_(torch.optim.SGD(ref_params, lr=0.1))

    assert norm.dtype == torch.float32 and norm.numel() == 1 and norm.device.type == "cpu"
    assert norm.item() == pytest.approx(_reference_norm(grads_before, inv), rel=2e-6)
    for i, (p, r) in enumerate(zip(params, ref_params)):
        if p.grad is None:
            assert r.grad is None
        elif i == 1:
            assert r.grad is None
            _assert_bitwise(p.grad, (fp16_before.float() * inv).half())
        elif p.grad.is_sparse:  # unscaled uncoalesced, as torch does
            assert not p.grad.is_coalesced()
            _assert_bitwise(p.grad._values(), r.grad._values())
            _assert_bitwise(p.grad._indices(), r.grad._indices())
        else:
            _assert_bitwise(p.grad, r.grad)
            assert p.grad is grad_objects[i]  # unscaled in place, layout kept
    assert scaler._found_inf_per_device(opt)[torch.device("cpu")].item() == 0.0


def test_unscale_norm_nonfinite_and_empty_and_disabled():
    params = _norm_setup()
    params[2].grad.view(-1)[3] = INF
    scaler = GradScaler("cpu", init_scale=8.0)
    scaler.scale(torch.ones(()))
    opt = torch.optim.SGD(params, lr=0.1)
    assert not math.isfinite(scaler.unscale_(opt, norm=True).item())
    assert scaler._found_inf_per_device(opt)[torch.device("cpu")].item() == 1.0

    # unscale_ without norm returns None, as torch's.
    scaler2 = GradScaler("cpu", init_scale=8.0)
    scaler2.scale(torch.ones(()))
    assert scaler2.unscale_(torch.optim.SGD(_norm_setup(), lr=0.1)) is None

    # No gradients at all: norm 0.
    bare = [torch.nn.Parameter(torch.randn(3))]
    scaler3 = GradScaler("cpu")
    scaler3.scale(torch.ones(()))
    assert scaler3.unscale_(torch.optim.SGD(bare, lr=0.1), norm=True).item() == 0.0

    # Disabled: nothing is unscaled, the norm is the gradients' as they are.
    params = _norm_setup()
    grads_before = [p.grad.clone() for p in params if p.grad is not None]
    disabled = GradScaler("cpu", enabled=False)
    norm = disabled.unscale_(torch.optim.SGD(params, lr=0.1), norm=True)
    assert norm.item() == pytest.approx(_reference_norm(grads_before, 1.0), rel=2e-6)
    for before, p in zip(grads_before, [p for p in params if p.grad is not None]):
        _assert_bitwise(p.grad.to_dense() if p.grad.is_sparse else p.grad,
                        before.to_dense() if before.is_sparse else before)
    assert disabled.unscale_(torch.optim.SGD(params, lr=0.1)) is None


# --------------------------------------------------------------------------------------------------------
# comm-hook protocol
# --------------------------------------------------------------------------------------------------------


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(6, 24), torch.nn.Tanh(), torch.nn.Linear(24, 24), torch.nn.Tanh(),
                               torch.nn.Linear(24, 3))


_HOOK_INJECT = {1: (0, 5, INF), 5: (2, 0, NAN), 6: (5, 2, -INF), 12: (3, 11, INF)}
_OTHER_RANK_INF = {9, 16}  # steps where only "another rank" saw an inf: the hook's flag says so


def _simulated_hook(scaler, model):
    """What ring_hook does: each bucket (here: two, in reverse order like DDP's) unscales and checks its grads
    with the scaler's tensors."""
    grads = [p.grad for p in model.parameters()]
    buckets = [grads[3:], grads[:3]]
    pairs = []
    for bucket in buckets:
        inv_scale, found_inf = scaler.comm_hook_unscale(torch.device("cpu"))
        pairs.append((inv_scale, found_inf))
        paracomm.unscale_and_check_(bucket, inv_scale, found_inf)
    assert pairs[0][0] is pairs[1][0] and pairs[0][1] is pairs[1][1]
    return pairs[0]


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
def test_comm_hook_protocol_side_by_side_with_torch(opt_kind):
    torch.manual_seed(11)
    ref_model = _mlp()
    our_model = copy.deepcopy(ref_model)
    ref_opt, our_opt = _make_opt(opt_kind, ref_model), _make_opt(opt_kind, our_model)
    kw = dict(init_scale=2.0**12, growth_interval=2)
    ref_scaler, our_scaler = torch.amp.GradScaler("cpu", **kw), GradScaler("cpu", **kw)
    scales = []
    for step in range(20):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
        before = _params(our_model)
        for model, opt, scaler in ((ref_model, ref_opt, ref_scaler), (our_model, our_opt, our_scaler)):
            opt.zero_grad(set_to_none=True)
            scaler.scale(((model(x) - y) ** 2).mean()).backward()
            if step in _HOOK_INJECT:
                i, j, value = _HOOK_INJECT[step]
                list(model.parameters())[i].grad.view(-1)[j] = value
            if step in _OTHER_RANK_INF and scaler is ref_scaler:
                # torch's DDP would see the other rank's inf in the reduced gradient.
                list(model.parameters())[4].grad.view(-1)[0] = INF
            if scaler is our_scaler:
                scale_now = scaler._scale.clone()
                inv_scale, found_inf = _simulated_hook(scaler, model)
                _assert_bitwise(inv_scale, scale_now.double().reciprocal().float())
                assert inv_scale.dtype == torch.float32 and inv_scale.numel() == 1
                assert found_inf.dtype == torch.float32 and found_inf.numel() == 1
                assert found_inf.item() == float(step in _HOOK_INJECT)
                if step in _OTHER_RANK_INF:
                    found_inf.fill_(1.0)
                if step % 4 == 3:
                    grads = [p.grad.clone() for p in model.parameters()]
                    norm = scaler.unscale_(opt, norm=True)
                    for gr, p in zip(grads, model.parameters()):
                        _assert_bitwise(p.grad, gr)  # not unscaled a second time, not modified
                    ref_norm = _reference_norm(grads, 1.0)
                    assert norm.item() == pytest.approx(ref_norm, rel=2e-6) or not math.isfinite(ref_norm)
                elif step % 4 == 1:
                    scaler.unscale_(opt)
            elif step % 4 in (1, 3):
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        assert our_scaler._comm_hook_state == {}
        for ref_p, our_p in zip(ref_model.parameters(), our_model.parameters()):
            _assert_bitwise(our_p, ref_p)
            if step not in _OTHER_RANK_INF:
                _assert_bitwise(our_p.grad, ref_p.grad)
        assert our_scaler.get_scale() == ref_scaler.get_scale()
        assert our_scaler._get_growth_tracker() == ref_scaler._get_growth_tracker()
        was_skipped = all(torch.equal(b, p) for b, p in zip(before, our_model.parameters()))
        assert was_skipped == (step in _HOOK_INJECT or step in _OTHER_RANK_INF), step
        scales.append(our_scaler.get_scale())
    assert any(b > a for a, b in zip(scales, scales[1:])) and any(b < a for a, b in zip(scales, scales[1:]))


def test_comm_hook_state_is_per_iteration_and_sparse_grads_still_unscaled():
    scaler = GradScaler("cpu", init_scale=64.0)
    with pytest.raises(AssertionError, match="Attempted comm_hook_unscale but _scale is None"):
        scaler.comm_hook_unscale("cpu")
    scaler.scale(torch.ones(()))
    inv1, found1 = scaler.comm_hook_unscale("cpu")
    assert scaler.comm_hook_unscale(torch.device("cpu"))[1] is found1
    found1.fill_(1.0)
    dense = torch.nn.Parameter(torch.randn(5))
    dense.grad = torch.randn(5) * 64
    dense_grad = dense.grad.clone()
    sparse = torch.nn.Parameter(torch.randn(6, 2))
    values = torch.randn(3, 2) * 64
    sparse.grad = torch.sparse_coo_tensor(torch.tensor([[0, 3, 0]]), values.clone(), (6, 2), check_invariants=True)
    opt = torch.optim.SGD([dense, sparse], lr=0.1)
    scaler.step(opt)  # skipped: the hook said inf
    _assert_bitwise(dense.grad, dense_grad)  # dense: the hook's job, untouched
    _assert_bitwise(sparse.grad._values(), values * inv1)  # sparse: unscaled by the scaler
    found = scaler._found_inf_per_device(opt)[torch.device("cpu")]
    assert found is not found1 and found.item() == 1.0
    scaler.update()
    assert scaler.get_scale() == 32.0
    assert found1.item() == 1.0  # update's in-place sum did not touch the hook's tensor
    inv2, found2 = scaler.comm_hook_unscale("cpu")
    assert found2 is not found1 and found2.item() == 0.0
    assert inv2.item() == 1.0 / 32.0
    # update(new_scale) also ends the hook's iteration.
    scaler.update(4.0)
    assert scaler.comm_hook_unscale("cpu")[0].item() == 0.25


@pytest.mark.parametrize("use_hook", [False, True], ids=["no_hook", "hook"])
def test_optimizer_that_unscales_itself(use_hook):
    """Fused SGD takes the scale from the scaler and unscales inside its step. Without a hook the scaler only
    checks for inf/nan (torch's _check_inf_per_device, bitwise torch's result); with a comm hook it must not
    divide the hook's already unscaled gradients again (close to torch's scaler + fused SGD)."""
    torch.manual_seed(2)
    ref_model = _mlp()
    our_model = copy.deepcopy(ref_model)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05, fused=True)
    our_opt = torch.optim.SGD(our_model.parameters(), lr=0.05, fused=True)
    ref_scaler, our_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10), GradScaler("cpu", init_scale=2.0**10)
    for step in range(6):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
        before = _params(our_model)
        for model, opt, scaler in ((ref_model, ref_opt, ref_scaler), (our_model, our_opt, our_scaler)):
            opt.zero_grad(set_to_none=True)
            scaler.scale(((model(x) - y) ** 2).mean()).backward()
            if step == 3:
                list(model.parameters())[1].grad.view(-1)[0] = NAN
            if scaler is our_scaler and use_hook:
                _simulated_hook(scaler, model)
            scaler.step(opt)
            scaler.update()
        for ref_p, our_p in zip(ref_model.parameters(), our_model.parameters()):
            if use_hook:  # fused SGD divides by the scale, the hook multiplies by its reciprocal
                torch.testing.assert_close(our_p, ref_p, rtol=1e-6, atol=1e-7)
            else:
                _assert_bitwise(our_p, ref_p)
        assert our_scaler.get_scale() == ref_scaler.get_scale()
        assert all(torch.equal(b, p) for b, p in zip(before, our_model.parameters())) == (step == 3)


# --------------------------------------------------------------------------------------------------------
# torch's state machine and errors, and bad arguments
# --------------------------------------------------------------------------------------------------------


def _one_param_opt():
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    return p, torch.optim.SGD([p], lr=0.1)


@pytest.mark.parametrize("cls", [torch.amp.GradScaler, GradScaler], ids=["torch", "paracomm"])
def test_state_errors_match_torch(cls):
    scaler = cls("cpu")
    _, opt = _one_param_opt()
    with pytest.raises(AssertionError, match="Attempted unscale_ but _scale is None"):
        scaler.unscale_(opt)
    with pytest.raises(AssertionError, match="Attempted step but _scale is None"):
        scaler.step(opt)
    scaler.scale(torch.ones(()))
    with pytest.raises(AssertionError, match="No inf checks were recorded prior to update"):
        scaler.update()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="unscale_\\(\\) has already been called on this optimizer"):
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="Closure use is not currently supported"):
        scaler.step(opt, closure=lambda: None)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="step\\(\\) has already been called since the last update"):
        scaler.step(opt)
    with pytest.raises(RuntimeError, match="unscale_\\(\\) is being called after step"):
        scaler.unscale_(opt)
    with pytest.raises(AssertionError, match="may only be pickled at the beginning"):
        pickle.dumps(scaler)
    scaler.update()
    scaler.unscale_(opt)  # a new iteration: allowed again
    bare = torch.optim.SGD([torch.nn.Parameter(torch.randn(2))], lr=0.1)
    with pytest.raises(AssertionError, match="No inf checks were recorded for this optimizer"):
        scaler.step(bare)
    with pytest.raises(AssertionError, match="The growth factor must be > 1.0"):
        cls("cpu", growth_factor=1.0)
    with pytest.raises(AssertionError, match="The backoff factor must be < 1.0"):
        cls("cpu", backoff_factor=1.0)


def test_pickle_and_state_dict_round_trip():
    scaler = GradScaler("cpu", init_scale=128.0, growth_interval=7)
    p, opt = _one_param_opt()
    scaler.scale(torch.ones(()))
    scaler.step(opt)
    scaler.update()
    clone = pickle.loads(pickle.dumps(scaler))
    assert isinstance(clone, GradScaler) and clone.state_dict() == scaler.state_dict()
    clone.scale(torch.ones(()))
    clone.comm_hook_unscale("cpu")  # the lock came back
    with pytest.raises(AssertionError, match="may only be pickled at the beginning"):
        pickle.dumps(clone)  # hook state pending
    fresh = GradScaler("cpu")
    fresh.load_state_dict(scaler.state_dict())
    assert fresh.state_dict() == scaler.state_dict()


def test_bad_arguments_write_nothing():
    scaler = GradScaler("cpu", init_scale=16.0)
    scaler.scale(torch.ones(()))
    p, opt = _one_param_opt()
    grad = p.grad.clone()
    with pytest.raises(TypeError, match="norm must be a bool"):
        scaler.unscale_(opt, norm="yes")
    with pytest.raises(TypeError, match="norm must be a bool"):
        scaler.unscale_(opt, norm=1)
    _assert_bitwise(p.grad, grad)
    scaler.unscale_(opt)  # the refused calls left the optimizer READY
    _assert_bitwise(p.grad, grad / 16.0)
    with pytest.raises(TypeError, match="comm_hook_unscale: device must be a str or torch.device"):
        scaler.comm_hook_unscale(0)
    with pytest.raises(ValueError, match="comm_hook_unscale: device must be a cpu or cuda device"):
        scaler.comm_hook_unscale("meta")
    with pytest.raises(ValueError, match="is not a device name"):
        scaler.comm_hook_unscale("gpu7")
    assert scaler._comm_hook_state == {}


def test_disabled_scaler_is_a_pass_through():
    scaler = GradScaler("cpu", enabled=False)
    p, opt = _one_param_opt()
    before, grad = p.detach().clone(), p.grad.clone()
    out = torch.randn(3)
    assert scaler.scale(out) is out
    inv_scale, found_inf = scaler.comm_hook_unscale("cpu")
    assert inv_scale.item() == 1.0 and found_inf.item() == 0.0 and scaler._comm_hook_state == {}
    scaler.step(opt)
    scaler.update()
    _assert_bitwise(p.detach(), before - 0.1 * grad)
    assert scaler.get_scale() == 1.0 and not scaler.is_enabled()


# --------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
def test_cuda_side_by_side_with_torch(opt_kind):
    torch.manual_seed(0)
    ref_model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).cuda()
    our_model = copy.deepcopy(ref_model)
    ref_opt, our_opt = _make_opt(opt_kind, ref_model), _make_opt(opt_kind, our_model)
    kw = dict(init_scale=2.0**10, growth_interval=3)
    ref_scaler, our_scaler = torch.amp.GradScaler("cuda", **kw), GradScaler("cuda", **kw)
    for step in range(20):
        g = torch.Generator(device="cuda").manual_seed(step)
        x = torch.randn(16, 32, device="cuda", generator=g)
        before = _params(our_model)
        for model, opt, scaler in ((ref_model, ref_opt, ref_scaler), (our_model, our_opt, our_scaler)):
            opt.zero_grad(set_to_none=True)
            scaler.scale(model(x).square().mean()).backward()
            if step in (2, 9):
                list(model.parameters())[step % 4].grad.view(-1)[1] = INF if step == 2 else NAN
            scaler.step(opt)
            scaler.update()
        for ref_p, our_p in zip(ref_model.parameters(), our_model.parameters()):
            _assert_bitwise(our_p, ref_p)
        assert our_scaler.get_scale() == ref_scaler.get_scale()
        assert all(torch.equal(b, p) for b, p in zip(before, our_model.parameters())) == (step in (2, 9))


@pytest.mark.cuda
def test_cuda_and_cpu_grads_one_norm_and_hook():
    g = torch.Generator().manual_seed(9)
    cpu_p = [torch.nn.Parameter(torch.randn(100, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g).half())]
    cuda_p = [torch.nn.Parameter(torch.randn(1000, generator=g).cuda()),
              torch.nn.Parameter(torch.randn(31, generator=g).bfloat16().cuda())]
    for p in cpu_p + cuda_p:
        p.grad = (torch.randn(p.shape, generator=g) * 1000).to(p.dtype).to(p.device)
    grads = [p.grad.clone() for p in cpu_p + cuda_p]
    scaler = GradScaler("cuda", init_scale=1024.0)
    scaler.scale(torch.ones((), device="cuda"))
    norm = scaler.unscale_(torch.optim.SGD(cpu_p + cuda_p, lr=0.1), norm=True)
    assert norm.device.type == "cuda"
    inv = float(torch.tensor(1024.0).double().reciprocal().float())
    assert norm.item() == pytest.approx(_reference_norm(grads, inv), rel=2e-6)
    for p, before in zip(cpu_p + cuda_p, grads):
        _assert_bitwise(p.grad, (before.float() * inv).to(p.dtype))

    # The hook on the CUDA device only: CUDA grads are left alone, CPU grads are unscaled by the scaler.
    for p, before in zip(cpu_p + cuda_p, grads):
        p.grad = before.clone()
    scaler.update(1024.0)
    inv_scale, found_inf = scaler.comm_hook_unscale("cuda")
    assert inv_scale.device == torch.device("cuda", torch.cuda.current_device())
    paracomm.unscale_and_check_([p.grad for p in cuda_p], inv_scale, found_inf)
    opt = torch.optim.SGD(cpu_p + cuda_p, lr=0.1)
    norm = scaler.unscale_(opt, norm=True)
    assert norm.item() == pytest.approx(_reference_norm(grads, inv), rel=2e-6)
    for p, before in zip(cpu_p + cuda_p, grads):
        _assert_bitwise(p.grad, (before.float() * inv).to(p.dtype))
