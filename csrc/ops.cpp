// Every paracomm operator schema, in one TORCH_LIBRARY block, and the pybind11 module paracomm._C.
//
// Implementations live elsewhere: csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(paracomm, CPU)) and csrc/cuda/*
// (TORCH_LIBRARY_IMPL(paracomm, CUDA)); paracomm/_ops.py registers a fake (meta) kernel for each op.
// Mutated arguments are declared Tensor(x!) so torch.compile and functionalization see the writes.
#include <torch/library.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "checks.h"
#include "cpu/half_convert.h"

namespace paracomm {
void bind_plans(pybind11::module_& m);  // csrc/plan_binding.cpp
void bind_shm(pybind11::module_& m);    // csrc/shm/shm_binding.cpp
void bind_gloo_work(pybind11::module_& m);  // csrc/cpu/gloo_work.cpp
}

#ifdef PARACOMM_WITH_CUDA
#include <cuda_runtime_api.h>
#include <nccl.h>
namespace paracomm {
void bind_nccl(pybind11::module_& m);  // csrc/cuda/nccl_binding.cpp
}
#endif

TORCH_LIBRARY(paracomm, m) {
  // grads[i] *= inv_scale in place; found_inf = 1 if any grad holds inf/nan (never cleared);
  // norm, if given, = L2 norm of all unscaled values, from the same pass.
  m.def("unscale_and_check_(Tensor(a!)[] grads, Tensor inv_scale, Tensor(b!) found_inf, Tensor(c!)? norm) -> ()");
  // out[i] = float32(grads[i]) * inv_scale, grads untouched (fp32 master gradients); found_inf and norm as above.
  m.def(
      "unscale_and_check_out(Tensor[] grads, Tensor inv_scale, Tensor(a!) found_inf, Tensor(b!)[] out, "
      "Tensor(c!)? norm) -> ()");
  // One 1-D buffer of `dtype` holding the tensors back to back, each value multiplied by
  // scale (and by scale_tensor[0] when given) and cast on the way.
  m.def("flatten(Tensor[] tensors, ScalarType dtype, float scale=1.0, Tensor? scale_tensor=None) -> Tensor");
  m.def("flatten_out(Tensor[] tensors, Tensor(a!) out, float scale=1.0, Tensor? scale_tensor=None) -> ()");
  // tensors[i] = cast(flat[segment i] * scale (* scale_tensor[0])), segments consecutive in order.
  m.def("unflatten_(Tensor flat, Tensor(a!)[] tensors, float scale=1.0, Tensor? scale_tensor=None) -> ()");
  // The all-reduce's local reduction (every step of every plan, csrc/allreduce/plan.h), accumulating in fp32
  // (fp64 for float64, int64 for integers):  v = inputs[0][i] + inputs[1][i] + ... (in this order);
  // v /= divisor;  v *= scale[0];  if wire_dtype: w = cast(v), wire_out[i] = w (if given), v = w;
  // found_inf |= !isfinite(v) (the stored value, after that rounding);  out[i] = cast(v).
  // An input may be the very tensor out or wire_out is (each element is read before it is written).
  m.def(
      "reduce_(Tensor(a!) out, Tensor[] inputs, float divisor=1.0, Tensor? scale=None, Tensor(b!)? found_inf=None, "
      "ScalarType? wire_dtype=None, Tensor(c!)? wire_out=None) -> ()");
}

namespace py = pybind11;

static py::dict build_info() {
  py::dict info;
#ifdef PARACOMM_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = py::str(std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10));
  info["nccl_version"] =
      py::str(std::to_string(NCCL_MAJOR) + "." + std::to_string(NCCL_MINOR) + "." + std::to_string(NCCL_PATCH));
  int loaded = 0;
  if (ncclGetVersion(&loaded) == ncclSuccess) {
    // NCCL >= 2.9 encodes major*10000 + minor*100 + patch.
    info["nccl_version_loaded"] = py::str(std::to_string(loaded / 10000) + "." + std::to_string(loaded % 10000 / 100) +
                                          "." + std::to_string(loaded % 100));
  } else {
    info["nccl_version_loaded"] = py::none();
  }
#ifdef PARACOMM_CUDA_ARCHS
  info["archs"] = py::str(PARACOMM_CUDA_ARCHS);
#else
  info["archs"] = py::none();
#endif
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["nccl_version"] = py::none();
  info["nccl_version_loaded"] = py::none();
  info["archs"] = py::none();
#endif
  return info;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "paracomm's compiled core: torch ops are registered under torch.ops.paracomm on import.";
  m.def("build_info", &build_info, "What this build of paracomm._C was compiled with.");
  m.def("cpu_half_convert_vectorised", &paracomm::half_convert_is_vectorised,
        "True when the CPU ops convert float16/bfloat16 with AVX2/F16C (csrc/cpu/half_convert.h).");

  paracomm::bind_plans(m);
  paracomm::bind_shm(m);
  paracomm::bind_gloo_work(m);
  py::register_exception<paracomm::Error>(m, "ParacommError", PyExc_RuntimeError);

#ifdef PARACOMM_WITH_CUDA
  paracomm::bind_nccl(m);
#endif
}
