"""paracomm::ring_reduce_ on CPU: every supported dtype combination against torch references, opcheck,
and refused inputs that leave every tensor untouched."""
import itertools

import pytest
import torch

import paracomm._ops as pops

F32, F16, BF16, F64, I32, I64 = torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64
SIZES = [0, 1, 1023, 1024, 1025, 70_001]  # around the 1024-element block and the 64-block parallel grain


def _rand(n, dtype, gen, scale=10.0):
    if dtype.is_floating_point:
        return (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min // 2, info.max // 2, (n,), generator=gen, dtype=dtype)


def _reference(out_dtype, a, b, divisor, scale, wire_dtype):
    """The formula in torch ops: accumulate in fp32 (fp64 / int64), divide, scale, round through the wire."""
    if a.dtype in (I32, I64):
        v = a.to(I64) + (b.to(I64) if b is not None else 0)  # torch int64 adds wrap
        return v.to(out_dtype), None
    acc = F64 if a.dtype == F64 else F32
    v = a.to(acc)
    if b is not None:
        v = v + b.to(acc)
    if divisor != 1.0:
        v = v / torch.tensor(divisor, dtype=acc)
    if scale is not None:
        v = v * scale.to(acc)
    wire = None
    if wire_dtype is not None:
        wire = v.to(wire_dtype)
        v = wire.to(acc)
    return v.to(out_dtype), wire


def _fp32_family_combos():
    """(out, a, b or None, wire_out or None): each float32 or one low-precision W."""
    combos = []
    for w in (F16, BF16):
        for out, a in itertools.product((F32, w), repeat=2):
            for b in (None, F32, w):
                for wire in (None, F32, w):
                    combos.append((out, a, b, wire))
    return combos


@pytest.mark.parametrize("out_t, a_t, b_t, wire_t", _fp32_family_combos())
def test_fp32_accumulation_combos_match_torch_bitwise(out_t, a_t, b_t, wire_t, seeded):
    for n in (0, 1, 1025, 70_001):
        for divisor, with_scale in ((1.0, False), (3.0, True)):
            a = _rand(n, a_t, seeded)
            b = _rand(n, b_t, seeded) if b_t is not None else None
            scale = torch.tensor([0.37]) if with_scale else None
            out = torch.empty(n, dtype=out_t)
            wire = torch.empty(n, dtype=wire_t) if wire_t is not None else None
            found = torch.zeros(1)
            pops.ring_reduce_(out, a, b, divisor=divisor, scale=scale, found_inf=found, wire_out=wire)
            ref, ref_wire = _reference(out_t, a, b, divisor, scale, wire_t)
            assert torch.equal(out, ref), (n, divisor)
            if wire is not None:
                assert torch.equal(wire, ref_wire)
            assert found.item() == 0.0
            # Independent check in float64 (from the already-rounded inputs): within the output's rounding.
            exact = a.double() + (b.double() if b is not None else 0)
            exact = exact / divisor * (0.37 if with_scale else 1.0)
            low = {F16, BF16} & {out_t, a_t, b_t, wire_t}
            tol = 1e-2 if BF16 in low else (2e-3 if F16 in low else 1e-6)
            torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64, I32, I64])
def test_single_dtype_matches_torch(dtype, seeded):
    floating = dtype.is_floating_point
    for n in SIZES:
        a = _rand(n, dtype, seeded)
        b = _rand(n, dtype, seeded)
        out = torch.empty(n, dtype=dtype)
        pops.ring_reduce_(out, a, b, divisor=4.0 if floating else 1.0)
        ref, _ = _reference(dtype, a, b, 4.0 if floating else 1.0, None, None)
        assert torch.equal(out, ref)
        # out aliasing a (the executors reduce in place), b absent: a copy/cast pass.
        x = a.clone()
        pops.ring_reduce_(x, x, b)
        assert torch.equal(x, _reference(dtype, a, b, 1.0, None, None)[0])
        y = a.clone()
        pops.ring_reduce_(y, y)
        assert torch.equal(y, a)
        if floating:
            torch.testing.assert_close(out.double(), (a.double() + b.double()) / 4.0,
                                       rtol=1e-2 if dtype in (F16, BF16) else 1e-6, atol=1e-2)


def test_integer_sums_wrap():
    big = torch.tensor([2**31 - 1, -(2**31)], dtype=I32)
    one = torch.tensor([1, -1], dtype=I32)
    out = torch.empty(2, dtype=I32)
    pops.ring_reduce_(out, big, one)
    assert out.tolist() == [-(2**31), 2**31 - 1]
    big = torch.tensor([2**63 - 1], dtype=I64)
    out = torch.empty(1, dtype=I64)
    pops.ring_reduce_(out, big, torch.tensor([1], dtype=I64))
    assert out.item() == -(2**63)


