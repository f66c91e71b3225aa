// The all-reduce's local reduction, torch-free (formula and contract: reduce_core.h).
//
// Speed: the range is processed in blocks of kBlock elements held in an accumulator array. Each stage (load,
// add, round-trip, store) is a loop templated on one element type and picked once per call through a
// function pointer, so the inner loops are dtype-free and vectorisable.
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

}  // namespace

bool reduce_range(const ReduceArgs& a, int64_t begin, int64_t end) {
  if (end <= begin) return false;
  switch (a.out_dtype) {
    case DType::kFloat64: return reduce_range_impl<double>(a, begin, end);
    case DType::kInt32:
    case DType::kInt64: return reduce_range_impl<int64_t>(a, begin, end);
    default: return reduce_range_impl<float>(a, begin, end);
  }
}

}  // namespace paracomm
