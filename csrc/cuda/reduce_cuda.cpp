// CUDA implementation of paracomm::reduce_ (the all-reduce's local reduction as a torch op, used by tests and
// by anything that wants the kernel on torch tensors): validate (check_reduce_args, shared with the CPU op),
// guard the device, take torch's current stream, call launch_reduce (csrc/kernels/reduce.h). No host
// synchronisation.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "kernels/reduce.h"
#include "validate.h"

namespace paracomm {
namespace {

constexpr const char* kOp = "reduce_";

void reduce_cuda(const at::Tensor& out, at::TensorList inputs, double divisor, const std::optional<at::Tensor>& scale,
                 const std::optional<at::Tensor>& found_inf, std::optional<at::ScalarType> wire_dtype,
                 const std::optional<at::Tensor>& wire_out) {
  check_reduce_args(out, inputs, divisor, scale, found_inf, wire_dtype, wire_out);
  const at::Device device = out.device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  ReduceArgs args;
  args.out = out.mutable_data_ptr();
  args.out_dtype = to_dtype(out.scalar_type(), kOp, "out");
  args.num_inputs = static_cast<int32_t>(inputs.size());
  for (size_t j = 0; j < inputs.size(); ++j) args.inputs[j] = inputs[j].const_data_ptr();
  args.first_dtype = to_dtype(inputs[0].scalar_type(), kOp, "inputs[0]");
  args.rest_dtype = inputs.size() > 1 ? to_dtype(inputs[1].scalar_type(), kOp, "inputs[1]") : args.first_dtype;
  args.n = out.numel();
  args.divisor = divisor;
  if (scale.has_value()) args.scale = scale->const_data_ptr<float>();
  if (found_inf.has_value()) args.found_inf = found_inf->mutable_data_ptr<float>();
  if (wire_dtype.has_value()) {
    args.round_to_wire = true;
    args.wire_dtype = to_dtype(*wire_dtype, kOp, "wire_dtype");
    if (wire_out.has_value()) args.wire_out = wire_out->mutable_data_ptr();
  }
  launch_reduce(args, stream);
}

}  // namespace

TORCH_LIBRARY_IMPL(paracomm, CUDA, m) { m.impl("reduce_", &reduce_cuda); }

}  // namespace paracomm
