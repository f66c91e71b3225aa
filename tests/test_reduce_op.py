"""paracomm::reduce_ on CPU (csrc/cpu/reduce_cpu.cpp, checks in csrc/validate_reduce.cpp).

Every supported dtype combination and 1..32 inputs against torch references that follow the documented
formula step by step (sum left to right in the accumulation dtype, divide, scale, round through the wire
dtype, cast), compared bitwise; an independent float64 reference with an error bound as a sanity check;
aliasing (an input is out or wire_out); integer wrap; found_inf; opcheck; and refused inputs that leave every
tensor untouched.
"""
import itertools

import numpy as np
import pytest
import torch

import paracomm._ops as pops

F32, F16, BF16, F64, I32, I64 = torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64
MAX_INPUTS = 32
SIZES = [0, 1, 1023, 1024, 1025, 70_001]  # around the 1024-element block and the 64-block parallel grain
BIG = 70_001  # more than one 64K-element parallel task: the reduction runs on several threads
UNIT_ROUNDOFF = {F64: 2.0**-53, F32: 2.0**-24, F16: 2.0**-11, BF16: 2.0**-8}


def _rand(n, dtype, gen, scale=10.0):
    if dtype.is_floating_point:
        return (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min // 2, info.max // 2, (n,), generator=gen, dtype=dtype)


def _inputs(n, first, rest, count, gen):
    return [_rand(n, first, gen)] + [_rand(n, rest, gen) for _ in range(count - 1)]


def _wrap_sum(inputs, out_dtype):
    """Integer sum modulo 2**64 (numpy's unsigned arithmetic wraps by definition), cast to out_dtype."""
    acc = np.zeros(inputs[0].numel(), dtype=np.uint64)
    for x in inputs:
        acc += x.numpy().astype(np.int64).view(np.uint64)
    if out_dtype == I32:
        return torch.from_numpy(acc.astype(np.uint32).view(np.int32).copy())
    return torch.from_numpy(acc.view(np.int64).copy())


def _reference(out_dtype, inputs, divisor=1.0, scale=None, wire_dtype=None):
    """The formula in torch ops: (out, wire). Sum left to right in float32 (float64 for float64, wrapping
    integers for int32/int64), divide, scale, round through the wire dtype, cast to out's dtype."""
    if out_dtype in (I32, I64):
        return _wrap_sum(inputs, out_dtype), None
    acc = F64 if out_dtype == F64 else F32
    v = inputs[0].to(acc)
    for x in inputs[1:]:
        v = v + x.to(acc)  # one correctly rounded add per input, in order
    if divisor != 1.0:
        v = v / torch.tensor(divisor, dtype=acc)
    if scale is not None:
        v = v * scale.to(acc)
    wire = None
    if wire_dtype is not None:
        wire = v.to(wire_dtype)
        v = wire.to(acc)
    return v.to(out_dtype), wire


def _assert_within_float64_bound(out, inputs, divisor, scale_value, wire_dtype):
    """Independent check: the exact (float64) result of the already-rounded inputs, with the classic error
    bound of left-to-right summation ((k-1) * u * sum|x|) plus one rounding for the wire and one for out."""
    k = len(inputs)
    scale_value = torch.tensor(scale_value, dtype=F32).item()  # the op's scale is a float32 tensor
    exact = sum(x.double() for x in inputs) / divisor * scale_value
    abs_sum = sum(x.double().abs() for x in inputs) / divisor * abs(scale_value)
    u_acc = UNIT_ROUNDOFF[F64 if out.dtype == F64 else F32]
    u_round = (UNIT_ROUNDOFF[wire_dtype] if wire_dtype is not None else 0.0) + UNIT_ROUNDOFF[out.dtype]
    # (k + 2) roundings in the accumulator (k - 1 adds, divide, scale); factor 2 for the second-order terms;
    # 2**-24 covers float16's subnormal spacing near zero.
    bound = 2 * (k + 2) * u_acc * abs_sum + 2 * u_round * exact.abs() + 2.0**-24
    err = (out.double() - exact).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item()} exceeds the bound"


# ---------------------------------------------------------------------------------------------------------
# Results against the references
# ---------------------------------------------------------------------------------------------------------


