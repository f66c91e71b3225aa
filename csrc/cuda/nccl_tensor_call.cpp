// The CUDA per-call path of paracomm.all_reduce in one C++ call (torch-facing): _C.nccl_all_reduce(comm, tensor,
// ...) takes the tensors themselves, reads torch's current stream, resolves "auto", and hands the torch-free
// NcclComm (csrc/allreduce/nccl_comm.h) the services it needs from torch: the workspace from the caching
// allocator's pool of paracomm's reduce stream R (released right after the enqueue; nccl_executor.h says why
// that is safe), and record_stream of the caller's buffers on R for async calls (torch's keep-alive for a
// collective's tensors). No environment reads, no Python tuples, no plan lookups in Python: comm.py validates
// the arguments once (paracomm/comm.py, Communicator._validate) and calls this. The GIL is released while the
// communicator enqueues.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <optional>

#include "allreduce/nccl_comm.h"
#include "glue.h"

namespace py = pybind11;

namespace paracomm {

namespace {

// The services of one call (nccl_executor.h, NcclCallServices).
class TorchCallServices final : public NcclCallServices {
 public:
  TorchCallServices(c10::DeviceIndex device, const at::Tensor& data, const std::optional<at::Tensor>& scale,
                    const std::optional<at::Tensor>& found_inf)
      : device_(device), data_(data), scale_(scale), found_inf_(found_inf) {}

  void* allocate_workspace(int64_t bytes, cudaStream_t stream) override {
    return c10::cuda::CUDACachingAllocator::raw_alloc_with_stream(static_cast<size_t>(bytes), stream);
  }
  void release_workspace(void* ptr) noexcept override {
    try {
      c10::cuda::CUDACachingAllocator::raw_delete(ptr);
    } catch (...) {
    }
  }
  void keep_alive(cudaStream_t stream) override {
    const c10::cuda::CUDAStream s = c10::cuda::getStreamFromExternal(stream, device_);
    // A block the caching allocator did not make (a DLPack import) is skipped by the allocator: its owner
    // keeps it alive (the Work also holds the tensor until wait()).
    c10::cuda::CUDACachingAllocator::recordStream(data_.storage().data_ptr(), s);
    if (scale_.has_value()) c10::cuda::CUDACachingAllocator::recordStream(scale_->storage().data_ptr(), s);
    if (found_inf_.has_value()) c10::cuda::CUDACachingAllocator::recordStream(found_inf_->storage().data_ptr(), s);
  }

 private:
  c10::DeviceIndex device_;
  const at::Tensor& data_;
  const std::optional<at::Tensor>& scale_;
  const std::optional<at::Tensor>& found_inf_;
};

}  // namespace

void bind_nccl_tensor(py::module_& m) {
  m.def(
      "nccl_all_reduce",
      [](NcclComm& comm, const at::Tensor& data, double divisor, int64_t wire_dtype,
         const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& found_inf, int64_t algorithm,
         int64_t chunk_bytes, bool async_op) {
        PARACOMM_CHECK(data.is_cuda() && data.is_contiguous(), "nccl_all_reduce: data must be a contiguous CUDA tensor");
        PARACOMM_CHECK(data.get_device() == comm.device(), "nccl_all_reduce: data is on cuda:", data.get_device(),
                       " but the communicator on cuda:", comm.device());
        for (const std::optional<at::Tensor>* t : {&scale, &found_inf}) {
          if (t->has_value()) {
            PARACOMM_CHECK((*t)->is_cuda() && (*t)->get_device() == comm.device() && (*t)->numel() == 1 &&
                               (*t)->scalar_type() == at::kFloat,
                           "nccl_all_reduce: scale / found_inf must be 1-element float32 tensors on the data's device");
          }
        }
        PARACOMM_CHECK(wire_dtype == kNoWire || wire_dtype == 1 || wire_dtype == 2,
                       "nccl_all_reduce: wire_dtype must be -1 (none), 1 (float16) or 2 (bfloat16), got ", wire_dtype);
        NcclAllReduceCall call;
        call.data = data.data_ptr();
        call.numel = data.numel();
        call.dtype = to_dtype(data.scalar_type(), "nccl_all_reduce", "tensor");
        call.wire_dtype = static_cast<int32_t>(wire_dtype);
        call.divisor = divisor;
        call.scale = scale.has_value() ? scale->const_data_ptr<float>() : nullptr;
        call.found_inf = found_inf.has_value() ? found_inf->mutable_data_ptr<float>() : nullptr;
        if (algorithm < 0) {
          call.algorithm = choose_algorithm(call.numel, call.dtype, call.wire_dtype, comm.world_size(), Backend::kNccl);
        } else {
          PARACOMM_CHECK(algorithm <= static_cast<int64_t>(Algorithm::kOneShot),
                         "nccl_all_reduce: algorithm must be -1 (auto), 0 (ring), 1 (direct) or 2 (one_shot), got ",
                         algorithm);
          call.algorithm = static_cast<Algorithm>(algorithm);
        }
        call.chunk_bytes = chunk_bytes;
        call.sync = !async_op;
        const c10::DeviceIndex device = static_cast<c10::DeviceIndex>(comm.device());
        TorchCallServices services(device, data, scale, found_inf);
        call.services = &services;
        const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
        py::gil_scoped_release release;
        comm.all_reduce(call, stream);
      },
      py::arg("comm"), py::arg("data"), py::arg("divisor"), py::arg("wire_dtype"), py::arg("scale"),
      py::arg("found_inf"), py::arg("algorithm"), py::arg("chunk_bytes"), py::arg("async_op"),
      "In-place all_reduce of the contiguous CUDA tensor `data` on NcclComm `comm`, ordered after torch's current "
      "stream. async_op=False: the current stream waits for the call before this returns (dist.all_reduce). "
      "async_op=True: the current stream is left free; wait on comm.reduce_stream (paracomm's Work does) before "
      "using the result; data/scale/found_inf are recorded on that stream so freeing them early is safe. "
      "divisor: N for avg, else 1. wire_dtype: -1, 1 (float16) or 2 (bfloat16). scale/found_inf: None or "
      "1-element float32 tensors. algorithm: -1 auto, 0 ring, 1 direct, 2 one_shot. chunk_bytes: 0 = the plan's "
      "default. Raises (nothing enqueued) on bad arguments or a failed communicator; raises after failing the "
      "communicator if enqueuing fails midway.");
}

}  // namespace paracomm
