// The all-reduce's local reduction, torch-free (formula and contract: reduce_core.h).
//
// Speed: same-dtype float32 / float64 reductions without wire rounding (the common case) run as fused loops
// (the one-pass path at the end). Everything else is processed in blocks of kBlock elements held in an
// accumulator array. Each stage (load, add, round-trip, store) is a loop templated on one element type and
// picked once per call through a function pointer, so the inner loops are dtype-free and vectorisable.
#include "cpu/reduce_core.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "checks.h"
#include "cpu/half_convert.h"

namespace paracomm {
namespace {

constexpr int64_t kBlock = kReduceBlock;

template <typename Acc>
using LoadFn = void (*)(const void* src, int64_t begin, int64_t n, Acc* v);
template <typename Acc>
using StoreFn = void (*)(const Acc* v, void* dst, int64_t begin, int64_t n);
template <typename Acc>
using RoundFn = void (*)(Acc* v, void* wire, int64_t begin, int64_t n);

// Integer accumulation wraps (signed overflow is undefined in C++, unsigned is modular).
template <typename Acc>
inline Acc acc_add(Acc x, Acc y) {
  if constexpr (std::is_integral_v<Acc>) {
    return static_cast<Acc>(static_cast<uint64_t>(x) + static_cast<uint64_t>(y));
  } else {
    return x + y;
  }
}

// float16/bfloat16 <-> float32 go through half_convert.h (8 at a time with AVX2/F16C); every other pair is a
// plain cast loop.
template <typename Acc, typename T>
constexpr bool kHalfLike = std::is_same_v<Acc, float> && (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>);

template <typename Acc, typename T>
void load_block(const void* src, int64_t begin, int64_t n, Acc* v) {
  const T* p = static_cast<const T*>(src) + begin;
  if constexpr (kHalfLike<Acc, T>) {
    to_float(p, v, n);
  } else {
    for (int64_t i = 0; i < n; ++i) v[i] = static_cast<Acc>(p[i]);
  }
}

template <typename Acc, typename T>
void add_block(const void* src, int64_t begin, int64_t n, Acc* v) {
  const T* p = static_cast<const T*>(src) + begin;
  if constexpr (kHalfLike<Acc, T>) {
    float widened[kBlock];
    to_float(p, widened, n);
    for (int64_t i = 0; i < n; ++i) v[i] += widened[i];
  } else {
    for (int64_t i = 0; i < n; ++i) v[i] = acc_add<Acc>(v[i], static_cast<Acc>(p[i]));
  }
}

template <typename Acc, typename T>
void store_block(const Acc* v, void* dst, int64_t begin, int64_t n) {
  T* p = static_cast<T*>(dst) + begin;
  if constexpr (kHalfLike<Acc, T>) {
    from_float(v, p, n);
  } else {
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(v[i]);
  }
}

// v[i] = acc(W(v[i])), keeping W(v[i]) in wire[begin + i] when wire is given: the owner continues with exactly
// the bits it sends.
template <typename Acc, typename W>
void round_block(Acc* v, void* wire, int64_t begin, int64_t n) {
  if (wire == nullptr) {
    W rounded[kBlock];
    store_block<Acc, W>(v, rounded, 0, n);
    load_block<Acc, W>(rounded, 0, n, v);
    return;
  }
  store_block<Acc, W>(v, wire, begin, n);
  load_block<Acc, W>(wire, begin, n, v);
}

// Stage functions for a tensor's dtype within accumulation family Acc (the dtype was validated to belong to
// it, so the fallthrough is unreachable).
template <typename Acc>
struct Stages {
  LoadFn<Acc> load = nullptr;
  LoadFn<Acc> add = nullptr;
  StoreFn<Acc> store = nullptr;
  RoundFn<Acc> round = nullptr;
};

template <typename Acc, typename T>
Stages<Acc> stages_of_type() {
  return Stages<Acc>{&load_block<Acc, T>, &add_block<Acc, T>, &store_block<Acc, T>, &round_block<Acc, T>};
}

template <typename Acc>
Stages<Acc> stages_for(DType t) {
  if constexpr (std::is_same_v<Acc, float>) {
    switch (t) {
      case DType::kFloat32: return stages_of_type<float, float>();
      case DType::kFloat16: return stages_of_type<float, c10::Half>();
      case DType::kBFloat16: return stages_of_type<float, c10::BFloat16>();
      default: break;
    }
  } else if constexpr (std::is_same_v<Acc, double>) {
    if (t == DType::kFloat64) return stages_of_type<double, double>();
  } else {
    if (t == DType::kInt32) return stages_of_type<int64_t, int32_t>();
    if (t == DType::kInt64) return stages_of_type<int64_t, int64_t>();
  }
  PARACOMM_THROW("reduce_: dtype ", dtype_name(t), " does not belong to this accumulation type (validation missed it)");
}

template <typename Acc>
bool reduce_range_impl(const ReduceArgs& a, int64_t begin, int64_t end) {
  const int64_t k = a.num_inputs;
  const Stages<Acc> out_s = stages_for<Acc>(a.out_dtype);
  const Stages<Acc> first_s = stages_for<Acc>(a.first_dtype);
  const Stages<Acc> rest_s = k > 1 ? stages_for<Acc>(a.rest_dtype) : Stages<Acc>{};
  const Stages<Acc> w_s = a.round ? stages_for<Acc>(a.wire_dtype) : Stages<Acc>{};
  constexpr bool kFloating = std::is_floating_point_v<Acc>;
  const bool do_div = kFloating && a.divisor != 1.0;
  const Acc div = static_cast<Acc>(a.divisor);
  const bool do_scale = kFloating && a.scale != nullptr;
  const Acc scale_v = do_scale ? static_cast<Acc>(a.scale[0]) : Acc(1);
  const bool check = kFloating && a.check_inf;
  const bool narrow_out = a.out_dtype == DType::kFloat16 || a.out_dtype == DType::kBFloat16;
  Acc v[kBlock];
  bool found = false;
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t len = std::min(kBlock, end - b);
    // Every input of the block is read before anything is stored: an input may be out or wire_out itself.
    first_s.load(a.inputs[0], b, len, v);
    for (int64_t i = 1; i < k; ++i) rest_s.add(a.inputs[i], b, len, v);
    if constexpr (kFloating) {
      if (do_div)
        for (int64_t i = 0; i < len; ++i) v[i] /= div;
      if (do_scale)
        for (int64_t i = 0; i < len; ++i) v[i] *= scale_v;
    }
    if (a.round) w_s.round(v, a.wire_out, b, len);
    if (check && narrow_out) {
      // found_inf tests the value as stored: a finite float32 sum can overflow a float16 out.
      out_s.round(v, nullptr, 0, len);
    }
    if constexpr (kFloating) {
      if (check) {
        bool bad = false;
        for (int64_t i = 0; i < len; ++i) bad |= !std::isfinite(v[i]);
        found |= bad;
      }
    }
    out_s.store(v, a.out, b, len);
  }
  return found;
}

// ---- The one-pass path: output and every input float32 (or all float64), no wire rounding ----
// The blocked path above makes three passes through an L1 accumulator per block and costs ~4x a fused loop
// (bench/NOTES.md, round 4); this common case (the fp32 wire, the gloo and shared-memory executors' reductions)
// gets fused loops instead. Per element it performs the same operations in the same order as the blocked path
// (v = in0 + in1, v += in2, ..., v /= divisor, v *= scale; IEEE addition is commutative, so which operand of
// one addition is in place does not matter), so it gives the same bits. Every pointer of a loop is
// __restrict: an input that is the output itself is handled by the in-place form (out = post(out + y)), and the
// caller (reduce_range) takes this path only when no input overlaps the output otherwise. The loops are
// noinline on purpose: inlined into their caller, GCC drops the parameters' __restrict and versions each loop
// with alias checks, which measured ~2x slower than the plain loop (bench/NOTES.md, round 4).
template <typename T, bool kDiv, bool kScale>
struct Post {
  T div, scale;
  T operator()(T v) const {
    if constexpr (kDiv) v /= div;
    if constexpr (kScale) v *= scale;
    return v;
  }
};

template <typename T, typename P>
__attribute__((noinline)) void sum2(T* __restrict o, const T* __restrict x, const T* __restrict y, int64_t n, P post) {
  for (int64_t i = 0; i < n; ++i) o[i] = post(x[i] + y[i]);
}

template <typename T, typename P>
__attribute__((noinline)) void sum2_inplace(T* __restrict o, const T* __restrict y, int64_t n, P post) {
  for (int64_t i = 0; i < n; ++i) o[i] = post(o[i] + y[i]);
}

template <typename T, typename P>
__attribute__((noinline)) void copy_post(T* __restrict o, const T* __restrict x, int64_t n, P post) {
  for (int64_t i = 0; i < n; ++i) o[i] = post(x[i]);
}

template <typename T, typename P>
__attribute__((noinline)) void post_inplace(T* __restrict o, int64_t n, P post) {
  for (int64_t i = 0; i < n; ++i) o[i] = post(o[i]);
}

template <typename T>
__attribute__((noinline)) void add_into(T* __restrict v, const T* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] += y[i];
}

