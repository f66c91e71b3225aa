// The ring all-reduce's local reduction on the GPU (torch-free). Semantics: csrc/ops.cpp, op ring_reduce_.
//   v = acc(a[i]) (+ acc(b[i]));  v /= divisor (if != 1);  v *= *scale (if scale);
//   if wire_out: wire_out[i] = wire(v), v = acc(wire_out[i]);  if found_inf && !isfinite(v): *found_inf = 1;
//   out[i] = out_t(v)
// found_inf tests the stored value, after the wire round-trip: an fp32 sum that overflows the wire type is a
// non-finite result on every rank, so the owner (which rounds it) must flag it too.
// acc is float for fp32/fp16/bf16, double for fp64, int64 for int32/int64. out may equal a.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace paracomm {

struct RingReduceArgs {
  void* out = nullptr;
  DType out_dtype = DType::kFloat32;
  const void* a = nullptr;
  DType a_dtype = DType::kFloat32;
  const void* b = nullptr;  // may be null: then v = acc(a[i])
  DType b_dtype = DType::kFloat32;
  int64_t n = 0;
  double divisor = 1.0;
  const float* scale = nullptr;  // device pointer, may be null
  float* found_inf = nullptr;    // device pointer, may be null
  void* wire_out = nullptr;      // may be null
  DType wire_dtype = DType::kFloat16;
};

// Enqueues the reduction on `stream`; n == 0 launches nothing. Throws paracomm::Error on an unsupported dtype
// combination or a launch failure.
void launch_ring_reduce(const RingReduceArgs& args, cudaStream_t stream);

}  // namespace paracomm
