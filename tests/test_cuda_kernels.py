"""CUDA ops against their CPU twins (and against torch's own arithmetic) on random data.

Every op's CUDA implementation must give the CPU op's bits: the same per-element arithmetic, the same casts.
Comparisons use assert_close(rtol=0, atol=0, equal_nan=True), i.e. bitwise up to NaN payloads; only the
unscale norm (a sum whose order legitimately differs between the two devices) gets a tolerance.
Sizes straddle the kernels' boundaries: 16-byte vectors (tails of 1..7 elements), the multi-tensor chunk
(65536 elements), more tensors than one launch's metadata holds (176 in place, 128 with two pointers), and
views that start mid-vector: slices of a flat bucket at every element offset with odd numels (the head peeled
to the 16-byte boundary, the body vectorised, the tail scalar), and pointers misaligned by different amounts
(no common boundary: the scalar path).
All tests need a GPU (``cuda`` marker: skipped without one).
"""
import pytest
import torch
from torch.testing import assert_close

import paracomm
from paracomm import _ops

pytestmark = pytest.mark.cuda

ops = torch.ops.paracomm
DEV = "cuda"
GRAD_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64]
SIZES = [1, 3, 4095, 65535, 65536, 65537, 1_000_003]
CHUNK = 65536
INPLACE_CAPACITY = 176  # TensorListMeta<1>::kMaxTensors
OUT_CAPACITY = 128  # TensorListMeta<2>::kMaxTensors


