#include "cpu/half_convert.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PARACOMM_X86_DISPATCH 1
#endif

namespace paracomm {
namespace {

// ---- portable scalar versions: c10's own conversions, so the bits are torch's by construction ----
void half_to_float_scalar(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
void float_to_half_scalar(const float* src, c10::Half* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}
void bf16_to_float_scalar(const c10::BFloat16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
void float_to_bf16_scalar(const float* src, c10::BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::BFloat16>(src[i]);
}

#ifdef PARACOMM_X86_DISPATCH
// ---- AVX2 + F16C: 8 values per step, the scalar versions for the tail ----
#define PARACOMM_AVX2 __attribute__((target("avx2,f16c")))

PARACOMM_AVX2 void half_to_float_avx2(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));  // exact: every float16 is a float32
  }
  half_to_float_scalar(src + i, dst + i, n - i);
}

PARACOMM_AVX2 void float_to_half_avx2(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  float_to_half_scalar(src + i, dst + i, n - i);
}

PARACOMM_AVX2 void bf16_to_float_avx2(const c10::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    // bfloat16 is the top half of a float32: widen to 32 bits and shift into place (exact).
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  bf16_to_float_scalar(src + i, dst + i, n - i);
}

PARACOMM_AVX2 void float_to_bf16_avx2(const float* src, c10::BFloat16* dst, int64_t n) {
  // c10::BFloat16's rounding: bits + 0x7FFF + ((bits >> 16) & 1), keep the top 16 (round to nearest even);
  // NaN -> 0x7FC0.
  const __m256i bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1), qnan = _mm256_set1_epi32(0x7FC0);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(src + i);
    const __m256i u = _mm256_castps_si256(x);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(bias, odd)), 16);
    const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, qnan, is_nan);
    // Narrow 8 x u32 (each < 2^16) to 8 x u16: packus works per 128-bit lane, so fix the lane order after.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_castsi256_si128(packed));
  }
  float_to_bf16_scalar(src + i, dst + i, n - i);
}

bool cpu_has_avx2_f16c() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}
#endif

struct Converters {
  void (*h2f)(const c10::Half*, float*, int64_t);
  void (*f2h)(const float*, c10::Half*, int64_t);
  void (*b2f)(const c10::BFloat16*, float*, int64_t);
  void (*f2b)(const float*, c10::BFloat16*, int64_t);
  bool vectorised;
};

// Chosen once, on first use (thread-safe static initialisation).
const Converters& converters() {
  static const Converters c = [] {
#ifdef PARACOMM_X86_DISPATCH
    if (cpu_has_avx2_f16c()) {
      return Converters{&half_to_float_avx2, &float_to_half_avx2, &bf16_to_float_avx2, &float_to_bf16_avx2, true};
    }
#endif
    return Converters{&half_to_float_scalar, &float_to_half_scalar, &bf16_to_float_scalar, &float_to_bf16_scalar,
                      false};
  }();
  return c;
}

}  // namespace

void half_to_float(const c10::Half* src, float* dst, int64_t n) { converters().h2f(src, dst, n); }
void float_to_half(const float* src, c10::Half* dst, int64_t n) { converters().f2h(src, dst, n); }
void bf16_to_float(const c10::BFloat16* src, float* dst, int64_t n) { converters().b2f(src, dst, n); }
void float_to_bf16(const float* src, c10::BFloat16* dst, int64_t n) { converters().f2b(src, dst, n); }
bool half_convert_is_vectorised() { return converters().vectorised; }

}  // namespace paracomm
