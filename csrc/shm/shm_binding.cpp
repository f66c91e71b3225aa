// paracomm._C.ShmComm: the shared-memory transport (csrc/shm/shm_comm.h) for paracomm/_shm.py. Pointers cross as
// integers (the caller's tensors' data_ptr()); every call releases the GIL while it waits and copies.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <vector>

#include "dtype.h"

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
      .def_property_readonly("eager_bytes", &shm::ShmComm::eager_bytes)
      .def(
          "wait_stats",
          [](const shm::ShmComm& self) {
            const shm::ShmComm::WaitStats w = self.wait_stats();
            py::dict d;
            d["sleeps"] = w.sleeps;
            d["slept_s"] = w.slept_s;
            d["wakes"] = w.wakes;
            d["moves"] = w.moves;
            return d;
          },
          "This rank's waits so far: {'sleeps': futex sleeps, 'slept_s': seconds in them, 'wakes': futex wakes "
          "made for sleeping peers, 'moves': moves off a core shared with a peer}.")
      .def(
          "prepare",
          [](shm::ShmComm& self, int collective, int64_t numel, int dtype, int wire_dtype, int algorithm,
             double divisor, bool has_found_inf, bool has_final_op, int64_t chunk_bytes,
             const std::vector<int32_t>& node_of, const std::vector<int64_t>& signature) {
            PARACOMM_CHECK(dtype >= 0 && dtype <= static_cast<int>(DType::kInt64), "shm: bad dtype code ", dtype);
            shm::CallArgs a;
            a.collective = collective;
            a.numel = numel;
            a.dtype = static_cast<DType>(dtype);
            a.wire_dtype = wire_dtype;
            a.algorithm = algorithm;
            a.divisor = divisor;
            a.has_found_inf = has_found_inf;
            a.has_final_op = has_final_op;
            a.chunk_bytes = chunk_bytes;
            a.node_of = node_of;
            return self.prepare(a, signature);
          },
          py::arg("collective"), py::arg("numel"), py::arg("dtype"), py::arg("wire_dtype"), py::arg("algorithm"),
          py::arg("divisor"), py::arg("has_found_inf"), py::arg("has_final_op"), py::arg("chunk_bytes"),
          py::arg("node_of"), py::arg("signature"),
          "A call's constant part (plan and analyses) for `run`: collective 0 all_reduce / 1 reduce_scatter / 2 "
          "all_gather; numel the plan's (plan.h); DType codes; wire -1: none; algorithm -1: auto (node map "
          "aware), else 0 ring / 1 direct / 2 one_shot / 3 hierarchical; node_of: rank -> node, [] for one node.")
      .def(
          "run",
          [](shm::ShmComm& self, const shm::ShmComm::Prepared& p, uintptr_t data, uintptr_t input, uintptr_t scale,
             uintptr_t found_inf, double timeout_s) {
            shm::CallBuffers b;
            b.data = reinterpret_cast<void*>(data);
            b.input = reinterpret_cast<const void*>(input);
            b.scale = reinterpret_cast<const float*>(scale);
            b.found_inf = reinterpret_cast<float*>(found_inf);
            std::vector<std::vector<int64_t>> mismatch;
            {
              py::gil_scoped_release release;
              mismatch = self.run(p, b, timeout_s);
            }
            if (mismatch.empty()) return py::object(py::none());
            return py::object(py::cast(mismatch));
          },
          py::arg("prepared"), py::arg("data"), py::arg("input"), py::arg("scale"), py::arg("found_inf"),
          py::arg("timeout_s"),
          "One call of a prepared plan: output at `data`, input at `input` (0 for all-reduce), scale/found_inf: "
          "float32 pointers or 0. None on success; on a signature mismatch every rank's signature (nothing "
          "written). Raises RuntimeError naming the peer on a dead or failed peer or the timeout.");
  py::class_<shm::ShmComm::Prepared, std::shared_ptr<shm::ShmComm::Prepared>>(
      m, "ShmPrepared", "A prepared shared-memory call (ShmComm.prepare): plan, analyses, signature.")
      .def_property_readonly("algorithm", [](const shm::ShmComm::Prepared& p) {
        return static_cast<int>(p.plan.spec.algorithm);
      })
      .def_property_readonly("eager_steps", [](const shm::ShmComm::Prepared& p) {
        std::vector<int> steps;
        for (size_t i = 0; i < p.eager.is_step.size(); ++i) {
          if (p.eager.is_step[i]) steps.push_back(static_cast<int>(i));
        }
        return steps;
      });
}

}  // namespace paracomm
