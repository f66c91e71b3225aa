// Error handling for paracomm's torch-free core.
//
// Library code never exits: every failure throws paracomm::Error whose text starts with "paracomm:" and ends
// with the file:line that raised it. pybind11 and the torch dispatcher both turn it into a Python RuntimeError.
// CUDA and NCCL failures name the error (cudaGetErrorName / ncclGetErrorString) and, for NCCL, the
// communicator's last error text (ncclGetLastError), which is where NCCL explains *why*.
#pragma once

#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>

namespace paracomm {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Strips the directories from __FILE__ so messages read "schedule.cpp:42", not a build machine's path.
inline const char* base_name(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash ? slash + 1 : path;
}

template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

[[noreturn]] inline void throw_error(const char* file, int line, const std::string& msg) {
  throw Error(concat("paracomm: ", msg, " [", base_name(file), ":", line, "]"));
}

}  // namespace paracomm

#define PARACOMM_CHECK(cond, ...)                                                     \
  do {                                                                                \
    if (!(cond)) ::paracomm::throw_error(__FILE__, __LINE__, ::paracomm::concat(__VA_ARGS__)); \
  } while (0)

#define PARACOMM_THROW(...) ::paracomm::throw_error(__FILE__, __LINE__, ::paracomm::concat(__VA_ARGS__))

#if defined(PARACOMM_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

#define PARACOMM_CUDA_CHECK(expr)                                                                  \
  do {                                                                                             \
    cudaError_t paracomm_err_ = (expr);                                                            \
    if (paracomm_err_ != cudaSuccess)                                                              \
      PARACOMM_THROW("CUDA error ", cudaGetErrorName(paracomm_err_), " (",                         \
                     cudaGetErrorString(paracomm_err_), ") in ", #expr);                           \
  } while (0)

// Checks the last kernel launch (launch-configuration errors only; kernels run asynchronously).
#define PARACOMM_CUDA_CHECK_LAUNCH() PARACOMM_CUDA_CHECK(cudaGetLastError())
#endif

#if defined(PARACOMM_WITH_NCCL)
#include <nccl.h>

// ncclInProgress is not a failure for a non-blocking communicator: callers poll it (see nccl_comm.cpp).
#define PARACOMM_NCCL_CHECK(expr, comm)                                                            \
  do {                                                                                             \
    ncclResult_t paracomm_res_ = (expr);                                                           \
    if (paracomm_res_ != ncclSuccess && paracomm_res_ != ncclInProgress) {                         \
      const char* paracomm_last_ = (comm) ? ncclGetLastError(comm) : ncclGetLastError(nullptr);    \
      PARACOMM_THROW("NCCL error ", ncclGetErrorString(paracomm_res_), " in ", #expr,               \
                     (paracomm_last_ && *paracomm_last_) ? ": " : "",                              \
                     paracomm_last_ ? paracomm_last_ : "");                                        \
    }                                                                                              \
  } while (0)
#endif
