// Argument validation for every paracomm op, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) glue so both
// refuse exactly the same inputs with the same messages. Each function checks everything before the op
// writes anything. Errors: TypeError for dtypes, ValueError otherwise (see glue.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "glue.h"

namespace paracomm {

// unscale_and_check_ (out == nullptr) and unscale_and_check_out. `op` names the op in messages.
// grads: same device, contiguous, fp16/bf16/fp32; inv_scale/found_inf/norm: 1-element fp32 on that device;
// out: as many tensors as grads, fp32, same shapes, contiguous, same device.   (csrc/validate.cpp)
void check_unscale_args(const char* op, at::TensorList grads, const at::Tensor& inv_scale,
                        const at::Tensor& found_inf, const at::TensorList* out, const std::optional<at::Tensor>& norm);

// flatten / flatten_out / unflatten_. `flat` is the out buffer (flatten_out), the source (unflatten_), or an
// undefined tensor (flatten, which allocates its own). tensors: same device, contiguous, supported dtypes;
// flat: 1-D, contiguous, supported dtype, numel == sum of the tensors' numels, same device;
// scale_tensor: 1-element fp32 on that device. Returns the total element count.   (csrc/validate.cpp)
int64_t check_flatten_args(const char* op, at::TensorList tensors, const at::Tensor& flat,
                           const std::optional<at::Tensor>& scale_tensor);

// reduce_ (the all-reduce's local reduction, csrc/kernels/reduce.h): out, inputs[k], wire_out contiguous, same
// device, same numel; 1..32 inputs, inputs[1:] of one dtype; dtypes of one accumulation family (float32
// accumulation mixes float32 with one of float16/bfloat16; float64 and integers take one dtype throughout);
// wire_dtype float16/bfloat16 with float32 accumulation only, wire_out (needs wire_dtype) of that dtype;
// divisor > 0 and 1 for integers; scale/found_inf 1-element fp32.   (csrc/validate_reduce.cpp)
void check_reduce_args(const at::Tensor& out, at::TensorList inputs, double divisor,
                       const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& found_inf,
                       std::optional<at::ScalarType> wire_dtype, const std::optional<at::Tensor>& wire_out);

}  // namespace paracomm