def _fp32_family_combos():
    """(out, inputs[0], inputs[1:] or None, number of inputs, wire): each float32 or one low-precision L;
    wire is None, (L, True) (round and keep wire_out) or (L, False) (round only)."""
    combos = []
    for low in (F16, BF16):
        for out, first in itertools.product((F32, low), repeat=2):
            rests = [(None, 1)] + [(r, k) for r in (F32, low) for k in (2, 3)]
            for (rest, k), wire in itertools.product(rests, (None, (low, True), (low, False))):
                combos.append((out, first, rest, k, wire))
    return combos


def _combo_id(combo):
    out, first, rest, k, wire = combo
    name = lambda t: str(t).replace("torch.", "")  # noqa: E731
    parts = [f"out={name(out)}", f"in={name(first)}" + (f"+{k - 1}x{name(rest)}" if rest is not None else "")]
    if wire is not None:
        parts.append(f"wire={name(wire[0])}" + ("+out" if wire[1] else ""))
    return ",".join(parts)


@pytest.mark.parametrize("out_t, first_t, rest_t, k, wire", _fp32_family_combos(),
                         ids=[_combo_id(c) for c in _fp32_family_combos()])
def test_fp32_accumulation_combos_match_torch_bitwise(out_t, first_t, rest_t, k, wire, seeded):
    wire_t, keep = wire if wire is not None else (None, False)
    settings = [(n, divisor, with_scale) for n in (0, 1, 1025) for divisor, with_scale in
                ((1.0, False), (3.0, True), (7.3, False))] + [(BIG, 3.0, True)]
    for n, divisor, with_scale in settings:
        inputs = _inputs(n, first_t, rest_t, k, seeded)
        before = [x.clone() for x in inputs]
        scale = torch.tensor([0.37]) if with_scale else None
        out = _rand(n, out_t, seeded)
        wire_out = _rand(n, wire_t, seeded) if keep else None
        found = torch.zeros(1)
        pops.reduce_(out, inputs, divisor=divisor, scale=scale, found_inf=found, wire_dtype=wire_t,
                     wire_out=wire_out)
        ref, ref_wire = _reference(out_t, inputs, divisor, scale, wire_t)
        assert torch.equal(out, ref), (n, divisor)
        if keep:
            assert torch.equal(wire_out, ref_wire)
        assert found.item() == 0.0
        assert all(torch.equal(x, y) for x, y in zip(inputs, before))
        _assert_within_float64_bound(out, inputs, divisor, 0.37 if with_scale else 1.0, wire_t)


# (out, inputs[0], inputs[1:], wire_dtype, keep wire_out, divisor is the input count, scale)
N_LAYOUTS = {
    "f32": (F32, F32, F32, None, False, False, None),
    "f32+bf16 ring step": (F32, F32, BF16, BF16, True, True, 0.37),   # own float32 data + received partial sums
    "f32+f16 to f16": (F16, F32, F16, F16, False, True, None),
    "f16+f32": (F32, F16, F32, None, False, False, 1.9),
    "bf16": (BF16, BF16, BF16, BF16, True, True, None),
    "f64": (F64, F64, F64, None, False, True, 0.37),
    "i32": (I32, I32, I32, None, False, False, None),
    "i64": (I64, I64, I64, None, False, False, None),
}


@pytest.mark.parametrize("layout", list(N_LAYOUTS))
@pytest.mark.parametrize("k", range(1, MAX_INPUTS + 1))
def test_n_inputs_match_left_to_right_accumulation(k, layout, seeded):
    out_t, first_t, rest_t, wire_t, keep, average, scale_value = N_LAYOUTS[layout]
    n = BIG if k in (1, 2, 7, MAX_INPUTS) else 3001 + 8 * k  # assorted tails; the largest counts threaded
    inputs = _inputs(n, first_t, rest_t, k, seeded)
    before = [x.clone() for x in inputs]
    divisor = float(k) if average else 1.0
    scale = torch.tensor([scale_value]) if scale_value is not None else None
    out = _rand(n, out_t, seeded)
    wire_out = _rand(n, wire_t, seeded) if keep else None
    found = torch.zeros(1)
    pops.reduce_(out, inputs, divisor=divisor, scale=scale, found_inf=found, wire_dtype=wire_t, wire_out=wire_out)
    ref, ref_wire = _reference(out_t, inputs, divisor, scale, wire_t)
    assert torch.equal(out, ref)
    if keep:
        assert torch.equal(wire_out, ref_wire)
    assert found.item() == 0.0
    assert all(torch.equal(x, y) for x, y in zip(inputs, before))
    if out_t.is_floating_point:
        _assert_within_float64_bound(out, inputs, divisor, scale_value if scale_value is not None else 1.0, wire_t)