// out[i] = post(in0[i] + ... + in_{k-1}[i]) for i in [begin, end): one loop for k <= 2, else blocks of kBlock
// through an accumulator.
template <typename T, typename P>
void fused_sum(const ReduceArgs& a, int64_t begin, int64_t end, P post) {
  const int64_t k = a.num_inputs;
  const T* const* in = reinterpret_cast<const T* const*>(a.inputs);
  T* out = static_cast<T*>(a.out);
  if (k == 1) {
    if (in[0] == out) post_inplace(out + begin, end - begin, post);
    else copy_post(out + begin, in[0] + begin, end - begin, post);
    return;
  }
  if (k == 2) {  // at most one of the two is out (fused_applies)
    if (in[0] == out) sum2_inplace(out + begin, in[1] + begin, end - begin, post);
    else if (in[1] == out) sum2_inplace(out + begin, in[0] + begin, end - begin, post);
    else sum2(out + begin, in[0] + begin, in[1] + begin, end - begin, post);
    return;
  }
  T v[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t len = std::min(kBlock, end - b);
    // Every input equal to out is read into v (inputs 0 .. k-2) before out is written (input k-1, last).
    sum2(v, in[0] + b, in[1] + b, len, Post<T, false, false>{});
    for (int64_t j = 2; j < k - 1; ++j) add_into(v, in[j] + b, len);
    if (in[k - 1] == out) sum2_inplace(out + b, v, len, post);
    else sum2(out + b, v, in[k - 1] + b, len, post);
  }
}

