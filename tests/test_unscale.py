"""paracomm.unscale_and_check_ (in place and out=) against torch's AMP op and float64 references.

The kernel computes v = float32(g) * inv_scale and casts back, exactly as torch's
``_amp_foreach_non_finite_check_and_unscale_`` does, so in-place results must match torch bitwise; the
float64 reference bounds the error at one rounding of the grad dtype. Data is random and never zero.
"""
import pytest
import torch

import paracomm

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
GRAD_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# Around the CUDA kernel's chunk boundaries (4096-element vector chunks, 65536-element blocks) and one large.
SIZES = [1, 3, 4095, 65535, 65536, 65537, 1_000_003]
INV_SCALE = 1.0 / 1000.0  # not a power of two: every product rounds


def _other_device(device):
    """A second device on this machine (meta on CPU-only machines): for the wrong-device cases."""
    return "meta" if device == "cpu" else "cpu"


def _rand(n, dtype, device, gen, magnitude=1000.0):
    """Random values in +-[magnitude/8, magnitude) of `dtype` (never zero, like scaled gradients)."""
    mag = torch.rand(n, generator=gen, dtype=torch.float64) * (magnitude * 7 / 8) + magnitude / 8
    sign = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64) * 2 - 1
    return (mag * sign).to(dtype).to(device)


def _scalars(device, found=0.0):
    inv = torch.tensor([INV_SCALE], dtype=torch.float32, device=device)
    return inv, torch.tensor([found], dtype=torch.float32, device=device)


def _rel_tol(dtype):
    """One rounding of `dtype` (the cast after the fp32 multiply) plus one of fp32."""
    return {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-22}[dtype]


def _assert_close_to_f64(actual, exact64, dtype):
    torch.testing.assert_close(actual.cpu().double(), exact64.cpu(), rtol=_rel_tol(dtype), atol=0.0)


def _norm64(grads, inv):
    return torch.cat([g.cpu().double().flatten() * inv for g in grads]).norm().item()


def _torch_unscale(grads, inv, found):
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", GRAD_DTYPES)
def test_inplace_matches_torch_and_float64(device, size, dtype, seeded):
    g = _rand(size, dtype, device, seeded)
    exact = g.cpu().double() * INV_SCALE
    norm64 = _norm64([g], INV_SCALE)
    expected = g.clone()
    inv, found = _scalars(device)
    _torch_unscale([expected], inv, found.clone())

    norm = torch.full((1,), -1.0, device=device)
    paracomm.unscale_and_check_([g], inv, found, norm=norm)

    assert torch.equal(g, expected)  # same fp32 arithmetic as torch's op: bitwise
    _assert_close_to_f64(g, exact, dtype)
    assert found.item() == 0.0
    assert norm.item() == pytest.approx(norm64, rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_in_place_and_out(device, seeded):
    dtypes = [GRAD_DTYPES[i % 3] for i in range(len(SIZES))]
    grads = [_rand(n, dt, device, seeded) for n, dt in zip(SIZES, dtypes)]
    originals = [g.clone() for g in grads]
    norm64 = _norm64(grads, INV_SCALE)
    inv, found = _scalars(device)

    # out=: fp32 master grads, grads untouched.
    out = [torch.full(g.shape, 7.0, dtype=torch.float32, device=device) for g in grads]
    norm = torch.zeros(1, device=device)
    paracomm.unscale_and_check_(grads, inv, found, out=out, norm=norm)
    for g, g0, o in zip(grads, originals, out):
        assert torch.equal(g, g0)
        assert o.dtype == torch.float32
        assert torch.equal(o, g0.float() * inv)  # one fp32 multiply
        _assert_close_to_f64(o, g0.cpu().double() * INV_SCALE, torch.float32)
    assert norm.item() == pytest.approx(norm64, rel=1e-5)
    assert found.item() == 0.0

    # In place, the same list.
    expected = [g.clone() for g in grads]
    _torch_unscale(expected, inv, found.clone())
    norm.fill_(0.0)
    paracomm.unscale_and_check_(grads, inv, found, norm=norm)
    for g, e in zip(grads, expected):
        assert torch.equal(g, e)
    assert norm.item() == pytest.approx(norm64, rel=1e-5)
    assert found.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_more_tensors_than_one_launch(device, seeded):
    """1500 small tensors of mixed dtypes and odd shapes: more than one CUDA launch's metadata holds."""
    sizes = torch.randint(1, 300, (1500,), generator=seeded).tolist()
    grads = [_rand(n, GRAD_DTYPES[i % 3], device, seeded).view(1, n) for i, n in enumerate(sizes)]
    originals = [g.clone() for g in grads]
    inv, found = _scalars(device)
    out = [torch.empty(g.shape, dtype=torch.float32, device=device) for g in grads]
    norm = torch.zeros(1, device=device)
    paracomm.unscale_and_check_(grads, inv, found, out=out, norm=norm)
    for g0, o in zip(originals, out):
        assert torch.equal(o, g0.float() * inv)
    assert norm.item() == pytest.approx(_norm64(originals, INV_SCALE), rel=1e-5)

    expected = [g.clone() for g in grads]
    _torch_unscale(expected, inv, found.clone())
    paracomm.unscale_and_check_(grads, inv, found)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected))
    assert found.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_out", [False, True])