def test_sums_left_to_right_in_the_accumulation_dtype():
    big = 2.0**25  # float32 spacing there is 4: big + 1 rounds back to big
    cases = [([big, 1.0, -big], 0.0), ([1.0, big, -big], 0.0), ([big, -big, 1.0], 1.0)]
    for values, want in cases:
        out = torch.full((3,), 5.0)
        pops.reduce_(out, [torch.full((3,), v) for v in values])
        assert out.tolist() == [want] * 3, values
    # float64 accumulates in float64: 2**54 + 1 rounds back there, 2**52 + 1 does not (it would in float32).
    out = torch.full((2,), 5.0, dtype=F64)
    pops.reduce_(out, [torch.full((2,), v, dtype=F64) for v in (2.0**54, 1.0, -(2.0**54))])
    assert out.tolist() == [0.0, 0.0]
    out = torch.full((2,), 5.0, dtype=F64)
    pops.reduce_(out, [torch.full((2,), v, dtype=F64) for v in (2.0**52, 1.0, -(2.0**52))])
    assert out.tolist() == [1.0, 1.0]
    # float16 inputs accumulate in float32: 2048 + 1 would round back in float16, not in float32.
    for low in (F16, BF16):
        out = torch.full((2,), 5.0, dtype=low)
        pops.reduce_(out, [torch.full((2,), v, dtype=low) for v in (2048.0, 1.0, 1.0, -2048.0)])
        assert out.tolist() == [2.0, 2.0]


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64, I32, I64])
def test_single_dtype_matches_torch(dtype, seeded):
    floating = dtype.is_floating_point
    divisor = 4.0 if floating else 1.0
    for n in SIZES:
        a = _rand(n, dtype, seeded)
        b = _rand(n, dtype, seeded)
        out = _rand(n, dtype, seeded)
        pops.reduce_(out, [a, b], divisor=divisor)
        ref, _ = _reference(dtype, [a, b], divisor)
        assert torch.equal(out, ref)
        # out is inputs[0] (the executors reduce in place).
        x = a.clone()
        pops.reduce_(x, [x, b])
        assert torch.equal(x, _reference(dtype, [a, b])[0])
        # One input that is out: a copy pass that changes nothing.
        y = a.clone()
        pops.reduce_(y, [y])
        assert torch.equal(y, a)
        if floating:
            torch.testing.assert_close(out.double(), (a.double() + b.double()) / 4.0,
                                       rtol=1e-2 if dtype in (F16, BF16) else 1e-6, atol=1e-2)


def test_scale_then_divisor_order():
    a, b = torch.tensor([3.0]), torch.tensor([4.0])
    out = torch.empty(1)
    pops.reduce_(out, [a, b], divisor=7.0, scale=torch.tensor([0.5]))
    assert out.item() == 0.5  # (3 + 4) / 7 * 0.5


@pytest.mark.parametrize("low", [F16, BF16])
def test_round_to_wire_without_wire_out(low, seeded):
    inputs = _inputs(BIG, F32, low, 5, seeded)
    scale = torch.tensor([0.61])
    out = _rand(BIG, F32, seeded)
    pops.reduce_(out, inputs, divisor=5.0, scale=scale, wire_dtype=low)
    ref, ref_wire = _reference(F32, inputs, 5.0, scale, low)
    assert torch.equal(out, ref)
    assert torch.equal(out, ref_wire.float())  # every stored value is representable in the wire dtype
    # Without wire_dtype the result keeps float32 precision: the rounding really happened above.
    unrounded = torch.empty(BIG)
    pops.reduce_(unrounded, inputs, divisor=5.0, scale=scale)
    assert not torch.equal(unrounded, out)
    # Same bits as with wire_out given, and wire_out holds exactly them.
    out2, wire = torch.empty(BIG), _rand(BIG, low, seeded)
    pops.reduce_(out2, inputs, divisor=5.0, scale=scale, wire_dtype=low, wire_out=wire)
    assert torch.equal(out2, out) and torch.equal(wire, ref_wire)


