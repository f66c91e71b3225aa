// paracomm._C's NCCL API (CUDA builds only): nccl_unique_id and the NcclComm class.
//
// Torch-free on purpose: tensors arrive as raw device pointers (int), streams as cudaStream_t values (int),
// dtypes as DType codes (csrc/dtype.h), the algorithm as the int of paracomm::Algorithm. paracomm/comm.py
// validates tensors, sizes the workspace with the plan's workspace_bytes (_C.plan_summary / all_reduce_plan),
// allocates it on the current stream and calls in here. Calls that may block (construction, which waits for
// every rank; all_reduce, whose blocking NCCL enqueue may wait while NCCL connects to a peer; abort;
// destruction) release the GIL.
#include "allreduce/nccl_comm.h"

#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace py = pybind11;

namespace paracomm {

void bind_nccl_tensor(py::module_& m);  // csrc/cuda/nccl_tensor_call.cpp (torch-facing)

namespace {

// Destroying a communicator may wait (finalize, bounded by timeout_s): do it without the GIL so other Python
// threads keep running.
struct NcclCommDeleter {
  void operator()(NcclComm* comm) const {
    if (PyGILState_Check()) {
      py::gil_scoped_release release;
      delete comm;
    } else {
      delete comm;
    }
  }
};
using NcclCommHolder = std::unique_ptr<NcclComm, NcclCommDeleter>;

template <typename T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

DType dtype_from_code(int64_t code, const char* arg) {
  PARACOMM_CHECK(code >= 0 && code <= static_cast<int64_t>(DType::kInt64), arg,
                 " must be a DType code in [0, 5] (float32, float16, bfloat16, float64, int32, int64), got ", code);
  return static_cast<DType>(code);
}

Algorithm algorithm_from_code(int64_t code) {
  PARACOMM_CHECK(code >= static_cast<int64_t>(Algorithm::kRing) && code <= static_cast<int64_t>(Algorithm::kHierarchical),
                 "algorithm must be 0 (ring), 1 (direct), 2 (one_shot) or 3 (hierarchical), got ", code);
  return static_cast<Algorithm>(code);
}

}  // namespace

// The header words of a call (paracomm._signature.header); throws naming `header` when there are too many.
void set_call_header(NcclCall& call, const std::vector<int64_t>& header) {
  PARACOMM_CHECK(header.size() <= static_cast<size_t>(kMaxHeaderWords), "header must have at most ", kMaxHeaderWords,
                 " words, got ", header.size());
  for (size_t w = 0; w < header.size(); ++w) call.header.v[w] = header[w];
  call.header_words = static_cast<int32_t>(header.size());
}

void bind_nccl(py::module_& m) {
  m.def(
      "nccl_unique_id",
      []() {
        ncclUniqueId id;
        {
          py::gil_scoped_release release;
          PARACOMM_NCCL_CHECK(ncclGetUniqueId(&id), nullptr);
        }
        return py::bytes(id.internal, NCCL_UNIQUE_ID_BYTES);
      },
      "A fresh ncclUniqueId (NCCL_UNIQUE_ID_BYTES = 128 bytes) for rank 0 to share with the other ranks.");

  py::class_<NcclComm, NcclCommHolder>(m, "NcclComm",
                                       "paracomm's NCCL communicator: a blocking data path, its own stream and a "
                                       "watchdog (csrc/allreduce/nccl_comm.h).")
      .def(py::init([](py::bytes unique_id, int world_size, int rank, int device, double timeout_s) {
             std::string id = unique_id;  // copied while the GIL is held
             py::gil_scoped_release release;
             return NcclCommHolder(new NcclComm(id, world_size, rank, device, timeout_s));
           }),
           py::arg("unique_id"), py::arg("world_size"), py::arg("rank"), py::arg("device"), py::arg("timeout_s"),
           "Joins the communicator (blocks until every rank has joined; raises after timeout_s seconds, on bad "
           "arguments, on NCCL errors, or when the NCCL loaded at run time is older than the one paracomm was "
           "compiled against).")
      .def(
          "all_reduce",
          [](NcclComm& self, uintptr_t ptr, int64_t numel, int64_t dtype, double divisor, int64_t wire_dtype,
             uintptr_t scale_ptr, uintptr_t found_inf_ptr, uintptr_t workspace_ptr, int64_t workspace_bytes,
             uintptr_t stream, int64_t algorithm, int64_t chunk_bytes, const std::string& collective,
             uintptr_t input_ptr, const std::vector<int32_t>& node_map, const std::vector<int64_t>& header) {
            NcclCall call;
            call.collective = collective_from_name(collective, "collective");
            call.input = as_ptr<const void>(input_ptr);
            call.node_of = node_map;
            set_call_header(call, header);
            call.data = as_ptr<void>(ptr);
            call.numel = numel;
            call.dtype = dtype_from_code(dtype, "dtype");
            PARACOMM_CHECK(wire_dtype == kNoWire || (wire_dtype >= 0 && wire_dtype <= 5),
                           "wire_dtype must be -1 (none) or a DType code, got ", wire_dtype);
            call.wire_dtype = static_cast<int32_t>(wire_dtype);
            call.divisor = divisor;
            call.scale = as_ptr<const float>(scale_ptr);
            call.found_inf = as_ptr<float>(found_inf_ptr);
            call.workspace = as_ptr<void>(workspace_ptr);
            call.workspace_bytes = workspace_bytes;
            call.algorithm = algorithm_from_code(algorithm);
            call.chunk_bytes = chunk_bytes;
            py::gil_scoped_release release;
            self.all_reduce(call, as_ptr<CUstream_st>(stream));
          },
          py::arg("ptr"), py::arg("numel"), py::arg("dtype"), py::arg("divisor"), py::arg("wire_dtype"),
          py::arg("scale_ptr"), py::arg("found_inf_ptr"), py::arg("workspace_ptr"), py::arg("workspace_bytes"),
          py::arg("stream"), py::arg("algorithm"), py::arg("chunk_bytes"), py::arg("collective") = "all_reduce",
          py::arg("input_ptr") = 0, py::arg("node_map") = std::vector<int32_t>{},
          py::arg("header") = std::vector<int64_t>{},
          "One collective through the raw pointers (the name is historical). collective 'all_reduce' (default): "
          "in-place all_reduce of numel elements at device address `ptr` (DType code `dtype`: 0 float32, "
          "1 float16, 2 bfloat16, 3 float64, 4 int32, 5 int64), enqueued on cudaStream_t `stream` without host "
          "synchronisation, running the plan of `algorithm` (0 ring, 1 direct, 2 one_shot; see "
          "csrc/allreduce/plan.h). divisor: N for avg, else 1 (exactly 1 for integers). wire_dtype: -1 or 1/2 "
          "(float16/bfloat16, float32 data only). scale_ptr / found_inf_ptr: 1-element float32 device buffers "
          "or 0. workspace: >= the workspace_bytes of _C.plan_summary(...) for the same call (backend 'nccl', "
          "this rank); it and "
          "every other buffer may be freed (on `stream`) as soon as this returns (the call is synchronous: `stream` waits for it). chunk_bytes: 0 for the plan's "
          "default, else bytes of the wire dtype per piece. Raises (nothing enqueued) on invalid arguments, a "
          "stream that is capturing a CUDA graph, or a failed/aborted communicator; raises after aborting the "
          "communicator if enqueuing fails midway. collective 'reduce_scatter' / 'all_gather': `ptr` is the "
          "output (numel / world_size x numel elements) and `input_ptr` the input (world_size x numel / numel), "
          "numel as PlanSpec::numel (plan.h). algorithm 3: hierarchical (needs node_map, rank -> node). header: "
          "the call's signature header words (paracomm._signature.header), exchanged and compared on the device "
          "when non-empty (a mismatch fails the communicator; see mismatch_headers).")
      .def("mismatch_headers", &NcclComm::mismatch_headers, py::call_guard<py::gil_scoped_release>(),
           "Every rank's signature header (list per rank) after the per-call check failed the communicator; [] "
           "otherwise.")
      .def("close", &NcclComm::close, py::call_guard<py::gil_scoped_release>(),
           "Waits for pending work (bounded by timeout_s: a call past its deadline fails the communicator), then "
           "finalizes it, or aborts it if it failed; later calls raise. What destruction does. Idempotent.")
      .def_property_readonly(
          "reduce_stream", [](const NcclComm& self) { return reinterpret_cast<uintptr_t>(self.reduce_stream()); },
          "cudaStream_t (int) of paracomm's reduce stream: every call's completion is recorded there last.")
      .def("check", &NcclComm::check, py::call_guard<py::gil_scoped_release>(),
           "Raises if the communicator has failed (asynchronous NCCL error, timeout) or been aborted.")
      .def("abort", &NcclComm::abort, py::call_guard<py::gil_scoped_release>(),
           "Aborts the communicator (ncclCommAbort, by its watchdog); every later call raises. Idempotent.")
      .def_property_readonly("rank", &NcclComm::rank)
      .def_property_readonly("world_size", &NcclComm::world_size)
      .def_property_readonly("device", &NcclComm::device)
      .def_property_readonly("timeout_s", &NcclComm::timeout_s)
      .def_property_readonly("last_enqueue_us", &NcclComm::last_enqueue_us,
                             "Host microseconds the last all_reduce spent enqueuing (plan lookup, checks, NCCL "
                             "groups and kernel launches), for the benchmark.");
  bind_nccl_tensor(m);  // after NcclComm's registration: its signature names the class
}

}  // namespace paracomm
