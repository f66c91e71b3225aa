// Bulk float16 / bfloat16 <-> float32 conversion for the CPU ops.
//
// The CPU kernels are compiled for baseline x86-64, where a float16 conversion is ~10 scalar instructions and
// GCC does not vectorise it. These converters use AVX2 + F16C (vcvtph2ps / vcvtps2ph, 8 values at a time) when
// the CPU has them, chosen once at run time, and c10's scalar conversions otherwise. Both give the same bits
// as c10::Half / c10::BFloat16 for every non-NaN value (IEEE round-to-nearest-even); NaN stays NaN (its
// payload bits may differ, as they do between torch's own CPU and CUDA casts).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace paracomm {

void half_to_float(const c10::Half* src, float* dst, int64_t n);
void float_to_half(const float* src, c10::Half* dst, int64_t n);
void bf16_to_float(const c10::BFloat16* src, float* dst, int64_t n);
void float_to_bf16(const float* src, c10::BFloat16* dst, int64_t n);

// Overloads so templated kernels can convert any of float / Half / BFloat16 without a type switch.
inline void to_float(const float* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}
inline void to_float(const c10::Half* src, float* dst, int64_t n) { half_to_float(src, dst, n); }
inline void to_float(const c10::BFloat16* src, float* dst, int64_t n) { bf16_to_float(src, dst, n); }
inline void from_float(const float* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}
inline void from_float(const float* src, c10::Half* dst, int64_t n) { float_to_half(src, dst, n); }
inline void from_float(const float* src, c10::BFloat16* dst, int64_t n) { float_to_bf16(src, dst, n); }

// True when the AVX2/F16C converters are in use (for tests and benchmark headers).
bool half_convert_is_vectorised();

}  // namespace paracomm
