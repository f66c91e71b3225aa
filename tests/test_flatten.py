"""paracomm.flatten / flatten(out=) / unflatten_ against torch references.

Reference: ``torch.cat`` of each ``t.double() * scale``, then one cast (torch's own ``Tensor.to``); without a
scale, ``torch.cat`` of the cast tensors. With power-of-two scales every product is exact in float32 and
float64, so the kernels must match bitwise; an inexact scale (0.3) is held to one rounding of the result dtype.
Data is random and never zero.
"""
import pytest
import torch

import paracomm

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64]
SIZES = [1, 3, 4095, 65535, 65536, 65537, 1_000_003]
INT_DTYPES = (torch.int32, torch.int64)
# (float scale, scale_tensor value or None). The factor applied is their product.
SCALES = {
    "none": (1.0, None),
    "float": (0.25, None),
    "tensor": (1.0, 4.0),
    "both": (0.5, 0.125),
    "inexact": (0.3, None),
}


def _other_device(device):
    return "meta" if device == "cpu" else "cpu"


def _rand(shape, dtype, device, gen):
    """Random, never-zero values that every dtype holds after scaling by up to 4 (|x| in [1, 100))."""
    n = torch.Size(shape).numel()
    if dtype in INT_DTYPES:
        mag = torch.randint(1, 100, (n,), generator=gen, dtype=torch.int64)
    else:
        mag = torch.rand(n, generator=gen, dtype=torch.float64) * 99 + 1
    sign = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64) * 2 - 1
    return (mag * sign).to(dtype).reshape(shape).to(device)


def _scale_args(name, device):
    value, tensor_value = SCALES[name]
    st = None if tensor_value is None else torch.tensor([tensor_value], dtype=torch.float32, device=device)
    factor = value * (1.0 if tensor_value is None else tensor_value)
    return value, st, factor


def _scale_kwarg(value, st):
    """paracomm's public `scale=`: a float, or a tensor (folding in a float, if any, beforehand)."""
    if st is None:
        return None if value == 1.0 else value
    return st if value == 1.0 else st * value


def _ref_flat(tensors, dtype, factor):
    if factor == 1.0:
        return torch.cat([t.cpu().flatten().to(dtype) for t in tensors])
    return torch.cat([t.cpu().double().flatten() * factor for t in tensors]).to(dtype)


def _ref_unflat(flat, tensors, factor):
    out, offset = [], 0
    for t in tensors:
        seg = flat.cpu()[offset:offset + t.numel()]
        offset += t.numel()
        seg = seg.to(t.dtype) if factor == 1.0 else (seg.double() * factor).to(t.dtype)
        out.append(seg.reshape(t.shape))
    return out


def _tolerance(dtype, exact):
    if exact or dtype in INT_DTYPES:
        return dict(rtol=0.0, atol=0.0)
    # A float32 product (with a float32-rounded factor), then one rounding of `dtype`.
    ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-22, torch.float64: 2.0**-22}
    return dict(rtol=ulp[dtype] + 2.0**-22, atol=0.0)


def _assert_matches(actual, expected, exact):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if exact or expected.dtype in INT_DTYPES:
        assert torch.equal(actual.cpu(), expected), (actual.cpu() - expected).abs().max()
    else:
        torch.testing.assert_close(actual.cpu(), expected, **_tolerance(expected.dtype, exact))


