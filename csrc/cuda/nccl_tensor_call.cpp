// The CUDA per-call path of paracomm's collectives in one C++ call (torch-facing): _C.nccl_collective(comm,
// collective, output, input, ...) (and _C.nccl_all_reduce, its in-place all-reduce form) takes the tensors
// themselves, reads torch's current stream, resolves "auto" (topology-aware with a node map), and hands the
// torch-free NcclComm (csrc/allreduce/nccl_comm.h) the services it needs from torch: the workspace from the
// caching allocator's pool of paracomm's reduce stream R (released right after the enqueue; nccl_executor.h says
// why that is safe), and record_stream of the caller's buffers (output, input, scale, found_inf) on R for async
// calls (torch's keep-alive for a collective's tensors). No environment reads, no plan lookups in Python:
// comm.py / collectives.py validate the arguments once and call this. The GIL is released while the
// communicator enqueues.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "allreduce/hierarchical.h"

#include "allreduce/nccl_comm.h"
#include "glue.h"

namespace py = pybind11;

namespace paracomm {

void set_call_header(NcclCall& call, const std::vector<int64_t>& header);  // csrc/cuda/nccl_binding.cpp

namespace {

// The services of one call (nccl_executor.h, NcclCallServices).
class TorchCallServices final : public NcclCallServices {
 public:
  TorchCallServices(c10::DeviceIndex device, const at::Tensor& data, const std::optional<at::Tensor>& input,
                    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& found_inf)
      : device_(device), data_(data), input_(input), scale_(scale), found_inf_(found_inf) {}

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
    // keeps it alive (the Work also holds the tensors until wait()).
    c10::cuda::CUDACachingAllocator::recordStream(data_.storage().data_ptr(), s);
    for (const std::optional<at::Tensor>* t : {&input_, &scale_, &found_inf_}) {
      if (t->has_value()) c10::cuda::CUDACachingAllocator::recordStream((*t)->storage().data_ptr(), s);
    }
  }

 private:
  c10::DeviceIndex device_;
  const at::Tensor& data_;
  const std::optional<at::Tensor>& input_;
  const std::optional<at::Tensor>& scale_;
  const std::optional<at::Tensor>& found_inf_;
};

// One collective on CUDA tensors: the body of nccl_collective and nccl_all_reduce.
void run_collective(NcclComm& comm, const std::string& collective_name, const at::Tensor& data,
                    const std::optional<at::Tensor>& input, double divisor, int64_t wire_dtype,
                    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& found_inf,
                    int64_t algorithm, int64_t chunk_bytes, bool async_op, const std::vector<int32_t>& node_map,
                    const std::vector<int64_t>& header) {
  const char* name = "nccl_collective";
  const Collective collective = collective_from_name(collective_name, "collective");
  PARACOMM_CHECK(data.is_cuda() && data.is_contiguous(), name, ": output must be a contiguous CUDA tensor");
  PARACOMM_CHECK(data.get_device() == comm.device(), name, ": output is on cuda:", data.get_device(),
                 " but the communicator on cuda:", comm.device());
  PARACOMM_CHECK(input.has_value() == (collective != Collective::kAllReduce), name,
                 ": input is required by reduce_scatter / all_gather and refused by all_reduce (in place)");
  int64_t numel = data.numel();
  if (input.has_value()) {
    PARACOMM_CHECK(input->is_cuda() && input->is_contiguous() && input->get_device() == comm.device() &&
                       input->scalar_type() == data.scalar_type(),
                   name, ": input must be a contiguous CUDA tensor of the output's dtype on its device");
    const int64_t n = comm.world_size();
    if (collective == Collective::kReduceScatter) {
      PARACOMM_CHECK(input->numel() == n * data.numel(), name, ": input must have world_size x output.numel() = ",
                     n * data.numel(), " elements, got ", input->numel());
    } else {
      PARACOMM_CHECK(data.numel() == n * input->numel(), name, ": output must have world_size x input.numel() = ",
                     n * input->numel(), " elements, got ", data.numel());
      numel = input->numel();
    }
  }
  for (const std::optional<at::Tensor>* t : {&scale, &found_inf}) {
    if (t->has_value()) {
      PARACOMM_CHECK((*t)->is_cuda() && (*t)->get_device() == comm.device() && (*t)->numel() == 1 &&
                         (*t)->scalar_type() == at::kFloat,
                     name, ": scale / found_inf must be 1-element float32 tensors on the data's device");
    }
  }
  PARACOMM_CHECK(wire_dtype == kNoWire || wire_dtype == 1 || wire_dtype == 2, name,
                 ": wire_dtype must be -1 (none), 1 (float16) or 2 (bfloat16), got ", wire_dtype);
  check_node_map(node_map, comm.world_size());
  NcclCall call;
  call.collective = collective;
  call.data = data.data_ptr();
  call.input = input.has_value() ? input->const_data_ptr() : nullptr;
  call.numel = numel;
  call.dtype = to_dtype(data.scalar_type(), name, "output");
  call.wire_dtype = static_cast<int32_t>(wire_dtype);
  call.divisor = divisor;
  call.scale = scale.has_value() ? scale->const_data_ptr<float>() : nullptr;
  call.found_inf = found_inf.has_value() ? found_inf->mutable_data_ptr<float>() : nullptr;
  call.node_of = node_map;
  if (algorithm < 0) {
    call.algorithm = node_map.empty()
                         ? choose_algorithm(collective, numel, call.dtype, call.wire_dtype, comm.world_size(),
                                            Backend::kNccl)
                         : choose_algorithm_topology(collective, numel, call.dtype, call.wire_dtype,
                                                     comm.world_size(), Backend::kNccl, node_map, nullptr);
  } else {
    PARACOMM_CHECK(algorithm <= static_cast<int64_t>(Algorithm::kHierarchical), name,
                   ": algorithm must be -1 (auto), 0 (ring), 1 (direct), 2 (one_shot) or 3 (hierarchical), got ",
                   algorithm);
    call.algorithm = static_cast<Algorithm>(algorithm);
  }
  call.chunk_bytes = chunk_bytes;
  set_call_header(call, header);
  call.sync = !async_op;
  const c10::DeviceIndex device = static_cast<c10::DeviceIndex>(comm.device());
  TorchCallServices services(device, data, input, scale, found_inf);
  call.services = &services;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  py::gil_scoped_release release;
  comm.run(call, stream);
}

}  // namespace