template <typename T>
bool fused_reduce(const ReduceArgs& a, int64_t begin, int64_t end) {
  const T div = static_cast<T>(a.divisor);
  const T scale = a.scale != nullptr ? static_cast<T>(a.scale[0]) : T(1);
  const bool do_div = a.divisor != 1.0, do_scale = a.scale != nullptr;
  if (do_div && do_scale) fused_sum<T>(a, begin, end, Post<T, true, true>{div, scale});
  else if (do_div) fused_sum<T>(a, begin, end, Post<T, true, false>{div, scale});
  else if (do_scale) fused_sum<T>(a, begin, end, Post<T, false, true>{div, scale});
  else fused_sum<T>(a, begin, end, Post<T, false, false>{div, scale});
  if (!a.check_inf) return false;
  const T* o = static_cast<const T*>(a.out);
  bool bad = false;
  for (int64_t i = begin; i < end; ++i) bad |= !std::isfinite(o[i]);
  return bad;
}

// The one-pass path applies: every dtype is `dt` (float32 or float64), no rounding, and every input is either
// the output itself or disjoint from [out, out + n); with two inputs, not both the output (the in-place loop
// reads its other operand through a __restrict pointer that must not be the output).
bool fused_applies(const ReduceArgs& a) {
  const DType dt = a.out_dtype;
  if (a.round || (dt != DType::kFloat32 && dt != DType::kFloat64) || a.first_dtype != dt ||
      (a.num_inputs > 1 && a.rest_dtype != dt) || a.num_inputs < 1) {
    return false;
  }
  const auto* lo = static_cast<const char*>(a.out);
  const char* hi = lo + a.n * dtype_size(dt);
  for (int32_t j = 0; j < a.num_inputs; ++j) {
    const auto* p = static_cast<const char*>(a.inputs[j]);
    if (p != lo && p < hi && lo < p + a.n * dtype_size(dt)) return false;
  }
  return !(a.num_inputs == 2 && a.inputs[0] == a.out && a.inputs[1] == a.out);
}

}  // namespace

bool reduce_range(const ReduceArgs& a, int64_t begin, int64_t end) {
  if (end <= begin) return false;
  if (fused_applies(a)) {
    return a.out_dtype == DType::kFloat32 ? fused_reduce<float>(a, begin, end) : fused_reduce<double>(a, begin, end);
  }
  switch (a.out_dtype) {
    case DType::kFloat64: return reduce_range_impl<double>(a, begin, end);
    case DType::kInt32:
    case DType::kInt64: return reduce_range_impl<int64_t>(a, begin, end);
    default: return reduce_range_impl<float>(a, begin, end);
  }
}

}  // namespace paracomm