@pytest.mark.parametrize("n", [1, 1025, BIG])
def test_empty_tensors_write_nothing(n, seeded):
    # n == 0: every tensor untouched (found_inf included).
    found = torch.zeros(1)
    out = torch.empty(0)
    pops.reduce_(out, [torch.empty(0), torch.empty(0, dtype=BF16)], found_inf=found, wire_dtype=BF16)
    assert found.item() == 0.0
    # n > 0 with an inf in the data: the flag is set (so the n == 0 check above is not vacuous).
    inputs = _inputs(n, F32, BF16, 2, seeded)
    inputs[0][n - 1] = float("inf")
    pops.reduce_(torch.empty(n), inputs, found_inf=found, wire_dtype=BF16)
    assert found.item() == 1.0


# ---------------------------------------------------------------------------------------------------------
# Aliasing: an input may be exactly out or wire_out
# ---------------------------------------------------------------------------------------------------------


def _out_alias_cases():
    # out may sit at any position when it has the dtype of inputs[1:], else only at 0.
    cases = []
    for out_t, rest_t in [(F32, F32), (F32, BF16), (F16, F32), (F64, F64), (I64, I64), (I32, I32)]:
        cases += [(where, out_t, rest_t) for where in ((0, 2, 4) if out_t == rest_t else (0,))]
    return cases


@pytest.mark.parametrize("where, out_t, rest_t", _out_alias_cases())
def test_out_is_an_input(where, out_t, rest_t, seeded):
    k = 5
    inputs = [_rand(BIG, rest_t, seeded) for _ in range(k)]
    out = _rand(BIG, out_t, seeded)
    inputs[where] = out
    plain = [x.clone() for x in inputs]  # the values the op must read
    divisor = 3.0 if out_t.is_floating_point else 1.0
    pops.reduce_(out, inputs, divisor=divisor)
    assert torch.equal(out, _reference(out_t, plain, divisor)[0])


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_out_is_every_input(k, dtype, seeded):
    x = _rand(BIG, dtype, seeded)
    want = _reference(dtype, [x] * k, 3.0)[0]
    pops.reduce_(x, [x] * k, divisor=3.0)
    assert torch.equal(x, want)


@pytest.mark.parametrize("low", [F16, BF16])
@pytest.mark.parametrize("out_too", [False, True])
def test_wire_out_is_an_input(low, out_too, seeded):
    # The ring's owner step: own float32 data + received low-precision partial sums, the sum rounded for the
    # wire into the buffer that held one of the partial sums (and, with out_too, kept in place in inputs[0]).
    inputs = _inputs(BIG, F32, low, 4, seeded)
    wire_out = inputs[2]
    out = inputs[0] if out_too else _rand(BIG, F32, seeded)
    plain = [x.clone() for x in inputs]
    found = torch.zeros(1)
    pops.reduce_(out, inputs, divisor=4.0, scale=torch.tensor([1.3]), found_inf=found, wire_dtype=low,
                 wire_out=wire_out)
    ref, ref_wire = _reference(F32, plain, 4.0, torch.tensor([1.3]), low)
    assert torch.equal(out, ref)
    assert torch.equal(wire_out, ref_wire)
    assert found.item() == 0.0


def test_low_precision_out_is_input_zero(seeded):
    # A float16 partial sum updated in place with float32 inputs.
    out = _rand(BIG, F16, seeded)
    inputs = [out] + [_rand(BIG, F32, seeded) for _ in range(3)]
    plain = [x.clone() for x in inputs]
    pops.reduce_(out, inputs, wire_dtype=F16)
    assert torch.equal(out, _reference(F16, plain, wire_dtype=F16)[0])


# ---------------------------------------------------------------------------------------------------------
# Integers
# ---------------------------------------------------------------------------------------------------------