def test_found_inf_is_never_cleared(device, use_out, seeded):
    grads = [_rand(n, dt, device, seeded) for n, dt in [(100, torch.float16), (5000, torch.float32)]]
    inv, _ = _scalars(device)
    found = torch.ones(1, device=device)
    out = [torch.empty(g.shape, dtype=torch.float32, device=device) for g in grads] if use_out else None
    paracomm.unscale_and_check_(grads, inv, found, out=out)
    assert found.item() == 1.0


NONFINITE = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("elem", ["first", "middle", "last"])
@pytest.mark.parametrize("which", ["first", "middle", "last"])
@pytest.mark.parametrize("value", list(NONFINITE))
def test_nonfinite_sets_found_inf(device, elem, which, value, seeded):
    sizes = [4097, 65537, 1000, 3]
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float16]
    grads = [_rand(n, dt, device, seeded) for n, dt in zip(sizes, dtypes)]
    t = {"first": 0, "middle": 1, "last": len(grads) - 1}[which]
    n = sizes[t]
    i = {"first": 0, "middle": n // 2, "last": n - 1}[elem]
    grads[t][i] = NONFINITE[value]
    originals = [g.clone() for g in grads]
    inv, found = _scalars(device)

    out = [torch.empty(g.shape, dtype=torch.float32, device=device) for g in grads]
    norm = torch.zeros(1, device=device)
    paracomm.unscale_and_check_(grads, inv, found, out=out, norm=norm)
    assert found.item() == 1.0
    assert not torch.isfinite(norm).item()
    for g, g0, o in zip(grads, originals, out):
        torch.testing.assert_close(g, g0, rtol=0, atol=0, equal_nan=True)  # untouched
        assert torch.equal(o.isnan(), g0.isnan())
        fin = torch.isfinite(g0)
        assert torch.equal(o[fin], g0[fin].float() * inv)

    found2 = torch.zeros(1, device=device)
    paracomm.unscale_and_check_(grads, inv, found2)
    assert found2.item() == 1.0
    bad = grads[t][i].item()
    assert (bad != bad) if value == "nan" else bad == NONFINITE[value]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, seeded):
    def make(with_norm):
        grads = [_rand(n, dt, device, seeded) for n, dt in [(5, torch.float16), (300, torch.bfloat16),
                                                              (1, torch.float32)]]
        inv, found = _scalars(device)
        norm = torch.zeros(1, device=device) if with_norm else None
        return grads, inv, found, norm

    for with_norm in (False, True):
        grads, inv, found, norm = make(with_norm)
        torch.library.opcheck(torch.ops.paracomm.unscale_and_check_.default, (grads, inv, found, norm))
        grads, inv, found, norm = make(with_norm)
        out = [torch.empty(g.shape, dtype=torch.float32, device=device) for g in grads]
        torch.library.opcheck(torch.ops.paracomm.unscale_and_check_out.default, (grads, inv, found, out, norm))


# ---------------------------------------------------------------------------------------------------------
# Refused calls: TypeError / ValueError naming the argument, and nothing written.
# ---------------------------------------------------------------------------------------------------------


