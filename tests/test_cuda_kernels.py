"""CUDA ops against their CPU twins (and against torch's own arithmetic) on random data.

Every op's CUDA implementation must give the CPU op's bits: the same per-element arithmetic, the same casts.
Comparisons use assert_close(rtol=0, atol=0, equal_nan=True), i.e. bitwise up to NaN payloads; only the
unscale norm (a sum whose order legitimately differs between the two devices) gets a tolerance.
Sizes straddle the kernels' boundaries: 16-byte vectors (tails of 1..7 elements), the multi-tensor chunk
(65536 elements), more tensors than one launch's metadata holds (176 in place, 128 with two pointers), and
views that start one element in (misaligned: the scalar path).
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
def test_unscale_misaligned_views_take_the_scalar_path(dtype, out, gen):
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
# ring_reduce_
# ----------------------------------------------------------------------------------------------------------


def ring_both(out, a, b=None, *, divisor=1.0, scale=None, found_inf=None, wire_out=None):
    """Runs ring_reduce_ on the given CUDA tensors and on CPU copies; checks every written buffer bitwise."""
    cpu = lambda t: None if t is None else t.detach().cpu().clone()  # noqa: E731
    c_out, c_a, c_b, c_scale, c_found, c_wire = map(cpu, (out, a, b, scale, found_inf, wire_out))
    if a is out:
        c_a = c_out
    _ops.ring_reduce_(out, a, b, divisor=divisor, scale=scale, found_inf=found_inf, wire_out=wire_out)
    _ops.ring_reduce_(c_out, c_a, c_b, divisor=divisor, scale=c_scale, found_inf=c_found, wire_out=c_wire)
    bitwise(out, c_out)
    if wire_out is not None:
        bitwise(wire_out, c_wire)
    if found_inf is not None:
        bitwise(found_inf, c_found)


RING_SIZES = [1, 7, 4099, 1_000_003]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n", RING_SIZES)
def test_ring_reduce_uncompressed(dtype, n, gen):
    floating = dtype.is_floating_point
    for misaligned in (False, True):
        x = rand(n, dtype, gen, misaligned=misaligned)
        recv = rand(n, dtype, gen, misaligned=misaligned)
        # reduce-scatter step: x[R] += recv, in place
        ring_both(x, x, recv)
        # final step: divisor, scale and found_inf (floating only)
        if floating:
            ring_both(x, x, recv, divisor=4.0, scale=scalar(0.25), found_inf=scalar(0.0))
        else:
            ring_both(x, x, recv, found_inf=scalar(0.0))
        # N == 1 with avg: one in-place pass without b
        if floating:
            ring_both(x, x, None, divisor=3.0, found_inf=scalar(0.0))
        # into a separate out
        out = torch.empty_like(x)
        ring_both(out, x, recv)


@pytest.mark.parametrize("wire", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", RING_SIZES)
def test_ring_reduce_compressed_steps(wire, n, gen):
    """The four local steps of a compressed ring (csrc/ring, executor brief), each against the CPU op."""
    for misaligned in (False, True):
        x = rand(n, torch.float32, gen, misaligned=misaligned)
        w = torch.empty(n, dtype=wire, device=DEV)
        recv = rand(n, wire, gen, misaligned=misaligned)
        ring_both(w, x)  # step 0: w[S] = cast(x[S])
        ring_both(w, x, recv)  # reduce-scatter, not final: w[R] = W(x[R] + recv)
        ring_both(x, x, recv, divisor=4.0, scale=scalar(0.5), found_inf=scalar(0.0), wire_out=w)  # final
        ring_both(x, recv, found_inf=scalar(0.0))  # all-gather: x[R] = float(w[R])
        # an f32 out from f32 a and W b without the wire, and a W out from W a and f32 b
        ring_both(torch.empty(n, device=DEV), x, recv)
        ring_both(torch.empty(n, dtype=wire, device=DEV), recv, x)


def test_ring_reduce_found_inf_after_wire_round_trip():
    """A finite float32 sum that overflows float16 is flagged (the stored result is inf on every rank)."""
    x = torch.full((1000,), 60000.0, device=DEV)
    recv = torch.full((1000,), 30000.0, dtype=torch.float16, device=DEV)
    w = torch.empty(1000, dtype=torch.float16, device=DEV)
    found = scalar(0.0)
    ring_both(x, x, recv, found_inf=found, wire_out=w)
    assert found.item() == 1.0
    assert torch.isinf(x).all()


def test_ring_reduce_integer_sum_wraps():
    big = torch.full((37,), 2**31 - 5, dtype=torch.int32, device=DEV)
    ring_both(big, big, torch.full((37,), 10, dtype=torch.int32, device=DEV))
    assert (big.cpu() == -(2**31) + 5).all()


def test_ring_reduce_inf_and_nan_inputs_set_found_inf(gen):
    for bad in (float("inf"), float("nan")):
        x = rand(4099, torch.float32, gen)
        x[4098] = bad
        found = scalar(0.0)
        ring_both(x, x, rand(4099, torch.float32, gen), divisor=2.0, found_inf=found)
        assert found.item() == 1.0


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
        ops.ring_reduce_.default, (x, x.clone(), rand(4099, torch.float16, gen), 2.0, scalar(0.5), scalar(0.0), w)
    )


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
        ops.ring_reduce_(x, x, recv, 2.0, inv, found, w)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    assert torch.isfinite(norm).item()
