// CUDA implementation of paracomm::flatten, paracomm::flatten_out and paracomm::unflatten_: validate, guard the
// device, take torch's current stream, call the torch-free launcher (csrc/kernels/flatten.h). A tensor scale
// stays on the device (the kernel reads it), so no call synchronises with the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "kernels/flatten.h"
#include "validate.h"

namespace paracomm {
namespace {

// Copies between `tensors` and the validated 1-D buffer `flat` in `direction`.
void flatten_cuda_impl(const char* op, FlattenDirection direction, at::TensorList tensors, const at::Tensor& flat,
                       double scale, const std::optional<at::Tensor>& scale_tensor) {
  const at::Device device = flat.device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  std::vector<FlattenSegment> segments(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    FlattenSegment& s = segments[i];
    s.dtype = to_dtype(t.scalar_type(), op, "tensors[" + std::to_string(i) + "]");
    s.numel = t.numel();
    s.data = direction == FlattenDirection::kToFlat ? const_cast<void*>(t.const_data_ptr()) : t.mutable_data_ptr();
  }
  void* flat_ptr =
      direction == FlattenDirection::kToFlat ? flat.mutable_data_ptr() : const_cast<void*>(flat.const_data_ptr());
  const float* scale_ptr = scale_tensor.has_value() ? scale_tensor->const_data_ptr<float>() : nullptr;
  launch_flatten(direction, segments.data(), static_cast<int64_t>(segments.size()), flat_ptr,
                 to_dtype(flat.scalar_type(), op, "flat"), scale, scale_ptr, stream);
}

at::Tensor flatten_cuda(at::TensorList tensors, at::ScalarType dtype, double scale,
                        const std::optional<at::Tensor>& scale_tensor) {
  const int64_t total = check_flatten_args("flatten", tensors, at::Tensor(), scale_tensor);
  to_dtype(dtype, "flatten", "dtype");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  at::Tensor out = at::empty({total}, tensors[0].options().dtype(dtype));
  flatten_cuda_impl("flatten", FlattenDirection::kToFlat, tensors, out, scale, scale_tensor);
  return out;
}

void flatten_out_cuda(at::TensorList tensors, const at::Tensor& out, double scale,
                      const std::optional<at::Tensor>& scale_tensor) {
  check_flatten_args("flatten_out", tensors, out, scale_tensor);
  flatten_cuda_impl("flatten_out", FlattenDirection::kToFlat, tensors, out, scale, scale_tensor);
}

void unflatten_cuda(const at::Tensor& flat, at::TensorList tensors, double scale,
                    const std::optional<at::Tensor>& scale_tensor) {
  check_flatten_args("unflatten_", tensors, flat, scale_tensor);
  flatten_cuda_impl("unflatten_", FlattenDirection::kFromFlat, tensors, flat, scale, scale_tensor);
}

}  // namespace

TORCH_LIBRARY_IMPL(paracomm, CUDA, m) {
  m.impl("flatten", &flatten_cuda);
  m.impl("flatten_out", &flatten_out_cuda);
  m.impl("unflatten_", &unflatten_cuda);
}

}  // namespace paracomm
