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
// The arithmetic is the torch-free reduce_range (cpu/reduce_core.*, shared with the shared-memory executor);
// this file validates, maps tensors onto raw pointers and spreads blocks over threads with at::parallel_for.
// Every element's arithmetic is independent of the blocking and of the thread count.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <vector>

#include "cpu/reduce_core.h"
#include "validate.h"

namespace paracomm {
namespace {

constexpr int64_t kGrainBlocks = 64;  // blocks per parallel task (64K elements): small chunks stay serial

void reduce_cpu(const at::Tensor& out, at::TensorList inputs, double divisor, const std::optional<at::Tensor>& scale,
                const std::optional<at::Tensor>& found_inf, std::optional<at::ScalarType> wire_dtype,
                const std::optional<at::Tensor>& wire_out) {
  check_reduce_args(out, inputs, divisor, scale, found_inf, wire_dtype, wire_out);
  const int64_t n = out.numel();
  if (n == 0) return;
  const int64_t k = static_cast<int64_t>(inputs.size());
  std::vector<const void*> in_p(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) in_p[static_cast<size_t>(i)] = inputs[i].const_data_ptr();
  ReduceArgs a;
  a.n = n;
  a.out = out.mutable_data_ptr();
  a.out_dtype = to_dtype(out.scalar_type(), "reduce_", "out");
  a.num_inputs = static_cast<int32_t>(k);
  a.inputs = in_p.data();
  a.first_dtype = to_dtype(inputs[0].scalar_type(), "reduce_", "inputs[0]");
  a.rest_dtype = k > 1 ? to_dtype(inputs[1].scalar_type(), "reduce_", "inputs[1]") : a.first_dtype;
  a.divisor = divisor;
  a.scale = scale.has_value() ? scale->const_data_ptr<float>() : nullptr;
  a.round = wire_dtype.has_value();
  if (a.round) a.wire_dtype = to_dtype(*wire_dtype, "reduce_", "wire_dtype");
  a.wire_out = wire_out.has_value() ? wire_out->mutable_data_ptr() : nullptr;
  a.check_inf = found_inf.has_value();
  std::atomic<bool> found{false};
  const int64_t num_blocks = (n + kReduceBlock - 1) / kReduceBlock;
  at::parallel_for(0, num_blocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    if (reduce_range(a, b0 * kReduceBlock, std::min(b1 * kReduceBlock, n))) found.store(true, std::memory_order_relaxed);
  });
  if (found.load()) found_inf->mutable_data_ptr<float>()[0] = 1.0f;
}

}  // namespace

TORCH_LIBRARY_IMPL(paracomm, CPU, m) { m.impl("reduce_", &reduce_cpu); }

}  // namespace paracomm