SHAPES = [(3, 5), (1,), (4095,), (2, 3, 7), (65537,), (11,)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", list(SCALES))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_flatten_and_back_match_torch(device, dtype, scale, seeded):
    """Every source dtype in one call, into a buffer of `dtype`; flatten, flatten(out=), unflatten_."""
    tensors = [_rand(s, dt, device, seeded) for s, dt in zip(SHAPES, ALL_DTYPES)]
    originals = [t.clone() for t in tensors]
    value, st, factor = _scale_args(scale, device)
    # int products are truncated, so an inexact factor is not bounded relatively there: compare exactly
    # only where the arithmetic is float64 end to end.
    exact = scale != "inexact"

    flat = paracomm.flatten(tensors, dtype=dtype, scale=_scale_kwarg(value, st))
    expected = _ref_flat(originals, dtype, factor)
    assert flat.device.type == device
    if scale == "inexact" and dtype in INT_DTYPES:
        # float64 arithmetic for integer destinations: bitwise against the float64 reference.
        assert torch.equal(flat.cpu(), expected)
    else:
        _assert_matches(flat, expected, exact)

    out = torch.full((flat.numel(),), 3, dtype=dtype, device=device)
    assert paracomm.flatten(tensors, out=out, scale=_scale_kwarg(value, st)) is out
    assert torch.equal(out, flat)
    for t, t0 in zip(tensors, originals):
        assert torch.equal(t, t0)

    # Back into fresh tensors of every dtype, undoing the scale.
    dests = [torch.full(t.shape, 5, dtype=t.dtype, device=device) for t in tensors]
    inv_value = 1.0 / value
    inv_st = None if st is None else 1.0 / st
    flat0 = flat.clone()
    paracomm.unflatten_(flat, dests, scale=_scale_kwarg(inv_value, inv_st))
    assert torch.equal(flat, flat0)
    inv_factor = inv_value * (1.0 if inv_st is None else inv_st.item())
    for d, e in zip(dests, _ref_unflat(flat0, dests, inv_factor)):
        if exact or d.dtype in INT_DTYPES:
            _assert_matches(d, e, True)
        else:
            torch.testing.assert_close(d.cpu(), e, **_tolerance(d.dtype, False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", SIZES)
def test_sizes_across_chunk_boundaries(device, size, seeded):
    tensors = [_rand((size,), dt, device, seeded) for dt in (torch.float16, torch.float32, torch.bfloat16)]
    st = torch.tensor([0.5], device=device)
    flat = paracomm.flatten(tensors, dtype=torch.float32, scale=st)
    _assert_matches(flat, _ref_flat(tensors, torch.float32, 0.5), True)
    wire = paracomm.flatten(tensors, dtype=torch.bfloat16, scale=0.25)
    _assert_matches(wire, _ref_flat(tensors, torch.bfloat16, 0.25), True)


@pytest.mark.parametrize("device", DEVICES)
def test_integers_and_float64_scale_in_float64(device, seeded):
    """Large int64 values and float64 data keep every bit through a scaled copy (no float32 on the way)."""
    big = torch.randint(1 << 40, 1 << 50, (1000,), generator=seeded, dtype=torch.int64).to(device)
    f64 = _rand((999,), torch.float64, device, seeded) * (1 + 2.0**-40)
    for dtype in (torch.int64, torch.float64):
        flat = paracomm.flatten([big, f64], dtype=dtype, scale=2.0)
        assert torch.equal(flat.cpu(), _ref_flat([big, f64], dtype, 2.0))
    dests = [torch.empty_like(big), torch.empty_like(f64)]
    paracomm.unflatten_(paracomm.flatten([big, f64], dtype=torch.float64, scale=2.0), dests, scale=0.5)
    assert torch.equal(dests[0], big) and torch.equal(dests[1], f64)


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_bf16_wire_round_trip(device, seeded):
    """DDP-style: fp32 grads -> bf16 wire scaled by 1/world (float) -> fp32 grads scaled by a tensor."""
    grads = [_rand(s, torch.float32, device, seeded) for s in [(300, 7), (65537,), (5,), (4096, 3)]]
    world = 4
    wire = paracomm.flatten(grads, dtype=torch.bfloat16, scale=1.0 / world)
    wire_ref = _ref_flat(grads, torch.bfloat16, 1.0 / world)
    _assert_matches(wire, wire_ref, True)
    back = [torch.empty_like(g) for g in grads]
    paracomm.unflatten_(wire, back, scale=torch.tensor([float(world)], device=device))
    for b, e in zip(back, _ref_unflat(wire_ref, back, float(world))):
        _assert_matches(b, e, True)
    # The bf16 round trip itself loses at most one bf16 rounding.
    for b, g in zip(back, grads):
        torch.testing.assert_close(b, g, rtol=2.0**-8, atol=0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_many_small_tensors_and_empty_ones(device, seeded):
    """1500 small tensors (more than one CUDA launch holds), mixed dtypes, with empty tensors among them."""
    sizes = torch.randint(1, 200, (1500,), generator=seeded).tolist()
    sizes[0] = sizes[700] = sizes[-1] = 0
    tensors = [_rand((n,), ALL_DTYPES[i % 3], device, seeded) for i, n in enumerate(sizes)]
    flat = paracomm.flatten(tensors, dtype=torch.float32, scale=2.0)
    _assert_matches(flat, _ref_flat(tensors, torch.float32, 2.0), True)
    dests = [torch.zeros_like(t) for t in tensors]
    paracomm.unflatten_(flat, dests, scale=0.5)
    assert all(torch.equal(d, t) for d, t in zip(dests, tensors))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_list_with_out_and_views_of_the_buffer(device, seeded):
    empty = torch.empty(0, dtype=torch.float16, device=device)
    assert paracomm.flatten([], out=empty) is empty
    paracomm.unflatten_(empty, [])

    # Tensors that are views of the buffer at their own positions (DDP's gradient-as-bucket-view layout).
    buf = _rand((100,), torch.float32, device, seeded)
    views = [buf[:30].view(5, 6), buf[30:31], buf[31:]]
    buf0 = buf.clone()
    paracomm.flatten(views, out=buf)
    assert torch.equal(buf, buf0)
    paracomm.flatten(views, out=buf, scale=0.5)
    assert torch.equal(buf, buf0 * 0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, seeded):
    ops = torch.ops.paracomm

    def tensors():
        return [_rand(s, dt, device, seeded) for s, dt in [((3, 4), torch.float16), ((7,), torch.float32),
                                                            ((2,), torch.int64)]]

    st = torch.tensor([0.5], device=device)
    for scale, scale_tensor in [(1.0, None), (0.25, None), (2.0, st)]:
        torch.library.opcheck(ops.flatten.default, (tensors(), torch.bfloat16, scale, scale_tensor))
        out = torch.empty(21, dtype=torch.float32, device=device)
        torch.library.opcheck(ops.flatten_out.default, (tensors(), out, scale, scale_tensor))
        flat = _rand((21,), torch.float32, device, seeded)
        torch.library.opcheck(ops.unflatten_.default, (flat, tensors(), scale, scale_tensor))


# ---------------------------------------------------------------------------------------------------------
# Refused calls: TypeError / ValueError naming the argument, and nothing written.
# ---------------------------------------------------------------------------------------------------------


def _bad_cases(device):
    """name -> (op, builder, exception, text the message must contain). op: flatten | flatten_out | unflatten_.

    A builder returns (tensors, flat, kwargs); `flat` is out= for flatten_out and the source for unflatten_.
    """
    other = _other_device(device)

    def good():
        gen = torch.Generator().manual_seed(3)
        return [_rand((3, 2), torch.float16, device, gen), _rand((7,), torch.float32, device, gen)]

    def fl(n=13, dtype=torch.float32, dev=device, shape=None):
        t = torch.full((n,), 9, dtype=dtype, device=dev)
        return t if shape is None else t.reshape(shape)

    def tensors_with(extra, pos=None):
        def build():
            ts = good()
            ts.insert(len(ts) if pos is None else pos, extra())
            return ts
        return build

    cases = {}
    for op in ("flatten", "flatten_out", "unflatten_"):
        flat_name = {"flatten": None, "flatten_out": "out", "unflatten_": "flat"}[op]
        def b(ts_builder, flat_fn=lambda n: fl(n), op=op, **kw):
            # The buffer always has the right size for the (possibly bad) tensors, so only one thing is wrong.
            def build():
                ts = ts_builder()
                total = sum(t.numel() for t in ts)
                return ts, (None if op == "flatten" else flat_fn(total)), kw
            return build

        cases[f"{op}-tensor_other_device"] = (
            op, b(tensors_with(lambda: torch.ones(4, device=other))), ValueError, "tensors[2]")
        cases[f"{op}-tensor_not_contiguous"] = (
            op, b(tensors_with(lambda: torch.ones(2, 2, device=device).t(), pos=0)), ValueError, "tensors[0]")
        cases[f"{op}-tensor_bool"] = (
            op, b(tensors_with(lambda: torch.ones(4, dtype=torch.bool, device=device), pos=1)),
            TypeError, "tensors[1]")
        cases[f"{op}-tensor_complex"] = (
            op, b(tensors_with(lambda: torch.ones(2, dtype=torch.complex64, device=device))),
            TypeError, "tensors[2]")
        cases[f"{op}-scale_tensor_shape"] = (
            op, b(good, scale=torch.ones(2, device=device)), ValueError, "scale_tensor")
        cases[f"{op}-scale_tensor_dtype"] = (
            op, b(good, scale=torch.ones(1, dtype=torch.float64, device=device)), TypeError, "scale_tensor")
        cases[f"{op}-scale_tensor_device"] = (
            op, b(good, scale=torch.ones(1, device=other)), ValueError, "scale_tensor")
        cases[f"{op}-scale_kind"] = (op, b(good, scale="2"), TypeError, "scale")
        if flat_name is not None:
            cases[f"{op}-{flat_name}_too_small"] = (
                op, b(good, lambda n: fl(n - 1)), ValueError, f"{flat_name} has 12 elements but the tensors hold 13")
            cases[f"{op}-{flat_name}_too_large"] = (
                op, b(good, lambda n: fl(n + 1)), ValueError, f"{flat_name} has 14 elements")
            cases[f"{op}-{flat_name}_2d"] = (op, b(good, lambda n: fl(n + 1, shape=(2, 7))), ValueError, flat_name)
            cases[f"{op}-{flat_name}_not_contiguous"] = (
                op, b(good, lambda n: fl(2 * n)[::2]), ValueError, flat_name)
            cases[f"{op}-{flat_name}_dtype"] = (
                op, b(good, lambda n: fl(n, dtype=torch.uint8)), TypeError, flat_name)
            cases[f"{op}-{flat_name}_device"] = (op, b(good, lambda n: fl(n, dev=other)), ValueError, flat_name)
    cases["flatten-empty"] = ("flatten", lambda: ([], None, {}), ValueError, "tensors")
    cases["flatten-dtype_bool"] = ("flatten", lambda: (good(), None, {"dtype": torch.bool}), TypeError, "dtype")
    cases["flatten_out-dtype_differs"] = (
        "flatten_out", lambda: (good(), fl(13), {"dtype": torch.float16}), TypeError, "dtype")
    return cases


def _call(op, tensors, flat, kw):
    if op == "flatten":
        return paracomm.flatten(tensors, **kw)
    if op == "flatten_out":
        return paracomm.flatten(tensors, out=flat, **kw)
    return paracomm.unflatten_(flat, tensors, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_and_write_nothing(device):
    for name, (op, build, exc, text) in _bad_cases(device).items():
        tensors, flat, kw = build()
        watched = [t for t in tensors + [flat] if t is not None and t.device.type != "meta"]
        before = [t.clone() for t in watched]
        with pytest.raises(exc) as info:
            _call(op, tensors, flat, kw)
        msg = str(info.value)
        assert "paracomm.flatten" in msg or "paracomm.unflatten_" in msg, f"{name}: {msg}"
        assert text in msg, f"{name}: {msg}"
        for t, t0 in zip(watched, before):
            assert torch.equal(t, t0), f"{name}: a refused call wrote to a tensor"



@pytest.mark.parametrize("op", ["flatten", "flatten_out", "unflatten_"])
def test_non_tensor_in_the_list_is_a_type_error_naming_the_index(op):
    t = torch.ones(2)
    tensors = [t, [1.0, 2.0]]
    flat = torch.full((4,), 9.0)
    with pytest.raises(TypeError, match=r"tensors\[1\] must be a torch.Tensor, got list"):
        _call(op, tensors, flat, {})
    assert torch.equal(flat, torch.full((4,), 9.0)) and torch.equal(t, torch.ones(2))
    with pytest.raises(TypeError, match="tensors must be a sequence of tensors"):
        _call(op, 3, flat, {})
    with pytest.raises(TypeError, match=r"wrap it in a list"):
        _call(op, t, flat, {})


def test_non_tensor_flat_or_out_is_a_type_error():
    with pytest.raises(TypeError, match="paracomm.unflatten_: flat must be a torch.Tensor"):
        paracomm.unflatten_([1.0, 2.0], [torch.ones(2)])
    with pytest.raises(TypeError, match="paracomm.flatten: out must be None or a torch.Tensor"):
        paracomm.flatten([torch.ones(2)], out=[0.0, 0.0])


def test_cpp_dtype_errors_read_like_python():
    """torch.int8 as a Python user writes it (not c10's "Char"), the supported list, no [file:line]."""
    with pytest.raises(TypeError) as info:
        paracomm.flatten([torch.ones(2), torch.ones(2, dtype=torch.int8)])
    msg = str(info.value)
    assert msg.startswith("paracomm.flatten: tensors[1] has unsupported dtype torch.int8 (float32, float16, "
                          "bfloat16, float64, int32, int64)"), msg
    assert "Char" not in msg and ".h:" not in msg and ".cpp:" not in msg
    with pytest.raises(TypeError) as info:
        paracomm.flatten([torch.ones(2)], dtype=torch.bool)
    assert "dtype=torch.bool is not supported" in str(info.value)
    with pytest.raises(ValueError) as info:
        paracomm.flatten([torch.ones(2)], out=torch.ones(1, 2))
    assert "out must be 1-D, got shape (1, 2)" in str(info.value)
    with pytest.raises(TypeError) as info:
        paracomm.flatten([torch.ones(2)], scale=torch.ones(1, dtype=torch.float64))
    assert "scale_tensor must be float32, got torch.float64" in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# Autograd: flatten is differentiable like torch.cat / torch._utils._flatten_dense_tensors.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["none", "float", "tensor", "both"])
def test_flatten_gradcheck_float64(scale, seeded):
    value, st, _ = _scale_args(scale, "cpu")
    kw = _scale_kwarg(value, st)
    inputs = [torch.randn(s, generator=seeded, dtype=torch.float64, requires_grad=True)
              for s in [(3, 4), (7,), (1,), (2, 1, 3)]]

    def fn(*ts):
        return paracomm.flatten(list(ts), scale=kw)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_flatten_backward_matches_torch_cat_per_dtype(device, seeded):
    """Mixed dtypes: each input's gradient is its segment of the output's, times the scale, in its own dtype;
    an integer input in the list gets none. Reference: the same graph through torch.cat."""
    specs = [((5, 3), torch.float16), ((4,), torch.float32), ((2,), torch.int64), ((3, 2), torch.bfloat16),
             ((6,), torch.float64)]
    xs = [_rand(s, dt, device, seeded) for s, dt in specs]
    xs = [x.requires_grad_() if x.is_floating_point() else x for x in xs]
    refs = [x.detach().clone().requires_grad_(x.requires_grad) for x in xs]
    upstream = _rand((sum(x.numel() for x in xs),), torch.float64, device, seeded)
    out = paracomm.flatten(xs, scale=0.25)
    assert out.dtype == torch.float64 and out.requires_grad
    out.backward(upstream)
    ref = torch.cat([r.double().reshape(-1) * 0.25 for r in refs])
    ref.backward(upstream)
    for x, r in zip(xs, refs):
        if not x.is_floating_point():
            assert x.grad is None
            continue
        assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
        # Powers of two: exact up to the one rounding to the input's dtype, which both sides do.
        assert torch.equal(x.grad, r.grad)


def test_flatten_backward_under_create_graph_is_differentiable(seeded):
    x = torch.randn(4, generator=seeded, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, generator=seeded, dtype=torch.float64, requires_grad=True)
    out = paracomm.flatten([x, y], scale=3.0)
    (gx,) = torch.autograd.grad((out ** 2).sum(), [x], create_graph=True)
    assert torch.allclose(gx, 18.0 * x)  # d/dx sum((3x)^2) = 18x
    (ggx,) = torch.autograd.grad(gx.sum(), [x])
    assert torch.allclose(ggx, torch.full_like(x, 18.0))


def test_flatten_opcheck_with_gradients(seeded):
    ops = torch.ops.paracomm
    st = torch.tensor([0.5])
    for scale, scale_tensor in [(1.0, None), (0.25, None), (2.0, st)]:
        tensors = [torch.randn(s, generator=seeded, dtype=dt).requires_grad_()
                   for s, dt in [((3, 4), torch.float32), ((7,), torch.float64), ((2,), torch.float16)]]
        torch.library.opcheck(ops.flatten.default, (tensors, torch.float32, scale, scale_tensor))
