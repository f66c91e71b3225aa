// Device-side element conversions and 16-byte vector loads/stores shared by paracomm's kernels (torch-free).
//
// Conversions reproduce the CPU ops' C++ static_casts through c10::Half / c10::BFloat16, so a CUDA result
// has the same bits as its CPU twin:
//   * float16 / bfloat16 values widen exactly to float32 first;
//   * anything -> float16 / bfloat16 goes through float32 (c10's Half(float) / BFloat16(float) constructors;
//     a float64 or int64 source is rounded to float32 first, as static_cast<c10::Half>(double) does), then
//     rounds to nearest even (__float2half_rn / __float2bfloat16_rn, the rounding c10 implements);
//   * all other pairs are plain static_casts (float -> int truncates toward zero, int64 -> int32 wraps).
//   * a same-type "conversion" is the identity, so copies keep every bit (NaN payloads included).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace paracomm {
namespace kernels {

using half_t = __half;
using bf16_t = __nv_bfloat16;

template <typename T>
inline constexpr bool is_half_like_v = std::is_same_v<T, half_t> || std::is_same_v<T, bf16_t>;

// float16 / bfloat16 -> float32 (exact); every other type is returned unchanged.
template <typename T>
__device__ __forceinline__ auto widen(T x) {
  if constexpr (std::is_same_v<T, half_t>) {
    return __half2float(x);
  } else if constexpr (std::is_same_v<T, bf16_t>) {
    return __bfloat162float(x);
  } else {
    return x;
  }
}

// static_cast<To>(x) with c10's rounding rules (see the file comment).
template <typename To, typename From>
__device__ __forceinline__ To convert(From x) {
  if constexpr (std::is_same_v<To, From>) {
    return x;
  } else if constexpr (std::is_same_v<To, half_t>) {
    return __float2half_rn(static_cast<float>(widen(x)));
  } else if constexpr (std::is_same_v<To, bf16_t>) {
    return __float2bfloat16_rn(static_cast<float>(widen(x)));
  } else {
    return static_cast<To>(widen(x));
  }
}

// Elements per vector for a loop that reads T1 and writes T2: one 16-byte access of the narrower type, so
// every access of either type is a whole number of 16-byte words.
template <typename T, typename... Ts>
constexpr size_t min_size_of() {
  if constexpr (sizeof...(Ts) == 0) {
    return sizeof(T);
  } else {
    constexpr size_t rest = min_size_of<Ts...>();
    return sizeof(T) < rest ? sizeof(T) : rest;
  }
}
template <typename... Ts>
inline constexpr int vec_elems_v = static_cast<int>(16 / min_size_of<Ts...>());

template <typename T, int N>
inline constexpr int pack_words_v = static_cast<int>(sizeof(T) * N / 16);

// Loads N consecutive elements from 16-byte aligned `src` as sizeof(T) * N / 16 independent 16-byte loads.
template <typename T, int N>
__device__ __forceinline__ void load_pack(T (&dst)[N], const T* src) {
  static_assert(sizeof(T) * N % 16 == 0, "a pack must be whole 16-byte words");
  constexpr int kWords = pack_words_v<T, N>;
  union {
    uint4 words[kWords];
    T elems[N];
  } u;
  const uint4* p = reinterpret_cast<const uint4*>(src);
#pragma unroll
  for (int w = 0; w < kWords; ++w) u.words[w] = p[w];
#pragma unroll
  for (int i = 0; i < N; ++i) dst[i] = u.elems[i];
}

// Stores N consecutive elements to 16-byte aligned `dst` as 16-byte stores.
template <typename T, int N>
__device__ __forceinline__ void store_pack(T* dst, const T (&src)[N]) {
  static_assert(sizeof(T) * N % 16 == 0, "a pack must be whole 16-byte words");
  constexpr int kWords = pack_words_v<T, N>;
  union {
    uint4 words[kWords];
    T elems[N];
  } u;
#pragma unroll
  for (int i = 0; i < N; ++i) u.elems[i] = src[i];
  uint4* p = reinterpret_cast<uint4*>(dst);
#pragma unroll
  for (int w = 0; w < kWords; ++w) p[w] = u.words[w];
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Block-wide sum of one double per thread, in a fixed order (warp shuffles, then warp 0 over the warp sums),
// so the result is bitwise reproducible. Every thread must call it; the total is valid in thread 0.
// `scratch` holds one double per warp.
__device__ __forceinline__ double block_sum_fixed_order(double v, double* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int num_warps = (blockDim.x + 31) >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double total = 0.0;
  if (warp == 0) {
    total = lane < num_warps ? scratch[lane] : 0.0;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_down_sync(0xffffffffu, total, offset);
  }
  return total;
}

}  // namespace kernels
}  // namespace paracomm