def _bad_cases(device):
    """name -> (builder, expected exception, text the message must contain). A builder returns kwargs."""
    other = _other_device(device)

    def base(**over):
        gen = torch.Generator().manual_seed(7)
        grads = [_rand(n, dt, device, gen) for n, dt in [(6, torch.float16), (10, torch.float32)]]
        kw = dict(grads=grads, inv_scale=torch.tensor([0.5], device=device),
                  found_inf=torch.zeros(1, device=device), out=None, norm=torch.zeros(1, device=device))
        kw.update(over)
        return kw

    def out_ok(grads):
        return [torch.zeros(g.shape, dtype=torch.float32, device=device) for g in grads]

    def with_out(fix):
        def build():
            kw = base()
            kw["out"] = out_ok(kw["grads"])
            fix(kw)
            return kw
        return build

    def grads_fix(fix):
        def build():
            kw = base()
            fix(kw["grads"])
            return kw
        return build

    return {
        "grad_other_device": (grads_fix(lambda g: g.append(torch.ones(4, device=other))), ValueError, "grads[2]"),
        "grad_not_contiguous": (
            grads_fix(lambda g: g.append(torch.ones(4, 6, device=device).t())), ValueError, "grads[2]"),
        "grad_integer": (grads_fix(lambda g: g.insert(0, torch.ones(3, dtype=torch.int32, device=device))),
                         TypeError, "grads[0]"),
        "grad_float64": (grads_fix(lambda g: g.append(torch.ones(3, dtype=torch.float64, device=device))),
                         TypeError, "grads[2]"),
        "inv_scale_shape": (lambda: base(inv_scale=torch.ones(2, device=device)), ValueError, "inv_scale"),
        "inv_scale_dtype": (lambda: base(inv_scale=torch.ones(1, dtype=torch.float64, device=device)),
                            TypeError, "inv_scale"),
        "inv_scale_device": (lambda: base(inv_scale=torch.ones(1, device=other)), ValueError, "inv_scale"),
        "found_inf_shape": (lambda: base(found_inf=torch.zeros(1, 2, device=device)), ValueError, "found_inf"),
        "found_inf_dtype": (lambda: base(found_inf=torch.zeros(1, dtype=torch.float16, device=device)),
                            TypeError, "found_inf"),
        "found_inf_device": (lambda: base(found_inf=torch.zeros(1, device=other)), ValueError, "found_inf"),
        "norm_shape": (lambda: base(norm=torch.zeros(3, device=device)), ValueError, "norm"),
        "norm_dtype": (lambda: base(norm=torch.zeros(1, dtype=torch.bfloat16, device=device)), TypeError, "norm"),
        "norm_device": (lambda: base(norm=torch.zeros(1, device=other)), ValueError, "norm"),
        "out_too_few": (with_out(lambda kw: kw["out"].pop()), ValueError, "out"),
        "out_too_many": (with_out(lambda kw: kw["out"].append(torch.zeros(3, device=device))), ValueError, "out"),
        "out_dtype": (with_out(lambda kw: kw["out"].__setitem__(1, torch.zeros(10, dtype=torch.float16,
                                                                               device=device))),
                      TypeError, "out[1]"),
        "out_shape": (with_out(lambda kw: kw["out"].__setitem__(0, torch.zeros(7, device=device))),
                      ValueError, "out[0]"),
        "out_not_contiguous": (with_out(lambda kw: kw["out"].__setitem__(1, torch.zeros(20, device=device)[::2])),
                               ValueError, "out[1]"),
        "out_device": (with_out(lambda kw: kw["out"].__setitem__(1, torch.zeros(10, device=other))),
                       ValueError, "out[1]"),
        # Not even a tensor: TypeError naming the argument (and the index in a list), before the dispatcher.
        "grad_not_a_tensor": (grads_fix(lambda g: g.insert(1, [1.0, 2.0])), TypeError, "grads[1]"),
        "grads_single_tensor": (lambda: base(grads=torch.ones(3, device=device)), TypeError, "grads"),
        "out_not_a_tensor": (with_out(lambda kw: kw["out"].__setitem__(1, [0.0] * 10)), TypeError, "out[1]"),
        "inv_scale_string": (lambda: base(inv_scale="0.5"), TypeError, "inv_scale"),
        "inv_scale_bool": (lambda: base(inv_scale=True), TypeError, "inv_scale"),
        "found_inf_number": (lambda: base(found_inf=0.0), TypeError, "found_inf"),
        "norm_number": (lambda: base(norm=0.0), TypeError, "norm"),
    }


