// The CUDA glue of every op (TORCH_LIBRARY_IMPL(paracomm, CUDA)), in one translation unit:
// each file that includes torch's headers costs seconds to compile, and the glue is thin: validate (validate.h),
// guard the device, take torch's current stream (and a workspace from its caching allocator), then call the
// torch-free launchers (csrc/kernels/unscale.h, flatten.h, reduce.h). Nothing here synchronises with the
// host: inv_scale and a tensor scale are read on the device, found_inf / norm are written there.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "kernels/flatten.h"
#include "kernels/reduce.h"
#include "kernels/unscale.h"
#include "validate.h"

namespace paracomm {
namespace {

// ---- unscale_and_check_ / unscale_and_check_out --------------------------------------------------------------

void unscale_cuda_impl(const char* op, at::TensorList grads, const at::Tensor& inv_scale, const at::Tensor& found_inf,
                       const at::TensorList* out, const std::optional<at::Tensor>& norm) {
  const at::Device device = found_inf.device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  std::vector<UnscaleTensor> list(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    UnscaleTensor& t = list[i];
    t.grad_dtype = to_dtype(g.scalar_type(), op, "grads[" + std::to_string(i) + "]");
    t.numel = g.numel();
    if (out == nullptr) {
      t.out = g.mutable_data_ptr();
      t.grad = t.out;
      t.out_dtype = t.grad_dtype;
    } else {
      t.grad = g.const_data_ptr();
      t.out = (*out)[i].mutable_data_ptr();
      t.out_dtype = DType::kFloat32;
    }
  }

  float* norm_ptr = nullptr;
  at::Tensor workspace;
  if (norm.has_value()) {
    norm_ptr = norm->mutable_data_ptr<float>();
    const int64_t elems = unscale_norm_workspace_elems(list.data(), static_cast<int64_t>(list.size()));
    // Allocated on the current stream by the caching allocator: freed when this function returns, reused only
    // by work ordered after the kernels on that stream.
    workspace = at::empty({elems}, found_inf.options().dtype(at::kDouble));
  }
  launch_unscale_and_check(list.data(), static_cast<int64_t>(list.size()), inv_scale.const_data_ptr<float>(),
                           found_inf.mutable_data_ptr<float>(), norm_ptr,
                           workspace.defined() ? workspace.mutable_data_ptr<double>() : nullptr,
                           workspace.defined() ? workspace.numel() : 0, stream);
}

void unscale_and_check_cuda(at::TensorList grads, const at::Tensor& inv_scale, const at::Tensor& found_inf,
                            const std::optional<at::Tensor>& norm) {
  check_unscale_args("unscale_and_check_", grads, inv_scale, found_inf, nullptr, norm);
  unscale_cuda_impl("unscale_and_check_", grads, inv_scale, found_inf, nullptr, norm);
}

void unscale_and_check_out_cuda(at::TensorList grads, const at::Tensor& inv_scale, const at::Tensor& found_inf,
                                at::TensorList out, const std::optional<at::Tensor>& norm) {
  // Named like the public wrapper (paracomm.unscale_and_check_(..., out=...)), as the CPU op does.
  check_unscale_args("unscale_and_check_", grads, inv_scale, found_inf, &out, norm);
  unscale_cuda_impl("unscale_and_check_", grads, inv_scale, found_inf, &out, norm);
}

// ---- flatten / flatten_out / unflatten_ ---------------------------------------------------------------------

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

// ---- reduce_ (the all-reduce's local reduction as a torch op) ------------------------------------------------

void reduce_cuda(const at::Tensor& out, at::TensorList inputs, double divisor, const std::optional<at::Tensor>& scale,
                 const std::optional<at::Tensor>& found_inf, std::optional<at::ScalarType> wire_dtype,
                 const std::optional<at::Tensor>& wire_out) {
  check_reduce_args(out, inputs, divisor, scale, found_inf, wire_dtype, wire_out);
  const at::Device device = out.device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  ReduceArgs args;
  args.out = out.mutable_data_ptr();
  args.out_dtype = to_dtype(out.scalar_type(), "reduce_", "out");
  args.num_inputs = static_cast<int32_t>(inputs.size());
  for (size_t j = 0; j < inputs.size(); ++j) args.inputs[j] = inputs[j].const_data_ptr();
  args.first_dtype = to_dtype(inputs[0].scalar_type(), "reduce_", "inputs[0]");
  args.rest_dtype = inputs.size() > 1 ? to_dtype(inputs[1].scalar_type(), "reduce_", "inputs[1]") : args.first_dtype;
  args.n = out.numel();
  args.divisor = divisor;
  if (scale.has_value()) args.scale = scale->const_data_ptr<float>();
  if (found_inf.has_value()) args.found_inf = found_inf->mutable_data_ptr<float>();
  if (wire_dtype.has_value()) {
    args.round_to_wire = true;
    args.wire_dtype = to_dtype(*wire_dtype, "reduce_", "wire_dtype");
    if (wire_out.has_value()) args.wire_out = wire_out->mutable_data_ptr();
  }
  launch_reduce(args, stream);
}

}  // namespace

TORCH_LIBRARY_IMPL(paracomm, CUDA, m) {
  m.impl("unscale_and_check_", &unscale_and_check_cuda);
  m.impl("unscale_and_check_out", &unscale_and_check_out_cuda);
  m.impl("flatten", &flatten_cuda);
  m.impl("flatten_out", &flatten_out_cuda);
  m.impl("unflatten_", &unflatten_cuda);
  m.impl("reduce_", &reduce_cuda);
}

}  // namespace paracomm
