// paracomm._C.ShmComm: the shared-memory transport (csrc/shm/shm_comm.h) for paracomm/_shm.py. Pointers cross as
// integers (the caller's tensors' data_ptr()); every call releases the GIL while it waits and copies.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>

#include "checks.h"
#include "shm/shm_comm.h"

namespace py = pybind11;

namespace paracomm {

void bind_shm(py::module_& m) {
  py::class_<shm::ShmComm, std::shared_ptr<shm::ShmComm>>(
      m, "ShmComm", "Shared-memory transport of one Communicator's ranks on one host (csrc/shm/shm_comm.h).")
      .def(py::init<const std::string&, bool, int, int>(), py::arg("name"), py::arg("create"), py::arg("rank"),
           py::arg("world_size"),
           "create=True: a new segment with a random name (rank 0); else map the segment `name`.")
      .def_property_readonly("name", &shm::ShmComm::name)
      .def_property_readonly("rank", &shm::ShmComm::rank)
      .def_property_readonly("world_size", &shm::ShmComm::world_size)
      .def_property_readonly("slot_bytes", &shm::ShmComm::slot_bytes)
      .def_property_readonly("segment_bytes", &shm::ShmComm::segment_bytes)
      .def("attach_peers", &shm::ShmComm::attach_peers, py::arg("timeout_s"),
           py::call_guard<py::gil_scoped_release>(), "After every rank mapped the segment: watch the peers' pids.")
      .def_static("unlink", &shm::ShmComm::unlink_name, py::arg("name"), "shm_unlink(name); False if already gone.")
      .def("fail", &shm::ShmComm::fail, "Mark this rank failed and wake its peers (they raise).")
      .def("resolve_algorithm", &shm::ShmComm::resolve_algorithm, py::arg("numel"), py::arg("dtype"),
           py::arg("wire_dtype"), py::arg("algorithm"))
      .def(
          "all_reduce",
          [](shm::ShmComm& self, uintptr_t data, int64_t numel, int dtype, int wire_dtype, int algorithm,
             double divisor, uintptr_t scale, uintptr_t found_inf, bool has_final_op, int64_t chunk_bytes,
             const std::vector<int64_t>& signature, double timeout_s) {
            PARACOMM_CHECK(dtype >= 0 && dtype <= static_cast<int>(DType::kInt64), "shm: bad dtype code ", dtype);
            shm::CallArgs a;
            a.data = reinterpret_cast<void*>(data);
            a.numel = numel;
            a.dtype = static_cast<DType>(dtype);
            a.wire_dtype = wire_dtype;
            a.algorithm = algorithm;
            a.divisor = divisor;
            a.scale = reinterpret_cast<const float*>(scale);
            a.found_inf = reinterpret_cast<float*>(found_inf);
            a.has_final_op = has_final_op;
            a.chunk_bytes = chunk_bytes;
            a.timeout_s = timeout_s;
            std::vector<std::vector<int64_t>> mismatch;
            {
              py::gil_scoped_release release;
              mismatch = self.all_reduce(a, signature);
            }
            if (mismatch.empty()) return py::object(py::none());
            return py::object(py::cast(mismatch));
          },
          py::arg("data"), py::arg("numel"), py::arg("dtype"), py::arg("wire_dtype"), py::arg("algorithm"),
          py::arg("divisor"), py::arg("scale"), py::arg("found_inf"), py::arg("has_final_op"), py::arg("chunk_bytes"),
          py::arg("signature"), py::arg("timeout_s"),
          "One all-reduce in place on `numel` elements at `data` (DType code `dtype`; wire -1: none; algorithm "
          "-1: auto, else 0 ring / 1 direct / 2 one_shot; scale/found_inf: float32 pointers or 0). None on "
          "success; on a signature mismatch every rank's signature (nothing written). Raises RuntimeError on a "
          "dead or failed peer or the timeout.");
}

}  // namespace paracomm