def bitwise(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert_close(actual.cpu(), expected.cpu(), rtol=0, atol=0, equal_nan=True)


def rand(n, dtype, gen, *, scale=4.0, misaligned=False):
    """Random values of `dtype` on the GPU (made on the CPU from `gen`, so reproducible); `misaligned`: a
    contiguous view starting one element into its storage."""
    extra = 1 if misaligned else 0
    if dtype.is_floating_point:
        base = (torch.randn(n + extra, generator=gen, dtype=torch.float64) * scale).to(dtype)
    else:
        base = torch.randint(-1000, 1000, (n + extra,), generator=gen, dtype=dtype)
    base = base.to(DEV)
    return base[extra:] if misaligned else base


def scalar(value):
    return torch.tensor([value], dtype=torch.float32, device=DEV)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(20240613)


# ----------------------------------------------------------------------------------------------------------
# unscale_and_check_
# ----------------------------------------------------------------------------------------------------------


def copy_keeping_offset(t, device, *, dtype=None, fill=None):
    """A copy of `t` (or, with `fill`, a tensor of t's shape filled with it) on `device` that starts at the same
    element offset into a fresh storage as `t` does, so a misaligned view stays misaligned (`clone()` would
    give an aligned allocation and silently test the vector path instead of the scalar one)."""
    offset = t.storage_offset()
    base = torch.empty(t.numel() + offset, dtype=dtype or t.dtype, device=device)
    c = base[offset:].view(t.shape)
    if fill is None:
        c.copy_(t)
    else:
        c.fill_(fill)
    return c


def unscale_on(device, grads, inv, found, *, out=False, norm=False):
    """Runs the op on copies placed on `device` (at the originals' storage offsets); returns (grads, outs,
    found, norm) on that device."""
    g = [copy_keeping_offset(t.detach(), device) for t in grads]
    o = [copy_keeping_offset(t, device, dtype=torch.float32, fill=-7.0) for t in grads] if out else None
    f = found.detach().to(device).clone()
    nrm = torch.full((1,), -1.0, device=device) if norm else None
    paracomm.unscale_and_check_(g, inv.to(device), f, out=o, norm=nrm)
    return g, o, f, nrm


def reference_unscale(grads, inv_value):
    """torch's own arithmetic: float32(g) * inv in float32, and the float64 norm of those values."""
    vals = [t.float().cpu() * torch.tensor(inv_value, dtype=torch.float32) for t in grads]
    sumsq = sum(float((v.double() ** 2).sum()) for v in vals)
    return vals, sumsq**0.5


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
@pytest.mark.parametrize("with_norm", [False, True])
def test_unscale_in_place_matches_cpu_and_torch(dtype, with_norm, gen):
    grads = [rand(n, dtype, gen) for n in SIZES]
    before = [t.clone() for t in grads]
    inv = scalar(1.0 / 1024.0)
    found = scalar(0.0)
    g_cuda, _, f_cuda, n_cuda = unscale_on(DEV, grads, inv, found, norm=with_norm)
    g_cpu, _, f_cpu, n_cpu = unscale_on("cpu", grads, inv, found, norm=with_norm)
    vals, ref_norm = reference_unscale(before, 1.0 / 1024.0)
    for a, b, v in zip(g_cuda, g_cpu, vals):
        bitwise(a, b)
        bitwise(a, v.to(dtype))
    assert f_cuda.item() == 0.0 and f_cpu.item() == 0.0
    if with_norm:
        assert_close(n_cuda.cpu(), n_cpu, rtol=1e-6, atol=0)
        assert n_cuda.item() == pytest.approx(ref_norm, rel=1e-6)


def test_unscale_out_mixed_dtypes_one_call(gen):
    """fp16, bf16 and fp32 grads in one call, written to fp32 out; grads untouched."""
    grads = []
    for i, n in enumerate(SIZES + [2, 8, 9, 17]):
        grads.append(rand(n, GRAD_DTYPES[i % 3], gen))
    before = [t.clone() for t in grads]
    inv = scalar(0.37)
    g_cuda, o_cuda, f_cuda, n_cuda = unscale_on(DEV, grads, inv, scalar(0.0), out=True, norm=True)
    _, o_cpu, f_cpu, n_cpu = unscale_on("cpu", grads, inv, scalar(0.0), out=True, norm=True)
    vals, ref_norm = reference_unscale(before, 0.37)
    for g, b in zip(g_cuda, before):
        bitwise(g, b)
    for a, b, v in zip(o_cuda, o_cpu, vals):
        bitwise(a, b)
        bitwise(a, v)
    assert f_cuda.item() == 0.0 and f_cpu.item() == 0.0
    assert_close(n_cuda.cpu(), n_cpu, rtol=1e-6, atol=0)
    assert n_cuda.item() == pytest.approx(ref_norm, rel=1e-6)


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
@pytest.mark.parametrize("out", [False, True])
def test_unscale_misaligned_views_peel_their_head(dtype, out, gen):
    grads = [rand(n, dtype, gen, misaligned=True) for n in (1, 3, 4095, 65537, 200_001)]
    assert all(t.data_ptr() % 16 != 0 for t in grads)
    before = [t.clone() for t in grads]
    inv = scalar(0.125)
    g_cuda, o_cuda, _, n_cuda = unscale_on(DEV, grads, inv, scalar(0.0), out=out, norm=True)
    results = o_cuda if out else g_cuda
    # The op really saw misaligned pointers (for `out`, both the fp32 outputs and the grads read).
    assert all(t.data_ptr() % 16 != 0 for t in g_cuda + results)
    vals, ref_norm = reference_unscale(before, 0.125)
    for r, v in zip(results, vals):
        bitwise(r, v if out else v.to(dtype))
    assert n_cuda.item() == pytest.approx(ref_norm, rel=1e-6)


@pytest.mark.parametrize("out", [False, True])
def test_unscale_more_tensors_than_one_launch(out, gen):
    """Several launches (by tensor count and by dtype group), one deterministic norm over all of them."""
    sizes = torch.randint(1, 300, (2 * INPLACE_CAPACITY + 5,), generator=gen).tolist()
    sizes[7] = 3 * CHUNK + 5  # a multi-chunk tensor in the middle of the list
    sizes[11] = 0  # empty tensors are skipped
    # 200 float32 then 157 float16: each dtype group alone exceeds one launch (176 in place, 128 with out).
    grads = [rand(n, GRAD_DTYPES[(i // 200) % 3], gen) for i, n in enumerate(sizes)]
    before = [t.clone() for t in grads]
    inv = scalar(2.0**-10)
    g_cuda, o_cuda, f_cuda, n_cuda = unscale_on(DEV, grads, inv, scalar(0.0), out=out, norm=True)
    _, _, _, n_again = unscale_on(DEV, before, inv, scalar(0.0), out=out, norm=True)
    _, _, _, n_cpu = unscale_on("cpu", before, inv, scalar(0.0), out=out, norm=True)
    vals, ref_norm = reference_unscale(before, 2.0**-10)
    results = o_cuda if out else g_cuda
    for r, v, b in zip(results, vals, before):
        bitwise(r, v if out else v.to(b.dtype))
    assert f_cuda.item() == 0.0
    bitwise(n_cuda, n_again)  # deterministic run to run
    assert_close(n_cuda.cpu(), n_cpu, rtol=1e-6, atol=0)
    assert n_cuda.item() == pytest.approx(ref_norm, rel=1e-6)


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_unscale_flags_non_finite_anywhere(dtype, bad, where, gen):
    grads = [rand(n, dtype, gen) for n in (5, 65537, 100_003)]
    target = grads[{"first": 0, "middle": 1, "last": 2}[where]]
    pos = {"first": 0, "middle": target.numel() // 2, "last": target.numel() - 1}[where]
    target[pos] = bad
    inv = scalar(0.5)
    g_cuda, o_cuda, f_cuda, n_cuda = unscale_on(DEV, grads, inv, scalar(0.0), out=True, norm=True)
    _, o_cpu, f_cpu, n_cpu = unscale_on("cpu", grads, inv, scalar(0.0), out=True, norm=True)
    assert f_cuda.item() == 1.0 and f_cpu.item() == 1.0
    for a, b in zip(o_cuda, o_cpu):
        bitwise(a, b)
    assert not torch.isfinite(n_cuda).item()
    # In place too, and found_inf is never cleared by a clean call afterwards.
    g2, _, f2, _ = unscale_on(DEV, grads, inv, scalar(0.0))
    assert f2.item() == 1.0
    clean = [rand(n, dtype, gen) for n in (5, 70_000)]
    _, _, f3, _ = unscale_on(DEV, clean, inv, f2)
    assert f3.item() == 1.0


def test_unscale_empty_list_and_empty_tensors_give_zero_norm():
    found = scalar(0.0)
    norm = scalar(-1.0)
    paracomm.unscale_and_check_([], scalar(0.5), found, norm=norm)
    assert norm.item() == 0.0 and found.item() == 0.0
    norm.fill_(-1.0)
    paracomm.unscale_and_check_([torch.empty(0, device=DEV, dtype=torch.float16)], scalar(0.5), found, norm=norm)
    assert norm.item() == 0.0 and found.item() == 0.0


def test_unscale_refused_call_writes_nothing(gen):
    grads = [rand(100, torch.float16, gen)]
    before = grads[0].clone()
    found = scalar(0.0)
    with pytest.raises(ValueError, match="inv_scale"):
        paracomm.unscale_and_check_(grads, torch.tensor([0.5]), found)  # inv_scale on the CPU
    with pytest.raises(TypeError, match=r"out\[0\]"):
        paracomm.unscale_and_check_(grads, scalar(0.5), found, out=[torch.empty(100, device=DEV, dtype=torch.half)])
    bitwise(grads[0], before)
    assert found.item() == 0.0


# ----------------------------------------------------------------------------------------------------------
# flatten / flatten_out / unflatten_
# ----------------------------------------------------------------------------------------------------------


def scale_cases():
    return {"none": None, "float": 0.75, "tensor": scalar(1.5)}


@pytest.mark.parametrize("src", ALL_DTYPES)
@pytest.mark.parametrize("dst", ALL_DTYPES)
def test_flatten_every_cast_and_scale_matches_cpu(src, dst, gen):
    tensors = [rand(n, src, gen, scale=100.0) for n in (1, 7, 4099, 65537)]
    for name, scale in scale_cases().items():
        flat_cuda = paracomm.flatten(tensors, dtype=dst, scale=scale)
        cpu_scale = scale.cpu() if isinstance(scale, torch.Tensor) else scale
        flat_cpu = paracomm.flatten([t.cpu() for t in tensors], dtype=dst, scale=cpu_scale)
        bitwise(flat_cuda, flat_cpu)
        # And back: unflatten_ into tensors of the source dtype, against the CPU op.
        back_cuda = [torch.empty_like(t) for t in tensors]
        back_cpu = [torch.empty_like(t, device="cpu") for t in tensors]
        paracomm.unflatten_(flat_cuda, back_cuda, scale=scale)
        paracomm.unflatten_(flat_cpu, back_cpu, scale=cpu_scale)
        for a, b in zip(back_cuda, back_cpu):
            bitwise(a, b)


def test_flatten_plain_cast_is_torch_cast(gen):
    """No scale: exactly Tensor.to (torch's own cast), including int64 values above 2**53."""
    big = torch.tensor([2**62 + 1, -(2**60) - 3, 2**53 + 1], dtype=torch.int64, device=DEV)
    flat = paracomm.flatten([big], dtype=torch.int64)
    bitwise(flat, big)
    for src in ALL_DTYPES:
        t = rand(4099, src, gen, scale=50.0)
        for dst in ALL_DTYPES:
            bitwise(paracomm.flatten([t], dtype=dst), t.to(dst))


def test_flatten_scale_arithmetic_is_float32_or_float64(gen):
    """Scaled copies: float32 arithmetic between 16/32-bit floats, float64 as soon as an integer or float64
    takes part, with the factor scale * scale_tensor formed first (torch's ops as the reference)."""
    x16 = rand(5000, torch.float16, gen)
    expect16 = (x16.float() * torch.tensor(0.3, dtype=torch.float32, device=DEV)).half()
    bitwise(paracomm.flatten([x16], dtype=torch.float16, scale=0.3), expect16)
    x32 = rand(5000, torch.float32, gen, scale=1000.0)
    factor64 = 0.3 * float(torch.tensor(1.7, dtype=torch.float32))
    expect_int = (x32.double() * factor64).to(torch.int64)
    bitwise(ops.flatten([x32], torch.int64, 0.3, scalar(1.7)), expect_int)
    bitwise(paracomm.flatten([x32], dtype=torch.int64), x32.to(torch.int64))


def test_flatten_many_tensors_mixed_dtypes_sizes_and_alignment(gen):
    sizes = torch.randint(0, 400, (3 * OUT_CAPACITY + 7,), generator=gen).tolist()
    sizes[5] = 2 * CHUNK + 3
    # The first 200 are float32 (one dtype group larger than a launch holds), the rest cycle through dtypes.
    dtypes = [torch.float32 if i < 200 else ALL_DTYPES[(i // 20) % len(ALL_DTYPES)] for i in range(len(sizes))]
    tensors = [rand(n, d, gen, scale=30.0, misaligned=(i % 3 == 1)) for i, (n, d) in enumerate(zip(sizes, dtypes))]
    total = sum(sizes)
    for dst in (torch.float32, torch.bfloat16, torch.float64):
        out = torch.full((total,), 3.0, dtype=dst, device=DEV)
        paracomm.flatten(tensors, out=out, scale=scalar(0.5))
        ref = paracomm.flatten([t.cpu() for t in tensors], dtype=dst, scale=torch.tensor([0.5]))
        bitwise(out, ref)
        back = [torch.zeros_like(t) for t in tensors]
        back_cpu = [torch.zeros_like(t, device="cpu") for t in tensors]
        paracomm.unflatten_(out, back, scale=2.0)
        paracomm.unflatten_(ref, back_cpu, scale=2.0)
        for a, b in zip(back, back_cpu):
            bitwise(a, b)


def test_flatten_into_misaligned_out_and_from_misaligned_flat(gen):
    tensors = [rand(n, torch.float32, gen) for n in (8, 4096, 33)]
    total = sum(t.numel() for t in tensors)
    storage = torch.zeros(total + 1, dtype=torch.float16, device=DEV)
    out = storage[1:]
    paracomm.flatten(tensors, out=out)
    bitwise(out, torch.cat([t.half() for t in tensors]))
    back = [torch.empty_like(t) for t in tensors]
    paracomm.unflatten_(out, back)
    for b, t in zip(back, tensors):
        bitwise(b, t.half().float())


def test_flatten_refused_call_writes_nothing(gen):
    tensors = [rand(10, torch.float32, gen)]
    out = torch.full((11,), 5.0, device=DEV)
    with pytest.raises(ValueError):
        paracomm.flatten(tensors, out=out)
    bitwise(out, torch.full((11,), 5.0, device=DEV))


# ----------------------------------------------------------------------------------------------------------
# reduce_ (the all-reduce's N-input local reduction, csrc/kernels/reduce.cu)
# ----------------------------------------------------------------------------------------------------------


def reduce_reference(inputs, out_dtype, *, divisor=1.0, scale=None, wire_dtype=None):
    """The formula of reduce.h in torch's own CPU arithmetic: sum left to right in acc (float32, float64, int64;
    torch's int64 add wraps), divide by a tensor (exact IEEE division, unlike a scalar divide, which may multiply
    by the reciprocal), scale, round through the wire dtype, cast to out's dtype. Returns (out, wire or None,
    whether a stored value is non-finite)."""
    first = inputs[0].cpu()
    if first.dtype in (torch.int32, torch.int64):
        acc_t = torch.int64
    elif first.dtype == torch.float64:
        acc_t = torch.float64
    else:
        acc_t = torch.float32
    acc = first.to(acc_t)
    for t in inputs[1:]:
        acc = acc + t.cpu().to(acc_t)
    if acc_t.is_floating_point:
        if divisor != 1.0:
            acc = acc / torch.full_like(acc, divisor)
        if scale is not None:
            acc = acc * scale.cpu().to(acc_t)
    wire = None
    if wire_dtype is not None:
        wire = acc.to(wire_dtype)
        acc = wire.to(acc_t)
    out = acc.to(out_dtype)
    # found_inf tests the stored value: after the wire round trip and the cast to out's dtype.
    bad = bool((~torch.isfinite(out.to(acc_t))).any()) if acc_t.is_floating_point else False
    return out, wire, bad


def reduce_both(out, inputs, *, divisor=1.0, scale=None, found_inf=None, wire_dtype=None, wire_out=None):
    """Runs reduce_ on the given CUDA tensors and on CPU copies (keeping which input *is* out or wire_out);
    checks every written buffer bitwise against the CPU op and against reduce_reference."""
    ref_out, ref_wire, ref_bad = reduce_reference(inputs, out.dtype, divisor=divisor, scale=scale,
                                                  wire_dtype=wire_dtype)
    cpu = lambda t: None if t is None else t.detach().cpu().clone()  # noqa: E731
    c_out, c_scale, c_found, c_wire = map(cpu, (out, scale, found_inf, wire_out))
    c_inputs = [c_out if t is out else c_wire if (wire_out is not None and t is wire_out) else cpu(t) for t in inputs]
    found_before = None if found_inf is None else found_inf.item()
    ops.reduce_(out, inputs, divisor, scale, found_inf, wire_dtype, wire_out)
    ops.reduce_(c_out, c_inputs, divisor, c_scale, c_found, wire_dtype, c_wire)
    bitwise(out, c_out)
    bitwise(out, ref_out)
    if wire_out is not None:
        bitwise(wire_out, c_wire)
        bitwise(wire_out, ref_wire)
    if found_inf is not None:
        bitwise(found_inf, c_found)
        expected = 1.0 if (ref_bad and out.dtype.is_floating_point) or found_before == 1.0 else 0.0
        assert found_inf.item() == expected


REDUCE_SIZES = [1, 7, 8, 17, 4099, 1_000_003]
WIRES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n", REDUCE_SIZES)
@pytest.mark.parametrize("k", [1, 2, 3, 8, 32])
def test_reduce_one_dtype_any_input_count(dtype, n, k, gen):
    """All buffers of one dtype (every plan step of an uncompressed all-reduce), 1..32 inputs, in place and into
    a separate out, with and without the owner's final fusions."""
    if k == 32 and n > 4099:
        n = 65537  # 32 inputs of 1e6 elements add nothing but time
    floating = dtype.is_floating_point
    for misaligned in (False, True):
        xs = [rand(n, dtype, gen, misaligned=misaligned) for _ in range(k)]
        out = torch.empty_like(xs[0])
        reduce_both(out, xs)
        if floating:
            reduce_both(out, xs, divisor=float(k + 1), scale=scalar(0.375), found_inf=scalar(0.0))
        else:
            reduce_both(out, xs, found_inf=scalar(0.0))  # integers are always finite
        x0 = xs[0]
        reduce_both(x0, xs, divisor=float(k) if floating else 1.0)  # out *is* inputs[0]


@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("n", REDUCE_SIZES)
def test_reduce_ring_steps_float32_with_wire(wire, n, gen):
    """The ring's steps with a compressed wire: (f32, W) -> W partial sums, (f32, W) -> f32 with the owner's
    rounding kept in wire_out, (f32) -> W casts, (W) -> f32 widening, in place where the ring is."""
    for misaligned in (False, True):
        x = rand(n, torch.float32, gen, misaligned=misaligned)
        recv = rand(n, wire, gen, misaligned=misaligned)
        w = torch.empty(n, dtype=wire, device=DEV)
        reduce_both(w, [x])  # cast: w = W(x)
        reduce_both(w, [x, recv])  # partial: w = W(x + recv)
        reduce_both(x, [x, recv], divisor=4.0, scale=scalar(0.5), found_inf=scalar(0.0), wire_dtype=wire,
                    wire_out=w)  # final, out is inputs[0]
        reduce_both(x, [x, recv], wire_dtype=wire)  # rounding without keeping the bits
        reduce_both(x, [recv], found_inf=scalar(0.0))  # all-gather: x = float(w)
        reduce_both(torch.empty(n, device=DEV), [x, recv])
        reduce_both(torch.empty(n, dtype=wire, device=DEV), [recv, x])  # a W first input, an f32 rest


@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("n", REDUCE_SIZES)
@pytest.mark.parametrize("k", [1, 2, 5, 8, 32])
def test_reduce_direct_final_widening(wire, n, k, gen):
    """direct / one_shot's owner reduction: N wire-dtype inputs (one of them this rank's own rounded copy,
    which is also wire_out) summed in float32 into float32 data, rounded once, the bits kept."""
    if k == 32 and n > 4099:
        n = 65537
    for misaligned in (False, True):
        xs = [rand(n, wire, gen, misaligned=misaligned) for _ in range(k)]
        out = rand(n, torch.float32, gen, misaligned=misaligned)
        own = xs[k // 2]
        reduce_both(out, xs, divisor=float(k), scale=scalar(2.0), found_inf=scalar(0.0), wire_dtype=wire,
                    wire_out=own)  # wire_out *is* inputs[k // 2]
        reduce_both(out, xs, wire_dtype=wire)
        reduce_both(out, xs)  # widening sum without rounding (one_shot, uncompressed result)
        reduce_both(out, xs, found_inf=scalar(0.0))


def test_reduce_misaligned_single_buffers(gen):
    """One misaligned buffer among aligned ones sends the whole call down the scalar path."""
    n = 4099
    for bad in range(4):
        xs = [rand(n, torch.bfloat16, gen, misaligned=(bad == j)) for j in range(3)]
        wo = rand(n, torch.bfloat16, gen, misaligned=(bad == 3))
        reduce_both(torch.empty(n, device=DEV), xs, divisor=3.0, wire_dtype=torch.bfloat16, wire_out=wo)


def test_reduce_found_inf_tests_the_stored_value():
    """A finite float32 sum that overflows a float16 wire or out is flagged (the stored result is inf)."""
    x = torch.full((1000,), 60000.0, device=DEV)
    recv = torch.full((1000,), 30000.0, dtype=torch.float16, device=DEV)
    w = torch.empty(1000, dtype=torch.float16, device=DEV)
    found = scalar(0.0)
    reduce_both(x, [x, recv], found_inf=found, wire_dtype=torch.float16, wire_out=w)
    assert found.item() == 1.0
    assert torch.isinf(x).all()
    # Without the wire: the float32 sum is finite, but the float16 out it is stored in is not.
    x = torch.full((1000,), 60000.0, device=DEV)
    out = torch.empty(1000, dtype=torch.float16, device=DEV)
    found = scalar(0.0)
    reduce_both(out, [x, recv], found_inf=found)
    assert found.item() == 1.0
    assert torch.isinf(out).all()
    found = scalar(0.0)
    reduce_both(torch.empty(1000, device=DEV), [x, recv], found_inf=found)  # a float32 out holds it
    assert found.item() == 0.0


def test_reduce_found_inf_is_never_cleared(gen):
    found = scalar(1.0)
    reduce_both(torch.empty(100, device=DEV), [rand(100, torch.float32, gen)], found_inf=found)
    assert found.item() == 1.0


def test_reduce_integer_sum_wraps():
    big = torch.full((37,), 2**31 - 5, dtype=torch.int32, device=DEV)
    reduce_both(big, [big, torch.full((37,), 10, dtype=torch.int32, device=DEV)])
    assert (big.cpu() == -(2**31) + 5).all()
    huge = torch.full((9,), 2**63 - 1, dtype=torch.int64, device=DEV)
    reduce_both(huge, [huge, huge, huge])
    assert (huge.cpu() == 2**63 - 3).all()


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", [0, 4095, 4098])
def test_reduce_inf_and_nan_inputs_set_found_inf(bad, where, gen):
    """A non-finite value in any input, in the vector body or the scalar tail, sets found_inf."""
    for j in range(3):
        xs = [rand(4099, torch.float32, gen) for _ in range(3)]
        xs[j][where] = bad
        found = scalar(0.0)
        reduce_both(torch.empty(4099, device=DEV), xs, divisor=2.0, found_inf=found)
        assert found.item() == 1.0


def test_reduce_empty_tensors_write_nothing():
    out = torch.empty(0, device=DEV)
    found = scalar(0.0)
    ops.reduce_(out, [torch.empty(0, device=DEV)], 2.0, None, found, None, None)
    assert found.item() == 0.0


def test_reduce_refused_call_writes_nothing(gen):
    """Bad arguments raise before the kernel runs (the shared check_reduce_args), and leave out untouched."""
    out = rand(64, torch.float32, gen)
    before = out.clone()
    cases = [
        ([rand(64, torch.float32, gen)], dict(divisor=0.0)),
        ([rand(65, torch.float32, gen)], {}),
        ([rand(64, torch.float64, gen)], {}),
        ([rand(64, torch.float32, gen) for _ in range(33)], {}),
        ([rand(64, torch.float16, gen), rand(64, torch.float16, gen), rand(64, torch.bfloat16, gen)], {}),
        ([rand(64, torch.float32, gen)], dict(wire_out=torch.empty(64, dtype=torch.float16, device=DEV))),
    ]
    for inputs, kw in cases:
        with pytest.raises((ValueError, TypeError, RuntimeError)):
            ops.reduce_(out, inputs, kw.get("divisor", 1.0), None, None, None, kw.get("wire_out"))
    bitwise(out, before)


# ----------------------------------------------------------------------------------------------------------
# opcheck and "no host synchronisation"
# ----------------------------------------------------------------------------------------------------------


def test_opcheck_on_cuda_inputs(gen):
    grads = [rand(n, d, gen) for n, d in ((100, torch.float16), (3, torch.float32), (70_000, torch.bfloat16))]
    torch.library.opcheck(ops.unscale_and_check_.default, ([g.clone() for g in grads], scalar(0.5), scalar(0.0), scalar(0.0)))
    outs = [torch.empty(g.shape, device=DEV) for g in grads]
    torch.library.opcheck(ops.unscale_and_check_out.default, (grads, scalar(0.5), scalar(0.0), outs, None))
    torch.library.opcheck(ops.flatten.default, (grads, torch.float32, 2.0, scalar(0.5)))
    flat = torch.empty(sum(g.numel() for g in grads), dtype=torch.bfloat16, device=DEV)
    torch.library.opcheck(ops.flatten_out.default, (grads, flat, 1.0, None))
    torch.library.opcheck(ops.unflatten_.default, (flat, [g.clone() for g in grads], 0.5, None))
    x = rand(4099, torch.float32, gen)
    w = torch.empty(4099, dtype=torch.float16, device=DEV)
    torch.library.opcheck(
        ops.reduce_.default,
        (x, [x.clone(), rand(4099, torch.float16, gen)], 2.0, scalar(0.5), scalar(0.0), torch.float16, w),
    )
    torch.library.opcheck(ops.reduce_.default, (x, [x.clone() for _ in range(5)], 1.0, None, None, None, None))


def test_no_host_synchronisation(gen):
    grads = [rand(n, d, gen) for n, d in ((4099, torch.float16), (65537, torch.float32), (3, torch.bfloat16))]
    outs = [torch.empty(g.shape, device=DEV) for g in grads]
    inv, found, norm, st = scalar(0.5), scalar(0.0), scalar(0.0), scalar(2.0)
    flat = torch.empty(sum(g.numel() for g in grads), dtype=torch.float32, device=DEV)
    x = rand(4099, torch.float32, gen)
    recv = rand(4099, torch.bfloat16, gen)
    w = torch.empty(4099, dtype=torch.bfloat16, device=DEV)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.unscale_and_check_(grads, inv, found, norm)
        ops.unscale_and_check_out(grads, inv, found, outs, norm)
        ops.flatten(grads, torch.float32, 1.0, st)
        ops.flatten_out(grads, flat, 0.5, None)
        ops.unflatten_(flat, grads, 1.0, st)
        ops.reduce_(x, [x, recv], 2.0, inv, found, torch.bfloat16, w)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    assert torch.isfinite(norm).item()


# ----------------------------------------------------------------------------------------------------------
# Misaligned slices: head peeled to the 16-byte boundary, vectorised body, scalar tail (every kernel)
# ----------------------------------------------------------------------------------------------------------
ODD_NUMELS = [1, 3, 5, 7, 9, 31, 4097, 65537, 131_075]


def bucket_slices(dtype, gen, numels, *, scale=4.0):
    """Slices of one flat buffer laid end to end, as a bucket lays out parameters: with odd numels every slice
    after the first starts at a different offset within a 16-byte word."""
    flat = rand(sum(numels), dtype, gen, scale=scale)
    out, at = [], 0
    for n in numels:
        out.append(flat[at:at + n])
        at += n
    return flat, out


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
@pytest.mark.parametrize("out", [False, True])
def test_unscale_bucket_slices_at_every_offset(dtype, out, gen):
    numels = ODD_NUMELS * 2
    _, grads = bucket_slices(dtype, gen, numels)
    offsets = {t.storage_offset() * t.element_size() % 16 for t in grads}
    assert len(offsets) > 4, offsets  # the slices really start at many positions within a 16-byte word
    before = [t.clone() for t in grads]
    inv = scalar(0.25)
    g_cuda, o_cuda, f_cuda, n_cuda = unscale_on(DEV, grads, inv, scalar(0.0), out=out, norm=True)
    g_cpu, o_cpu, f_cpu, n_cpu = unscale_on("cpu", [t.cpu() for t in grads], inv.cpu(), scalar(0.0).cpu(), out=out,
                                            norm=True)
    for a, b in zip(o_cuda if out else g_cuda, o_cpu if out else g_cpu):
        bitwise(a, b)
    vals, ref_norm = reference_unscale(before, 0.25)
    for r, v in zip(o_cuda if out else g_cuda, vals):
        bitwise(r, v if out else v.to(dtype))
    assert f_cuda.item() == 0.0 and n_cuda.item() == pytest.approx(ref_norm, rel=1e-6)


@pytest.mark.parametrize("dtype", GRAD_DTYPES)
@pytest.mark.parametrize("where", ["head", "body", "tail"])
def test_unscale_finds_non_finite_in_the_peeled_head_body_and_tail(dtype, where, gen):
    for offset in range(1, 8):
        storage = rand(offset + 1001, dtype, gen)
        g = storage[offset:offset + 1001]
        index = {"head": 0, "body": 500, "tail": 1000}[where]
        g[index] = float("inf")
        found = scalar(0.0)
        paracomm.unscale_and_check_([g], scalar(1.0), found)
        assert found.item() == 1.0, (offset, where)


@pytest.mark.parametrize("src", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dst", [torch.float32, torch.bfloat16])
def test_flatten_unflatten_bucket_slices_at_every_offset(src, dst, gen):
    _, tensors = bucket_slices(src, gen, ODD_NUMELS, scale=30.0)
    total = sum(ODD_NUMELS)
    for out_offset in (0, 1, 3):  # the flat buffer itself mid-vector too
        storage = torch.full((total + out_offset,), 3.0, dtype=dst, device=DEV)
        out = storage[out_offset:]
        paracomm.flatten(tensors, out=out, scale=scalar(0.5))
        ref = paracomm.flatten([t.cpu() for t in tensors], dtype=dst, scale=torch.tensor([0.5]))
        bitwise(out, ref)
        _, back = bucket_slices(src, gen, ODD_NUMELS)
        back_cpu = [copy_keeping_offset(b, "cpu") for b in back]
        paracomm.unflatten_(out, back, scale=2.0)
        paracomm.unflatten_(ref, back_cpu, scale=2.0)
        for a, b in zip(back, back_cpu):
            bitwise(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32])
@pytest.mark.parametrize("offset", list(range(8)))
def test_reduce_inputs_and_out_at_a_common_offset(dtype, offset, gen):
    """Every buffer starts `offset` elements into its storage: the kernel peels the head and vectorises."""
    for n in (1, 9, 4097, 100_003):
        inputs = [rand(n + offset, dtype, gen)[offset:] for _ in range(3)]
        out = torch.empty(n + offset, dtype=dtype, device=DEV)[offset:]
        reduce_both(out, inputs)
        reduce_both(inputs[0], inputs)  # in place: out is inputs[0]


@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("offset", [1, 3, 6])
def test_reduce_wire_rounding_at_a_common_offset(wire, offset, gen):
    n = 50_001
    inputs = [rand(n + offset, torch.float32, gen)[offset:]] + [rand(n + offset, wire, gen)[offset:] for _ in range(2)]
    out = torch.empty(n + offset, dtype=torch.float32, device=DEV)[offset:]
    wire_out = torch.empty(n + offset, dtype=wire, device=DEV)[offset:]
    found = scalar(0.0)
    reduce_both(out, inputs, divisor=3.0, scale=scalar(0.5), found_inf=found, wire_dtype=wire, wire_out=wire_out)


def test_reduce_pointers_misaligned_differently_take_the_scalar_path(gen):
    n = 10_007
    inputs = [rand(n + k, torch.float32, gen)[k:] for k in (1, 2, 3)]  # no index aligns all three
    out = torch.empty(n, dtype=torch.float32, device=DEV)
    reduce_both(out, inputs, divisor=2.0)
