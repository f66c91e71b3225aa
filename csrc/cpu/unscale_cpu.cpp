// CPU implementation of paracomm::unscale_and_check_ and paracomm::unscale_and_check_out.
//
// The loop mirrors the CUDA kernel's arithmetic: v = float(g) * inv_scale in fp32 (torch's opmath for
// fp16/bf16/fp32), the non-finite test on the input value, the squared norm of v. The norm is summed per
// fixed-size block and the block sums added in block order, so the result does not depend on how many
// threads at::parallel_for happens to use.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/half_convert.h"
#include "validate.h"

namespace paracomm {
namespace {

constexpr int64_t kNormBlock = 1 << 16;  // elements per deterministic partial sum

struct Partial {
  bool found = false;
  double sumsq = 0.0;
};

// kLanes independent partial sums, added in lane order at the end: the additions no longer form one serial
// dependency chain (which cost ~4 cycles per element), the loop vectorises, and the order is still fixed.
constexpr int kLanes = 8;
// float16/bfloat16 data is widened kSub elements at a time into a float buffer (half_convert.h: vectorised
// where the CPU allows), so the arithmetic below is one plain float loop for every dtype. kSub is a multiple
// of kLanes, so each element lands in the same lane as without the buffering.
constexpr int64_t kSub = 1024;

// v[i] = x[i] * inv_scale for m elements, OR-ing the inf/nan test into `found` and adding v^2 to the lanes.
// Called with x == v (one pointer) for in-place work and with distinct __restrict__ pointers otherwise: two
// pointers to the same memory would make the compiler's runtime alias check fail and fall back to scalar code.
template <bool kWantNorm, bool kInPlace>
__attribute__((always_inline)) inline void scale_check(const float* __restrict__ x_in, float* __restrict__ v_out,
                                                       int64_t m, float inv_scale, int& found, double* sumsq) {
  float* v = v_out;
  const float* x = kInPlace ? v_out : x_in;
  // Local lanes (kept in registers), added to the caller's once per sub-block: a fixed order all the same.
  double lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= m; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float xv = x[i + l];
      found |= !(std::fabs(xv) <= std::numeric_limits<float>::max());  // inf or nan
      const float y = xv * inv_scale;
      v[i + l] = y;
      if constexpr (kWantNorm) lane[l] += static_cast<double>(y) * static_cast<double>(y);
    }
  }
  for (int l = 0; i < m; ++i, ++l) {  // only in a block's last sub-block
    const float xv = x[i];
    found |= !(std::fabs(xv) <= std::numeric_limits<float>::max());
    const float y = xv * inv_scale;
    v[i] = y;
    if constexpr (kWantNorm) lane[l] += static_cast<double>(y) * static_cast<double>(y);
  }
  if constexpr (kWantNorm) {
    for (int l = 0; l < kLanes; ++l) sumsq[l] += lane[l];
  }
}

template <bool kWantNorm, typename In, typename Out>
__attribute__((always_inline)) inline Partial unscale_block(const In* in, Out* out, int64_t n, float inv_scale) {
  double sumsq[kLanes] = {};
  int found = 0;  // OR-ed without a branch, so the loop stays vectorisable
  float buf[kSub];
  for (int64_t s = 0; s < n; s += kSub) {
    const int64_t m = std::min(kSub, n - s);
    if constexpr (std::is_same_v<In, float>) {  // float32 grads: in place, or into a separate float32 out
      if (static_cast<const void*>(in) == static_cast<const void*>(out)) {
        scale_check<kWantNorm, true>(nullptr, out + s, m, inv_scale, found, sumsq);
      } else {
        scale_check<kWantNorm, false>(in + s, out + s, m, inv_scale, found, sumsq);
      }
    } else if constexpr (std::is_same_v<Out, float>) {  // 16-bit grads into float32 master grads
      to_float(in + s, out + s, m);  // exact widening, then unscaled where it lies
      scale_check<kWantNorm, true>(nullptr, out + s, m, inv_scale, found, sumsq);
    } else {  // 16-bit grads in place: widen, unscale, round back
      to_float(in + s, buf, m);
      scale_check<kWantNorm, true>(nullptr, buf, m, inv_scale, found, sumsq);
      from_float(buf, out + s, m);
    }
  }
  Partial p;
  p.found = found != 0;
  for (int lane = 0; lane < kLanes; ++lane) p.sumsq += sumsq[lane];
  return p;
}

