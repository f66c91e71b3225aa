// paracomm's NCCL communicator (torch-free): a non-blocking ncclComm_t, its own stream and events, and a
// watchdog thread that turns hangs and asynchronous NCCL errors into exceptions instead of stuck processes.
//
// Lifecycle
//   * Construction initialises a non-blocking communicator (ncclConfig_t.blocking = 0) and polls
//     ncclCommGetAsyncError until it is ready; past timeout_s it aborts and throws.
//   * all_reduce enqueues the ring (nccl_ring.h) and hands the call's completion event and deadline
//     (now + timeout_s) to the watchdog. It never synchronises with the device.
//   * The watchdog polls every pending completion event and ncclCommGetAsyncError. On an error or an expired
//     deadline it aborts the communicator (ncclCommAbort, which also releases kernels spinning on a dead
//     peer) and records why; every later all_reduce/check() throws paracomm::Error with that reason.
//   * The destructor stops the watchdog, then finalizes and destroys a healthy communicator (bounded by
//     timeout_s, aborting past it) or leaves an aborted one alone.
// Thread safety: every NCCL call on the communicator happens under one mutex (ncclCommGetAsyncError may
// complete NCCL's pending group work, so even the watchdog's polls are serialised with enqueues).
#pragma once

// This transport exists only in builds that link NCCL; checks.h defines PARACOMM_NCCL_CHECK under this macro.
#ifndef PARACOMM_WITH_NCCL
#define PARACOMM_WITH_NCCL 1
#endif

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "checks.h"
#include "ring/nccl_ring.h"

namespace paracomm {

class NcclComm {
 public:
  // unique_id: the NCCL_UNIQUE_ID_BYTES bytes of an ncclUniqueId (rank 0's ncclGetUniqueId, shared by all
  // ranks). device: the CUDA device of this rank. timeout_s: bound on init, on every NCCL enqueue, and on
  // each all_reduce's completion. Blocks until the communicator is ready; throws paracomm::Error on bad
  // arguments, NCCL failure or timeout (the calling thread's current CUDA device is left unchanged).
  NcclComm(const std::string& unique_id, int world_size, int rank, int device, double timeout_s);
  ~NcclComm();
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  // One in-place all_reduce of buf.data on `stream` (the caller's stream, on this communicator's device);
  // see nccl_ring.h for the ring and /work/briefs/nccl_api.md for the contract. spec.has_scale and
  // spec.has_found_inf are taken from the buffers. Throws paracomm::Error if the communicator failed or
  // was aborted, on invalid arguments (then nothing was enqueued), or if enqueuing fails midway (then the
  // communicator is aborted, since the peers cannot finish this ring).
  void all_reduce(RingAllReduceSpec spec, const RingBuffers& buf, cudaStream_t stream);

  // Throws paracomm::Error if the communicator has failed (asynchronous NCCL error, timeout, abort()).
  void check();
  // Aborts the communicator now (ncclCommAbort); later calls throw. Idempotent.
  void abort();

  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  int device() const { return device_; }
  double timeout_s() const { return timeout_s_; }

 private:
  using Clock = std::chrono::steady_clock;
  struct Pending {
    cudaEvent_t done;
    Clock::time_point deadline;
    uint64_t seq;
  };

  Clock::time_point deadline_from_now() const;
  // All *_locked functions expect mu_ held.
  [[noreturn]] void throw_failed_locked() const;
  void fail_locked(const std::string& reason);  // records the first reason, aborts the communicator
  void settle_locked(ncclResult_t result, const char* what, Clock::time_point deadline);
  void wait_ready_locked(const char* what, Clock::time_point deadline);
  void poll_locked();  // one watchdog round
  void recycle_pending_locked();
  cudaEvent_t take_completion_event_locked();
  void watchdog_loop();
  void release_cuda_resources() noexcept;

  const int world_size_;
  const int rank_;
  const int device_;
  const double timeout_s_;

  mutable std::mutex mu_;
  std::condition_variable wake_;
  ncclComm_t comm_ = nullptr;  // null once aborted/destroyed
  bool failed_ = false;
  std::string failure_;
  bool stop_ = false;
  uint64_t next_seq_ = 0;

  cudaStream_t comm_stream_ = nullptr;
  RingEvents events_;
  std::deque<Pending> pending_;             // enqueued all_reduces not yet seen complete
  std::vector<cudaEvent_t> free_events_;    // completion events ready for reuse
  std::vector<cudaEvent_t> all_events_;     // every completion event ever created (destroyed at the end)
  std::thread watchdog_;
};

}  // namespace paracomm
