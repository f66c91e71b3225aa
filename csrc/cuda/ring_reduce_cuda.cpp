// CUDA implementation of paracomm::ring_reduce_ (the ring's local reduction as a torch op, used by tests and
// by anything that wants the kernel on torch tensors): validate, guard the device, take torch's current
// stream, call launch_ring_reduce (csrc/kernels/ring_reduce.h). No host synchronisation.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels/ring_reduce.h"
#include "validate.h"

namespace paracomm {
namespace {

constexpr const char* kOp = "ring_reduce_";

void ring_reduce_cuda(const at::Tensor& out, const at::Tensor& a, const std::optional<at::Tensor>& b, double divisor,
                      const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::Tensor>& wire_out) {
  check_ring_reduce_args(out, a, b, divisor, scale, found_inf, wire_out);
  const at::Device device = out.device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  RingReduceArgs args;
  args.out = out.mutable_data_ptr();
  args.out_dtype = to_dtype(out.scalar_type(), kOp, "out");
  args.a = a.const_data_ptr();
  args.a_dtype = to_dtype(a.scalar_type(), kOp, "a");
  if (b.has_value()) {
    args.b = b->const_data_ptr();
    args.b_dtype = to_dtype(b->scalar_type(), kOp, "b");
  }
  args.n = out.numel();
  args.divisor = divisor;
  if (scale.has_value()) args.scale = scale->const_data_ptr<float>();
  if (found_inf.has_value()) args.found_inf = found_inf->mutable_data_ptr<float>();
  if (wire_out.has_value()) {
    args.wire_out = wire_out->mutable_data_ptr();
    args.wire_dtype = to_dtype(wire_out->scalar_type(), kOp, "wire_out");
  }
  launch_ring_reduce(args, stream);
}

}  // namespace

TORCH_LIBRARY_IMPL(paracomm, CUDA, m) { m.impl("ring_reduce_", &ring_reduce_cuda); }

}  // namespace paracomm