@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_found_inf_set_on_nonfinite_result(dtype, where, bad, seeded):
    n = 5000
    a = _rand(n, dtype, seeded)
    b = _rand(n, dtype, seeded)
    pos = {"first": 0, "middle": n // 2, "last": n - 1}[where]
    b[pos] = bad
    found = torch.zeros(1)
    out = torch.empty(n, dtype=dtype)
    pops.ring_reduce_(out, a, b, found_inf=found)
    assert found.item() == 1.0
    # Never cleared: a clean call leaves it at 1.
    pops.ring_reduce_(out, a, a, found_inf=found)
    assert found.item() == 1.0


def test_found_inf_sees_the_wire_rounding():
    # 1e5 is finite in float32 but overflows float16: the owner keeps (and others receive) inf, so it counts.
    a = torch.tensor([6e4, 1.0]), torch.tensor([4e4, 2.0])
    out, wire, found = torch.empty(2), torch.empty(2, dtype=F16), torch.zeros(1)
    pops.ring_reduce_(out, a[0], a[1], found_inf=found, wire_out=wire)
    assert found.item() == 1.0 and torch.isinf(out[0]) and out[1].item() == 3.0
    found.zero_()
    pops.ring_reduce_(out, a[0], a[1], found_inf=found)
    assert found.item() == 0.0 and out[0].item() == 1e5


def test_scale_then_divisor_order():
    a, b = torch.tensor([3.0]), torch.tensor([4.0])
    out = torch.empty(1)
    pops.ring_reduce_(out, a, b, divisor=7.0, scale=torch.tensor([0.5]))
    assert out.item() == 0.5  # (3 + 4) / 7 * 0.5


def _opcheck_cases():
    g = torch.Generator().manual_seed(7)
    n = 3000
    return [
        (torch.empty(n), torch.randn(n, generator=g), torch.randn(n, generator=g), 1.0, None, None, None),
        (torch.empty(n), torch.randn(n, generator=g), torch.randn(n, generator=g).to(BF16), 2.0,
         torch.tensor([0.5]), torch.zeros(1), torch.empty(n, dtype=BF16)),
        (torch.empty(n, dtype=F16), torch.randn(n, generator=g), None, 1.0, None, torch.zeros(1), None),
        (torch.empty(n, dtype=I64), torch.randint(-9, 9, (n,), generator=g), torch.randint(-9, 9, (n,), generator=g),
         1.0, None, None, None),
        (torch.empty(n, dtype=F64), torch.randn(n, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64),
         3.0, torch.tensor([2.0]), torch.zeros(1), None),
    ]


@pytest.mark.parametrize("case", range(5))
def test_opcheck(case):
    args = _opcheck_cases()[case]
    torch.library.opcheck(torch.ops.paracomm.ring_reduce_.default, args)


def _bad_cases():
    n = 16
    f = lambda dt=F32, m=n: torch.randn(m).to(dt)  # noqa: E731
    nc = torch.randn(n, 2)[:, 0]  # non-contiguous
    s1 = torch.tensor([1.0])
    return [
        # (out, a, b, divisor, scale, found_inf, wire_out), error type, message fragment
        ((nc, f(), None, 1.0, None, None, None), ValueError, "out must be contiguous"),
        ((f(), nc, None, 1.0, None, None, None), ValueError, "a must be contiguous"),
        ((f(), f(), nc, 1.0, None, None, None), ValueError, "b must be contiguous"),
        ((f(), f(m=15), None, 1.0, None, None, None), ValueError, "a has 15 elements"),
        ((f(), f(), f(m=17), 1.0, None, None, None), ValueError, "b has 17 elements"),
        ((f(), f(), None, 1.0, None, None, f(F16, 3)), ValueError, "wire_out has 3 elements"),
        ((f(), f(torch.float16), f(torch.bfloat16), 1.0, None, None, None), TypeError, "one low-precision"),
        ((f(F16), f(), None, 1.0, None, None, f(BF16)), TypeError, "wire_out"),
        ((f(F64), f(), None, 1.0, None, None, None), TypeError, "a has dtype"),
        ((f(), f(F64), None, 1.0, None, None, None), TypeError, "a has dtype"),
        ((f(I32), f(I64), None, 1.0, None, None, None), TypeError, "a has dtype"),
        ((f(I32), f(I32), f(I64), 1.0, None, None, None), TypeError, "b has dtype"),
        ((f(F64), f(F64), None, 1.0, None, None, f(F16)), TypeError, "wire_out needs float32"),
        ((f(torch.uint8), f(torch.uint8), None, 1.0, None, None, None), TypeError, "out has unsupported dtype"),
        ((f(), f(torch.int16), None, 1.0, None, None, None), TypeError, "a has unsupported dtype"),
        ((f(), f(), None, 0.0, None, None, None), ValueError, "divisor"),
        ((f(), f(), None, -2.0, None, None, None), ValueError, "divisor"),
        ((f(), f(), None, float("nan"), None, None, None), ValueError, "divisor"),
        ((f(I64), f(I64), None, 2.0, None, None, None), ValueError, "divisor must be 1"),
        ((f(I32), f(I32), None, 1.0, s1, None, None), TypeError, "scale is only supported"),
        ((f(), f(), None, 1.0, torch.tensor([1.0, 2.0]), None, None), ValueError, "scale must have exactly one"),
        ((f(), f(), None, 1.0, torch.tensor([1.0], dtype=F64), None, None), TypeError, "scale must be float32"),
        ((f(), f(), None, 1.0, None, torch.zeros(2), None), ValueError, "found_inf must have exactly one"),
        ((f(), f(), None, 1.0, None, torch.zeros(1, dtype=F16), None), TypeError, "found_inf must be float32"),
        ((f(), f(), f(), 1.0, None, None, f(F64)), TypeError, "wire_out has dtype"),
        # A meta tensor among CPU ones dispatches to the fake kernel, which must refuse it too.
        ((f(), f(), torch.empty(n, device="meta"), 1.0, None, None, None), ValueError, "b is on meta"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_refused_and_nothing_written(case):
    args, err, match = _bad_cases()[case]
    snapshot = [t.clone() if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t for t in args]
    with pytest.raises(err, match=match):
        torch.ops.paracomm.ring_reduce_(*args)
    for before, after in zip(snapshot, args):
        if isinstance(before, torch.Tensor) and before.device.type == "cpu":
            assert torch.equal(before, after)