// The block loop compiled twice, for baseline x86-64 and for x86-64-v3 (AVX2, FMA), the clone picked at load
// time by the CPU (GCC's target_clones). unscale_block is force-inlined so each clone vectorises it for its
// ISA; only the arithmetic's width changes, never its order (no FMA contraction under -std=c++17), so both
// clones give the same bits.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PARACOMM_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PARACOMM_CLONES
#endif
#define PARACOMM_UNSCALE_ENTRY(In, Out)                                                                    \
  PARACOMM_CLONES Partial unscale_block_entry(const In* in, Out* out, int64_t n, float inv, bool norm) {  \
    return norm ? unscale_block<true>(in, out, n, inv) : unscale_block<false>(in, out, n, inv);           \
  }
PARACOMM_UNSCALE_ENTRY(float, float)
PARACOMM_UNSCALE_ENTRY(at::Half, at::Half)
PARACOMM_UNSCALE_ENTRY(at::BFloat16, at::BFloat16)
PARACOMM_UNSCALE_ENTRY(at::Half, float)
PARACOMM_UNSCALE_ENTRY(at::BFloat16, float)
#undef PARACOMM_UNSCALE_ENTRY

template <typename F>
void visit_grad_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); return;
    case at::kHalf: f(at::Half{}); return;
    case at::kBFloat16: f(at::BFloat16{}); return;
    default: TORCH_INTERNAL_ASSERT(false, "paracomm unscale: unvalidated grad dtype ", t);
  }
}

// Unscales one tensor into `out` (which may be `in` itself). Returns the flag and the
// squared norm, summed block by block in order.
Partial unscale_tensor(const at::Tensor& in, const at::Tensor& out, float inv_scale, bool want_norm) {
  const int64_t n = in.numel();
  const int64_t num_blocks = (n + kNormBlock - 1) / kNormBlock;
  std::vector<Partial> partials(static_cast<size_t>(num_blocks));
  // Grads are float32, float16 or bfloat16 (validated).
  visit_grad_dtype(in.scalar_type(), [&](auto tag) {
    using in_t = decltype(tag);
    const in_t* src = in.const_data_ptr<in_t>();
    auto run = [&](auto* dst) {
      using Out = std::remove_pointer_t<decltype(dst)>;
      at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t begin = b * kNormBlock, len = std::min(kNormBlock, n - begin);
          partials[b] = unscale_block_entry(src + begin, dst + begin, len, inv_scale, want_norm);
        }
      });
    };
    if (out.scalar_type() == in.scalar_type()) {
      run(out.mutable_data_ptr<in_t>());
    } else {
      run(out.mutable_data_ptr<float>());  // the master-gradient path: out is float32
    }
  });
  Partial total;
  for (const Partial& p : partials) {
    total.found |= p.found;
    total.sumsq += p.sumsq;
  }
  return total;
}

void unscale_impl(at::TensorList grads, const at::Tensor& inv_scale, const at::Tensor& found_inf,
                  const at::TensorList* out, const std::optional<at::Tensor>& norm) {
  const float inv = inv_scale.item<float>();
  const bool want_norm = norm.has_value();
  Partial total;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& dst = out ? (*out)[i] : grads[i];
    const Partial p = unscale_tensor(grads[i], dst, inv, want_norm);
    total.found |= p.found;
    total.sumsq += p.sumsq;
  }
  if (total.found) found_inf.fill_(1.0);
  if (want_norm) norm->fill_(static_cast<float>(std::sqrt(total.sumsq)));
}

void unscale_and_check_cpu(at::TensorList grads, const at::Tensor& inv_scale, const at::Tensor& found_inf,
                           const std::optional<at::Tensor>& norm) {
  check_unscale_args("unscale_and_check_", grads, inv_scale, found_inf, nullptr, norm);
  unscale_impl(grads, inv_scale, found_inf, nullptr, norm);
}

void unscale_and_check_out_cpu(at::TensorList grads, const at::Tensor& inv_scale, const at::Tensor& found_inf,
                               at::TensorList out, const std::optional<at::Tensor>& norm) {
  check_unscale_args("unscale_and_check_out", grads, inv_scale, found_inf, &out, norm);
  unscale_impl(grads, inv_scale, found_inf, &out, norm);
}

}  // namespace

TORCH_LIBRARY_IMPL(paracomm, CPU, m) {
  m.impl("unscale_and_check_", &unscale_and_check_cpu);
  m.impl("unscale_and_check_out", &unscale_and_check_out_cpu);
}

}  // namespace paracomm