def test_integer_sums_wrap():
    big = torch.tensor([2**31 - 1, -(2**31)], dtype=I32)
    one = torch.tensor([1, -1], dtype=I32)
    out = torch.empty(2, dtype=I32)
    pops.reduce_(out, [big, one])
    assert out.tolist() == [-(2**31), 2**31 - 1]
    big = torch.tensor([2**63 - 1], dtype=I64)
    out = torch.empty(1, dtype=I64)
    pops.reduce_(out, [big, torch.tensor([1], dtype=I64)])
    assert out.item() == -(2**63)


@pytest.mark.parametrize("dtype", [I32, I64])
def test_integer_sums_of_many_inputs_wrap(dtype):
    bits = 32 if dtype == I32 else 64
    top = 2 ** (bits - 1) - 1
    values = [top, top - 12345, -top, 2 ** (bits - 2) + 7]
    for k in (3, 17, MAX_INPUTS):
        inputs = [torch.tensor(values, dtype=dtype) for _ in range(k)]
        out = torch.empty(len(values), dtype=dtype)
        pops.reduce_(out, inputs)
        want = [((k * v + 2 ** (bits - 1)) % 2**bits) - 2 ** (bits - 1) for v in values]  # Python ints: exact
        assert out.tolist() == want, k


def test_integer_found_inf_left_alone(seeded):
    found = torch.zeros(1)
    a, b = _rand(1000, I64, seeded), _rand(1000, I64, seeded)
    pops.reduce_(torch.empty(1000, dtype=I64), [a, b], found_inf=found)
    assert found.item() == 0.0


