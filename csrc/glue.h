// Shared argument checking for the torch-facing glue (csrc/cpu and csrc/cuda).
//
// Every op validates *all* of its arguments before it writes anything, so a refused call leaves every tensor
// as it was. Errors name the op and the argument ("paracomm.flatten: tensors[3] ...") in the words a Python
// user writes: dtypes as `torch.float64` (dtype_str), shapes as `(2, 3)` (shape_str), the same wording as the
// Python-side checks. A refused argument is the caller's doing, so its message carries no file:line; internal
// failures (PARACOMM_CHECK / PARACOMM_THROW in checks.h, CUDA, NCCL) keep theirs.
// Wrong dtypes raise TypeError, everything else ValueError (TORCH_CHECK_TYPE / TORCH_CHECK_VALUE).
#pragma once

// The Tensor class, not ATen/ATen.h (every op's declaration, ~5 s more of parsing in each file including this).
#include <ATen/core/Tensor.h>

#include <string>

#include "checks.h"
#include "dtype.h"

#define PARACOMM_ARG_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "paracomm.", __VA_ARGS__)
#define PARACOMM_DTYPE_CHECK(cond, ...) TORCH_CHECK_TYPE(cond, "paracomm.", __VA_ARGS__)

namespace paracomm {

// A dtype as Python prints it: "torch.float64", not c10's "Double" (which no Python user ever types).
inline std::string dtype_str(at::ScalarType t) {
  switch (t) {
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kHalf: return "torch.float16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    case at::kBool: return "torch.bool";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kQInt8: return "torch.qint8";
    case at::kQUInt8: return "torch.quint8";
    case at::kQInt32: return "torch.qint32";
    case at::kFloat8_e5m2: return "torch.float8_e5m2";
    case at::kFloat8_e4m3fn: return "torch.float8_e4m3fn";
    case at::kUInt16: return "torch.uint16";
    case at::kUInt32: return "torch.uint32";
    case at::kUInt64: return "torch.uint64";
    default: break;
  }
  return std::string("torch.") + c10::toString(t);  // rare types: still recognisable
}

// A shape as Python prints a tuple: "(2, 3)", "(5,)", "()" (c10 prints "[2, 3]").
inline std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(sizes[i]);
  }
  return s + (sizes.size() == 1 ? ",)" : ")");
}

// The dtypes paracomm's kernels handle, in the order every message lists them (as the Python side does).
inline constexpr const char* kSupportedDtypes = "float32, float16, bfloat16, float64, int32, int64";

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
  if (arg == "dtype") {
    PARACOMM_DTYPE_CHECK(false, op, ": dtype=", dtype_str(t), " is not supported (", kSupportedDtypes, ")");
  }
  PARACOMM_DTYPE_CHECK(false, op, ": ", arg, " has unsupported dtype ", dtype_str(t), " (", kSupportedDtypes, ")");
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
  PARACOMM_ARG_CHECK(t.numel() == 1, op, ": ", arg, " must have exactly one element, got shape ",
                     shape_str(t.sizes()));
  PARACOMM_DTYPE_CHECK(t.scalar_type() == at::kFloat, op, ": ", arg, " must be float32, got ",
                       dtype_str(t.scalar_type()));
  PARACOMM_ARG_CHECK(t.device() == device, op, ": ", arg, " is on ", t.device(), " but the data is on ", device);
}

// `t` is on `device` and contiguous (the kernels read and write flat memory).
inline void check_dense_on(const at::Tensor& t, const char* op, const std::string& arg, const at::Device& device) {
  PARACOMM_ARG_CHECK(t.defined(), op, ": ", arg, " is undefined");
  PARACOMM_ARG_CHECK(t.device() == device, op, ": ", arg, " is on ", t.device(), ", expected ", device);
  PARACOMM_ARG_CHECK(t.is_contiguous(), op, ": ", arg, " must be contiguous");
}

}  // namespace paracomm
