// Argument checks shared by the CPU and CUDA glue of the unscale and flatten ops (see validate.h).
#include "validate.h"

#include <cstring>
#include <string>

namespace paracomm {

void check_unscale_args(const char* op, at::TensorList grads, const at::Tensor& inv_scale, const at::Tensor& found_inf,
                        const at::TensorList* out, const std::optional<at::Tensor>& norm) {
  PARACOMM_ARG_CHECK(inv_scale.defined(), op, ": inv_scale is undefined");
  const at::Device device = grads.empty() ? inv_scale.device() : grads[0].device();
  for (size_t i = 0; i < grads.size(); ++i) {
    const std::string arg = "grads[" + std::to_string(i) + "]";
    check_dense_on(grads[i], op, arg, device);
    PARACOMM_DTYPE_CHECK(is_grad_dtype(grads[i].scalar_type()), op, ": ", arg,
                         " must be float16, bfloat16 or float32, got ", dtype_str(grads[i].scalar_type()));
  }
  check_fp32_scalar(inv_scale, op, "inv_scale", device);
  check_fp32_scalar(found_inf, op, "found_inf", device);
  if (norm.has_value()) check_fp32_scalar(*norm, op, "norm", device);
  if (out != nullptr) {
    PARACOMM_ARG_CHECK(out->size() == grads.size(), op, ": out has ", out->size(), " tensors but grads has ",
                       grads.size());
    for (size_t i = 0; i < out->size(); ++i) {
      const std::string arg = "out[" + std::to_string(i) + "]";
      check_dense_on((*out)[i], op, arg, device);
      PARACOMM_DTYPE_CHECK((*out)[i].scalar_type() == at::kFloat, op, ": ", arg, " must be float32, got ",
                           dtype_str((*out)[i].scalar_type()));
      PARACOMM_ARG_CHECK((*out)[i].sizes() == grads[i].sizes(), op, ": ", arg, " has shape ",
                         shape_str((*out)[i].sizes()), " but grads[", i, "] has shape ", shape_str(grads[i].sizes()));
    }
  }
}

int64_t check_flatten_args(const char* op, at::TensorList tensors, const at::Tensor& flat,
                           const std::optional<at::Tensor>& scale_tensor) {
  // `flat` is called "out" by flatten_out and "flat" by unflatten_; flatten passes none and allocates.
  const char* flat_arg = std::strcmp(op, "unflatten_") == 0 ? "flat" : "out";
  PARACOMM_ARG_CHECK(flat.defined() || !tensors.empty(), op, ": tensors must not be empty");
  const at::Device device = tensors.empty() ? flat.device() : tensors[0].device();
  int64_t total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::string arg = "tensors[" + std::to_string(i) + "]";
    check_dense_on(tensors[i], op, arg, device);
    to_dtype(tensors[i].scalar_type(), op, arg);  // TypeError for anything the core does not handle
    total += tensors[i].numel();
  }
  if (flat.defined()) {
    check_dense_on(flat, op, flat_arg, device);
    to_dtype(flat.scalar_type(), op, flat_arg);
    PARACOMM_ARG_CHECK(flat.dim() == 1, op, ": ", flat_arg, " must be 1-D, got shape ", shape_str(flat.sizes()));
    PARACOMM_ARG_CHECK(flat.numel() == total, op, ": ", flat_arg, " has ", flat.numel(),
                       " elements but the tensors hold ", total);
  }
  if (scale_tensor.has_value()) check_fp32_scalar(*scale_tensor, op, "scale_tensor", device);
  return total;
}

}  // namespace paracomm
