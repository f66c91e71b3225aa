// paracomm._C's NCCL API (CUDA builds only): nccl_unique_id, nccl_workspace_bytes and the NcclComm class.
//
// Torch-free on purpose: tensors arrive as raw device pointers (int), streams as cudaStream_t values (int),
// dtypes as DType codes (csrc/dtype.h). paracomm/comm.py validates tensors, allocates the workspace on the
// current stream and calls in here. Blocking calls (construction, which waits for every rank; all_reduce,
// which may wait for NCCL to connect to its peers; abort; destruction) release the GIL.
// Contract: /work/briefs/nccl_api.md.
#include "ring/nccl_comm.h"

#include <Python.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <string>

namespace py = pybind11;

namespace paracomm {

namespace {

// Destroying a communicator may wait (finalize flushes outstanding work, bounded by timeout_s): do it
// without the GIL so other Python threads keep running.
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

RingAllReduceSpec make_spec(int64_t numel, int64_t dtype, int64_t wire_dtype, int64_t chunk_elems) {
  RingAllReduceSpec spec;
  spec.numel = numel;
  spec.dtype = dtype_from_code(dtype, "dtype");
  PARACOMM_CHECK(wire_dtype == kNoWireDType || (wire_dtype >= 0 && wire_dtype <= 5),
                 "wire_dtype must be -1 (none) or a DType code, got ", wire_dtype);
  spec.wire_dtype = static_cast<int32_t>(wire_dtype);
  spec.chunk_elems = chunk_elems;
  return spec;
}

}  // namespace

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

  m.def(
      "nccl_workspace_bytes",
      [](int64_t numel, int64_t dtype, int64_t wire_dtype, int64_t chunk_elems) {
        return ring_workspace_layout(make_spec(numel, dtype, wire_dtype, chunk_elems)).total_bytes;
      },
      py::arg("numel"), py::arg("dtype"), py::arg("wire_dtype"), py::arg("chunk_elems"),
      "Device workspace bytes NcclComm.all_reduce needs for numel elements of DType code `dtype`, travelling as "
      "`wire_dtype` (-1: uncompressed) in chunks of chunk_elems elements: two receive buffers of "
      "min(chunk_elems, numel) travelling elements, plus numel wire elements of staging when compressed "
      "(256-byte aligned). Valid for every world size (world size 1 needs none). Raises on invalid arguments.");

  py::class_<NcclComm, NcclCommHolder>(m, "NcclComm",
                                       "A non-blocking NCCL communicator with its own stream and a watchdog "
                                       "(csrc/ring/nccl_comm.h).")
      .def(py::init([](py::bytes unique_id, int world_size, int rank, int device, double timeout_s) {
             std::string id = unique_id;  // copied while the GIL is held
             py::gil_scoped_release release;
             return NcclCommHolder(new NcclComm(id, world_size, rank, device, timeout_s));
           }),
           py::arg("unique_id"), py::arg("world_size"), py::arg("rank"), py::arg("device"), py::arg("timeout_s"),
           "Joins the communicator (blocks until every rank has joined; raises after timeout_s seconds, or on "
           "bad arguments / NCCL errors).")
      .def(
          "all_reduce",
          [](NcclComm& self, uintptr_t ptr, int64_t numel, int64_t dtype, double divisor, int64_t wire_dtype,
             uintptr_t scale_ptr, uintptr_t found_inf_ptr, uintptr_t workspace_ptr, int64_t workspace_bytes,
             uintptr_t stream, int64_t chunk_elems) {
            RingAllReduceSpec spec = make_spec(numel, dtype, wire_dtype, chunk_elems);
            spec.divisor = divisor;
            RingBuffers buf;
            buf.data = as_ptr<void>(ptr);
            buf.scale = as_ptr<const float>(scale_ptr);
            buf.found_inf = as_ptr<float>(found_inf_ptr);
            buf.workspace = as_ptr<void>(workspace_ptr);
            buf.workspace_bytes = workspace_bytes;
            py::gil_scoped_release release;
            self.all_reduce(spec, buf, as_ptr<CUstream_st>(stream));
          },
          py::arg("ptr"), py::arg("numel"), py::arg("dtype"), py::arg("divisor"), py::arg("wire_dtype"),
          py::arg("scale_ptr"), py::arg("found_inf_ptr"), py::arg("workspace_ptr"), py::arg("workspace_bytes"),
          py::arg("stream"), py::arg("chunk_elems"),
          "In-place ring all_reduce of numel elements at device address `ptr` (DType code `dtype`), enqueued on "
          "cudaStream_t `stream` without host synchronisation. divisor: N for avg, else 1. wire_dtype: -1 or "
          "1/2 (float16/bfloat16, float32 data only). scale_ptr/found_inf_ptr: 1-element float32 device "
          "buffers or 0. workspace: >= nccl_workspace_bytes(...) device bytes, may be freed (on `stream`) as "
          "soon as this returns. Raises if the communicator has failed or been aborted, or on invalid arguments "
          "(nothing enqueued then).")
      .def("check", &NcclComm::check, py::call_guard<py::gil_scoped_release>(),
           "Raises if the communicator has failed (asynchronous NCCL error, timeout) or been aborted.")
      .def("abort", &NcclComm::abort, py::call_guard<py::gil_scoped_release>(),
           "Aborts the communicator (ncclCommAbort); every later call raises. Idempotent.")
      .def_property_readonly("rank", &NcclComm::rank)
      .def_property_readonly("world_size", &NcclComm::world_size)
      .def_property_readonly("device", &NcclComm::device)
      .def_property_readonly("timeout_s", &NcclComm::timeout_s);
}

}  // namespace paracomm
