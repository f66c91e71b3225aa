// CPU implementation of paracomm::flatten, paracomm::flatten_out and paracomm::unflatten_.
//
// The tensors are laid end to end in one element range [0, total), segment i at [offset[i], offset[i+1]).
// One at::parallel_for splits that range into pieces of roughly equal length, whatever the tensor sizes, so
// 1500 small tensors cost one parallel region (not 1500) and one huge tensor still uses every thread. Each
// piece walks the segments it overlaps and converts them with one typed loop per (source, destination)
// dtype pair: a single pass over the data, each element read once and written once.
//
// Arithmetic (the same contract as the CUDA kernel, csrc/ops.cpp):
//   no scaling (scale == 1.0, no scale_tensor): dst = cast(src)  (a byte copy for equal dtypes, so exact);
//   scaling: factor = C(scale) * C(scale_tensor[0]), dst = cast(C(src) * factor), C = float32, or float64
//   when the source or the destination is float64 or an integer type (float32 would round int32/int64).
// Casts are C++ static_casts through c10's Half/BFloat16, as torch's own Tensor.to() does.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "validate.h"

namespace paracomm {
namespace {

// Calls f(T{}) with T the C++ type of `t`; `t` was validated by check_flatten_args.
template <typename F>
void visit_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); return;
    case at::kHalf: f(at::Half{}); return;
    case at::kBFloat16: f(at::BFloat16{}); return;
    case at::kDouble: f(double{}); return;
    case at::kInt: f(int32_t{}); return;
    case at::kLong: f(int64_t{}); return;
    default: TORCH_INTERNAL_ASSERT(false, "paracomm flatten: unvalidated dtype ", t);
  }
}

// Elements per parallel piece: ATen's own grain size (at::internal::GRAIN_SIZE, 32768), written out because it is
// declared in ATen/TensorIterator.h, a header that costs seconds of compile time for one constant.
constexpr int64_t kGrainSize = 32768;

inline bool needs_double(at::ScalarType t) { return t == at::kDouble || t == at::kInt || t == at::kLong; }

// How every element is transformed: a plain cast, or a multiply by a factor in float32 or float64.
struct Scaling {
  bool active = false;
  double factor64 = 1.0;
  float factor32 = 1.0f;
};

Scaling make_scaling(double scale, const std::optional<at::Tensor>& scale_tensor) {
  Scaling s;
  s.active = scale != 1.0 || scale_tensor.has_value();
  const float st = scale_tensor.has_value() ? scale_tensor->item<float>() : 1.0f;
  s.factor32 = static_cast<float>(scale) * st;
  s.factor64 = scale * static_cast<double>(st);
  return s;
}

// One contiguous run of n elements from src to dst.
template <typename Src, typename Dst>
void convert_run(const Src* src, Dst* dst, int64_t n, const Scaling& s, bool use_double) {
  if (!s.active) {
    if constexpr (std::is_same_v<Src, Dst>) {
      // Also covers in-place use (tensors that are views of the buffer at their own position).
      if (static_cast<const void*>(src) != static_cast<void*>(dst)) std::memmove(dst, src, n * sizeof(Src));
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<Dst>(src[i]);
    }
  } else if (use_double) {
    const double f = s.factor64;
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<Dst>(static_cast<double>(src[i]) * f);
  } else {
    const float f = s.factor32;
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<Dst>(static_cast<float>(src[i]) * f);
  }
}

// A list of contiguous tensors seen as one element range; `ptrs[i]` is tensor i's first element.
struct Segments {
  std::vector<int64_t> offsets;  // size n + 1, offsets[0] = 0, offsets[n] = total
  std::vector<char*> ptrs;
  std::vector<at::ScalarType> dtypes;
};

// `written`: the tensors are destinations (unflatten_); sources are only read (no copy-on-write materialised).
Segments make_segments(at::TensorList tensors, bool written) {
  Segments seg;
  seg.offsets.reserve(tensors.size() + 1);
  seg.offsets.push_back(0);
  for (const at::Tensor& t : tensors) {
    seg.offsets.push_back(seg.offsets.back() + t.numel());
    seg.ptrs.push_back(written ? static_cast<char*>(t.mutable_data_ptr())
                               : const_cast<char*>(static_cast<const char*>(t.const_data_ptr())));
    seg.dtypes.push_back(t.scalar_type());
  }
  return seg;
}