void bind_nccl_tensor(py::module_& m) {
  m.def(
      "nccl_collective",
      [](NcclComm& comm, const std::string& collective, const at::Tensor& output,
         const std::optional<at::Tensor>& input, double divisor, int64_t wire_dtype,
         const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& found_inf, int64_t algorithm,
         int64_t chunk_bytes, bool async_op, const std::vector<int32_t>& node_map,
         const std::vector<int64_t>& header) {
        run_collective(comm, collective, output, input, divisor, wire_dtype, scale, found_inf, algorithm,
                       chunk_bytes, async_op, node_map, header);
      },
      py::arg("comm"), py::arg("collective"), py::arg("output"), py::arg("input"), py::arg("divisor"),
      py::arg("wire_dtype"), py::arg("scale"), py::arg("found_inf"), py::arg("algorithm"), py::arg("chunk_bytes"),
      py::arg("async_op"), py::arg("node_map") = std::vector<int32_t>{}, py::arg("header") = std::vector<int64_t>{},
      "One collective on NcclComm `comm`, ordered after torch's current stream: 'all_reduce' (output reduced in "
      "place, input None), 'reduce_scatter' (input: world_size x output.numel() elements; rank r's output is "
      "the reduction of input segment r), 'all_gather' (output: world_size x input.numel(); segment p is rank "
      "p's input). Contiguous CUDA tensors of one dtype on the communicator's device. async_op=False: the "
      "current stream waits for the call before this returns; async_op=True: it is left free (wait on "
      "comm.reduce_stream); output/input/scale/found_inf are recorded on that stream so freeing them early is "
      "safe. divisor: N for avg, else 1. wire_dtype: -1, 1 (float16) or 2 (bfloat16). algorithm: -1 auto "
      "(topology-aware with a node_map), 0 ring, 1 direct, 2 one_shot, 3 hierarchical. chunk_bytes: 0 = the "
      "plan's default. node_map: rank -> node ([] one node). header: the call's signature header "
      "(paracomm._signature.header; [] = no per-call check). Raises (nothing enqueued) on bad arguments or a "
      "failed communicator; raises after failing the communicator if enqueuing fails midway.");
  m.def(
      "nccl_all_reduce",
      [](NcclComm& comm, const at::Tensor& data, double divisor, int64_t wire_dtype,
         const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& found_inf, int64_t algorithm,
         int64_t chunk_bytes, bool async_op) {
        run_collective(comm, "all_reduce", data, std::nullopt, divisor, wire_dtype, scale, found_inf, algorithm,
                       chunk_bytes, async_op, {}, {});
      },
      py::arg("comm"), py::arg("data"), py::arg("divisor"), py::arg("wire_dtype"), py::arg("scale"),
      py::arg("found_inf"), py::arg("algorithm"), py::arg("chunk_bytes"), py::arg("async_op"),
      "nccl_collective(comm, 'all_reduce', data, None, ...) on one node without the per-call header.");
}

}  // namespace paracomm
