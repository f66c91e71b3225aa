// CPU implementation of paracomm::reduce_, the all-reduce's local reduction (formula: csrc/ops.cpp and
// csrc/kernels/reduce.h, whose CUDA kernel gives the same bits):
//
//   v = acc(inputs[0][i]) + acc(inputs[1][i]) + ...  (left to right);  v /= divisor;  v *= scale[0];
//   if wire_dtype: w = W(v), wire_out[i] = w (if given), v = acc(w);  out[i] = O(v);
//   found_inf |= !isfinite(out[i])  (the stored value: after the wire round trip and the cast to O)
//
// acc is float for float32/float16/bfloat16, double for float64, int64 for int32/int64 (integer sums wrap like
// two's complement, as NCCL's and gloo's do). found_inf tests the value that is finally stored, i.e. after
// the wire round-trip: a finite float32 sum that overflows float16 is a non-finite *result* on every rank
// (the owner keeps the rounded bits, the others receive them), so the owner must flag it too.
//
// Speed: the tensor is processed in blocks of kBlock elements held in an accumulator array. Each stage (load,
// add, round-trip, store) is a loop templated on one element type and picked once per call through a
// function pointer, so the inner loops are dtype-free and vectorisable; blocks are spread over threads with
// at::parallel_for. Every element's arithmetic is independent of the blocking and of the thread count.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/half_convert.h"
#include "validate.h"

namespace paracomm {
namespace {

constexpr int64_t kBlock = 1024;          // elements per accumulator block
constexpr int64_t kGrainBlocks = 64;      // blocks per parallel task (64K elements): small chunks stay serial

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
constexpr bool kHalfLike = std::is_same_v<Acc, float> && (std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>);

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
Stages<Acc> stages_for(at::ScalarType t) {
  if constexpr (std::is_same_v<Acc, float>) {
    switch (t) {
      case at::kFloat: return stages_of_type<float, float>();
      case at::kHalf: return stages_of_type<float, at::Half>();
      case at::kBFloat16: return stages_of_type<float, at::BFloat16>();
      default: break;
    }
  } else if constexpr (std::is_same_v<Acc, double>) {
    if (t == at::kDouble) return stages_of_type<double, double>();
  } else {
    if (t == at::kInt) return stages_of_type<int64_t, int32_t>();
    if (t == at::kLong) return stages_of_type<int64_t, int64_t>();
  }
  PARACOMM_THROW("reduce_: dtype ", t, " does not belong to this accumulation type (validation missed it)");
}

template <typename Acc>
void reduce_impl(const at::Tensor& out, at::TensorList inputs, double divisor, const std::optional<at::Tensor>& scale,
                 const std::optional<at::Tensor>& found_inf, std::optional<at::ScalarType> wire_dtype,
                 const std::optional<at::Tensor>& wire_out) {
  const int64_t n = out.numel();
  if (n == 0) return;
  const int64_t k = static_cast<int64_t>(inputs.size());
  const Stages<Acc> out_s = stages_for<Acc>(out.scalar_type());
  const Stages<Acc> first_s = stages_for<Acc>(inputs[0].scalar_type());
  const Stages<Acc> rest_s = k > 1 ? stages_for<Acc>(inputs[1].scalar_type()) : Stages<Acc>{};
  const Stages<Acc> w_s = wire_dtype.has_value() ? stages_for<Acc>(*wire_dtype) : Stages<Acc>{};

  void* out_p = out.mutable_data_ptr();
  std::vector<const void*> in_p(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) in_p[static_cast<size_t>(i)] = inputs[i].const_data_ptr();
  void* w_p = wire_out.has_value() ? wire_out->mutable_data_ptr() : nullptr;
  const bool round = wire_dtype.has_value();

  constexpr bool kFloating = std::is_floating_point_v<Acc>;
  const bool do_div = kFloating && divisor != 1.0;
  const Acc div = static_cast<Acc>(divisor);
  const bool do_scale = kFloating && scale.has_value();
  const Acc scale_v = do_scale ? static_cast<Acc>(scale->const_data_ptr<float>()[0]) : Acc(1);
  const bool check = kFloating && found_inf.has_value();
  const bool narrow_out = out.scalar_type() == at::kHalf || out.scalar_type() == at::kBFloat16;
  std::atomic<bool> found{false};

  const int64_t num_blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, num_blocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    Acc v[kBlock];
    bool local_found = false;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t begin = blk * kBlock, len = std::min(kBlock, n - begin);
      // Every input of the block is read before anything is stored: an input may be out or wire_out itself.
      first_s.load(in_p[0], begin, len, v);
      for (int64_t i = 1; i < k; ++i) rest_s.add(in_p[static_cast<size_t>(i)], begin, len, v);
      if constexpr (kFloating) {
        if (do_div)
          for (int64_t i = 0; i < len; ++i) v[i] /= div;
        if (do_scale)
          for (int64_t i = 0; i < len; ++i) v[i] *= scale_v;
      }
      if (round) w_s.round(v, w_p, begin, len);
      if (check && narrow_out) {
        // found_inf tests the value as stored: a finite float32 sum can overflow a float16 out.
        out_s.round(v, nullptr, 0, len);
      }
      if constexpr (kFloating) {
        if (check) {
          bool bad = false;
          for (int64_t i = 0; i < len; ++i) bad |= !std::isfinite(v[i]);
          local_found |= bad;
        }
      }
      out_s.store(v, out_p, begin, len);
    }
    if (local_found) found.store(true, std::memory_order_relaxed);
  });
  if (found.load()) found_inf->mutable_data_ptr<float>()[0] = 1.0f;
}

void reduce_cpu(const at::Tensor& out, at::TensorList inputs, double divisor, const std::optional<at::Tensor>& scale,
                const std::optional<at::Tensor>& found_inf, std::optional<at::ScalarType> wire_dtype,
                const std::optional<at::Tensor>& wire_out) {
  check_reduce_args(out, inputs, divisor, scale, found_inf, wire_dtype, wire_out);
  switch (out.scalar_type()) {
    case at::kDouble:
      reduce_impl<double>(out, inputs, divisor, scale, found_inf, wire_dtype, wire_out);
      break;
    case at::kInt:
    case at::kLong:
      reduce_impl<int64_t>(out, inputs, divisor, scale, found_inf, wire_dtype, wire_out);
      break;
    default:
      reduce_impl<float>(out, inputs, divisor, scale, found_inf, wire_dtype, wire_out);
      break;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(paracomm, CPU, m) { m.impl("reduce_", &reduce_cpu); }

}  // namespace paracomm
