// Shared argument checking for the torch-facing glue (csrc/cpu and csrc/cuda).
//
// Every op validates *all* of its arguments before it writes anything, so a refused call leaves every tensor
// as it was. Errors name the op and the argument ("paracomm.flatten: tensors[3] ...") and end with file:line.
// Wrong dtypes raise TypeError, everything else ValueError (TORCH_CHECK_TYPE / TORCH_CHECK_VALUE).
#pragma once

// The Tensor class, not ATen/ATen.h (every op's declaration, ~5 s more of parsing in each file including this).
#include <ATen/core/Tensor.h>

#include <string>

#include "checks.h"
#include "dtype.h"

#define PARACOMM_ARG_CHECK(cond, ...) \
  TORCH_CHECK_VALUE(cond, "paracomm.", __VA_ARGS__, " [", ::paracomm::base_name(__FILE__), ":", __LINE__, "]")
#define PARACOMM_DTYPE_CHECK(cond, ...) \
  TORCH_CHECK_TYPE(cond, "paracomm.", __VA_ARGS__, " [", ::paracomm::base_name(__FILE__), ":", __LINE__, "]")

namespace paracomm {

// Maps a torch dtype onto the core's; TypeError naming `op` and `arg` for anything paracomm does not handle.
inline DType to_dtype(at::ScalarType t, const char* op, const std::string& arg) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    case at::kInt: return DType::kInt32;
    case at::kLong: return DType::kInt64;
    default: break;
  }
  PARACOMM_DTYPE_CHECK(false, op, ": ", arg, " has unsupported dtype ", t);
  return DType::kFloat32;  // unreachable
}

inline at::ScalarType to_scalar_type(DType t) {
  switch (t) {
    case DType::kFloat32: return at::kFloat;
    case DType::kFloat16: return at::kHalf;
    case DType::kBFloat16: return at::kBFloat16;
    case DType::kFloat64: return at::kDouble;
    case DType::kInt32: return at::kInt;
    case DType::kInt64: return at::kLong;
  }
  return at::kFloat;
}

inline bool is_grad_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// A one-element float32 tensor on `device` (inv_scale, found_inf, norm, scale_tensor).
inline void check_fp32_scalar(const at::Tensor& t, const char* op, const char* arg, const at::Device& device) {
  PARACOMM_ARG_CHECK(t.defined(), op, ": ", arg, " is undefined");
  PARACOMM_ARG_CHECK(t.numel() == 1, op, ": ", arg, " must have exactly one element, got shape ", t.sizes());
  PARACOMM_DTYPE_CHECK(t.scalar_type() == at::kFloat, op, ": ", arg, " must be float32, got ", t.scalar_type());
  PARACOMM_ARG_CHECK(t.device() == device, op, ": ", arg, " is on ", t.device(), " but the data is on ", device);
}

// `t` is on `device` and contiguous (the kernels read and write flat memory).
inline void check_dense_on(const at::Tensor& t, const char* op, const std::string& arg, const at::Device& device) {
  PARACOMM_ARG_CHECK(t.defined(), op, ": ", arg, " is undefined");
  PARACOMM_ARG_CHECK(t.device() == device, op, ": ", arg, " is on ", t.device(), ", expected ", device);
  PARACOMM_ARG_CHECK(t.is_contiguous(), op, ": ", arg, " must be contiguous");
}

}  // namespace paracomm
