"""The CPU ops' bulk float16/bfloat16 <-> float32 converters (csrc/cpu/half_convert.cpp) against torch's casts.

They are reached through reduce_ with one input (reduce_(out, [a]) is out = cast(a)): widening is exercised
with every float16 and bfloat16 bit pattern, narrowing with random floats plus the edge cases of
round-to-nearest-even (ties, subnormals, the overflow threshold, signed zeros, infinities, NaN). Lengths are not
multiples of 8 so the scalar tail of the vector path runs too. NaN payload bits are not compared (torch's own
CPU and CUDA casts differ there).
"""
import platform

import pytest
import torch

import paracomm
from paracomm._ops import reduce_


def _cast(a, dtype):
    out = torch.empty(a.shape, dtype=dtype)
    reduce_(out, [a])
    return out


def _assert_same_bits(got, want):
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    int_t = torch.int16 if got.element_size() == 2 else torch.int32
    assert torch.equal(got[~nan].view(int_t), want[~nan].view(int_t))


def _every_16bit_pattern(dtype):
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    return torch.cat([bits, bits[:5]]).view(dtype)  # 65541 values: a tail of 5 after the 8-wide steps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_widening_every_bit_pattern(dtype):
    a = _every_16bit_pattern(dtype)
    _assert_same_bits(_cast(a, torch.float32), a.float())


def _narrowing_inputs(dtype, gen):
    info = torch.finfo(dtype)
    fp32_eps = torch.finfo(torch.float32).eps
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), info.max, -info.max,
                            info.tiny, info.tiny / 2, info.tiny / 3, info.smallest_normal * 0.75,
                            torch.finfo(torch.float32).max, 1e-30, -1e-30])
    # Exact ties between neighbouring representable values, and values a hair either side of them.
    reps = torch.randn(4000, generator=gen).to(dtype).float()
    nxt = torch.nextafter(reps.to(dtype), torch.tensor(float("inf"), dtype=dtype)).float()
    ties = (reps + nxt) / 2
    near = torch.cat([ties * (1 + fp32_eps), ties * (1 - fp32_eps)])
    # Around the overflow threshold: float16 rounds 65519.99 down to 65504 and 65520 up to inf.
    edge = torch.tensor([65504.0, 65519.0, 65519.996, 65520.0, 65536.0, 3.3895e38, 3.39e38])
    wide = torch.randn(100_003, generator=gen) * torch.logspace(-40, 38, 100_003)
    return torch.cat([special, ties, near, edge, wide, -wide[:1001]])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_narrowing_rounds_like_torch(dtype):
    x = _narrowing_inputs(dtype, torch.Generator().manual_seed(7))
    assert x.numel() % 8 != 0
    _assert_same_bits(_cast(x, dtype), x.to(dtype))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the AVX2/F16C path exists on x86-64 only")
def test_vector_path_is_used_where_the_cpu_allows():
    flags = open("/proc/cpuinfo").read().split()
    expect = "avx2" in flags and "f16c" in flags
    assert paracomm._C.cpu_half_convert_vectorised() == expect
