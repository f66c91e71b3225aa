// The all-reduce's local reduction on the GPU (torch-free). Semantics shared with the CPU op
// (csrc/cpu/reduce_cpu.cpp) and declared once in csrc/ops.cpp (paracomm::reduce_):
//
//   v = acc(inputs[0][i]) + acc(inputs[1][i]) + ... (in this order, left to right)
//   if divisor != 1: v /= divisor;   if scale: v *= *scale;
//   if wire_dtype set: w = W(v), wire_out[i] = w (when wire_out), v = acc(w);
//   out[i] = O(v);     if found_inf && !isfinite(out[i]): *found_inf = 1
//
// acc is float when every dtype involved is float32/float16/bfloat16, double when float64 is involved, int64
// for int32/int64 (integer sums wrap like two's complement). found_inf tests the stored value: after the wire
// round trip and after the cast to out's dtype (a finite float32 sum can overflow a float16 out). inputs[1:] share one dtype (inputs[0] may differ: the ring adds its float32 data to a received
// bfloat16 partial sum). An input may be the very same memory as out or wire_out (same pointer, same length):
// each element's inputs are read before it is written. No other overlap is allowed.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace paracomm {

constexpr int kReduceMaxInputs = 32;  // == kMaxReduceInputs in allreduce/plan.h

struct ReduceArgs {
  void* out = nullptr;
  DType out_dtype = DType::kFloat32;
  int32_t num_inputs = 0;                      // 1..kReduceMaxInputs
  const void* inputs[kReduceMaxInputs] = {};
  DType first_dtype = DType::kFloat32;         // dtype of inputs[0]
  DType rest_dtype = DType::kFloat32;          // dtype of inputs[1:]
  int64_t n = 0;
  double divisor = 1.0;
  const float* scale = nullptr;                // device pointer, may be null
  float* found_inf = nullptr;                  // device pointer, may be null
  bool round_to_wire = false;
  DType wire_dtype = DType::kFloat16;          // with round_to_wire: float16 or bfloat16
  void* wire_out = nullptr;                    // with round_to_wire, may be null
};

// Enqueues the reduction on `stream`; n == 0 launches nothing. Throws paracomm::Error on an unsupported dtype
// combination or a launch failure.
void launch_reduce(const ReduceArgs& args, cudaStream_t stream);

}  // namespace paracomm
