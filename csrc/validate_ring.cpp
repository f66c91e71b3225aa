// Argument checks for ring_reduce_, shared by the CPU and CUDA glue (see validate.h).
//
// Supported dtype combinations, by accumulation type:
//   float32 accumulation: out, a, b, wire_out each float32 or one wire dtype W (float16 or bfloat16); never
//     both float16 and bfloat16 in one call (the core instantiates one wire type per launch);
//   float64 accumulation: out, a, b all float64, no wire_out;
//   int64 accumulation:   out, a, b all int32 or all int64, no wire_out, divisor 1, no scale.
#include <cmath>
#include <string>

#include "validate.h"

namespace paracomm {

namespace {
constexpr const char* kOp = "ring_reduce_";

bool is_half_like(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }
}  // namespace

void check_ring_reduce_args(const at::Tensor& out, const at::Tensor& a, const std::optional<at::Tensor>& b,
                            double divisor, const std::optional<at::Tensor>& scale,
                            const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& wire_out) {
  PARACOMM_ARG_CHECK(out.defined(), kOp, ": out is undefined");
  const at::Device device = out.device();
  check_dense_on(out, kOp, "out", device);
  check_dense_on(a, kOp, "a", device);
  if (b.has_value()) check_dense_on(*b, kOp, "b", device);
  if (wire_out.has_value()) check_dense_on(*wire_out, kOp, "wire_out", device);

  const int64_t n = out.numel();
  PARACOMM_ARG_CHECK(a.numel() == n, kOp, ": a has ", a.numel(), " elements but out has ", n);
  if (b.has_value()) PARACOMM_ARG_CHECK(b->numel() == n, kOp, ": b has ", b->numel(), " elements but out has ", n);
  if (wire_out.has_value())
    PARACOMM_ARG_CHECK(wire_out->numel() == n, kOp, ": wire_out has ", wire_out->numel(), " elements but out has ", n);

  // Every dtype must be one paracomm knows (TypeError naming the argument otherwise).
  const DType out_t = to_dtype(out.scalar_type(), kOp, "out");
  to_dtype(a.scalar_type(), kOp, "a");
  if (b.has_value()) to_dtype(b->scalar_type(), kOp, "b");
  if (wire_out.has_value()) to_dtype(wire_out->scalar_type(), kOp, "wire_out");

  const at::ScalarType ot = out.scalar_type();
  if (ot == at::kDouble || ot == at::kInt || ot == at::kLong) {
    // float64 / integer accumulation: one dtype throughout, no wire rounding.
    PARACOMM_DTYPE_CHECK(a.scalar_type() == ot, kOp, ": a has dtype ", a.scalar_type(), " but out has ", ot,
                         " (only float32 accumulation mixes dtypes)");
    if (b.has_value())
      PARACOMM_DTYPE_CHECK(b->scalar_type() == ot, kOp, ": b has dtype ", b->scalar_type(), " but out has ", ot,
                           " (only float32 accumulation mixes dtypes)");
    PARACOMM_DTYPE_CHECK(!wire_out.has_value(), kOp, ": wire_out needs float32 accumulation, but out is ", ot);
  } else {
    // float32 accumulation: each buffer float32 or the one wire dtype W.
    at::ScalarType wire = is_half_like(ot) ? ot : at::kFloat;
    auto check_member = [&](const at::Tensor& t, const char* arg) {
      const at::ScalarType st = t.scalar_type();
      PARACOMM_DTYPE_CHECK(st == at::kFloat || is_half_like(st), kOp, ": ", arg, " has dtype ", st, " but out is ",
                           ot, " (float32 accumulation takes float32, float16 or bfloat16)");
      if (is_half_like(st)) {
        PARACOMM_DTYPE_CHECK(wire == at::kFloat || wire == st, kOp, ": ", arg, " has dtype ", st,
                             " but another buffer is ", wire, " (one low-precision dtype per call)");
        wire = st;
      }
    };
    check_member(a, "a");
    if (b.has_value()) check_member(*b, "b");
    if (wire_out.has_value()) check_member(*wire_out, "wire_out");
  }

  const bool integer = !dtype_is_floating(out_t);
  PARACOMM_ARG_CHECK(std::isfinite(divisor) && divisor > 0, kOp, ": divisor must be a finite number > 0, got ",
                     divisor);
  if (integer) PARACOMM_ARG_CHECK(divisor == 1.0, kOp, ": divisor must be 1 for integer dtype ", ot, ", got ", divisor);
  if (scale.has_value()) {
    check_fp32_scalar(*scale, kOp, "scale", device);
    PARACOMM_DTYPE_CHECK(!integer, kOp, ": scale is only supported for floating dtypes, out is ", ot);
  }
  if (found_inf.has_value()) check_fp32_scalar(*found_inf, kOp, "found_inf", device);
}

}  // namespace paracomm
