#include "ring/nccl_comm.h"

#include <cmath>
#include <cstring>
#include <exception>

namespace paracomm {

namespace {

// Makes `device` current for a scope and restores the caller's device afterwards (torch keeps its own notion
// of the current device; a communicator call must not change it).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    PARACOMM_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) {
      PARACOMM_CUDA_CHECK(cudaSetDevice(device));
      changed_ = true;
    }
  }
  ~DeviceGuard() {
    if (changed_) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

// NCCL's name for `result` plus its explanation of the last failure, when it has one.
std::string nccl_error_text(ncclResult_t result, ncclComm_t comm) {
  const char* last = ncclGetLastError(comm);
  return concat(ncclGetErrorString(result), (last && *last) ? ": " : "", last ? last : "");
}

// Polling intervals of the watchdog: tight while an all_reduce is in flight, relaxed when idle (it still
// watches for asynchronous errors then, so check() reports a dead peer promptly).
constexpr auto kPollBusy = std::chrono::milliseconds(2);
constexpr auto kPollIdle = std::chrono::milliseconds(50);

}  // namespace

NcclComm::NcclComm(const std::string& unique_id, int world_size, int rank, int device, double timeout_s)
    : world_size_(world_size), rank_(rank), device_(device), timeout_s_(timeout_s) {
  PARACOMM_CHECK(unique_id.size() == NCCL_UNIQUE_ID_BYTES, "NcclComm: unique_id must be ", NCCL_UNIQUE_ID_BYTES,
                 " bytes (nccl_unique_id()), got ", unique_id.size());
  PARACOMM_CHECK(world_size >= 1, "NcclComm: world_size must be >= 1, got ", world_size);
  PARACOMM_CHECK(rank >= 0 && rank < world_size, "NcclComm: rank must be in [0, ", world_size, "), got ", rank);
  PARACOMM_CHECK(std::isfinite(timeout_s) && timeout_s > 0 && timeout_s <= 1e9,
                 "NcclComm: timeout_s must be in (0, 1e9] seconds, got ", timeout_s);
  int device_count = 0;
  PARACOMM_CUDA_CHECK(cudaGetDeviceCount(&device_count));
  PARACOMM_CHECK(device >= 0 && device < device_count, "NcclComm: device must be in [0, ", device_count,
                 "), got ", device);

  DeviceGuard guard(device_);
  try {
    PARACOMM_CUDA_CHECK(cudaStreamCreateWithFlags(&comm_stream_, cudaStreamNonBlocking));
    auto make_event = [](cudaEvent_t* e) { PARACOMM_CUDA_CHECK(cudaEventCreateWithFlags(e, cudaEventDisableTiming)); };
    make_event(&events_.start);
    make_event(&events_.end);
    for (auto& e : events_.transfer) make_event(&e);
    for (auto& e : events_.local) make_event(&e);

    ncclUniqueId id;
    std::memcpy(id.internal, unique_id.data(), NCCL_UNIQUE_ID_BYTES);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;  // every call returns at once; we poll with our own deadline instead of hanging
    const Clock::time_point deadline = deadline_from_now();

    std::lock_guard<std::mutex> lock(mu_);
    const ncclResult_t r = ncclCommInitRankConfig(&comm_, world_size_, id, rank_, &config);
    if (r != ncclSuccess && r != ncclInProgress) {
      PARACOMM_THROW("NcclComm: ncclCommInitRankConfig failed (rank ", rank_, " of ", world_size_, ", device ",
                     device_, "): ", nccl_error_text(r, comm_));
    }
    wait_ready_locked("communicator initialisation", deadline);
  } catch (...) {
    if (comm_ != nullptr) {
      (void)ncclCommAbort(comm_);  // stops an init still in progress (e.g. waiting for absent ranks)
      comm_ = nullptr;
    }
    release_cuda_resources();
    throw;
  }
  watchdog_ = std::thread([this] { watchdog_loop(); });
}

