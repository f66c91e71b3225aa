// CUDA implementation of paracomm::unscale_and_check_ and paracomm::unscale_and_check_out: validate, guard
// the device, take torch's current stream and a norm workspace from torch's caching allocator, then call the
// torch-free launcher (csrc/kernels/unscale.h). Nothing here synchronises with the host: inv_scale is read on
// the device and found_inf / norm are written there.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "kernels/unscale.h"
#include "validate.h"

namespace paracomm {
namespace {

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

}  // namespace

TORCH_LIBRARY_IMPL(paracomm, CUDA, m) {
  m.impl("unscale_and_check_", &unscale_and_check_cuda);
  m.impl("unscale_and_check_out", &unscale_and_check_out_cuda);
}

}  // namespace paracomm