// Copies between the segmented tensors and the 1-D buffer `flat` (to_flat: tensors -> flat, else back).
void copy_segments(const Segments& seg, char* flat, at::ScalarType flat_dtype, bool to_flat, const Scaling& s) {
  const int64_t total = seg.offsets.back();
  if (total == 0) return;
  const int64_t flat_size = static_cast<int64_t>(c10::elementSize(flat_dtype));
  at::parallel_for(0, total, kGrainSize, [&](int64_t begin, int64_t end) {
    // The last segment starting at or before `begin`: empty segments share an offset with the next one, so
    // this lands on the non-empty segment that holds element `begin`.
    size_t i = static_cast<size_t>(std::upper_bound(seg.offsets.begin(), seg.offsets.end(), begin) -
                                   seg.offsets.begin() - 1);
    for (int64_t pos = begin; pos < end; ++i) {
      const int64_t stop = std::min(end, seg.offsets[i + 1]);
      const int64_t n = stop - pos;
      if (n <= 0) continue;
      const at::ScalarType t_dtype = seg.dtypes[i];
      char* t_ptr = seg.ptrs[i] + (pos - seg.offsets[i]) * static_cast<int64_t>(c10::elementSize(t_dtype));
      char* f_ptr = flat + pos * flat_size;
      const at::ScalarType src_dtype = to_flat ? t_dtype : flat_dtype;
      const at::ScalarType dst_dtype = to_flat ? flat_dtype : t_dtype;
      const bool use_double = needs_double(src_dtype) || needs_double(dst_dtype);
      char* src = to_flat ? t_ptr : f_ptr;
      char* dst = to_flat ? f_ptr : t_ptr;
      visit_dtype(src_dtype, [&](auto src_tag) {
        using Src = decltype(src_tag);
        visit_dtype(dst_dtype, [&](auto dst_tag) {
          using Dst = decltype(dst_tag);
          convert_run(reinterpret_cast<const Src*>(src), reinterpret_cast<Dst*>(dst), n, s, use_double);
        });
      });
      pos = stop;
    }
  });
}

void flatten_into(at::TensorList tensors, const at::Tensor& out, double scale,
                  const std::optional<at::Tensor>& scale_tensor) {
  copy_segments(make_segments(tensors, /*written=*/false), static_cast<char*>(out.mutable_data_ptr()),
                out.scalar_type(), /*to_flat=*/true,
                make_scaling(scale, scale_tensor));
}

at::Tensor flatten_cpu(at::TensorList tensors, at::ScalarType dtype, double scale,
                       const std::optional<at::Tensor>& scale_tensor) {
  const int64_t total = check_flatten_args("flatten", tensors, at::Tensor(), scale_tensor);
  to_dtype(dtype, "flatten", "dtype");
  at::Tensor out = at::empty({total}, tensors[0].options().dtype(dtype));
  flatten_into(tensors, out, scale, scale_tensor);
  return out;
}

void flatten_out_cpu(at::TensorList tensors, const at::Tensor& out, double scale,
                     const std::optional<at::Tensor>& scale_tensor) {
  check_flatten_args("flatten_out", tensors, out, scale_tensor);
  flatten_into(tensors, out, scale, scale_tensor);
}

void unflatten_cpu(const at::Tensor& flat, at::TensorList tensors, double scale,
                   const std::optional<at::Tensor>& scale_tensor) {
  check_flatten_args("unflatten_", tensors, flat, scale_tensor);
  copy_segments(make_segments(tensors, /*written=*/true),
                const_cast<char*>(static_cast<const char*>(flat.const_data_ptr())), flat.scalar_type(),
                /*to_flat=*/false,
                make_scaling(scale, scale_tensor));
}

}  // namespace

TORCH_LIBRARY_IMPL(paracomm, CPU, m) {
  m.impl("flatten", &flatten_cpu);
  m.impl("flatten_out", &flatten_out_cpu);
  m.impl("unflatten_", &unflatten_cpu);
}

}  // namespace paracomm