NcclComm::~NcclComm() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
  try {
    DeviceGuard guard(device_);
    std::lock_guard<std::mutex> lock(mu_);
    if (comm_ != nullptr) {
      // Healthy: finalize (flushes outstanding work; non-blocking, so poll it) then destroy. If that fails or
      // outlives the timeout, abort instead: a destructor must not hang on a dead peer.
      bool finalized = false;
      try {
        const Clock::time_point deadline = deadline_from_now();
        settle_locked(ncclCommFinalize(comm_), "ncclCommFinalize", deadline);
        finalized = true;
      } catch (...) {
      }
      (void)(finalized ? ncclCommDestroy(comm_) : ncclCommAbort(comm_));
      comm_ = nullptr;
    }
    recycle_pending_locked();
  } catch (...) {
    // Destructors do not throw (this can run at interpreter exit, when CUDA may already be unloading).
  }
  release_cuda_resources();
}

void NcclComm::release_cuda_resources() noexcept {
  auto destroy = [](cudaEvent_t& e) {
    if (e != nullptr) (void)cudaEventDestroy(e);
    e = nullptr;
  };
  destroy(events_.start);
  destroy(events_.end);
  for (auto& e : events_.transfer) destroy(e);
  for (auto& e : events_.local) destroy(e);
  for (auto& e : all_events_) destroy(e);
  all_events_.clear();
  free_events_.clear();
  pending_.clear();
  if (comm_stream_ != nullptr) (void)cudaStreamDestroy(comm_stream_);
  comm_stream_ = nullptr;
}

NcclComm::Clock::time_point NcclComm::deadline_from_now() const {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s_));
}

void NcclComm::throw_failed_locked() const {
  PARACOMM_THROW("NcclComm (rank ", rank_, " of ", world_size_, ") is unusable: ", failure_);
}

void NcclComm::fail_locked(const std::string& reason) {
  if (failed_) return;  // keep the first reason: later ones are consequences
  failed_ = true;
  failure_ = reason;
  if (comm_ != nullptr) {
    // Sets NCCL's abort flag (kernels spinning on a dead peer return) and reclaims the communicator; for a
    // non-blocking communicator the reclaim may finish in the background (ncclInProgress). Either way the
    // handle must not be touched again.
    (void)ncclCommAbort(comm_);
    comm_ = nullptr;
  }
  recycle_pending_locked();
}

void NcclComm::wait_ready_locked(const char* what, Clock::time_point deadline) {
  for (int spin = 0;; ++spin) {
    ncclResult_t state = ncclInProgress;
    const ncclResult_t q = ncclCommGetAsyncError(comm_, &state);
    if (q != ncclSuccess) {
      PARACOMM_THROW("NcclComm (rank ", rank_, " of ", world_size_, "): ncclCommGetAsyncError failed during ",
                     what, ": ", nccl_error_text(q, comm_));
    }
    if (state == ncclSuccess) return;
    if (state != ncclInProgress) {
      PARACOMM_THROW("NcclComm (rank ", rank_, " of ", world_size_, "): ", what, " failed: ",
                     nccl_error_text(state, comm_));
    }
    if (Clock::now() >= deadline) {
      PARACOMM_THROW("NcclComm (rank ", rank_, " of ", world_size_, "): ", what, " did not complete within ",
                     timeout_s_, " s");
    }
    if (spin < 256) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  }
}

void NcclComm::settle_locked(ncclResult_t result, const char* what, Clock::time_point deadline) {
  if (result == ncclSuccess) return;
  if (result == ncclInProgress) {
    // Non-blocking communicator: the call continues in the background and no other NCCL call (nor CUDA work
    // that depends on it) may be issued until the communicator's state leaves ncclInProgress.
    wait_ready_locked(what, deadline);
    return;
  }
  PARACOMM_NCCL_CHECK(result, comm_);  // throws: result is an error
}

cudaEvent_t NcclComm::take_completion_event_locked() {
  if (!free_events_.empty()) {
    cudaEvent_t e = free_events_.back();
    free_events_.pop_back();
    return e;
  }
  cudaEvent_t e = nullptr;
  PARACOMM_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  all_events_.push_back(e);
  return e;
}

void NcclComm::recycle_pending_locked() {
  for (const Pending& p : pending_) free_events_.push_back(p.done);
  pending_.clear();
}