def _snapshot(kw):
    grads = kw["grads"] if isinstance(kw["grads"], list) else [kw["grads"]]
    tensors = [t for t in grads + (kw["out"] or []) + [kw["inv_scale"], kw["found_inf"], kw["norm"]]
               if isinstance(t, torch.Tensor) and t.device.type != "meta"]
    return tensors, [t.clone() for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_and_write_nothing(device):
    for name, (build, exc, arg) in _bad_cases(device).items():
        kw = build()
        tensors, before = _snapshot(kw)
        with pytest.raises(exc) as info:
            paracomm.unscale_and_check_(kw["grads"], kw["inv_scale"], kw["found_inf"], out=kw["out"],
                                        norm=kw["norm"])
        msg = str(info.value)
        assert "paracomm.unscale_and_check" in msg and arg in msg, f"{name}: {msg}"
        for t, b in zip(tensors, before):
            assert torch.equal(t, b), f"{name}: a refused call wrote to a tensor"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_out", [False, True])
def test_inv_scale_as_a_python_number(device, use_out, seeded):
    """A number is rounded to float32 once, like torch.tensor([x]): results bitwise equal to the tensor form."""
    grads = [_rand(n, dt, device, seeded) for n, dt in [(1000, torch.float16), (77, torch.bfloat16),
                                                          (513, torch.float32)]]
    twin = [g.clone() for g in grads]
    found, found_twin = torch.zeros(1, device=device), torch.zeros(1, device=device)
    norm, norm_twin = torch.zeros(1, device=device), torch.zeros(1, device=device)
    out = [torch.empty(g.shape, device=device) for g in grads] if use_out else None
    out_twin = [torch.empty(g.shape, device=device) for g in grads] if use_out else None
    paracomm.unscale_and_check_(grads, INV_SCALE, found, out=out, norm=norm)
    paracomm.unscale_and_check_(twin, torch.tensor([INV_SCALE], device=device), found_twin, out=out_twin,
                                norm=norm_twin)
    for a, b in zip(out if use_out else grads, out_twin if use_out else twin):
        assert torch.equal(a, b)
    assert torch.equal(norm, norm_twin) and found.item() == 0.0
    # A power of two is exact: the in-place result equals grads * 2 bitwise (an int works too).
    g = [_rand(100, torch.float32, device, seeded)]
    ref = g[0] * 2
    paracomm.unscale_and_check_(g, 2, found)
    assert torch.equal(g[0], ref)


def test_cpp_errors_name_dtypes_as_python_does_without_file_and_line():
    """Refused arguments read like the Python-side errors: torch.float64, not c10's Double; no [file:line]."""
    g = [torch.ones(3, dtype=torch.int8)]
    with pytest.raises(TypeError) as info:
        paracomm.unscale_and_check_(g, torch.ones(1), torch.zeros(1))
    msg = str(info.value)
    assert "grads[0] must be float16, bfloat16 or float32, got torch.int8" in msg, msg
    assert ".cpp:" not in msg and ".h:" not in msg and "Char" not in msg
    with pytest.raises(TypeError) as info:
        paracomm.unscale_and_check_([torch.ones(3)], torch.ones(1, dtype=torch.float64), torch.zeros(1))
    assert "inv_scale must be float32, got torch.float64" in str(info.value)
    with pytest.raises(ValueError) as info:
        paracomm.unscale_and_check_([torch.ones(3)], torch.ones(2, 1), torch.zeros(1))
    assert "inv_scale must have exactly one element, got shape (2, 1)" in str(info.value)
    with pytest.raises(ValueError) as info:
        paracomm.unscale_and_check_([torch.ones(3)], torch.ones(1), torch.zeros(1), out=[torch.ones(4)])
    assert "out[0] has shape (4,) but grads[0] has shape (3,)" in str(info.value)
