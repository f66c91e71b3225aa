// Fused unscale-and-check on the GPU (torch-free). Semantics: csrc/ops.cpp, ops unscale_and_check_ and
// unscale_and_check_out; arithmetic identical to the CPU op (csrc/cpu/unscale_cpu.cpp):
//   x = float(g);  found |= !isfinite(x);  v = x * inv_scale;  out = Out(v);  sumsq += double(v) * double(v)
// found_inf is set to 1.0 on the device when any input is inf/nan and never cleared; there is no host sync.
// norm (optional) = float(sqrt(sum of sumsq)), summed deterministically: one float64 partial per thread
// block into a caller-provided workspace, then one small kernel adds the partials in index order.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace paracomm {

struct UnscaleTensor {
  const void* grad = nullptr;  // float32, float16 or bfloat16, contiguous, device memory
  DType grad_dtype = DType::kFloat32;
  void* out = nullptr;  // == grad for in place (out_dtype must then equal grad_dtype), else float32 or grad_dtype
  DType out_dtype = DType::kFloat32;
  int64_t numel = 0;
};

// float64 elements of workspace launch_unscale_and_check needs for the norm of these tensors (one per
// block of the launch(es)); 0 for an empty list.
int64_t unscale_norm_workspace_elems(const UnscaleTensor* tensors, int64_t count);

// Enqueues the unscale of `count` tensors on `stream`: one launch per (grad dtype, out dtype, in place)
// group present (usually one), plus the norm's finalize kernel. inv_scale, found_inf, norm are device
// pointers to one float each (norm may be null: no norm, and the workspace is unused). norm_workspace must
// hold unscale_norm_workspace_elems(tensors, count) doubles when norm is given. An empty list with a norm
// writes norm = 0. Throws paracomm::Error on an unsupported dtype pair, a too-small workspace or a launch
// failure.
void launch_unscale_and_check(const UnscaleTensor* tensors, int64_t count, const float* inv_scale,
                              float* found_inf, float* norm, double* norm_workspace, int64_t workspace_elems,
                              cudaStream_t stream);

}  // namespace paracomm
