// Argument checks for reduce_, shared by the CPU and CUDA glue (see validate.h).
//
// Supported dtype combinations, by accumulation type (what the plans use, csrc/allreduce/plan.h):
//   float32 accumulation: out, every input and wire_out each float32 or one low-precision dtype L (float16 or
//     bfloat16); never both float16 and bfloat16 in one call (the kernels instantiate one per launch);
//   float64 accumulation: everything float64, no wire rounding;
//   int64 accumulation:   everything int32 or everything int64, no wire rounding, divisor 1, no scale.
// inputs[1:] share one dtype (inputs[0] may differ: the ring adds its float32 data to a float16 partial sum).
#include <cmath>
#include <string>

#include "validate.h"

namespace paracomm {

namespace {
constexpr const char* kOp = "reduce_";
constexpr int64_t kMaxInputs = 32;  // kMaxReduceInputs (csrc/allreduce/plan.h), kReduceMaxInputs (kernels)

bool is_half_like(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }
}  // namespace

void check_reduce_args(const at::Tensor& out, at::TensorList inputs, double divisor,
                       const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& found_inf,
                       std::optional<at::ScalarType> wire_dtype, const std::optional<at::Tensor>& wire_out) {
  PARACOMM_ARG_CHECK(out.defined(), kOp, ": out is undefined");
  const at::Device device = out.device();
  check_dense_on(out, kOp, "out", device);
  const int64_t k = static_cast<int64_t>(inputs.size());
  PARACOMM_ARG_CHECK(k >= 1 && k <= kMaxInputs, kOp, ": inputs must hold 1 to ", kMaxInputs, " tensors, got ", k);
  const int64_t n = out.numel();
  for (int64_t i = 0; i < k; ++i) {
    const std::string arg = "inputs[" + std::to_string(i) + "]";
    check_dense_on(inputs[i], kOp, arg, device);
    PARACOMM_ARG_CHECK(inputs[i].numel() == n, kOp, ": ", arg, " has ", inputs[i].numel(), " elements but out has ",
                       n);
    to_dtype(inputs[i].scalar_type(), kOp, arg);
  }
  if (wire_out.has_value()) {
    check_dense_on(*wire_out, kOp, "wire_out", device);
    PARACOMM_ARG_CHECK(wire_out->numel() == n, kOp, ": wire_out has ", wire_out->numel(), " elements but out has ",
                       n);
    PARACOMM_ARG_CHECK(wire_dtype.has_value(), kOp, ": wire_out needs wire_dtype (the dtype it is rounded to)");
    PARACOMM_DTYPE_CHECK(wire_out->scalar_type() == *wire_dtype, kOp, ": wire_out has dtype ",
                         dtype_str(wire_out->scalar_type()), " but wire_dtype is ", dtype_str(*wire_dtype));
  }
  const DType out_t = to_dtype(out.scalar_type(), kOp, "out");
  for (int64_t i = 2; i < k; ++i) {
    PARACOMM_DTYPE_CHECK(inputs[i].scalar_type() == inputs[1].scalar_type(), kOp, ": inputs[", i, "] has dtype ",
                         dtype_str(inputs[i].scalar_type()), " but inputs[1] has ", dtype_str(inputs[1].scalar_type()),
                         " (inputs[1:] share one dtype)");
  }

  const at::ScalarType ot = out.scalar_type();
  if (ot == at::kDouble || ot == at::kInt || ot == at::kLong) {
    // float64 / integer accumulation: one dtype throughout, no wire rounding.
    for (int64_t i = 0; i < k; ++i) {
      PARACOMM_DTYPE_CHECK(inputs[i].scalar_type() == ot, kOp, ": inputs[", i, "] has dtype ", dtype_str(inputs[i].scalar_type()),
                           " but out has ", dtype_str(ot), " (only float32 accumulation mixes dtypes)");
    }
    PARACOMM_DTYPE_CHECK(!wire_dtype.has_value(), kOp, ": wire_dtype needs float32 accumulation, but out is ", dtype_str(ot));
  } else {
    // float32 accumulation: each buffer float32 or the one low-precision dtype L.
    at::ScalarType low = is_half_like(ot) ? ot : at::kFloat;
    auto check_member = [&](at::ScalarType st, const std::string& arg) {
      PARACOMM_DTYPE_CHECK(st == at::kFloat || is_half_like(st), kOp, ": ", arg, " has dtype ", dtype_str(st), " but out is ",
                           dtype_str(ot), " (float32 accumulation takes float32, float16 or bfloat16)");
      if (is_half_like(st)) {
        PARACOMM_DTYPE_CHECK(low == at::kFloat || low == st, kOp, ": ", arg, " has dtype ", dtype_str(st),
                             " but another buffer is ", dtype_str(low), " (one low-precision dtype per call)");
        low = st;
      }
    };
    for (int64_t i = 0; i < k; ++i) check_member(inputs[i].scalar_type(), "inputs[" + std::to_string(i) + "]");
    if (wire_dtype.has_value()) {
      PARACOMM_DTYPE_CHECK(is_half_like(*wire_dtype), kOp, ": wire_dtype must be torch.float16 or torch.bfloat16, got ",
                           dtype_str(*wire_dtype));
      check_member(*wire_dtype, "wire_dtype");
    }
  }

  const bool integer = !dtype_is_floating(out_t);
  PARACOMM_ARG_CHECK(std::isfinite(divisor) && divisor > 0, kOp, ": divisor must be a finite number > 0, got ",
                     divisor);
  if (integer) PARACOMM_ARG_CHECK(divisor == 1.0, kOp, ": divisor must be 1 for integer dtype ", dtype_str(ot), ", got ", divisor);
  if (scale.has_value()) {
    check_fp32_scalar(*scale, kOp, "scale", device);
    PARACOMM_DTYPE_CHECK(!integer, kOp, ": scale is only supported for floating dtypes, out is ", dtype_str(ot));
  }
  if (found_inf.has_value()) check_fp32_scalar(*found_inf, kOp, "found_inf", device);
}

}  // namespace paracomm