# ---------------------------------------------------------------------------------------------------------
# found_inf
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("which", ["first", "middle", "last"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_found_inf_set_on_nonfinite_result(dtype, where, which, bad, seeded):
    n, k = 5000, 5
    inputs = _inputs(n, dtype, dtype, k, seeded)
    pos = {"first": 0, "middle": n // 2, "last": n - 1}[where]
    inputs[{"first": 0, "middle": k // 2, "last": k - 1}[which]][pos] = bad
    found = torch.zeros(1)
    out = _rand(n, dtype, seeded)
    pops.reduce_(out, inputs, found_inf=found)
    assert found.item() == 1.0
    assert torch.isnan(out[pos]) if bad != bad else out[pos].item() == bad
    assert bool(torch.isfinite(torch.cat([out[:pos], out[pos + 1:]])).all())
    # Never cleared: a clean call leaves it at 1.
    clean = _inputs(n, dtype, dtype, k, seeded)
    pops.reduce_(out, clean, found_inf=found)
    assert found.item() == 1.0
    found.zero_()
    pops.reduce_(out, clean, found_inf=found)
    assert found.item() == 0.0


@pytest.mark.parametrize("keep", [True, False])
def test_found_inf_sees_the_wire_rounding(keep):
    # 1e5 is finite in float32 but overflows float16: the owner keeps (and others receive) inf, so it counts.
    a = torch.tensor([6e4, 1.0]), torch.tensor([4e4, 2.0])
    out, found = torch.empty(2), torch.zeros(1)
    wire = torch.empty(2, dtype=F16) if keep else None
    pops.reduce_(out, list(a), found_inf=found, wire_dtype=F16, wire_out=wire)
    assert found.item() == 1.0 and torch.isinf(out[0]) and out[1].item() == 3.0
    if keep:
        assert torch.isinf(wire[0]) and wire[1].item() == 3.0
    found.zero_()
    pops.reduce_(out, list(a), found_inf=found)
    assert found.item() == 0.0 and out[0].item() == 1e5


@pytest.mark.parametrize("low, value, k", [(F16, 3000.0, MAX_INPUTS), (BF16, 1.7e38, 2), (F16, 2.2e4, 3)])
def test_found_inf_sees_the_wire_rounding_of_many_inputs(low, value, k, seeded):
    # k inputs whose float32 sum is finite but beyond the wire dtype's range (bfloat16's range is float32's
    # less its top half-ulp: 3.4e38 is finite in float32 and rounds to inf in bfloat16).
    n = 3000
    inputs = [torch.rand(n, generator=seeded) + 0.5 for _ in range(k)]  # positive, small: the sum is finite
    pos = 1234
    for x in inputs:
        x[pos] = value
    out, found = torch.empty(n), torch.zeros(1)
    pops.reduce_(out, inputs, found_inf=found)
    assert found.item() == 0.0 and bool(torch.isfinite(out).all())
    pops.reduce_(out, inputs, found_inf=found, wire_dtype=low, wire_out=torch.empty(n, dtype=low))
    assert found.item() == 1.0 and torch.isinf(out[pos])
    assert int(torch.isinf(out).sum()) == 1


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_found_inf_sees_the_cast_to_a_narrow_out(low):
    """A finite float32 sum that overflows a float16/bfloat16 out is stored as inf: found_inf says so."""
    big = {torch.float16: 6e4, torch.bfloat16: 3e38}[low]
    a = torch.tensor([big, 1.0, -2.0]).to(low)
    b = torch.tensor([big, 2.0, 0.5]).to(low)
    out = torch.full((3,), 7.0, dtype=low)
    found = torch.zeros(1)
    pops.reduce_(out, [a, b], found_inf=found)
    assert torch.isinf(out[0]) and out[1].item() == 3.0 and found.item() == 1.0
    found.zero_()
    out2 = torch.empty(2, dtype=low)
    pops.reduce_(out2, [a[1:].clone(), b[1:].clone()], found_inf=found)
    assert found.item() == 0.0


# ---------------------------------------------------------------------------------------------------------
# opcheck (non-aliased argument sets: schema, fake kernel, dispatch)
# ---------------------------------------------------------------------------------------------------------


def _opcheck_cases():
    g = torch.Generator().manual_seed(7)
    n = 3000
    r = lambda dt=F32: (torch.randn(n, generator=g) * 10).to(dt)  # noqa: E731
    return [
        # (out, inputs, divisor, scale, found_inf, wire_dtype, wire_out)
        (r(), [r(), r()], 1.0, None, None, None, None),
        (r(), [r(), r(BF16), r(BF16), r(BF16)], 2.0, torch.tensor([0.5]), torch.zeros(1), BF16, r(BF16)),
        (r(F16), [r()], 1.0, None, torch.zeros(1), None, None),
        (r(), [r(F16)] + [r() for _ in range(MAX_INPUTS - 1)], 32.0, None, torch.zeros(1), F16, None),
        (torch.empty(n, dtype=I64), [torch.randint(-9, 9, (n,), generator=g) for _ in range(3)], 1.0, None, None,
         None, None),
        (r(F64), [r(F64), r(F64)], 3.0, torch.tensor([2.0]), torch.zeros(1), None, None),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    torch.library.opcheck(torch.ops.paracomm.reduce_.default, _opcheck_cases()[case])


# ---------------------------------------------------------------------------------------------------------
# Refused inputs: the right error type, the argument named, nothing written
# ---------------------------------------------------------------------------------------------------------


def _bad_cases():
    n = 16
    gen = torch.Generator().manual_seed(11)

    def f(dt=F32, m=n):
        # Random, with an inf: a call that went ahead would change out and set found_inf.
        x = torch.randn(m, generator=gen) * 10
        x[0] = float("inf")
        return x.to(dt) if dt.is_floating_point else x.clamp(-1e4, 1e4).to(dt)

    nc = (torch.randn(n, 2, generator=gen) * 10)[:, 0]  # non-contiguous
    nc_bf16 = (torch.randn(n, 2, generator=gen) * 10).to(BF16)[:, 0]  # (.to() of nc would be contiguous)
    s1 = torch.tensor([1.0])
    z = lambda: torch.zeros(1)  # noqa: E731
    meta = lambda dt=F32, m=n: torch.empty(m, dtype=dt, device="meta")  # noqa: E731
    return [
        # (out, inputs, divisor, scale, found_inf, wire_dtype, wire_out), error type, message fragment
        ((nc, [f()], 1.0, None, z(), None, None), ValueError, r"out must be contiguous"),
        ((f(), [nc], 1.0, None, z(), None, None), ValueError, r"inputs\[0\] must be contiguous"),
        ((f(), [f(), nc], 1.0, None, z(), None, None), ValueError, r"inputs\[1\] must be contiguous"),
        ((f(), [f(), f(), f(), nc], 1.0, None, z(), None, None), ValueError, r"inputs\[3\] must be contiguous"),
        ((f(), [f(), f(), f(BF16)], 1.0, None, z(), BF16, nc_bf16), ValueError, r"wire_out must be contiguous"),
        ((f(), [], 1.0, None, z(), None, None), ValueError, r"inputs must hold 1 to 32 tensors, got 0"),
        ((f(), [f() for _ in range(33)], 1.0, None, z(), None, None), ValueError,
         r"inputs must hold 1 to 32 tensors, got 33"),
        ((f(), [f(m=15)], 1.0, None, z(), None, None), ValueError, r"inputs\[0\] has 15 elements but out has 16"),
        ((f(), [f(), f(m=17)], 1.0, None, z(), None, None), ValueError, r"inputs\[1\] has 17 elements"),
        ((f(), [f(), f(), f(), f(), f(m=15), f()], 1.0, None, z(), None, None), ValueError,
         r"inputs\[4\] has 15 elements"),
        ((f(m=15), [f(m=15), f()], 1.0, None, z(), None, None), ValueError, r"inputs\[1\] has 16 elements"),
        ((f(), [f()], 1.0, None, z(), F16, f(F16, 3)), ValueError, r"wire_out has 3 elements"),
        ((f(), [f(), f()], 1.0, None, z(), None, f(F16)), ValueError, r"wire_out needs wire_dtype"),
        ((f(), [f(), f(F16)], 1.0, None, z(), F16, f()), TypeError, r"wire_out has dtype torch.float32 but wire_dtype is torch.float16"),
        ((f(), [f(), f(), f()], 1.0, None, z(), F16, f(F64)), TypeError, r"wire_out has dtype torch.float64"),
        ((f(), [f(F16), f(BF16)], 1.0, None, z(), None, None), TypeError, r"inputs\[1\] .*one low-precision"),
        ((f(BF16), [f(F16)], 1.0, None, z(), None, None), TypeError, r"inputs\[0\] .*one low-precision"),
        ((f(F16), [f()], 1.0, None, z(), BF16, f(BF16)), TypeError, r"wire_dtype has dtype torch.bfloat16 .*one low-prec"),
        ((f(F16), [f()], 1.0, None, z(), BF16, None), TypeError, r"wire_dtype has dtype torch.bfloat16 .*one low-prec"),
        ((f(), [f(), f(), f()], 1.0, None, z(), F32, None), TypeError, r"wire_dtype must be torch.float16 or torch.bfloat16"),
        ((f(), [f(), f(BF16), f()], 1.0, None, z(), None, None), TypeError,
         r"inputs\[2\] has dtype torch.float32 but inputs\[1\] has torch.bfloat16"),
        ((f(), [f(), f(), f(), f(), f(), f(F16)], 1.0, None, z(), None, None), TypeError,
         r"inputs\[5\] has dtype torch.float16 but inputs\[1\] has torch.float32"),
        ((f(I64), [f(I64), f(I64), f(I32)], 1.0, None, z(), None, None), TypeError, r"inputs\[2\] has dtype torch.int32 "),
        ((f(F64), [f()], 1.0, None, z(), None, None), TypeError, r"inputs\[0\] has dtype torch.float32 but out has torch.float64"),
        ((f(), [f(F64)], 1.0, None, z(), None, None), TypeError, r"inputs\[0\] has dtype torch.float64 but out is torch.float32"),
        ((f(I32), [f(I64)], 1.0, None, z(), None, None), TypeError, r"inputs\[0\] has dtype torch.int64"),
        ((f(I32), [f(I32), f(I64)], 1.0, None, z(), None, None), TypeError, r"inputs\[1\] has dtype torch.int64"),
        ((f(F64), [f(F64), f(F64)], 1.0, None, z(), F16, None), TypeError, r"wire_dtype needs float32 accumulation"),
        ((f(F64), [f(F64)], 1.0, None, z(), F16, f(F16)), TypeError, r"wire_dtype needs float32 accumulation"),
        ((f(I32), [f(I32)], 1.0, None, z(), BF16, None), TypeError, r"wire_dtype needs float32 accumulation"),
        ((f(torch.uint8), [f()], 1.0, None, z(), None, None), TypeError, r"out has unsupported dtype"),
        ((f(), [f(), f(torch.int16)], 1.0, None, z(), None, None), TypeError, r"inputs\[1\] has unsupported dtype"),
        ((f(torch.uint8), [f(torch.uint8)], 1.0, None, z(), None, None), TypeError,
         r"inputs\[0\] has unsupported dtype"),
        ((f(), [f(), f()], 0.0, None, z(), None, None), ValueError, r"divisor must be a finite number > 0"),
        ((f(), [f(), f()], -2.0, None, z(), None, None), ValueError, r"divisor must be a finite number > 0"),
        ((f(), [f(), f()], float("nan"), None, z(), None, None), ValueError, r"divisor must be a finite number"),
        ((f(), [f(), f()], float("inf"), None, z(), None, None), ValueError, r"divisor must be a finite number"),
        ((f(I64), [f(I64), f(I64)], 2.0, None, z(), None, None), ValueError, r"divisor must be 1"),
        ((f(I32), [f(I32)], 1.0, s1, z(), None, None), TypeError, r"scale is only supported for floating"),
        ((f(I64), [f(I64), f(I64)], 1.0, s1, z(), None, None), TypeError, r"scale is only supported for floating"),
        ((f(), [f(), f()], 1.0, torch.tensor([1.0, 2.0]), z(), None, None), ValueError,
         r"scale must have exactly one"),
        ((f(), [f(), f()], 1.0, torch.tensor([1.0], dtype=F64), z(), None, None), TypeError, r"scale must be float32"),
        ((f(), [f(), f()], 1.0, None, torch.zeros(2), None, None), ValueError, r"found_inf must have exactly one"),
        ((f(), [f(), f()], 1.0, None, torch.zeros(1, dtype=F16), None, None), TypeError,
         r"found_inf must be float32"),
        # Devices. A meta tensor among CPU ones dispatches to the fake kernel, which must refuse it too.
        ((f(), [f(), meta()], 1.0, None, z(), None, None), ValueError, r"inputs\[1\] is on meta"),
        ((f(), [f(), f(), f(), meta()], 1.0, None, z(), None, None), ValueError, r"inputs\[3\] is on meta"),
        ((meta(), [f(), f()], 1.0, None, z(), None, None), ValueError, r"inputs\[0\] is on cpu, expected meta"),
        ((f(), [f(), f()], 1.0, torch.ones(1, device="meta"), z(), None, None), ValueError, r"scale is on meta"),
        ((f(), [f(), f()], 1.0, None, torch.zeros(1, device="meta"), None, None), ValueError,
         r"found_inf is on meta"),
        ((f(), [f(), f(BF16)], 1.0, None, z(), BF16, meta(BF16)), ValueError, r"wire_out is on meta"),
    ]


def _cpu_tensors(args):
    """Every CPU tensor an op call can see, list elements included (what 'nothing written' must cover)."""
    flat = []
    for a in args:
        for t in (a if isinstance(a, list) else [a]):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                flat.append(t)
    return flat


@pytest.mark.parametrize("via", ["torch.ops", "wrapper"])
@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_refused_and_nothing_written(case, via):
    args, err, match = _bad_cases()[case]
    tensors = _cpu_tensors(args)
    snapshot = [t.clone() for t in tensors]
    with pytest.raises(err, match=match):
        if via == "torch.ops":
            torch.ops.paracomm.reduce_(*args)
        else:
            out, inputs, divisor, scale, found_inf, wire_dtype, wire_out = args
            pops.reduce_(out, inputs, divisor=divisor, scale=scale, found_inf=found_inf, wire_dtype=wire_dtype,
                         wire_out=wire_out)
    for before, after in zip(snapshot, tensors):
        assert torch.equal(_bits(before), _bits(after))


def _bits(t):
    # Compare bits, not values: nan != nan, and an inf was planted in the data on purpose.
    return t.contiguous().view(torch.uint8)


def test_refusals_are_not_vacuous():
    # The same call with the bad argument fixed writes out and sets found_inf, so "unchanged" above means
    # something.
    [(args, _, _)] = [case for case in _bad_cases() if case[2] == r"inputs\[1\] must be contiguous"]
    out, inputs, divisor, scale, found_inf, wire_dtype, wire_out = args
    before = out.clone()
    pops.reduce_(out, [inputs[0], inputs[1].contiguous()], divisor=divisor, scale=scale, found_inf=found_inf,
                 wire_dtype=wire_dtype, wire_out=wire_out)
    assert not torch.equal(_bits(out), _bits(before)) and found_inf.item() == 1.0