void NcclComm::all_reduce(RingAllReduceSpec spec, const RingBuffers& buf, cudaStream_t stream) {
  spec.has_scale = buf.scale != nullptr;
  spec.has_found_inf = buf.found_inf != nullptr;
  std::unique_lock<std::mutex> lock(mu_);
  if (failed_) throw_failed_locked();
  const uint64_t seq = next_seq_++;
  const Clock::time_point enqueue_deadline = deadline_from_now();
  DeviceGuard guard(device_);

  bool nccl_issued = false;
  RingExecContext ctx;
  ctx.comm = comm_;
  ctx.rank = rank_;
  ctx.world_size = world_size_;
  ctx.comm_stream = comm_stream_;
  ctx.stream = stream;
  ctx.events = &events_;
  ctx.settle = [this, enqueue_deadline](ncclResult_t r, const char* what) { settle_locked(r, what, enqueue_deadline); };
  ctx.nccl_issued = &nccl_issued;
  try {
    enqueue_ring_all_reduce(ctx, spec, buf);
    if (nccl_issued) {
      // The caller's stream has waited for the comm stream, so this event completes with the whole call.
      cudaEvent_t done = take_completion_event_locked();
      const cudaError_t r = cudaEventRecord(done, stream);
      if (r != cudaSuccess) free_events_.push_back(done);
      PARACOMM_CUDA_CHECK(r);
      pending_.push_back(Pending{done, deadline_from_now(), seq});
    }
  } catch (const std::exception& e) {
    // Before the first NCCL call nothing was sent: the refusal leaves the communicator usable. After it, the
    // peers are mid-ring and would wait forever: abort so that they fail too (through their own watchdogs).
    if (nccl_issued) fail_locked(concat("all_reduce #", seq, " failed while being enqueued: ", e.what()));
    throw;
  }
  lock.unlock();
  wake_.notify_one();
}

void NcclComm::check() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!failed_ && comm_ != nullptr) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t q = ncclCommGetAsyncError(comm_, &state);
    if (q != ncclSuccess) {
      fail_locked(concat("ncclCommGetAsyncError failed: ", nccl_error_text(q, comm_)));
    } else if (state != ncclSuccess && state != ncclInProgress) {
      fail_locked(concat("asynchronous NCCL error: ", nccl_error_text(state, comm_)));
    }
  }
  if (failed_) throw_failed_locked();
}

void NcclComm::abort() {
  std::lock_guard<std::mutex> lock(mu_);
  if (failed_) return;
  DeviceGuard guard(device_);
  fail_locked("aborted by NcclComm.abort()");
}

void NcclComm::poll_locked() {
  if (failed_ || comm_ == nullptr) {
    recycle_pending_locked();
    return;
  }
  ncclResult_t state = ncclSuccess;
  const ncclResult_t q = ncclCommGetAsyncError(comm_, &state);
  if (q != ncclSuccess) {
    fail_locked(concat("ncclCommGetAsyncError failed: ", nccl_error_text(q, comm_)));
    return;
  }
  if (state != ncclSuccess && state != ncclInProgress) {
    fail_locked(concat("asynchronous NCCL error (a peer may have died): ", nccl_error_text(state, comm_)));
    return;
  }
  const Clock::time_point now = Clock::now();
  for (auto it = pending_.begin(); it != pending_.end();) {
    const cudaError_t r = cudaEventQuery(it->done);
    if (r == cudaSuccess) {
      free_events_.push_back(it->done);
      it = pending_.erase(it);
      continue;
    }
    (void)cudaGetLastError();  // a not-ready query must not linger as this thread's last error
    if (r != cudaErrorNotReady) {
      fail_locked(concat("all_reduce #", it->seq, ": CUDA error ", cudaGetErrorName(r), " (", cudaGetErrorString(r),
                         ") while waiting for it to complete"));
      return;
    }
    if (now >= it->deadline) {
      fail_locked(concat("all_reduce #", it->seq, " did not complete within ", timeout_s_,
                         " s (a peer may have died or stalled); the communicator was aborted"));
      return;
    }
    ++it;
  }
}

void NcclComm::watchdog_loop() {
  // Event queries and ncclCommAbort act on this device's context.
  (void)cudaSetDevice(device_);
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    wake_.wait_for(lock, pending_.empty() ? kPollIdle : kPollBusy);
    if (stop_) break;
    try {
      poll_locked();
    } catch (...) {
      // Only allocation failures can land here; the next round tries again.
    }
  }
}

}  // namespace paracomm
