// paracomm's NCCL communicator (torch-free): a NON-blocking ncclComm_t for the data path, its two streams (C for
// transfers, R for reductions: nccl_executor.h), an event pool, a plan cache, and a watchdog thread that turns
// hangs and asynchronous NCCL errors into exceptions.
//
// Lifecycle
//   * Construction refuses an NCCL library older at run time (ncclGetVersion) than the headers compiled
//     against (NCCL_VERSION_CODE). It then initialises a non-blocking communicator (ncclCommInitRankConfig,
//     polled with ncclCommGetAsyncError against a deadline of timeout_s, aborted past it), and splits it
//     (ncclCommSplit, color 0, key rank, splitShare 0) into a non-blocking child used for every enqueue. NCCL
//     runs the split as a job of the parent's group, so it is polled against the same deadline; past it the
//     parent is aborted, which NCCL forwards to a child still being initialised (the parent's childAbortFlag).
//     Should a library run the split synchronously, a timer thread does that abort. The parent is then
//     released (finalize + destroy): the child shares nothing with it.
//   * all_reduce looks up (or makes and checks) the plan and its schedules (plan_waits.h) for its PlanSpec,
//     validates the call, takes the workspace from the call's services (torch's caching allocator, pool of R),
//     and runs the schedule (nccl_executor.h): enqueue only, no host synchronisation, no thread start. A warm
//     ncclGroupEnd returns ncclSuccess inline; a cold one (NCCL connecting) returns ncclInProgress and the
//     enqueue polls ncclCommGetAsyncError until the group is enqueued, against the enqueue deadline and the
//     failure flag. The call's completion event `done` and its deadline (now + timeout_s) go to the watchdog.
//   * The watchdog polls the pending completion events (cudaEventQuery) and ncclCommGetAsyncError. On an
//     asynchronous error, an expired completion deadline, an enqueue in progress past its deadline, or abort(),
//     the communicator is marked failed (every later all_reduce/check() throws with the first reason) and
//     aborted (ncclCommAbort, which also releases NCCL kernels spinning on a dead peer). It runs with the
//     thread's stream-capture mode relaxed, so its event queries never invalidate a user's global-mode capture.
//   * Destruction (or close()) first waits for healthy pending work: the watchdog keeps running and ends that
//     wait by completing the work or by failing the communicator (asynchronous error, or a call past its
//     deadline, i.e. at most timeout_s after its enqueue). It then stops the watchdog and aborts if the
//     communicator failed, else finalizes (polled, bounded by timeout_s; aborted past it) and destroys it. So a
//     Communicator dropped right after a correct async or sync call never kills that call.
//
// Per-call signature check (PARACOMM_CHECK_SHAPES != 0; paracomm/comm.py passes the header):
//   * a call with a header runs the header schedule (plan_waits.h): R writes the header into the send slot,
//     the call's first transfer group also sends it to every peer and receives every peer's (the same size on
//     every rank, so the exchange itself never mismatches, whatever the data transfers do), and a one-thread
//     kernel on R compares them once that group is done (header_check.h). A mismatch is written into
//     host-mapped memory (every rank's header and the call's sequence number); no host synchronisation.
//   * the watchdog reads that record every round (also while the call is still pending: a mismatched plan
//     may leave its data transfers waiting forever) and fails the communicator with "ranks called the
//     collective with different arguments" and every rank's header; the abort then releases NCCL. Every rank
//     sees a differing peer, so every rank fails. Work.wait() / check() / the next call raise; comm.py turns
//     mismatch_headers() into paracomm's error naming each field that differs.
//   * not poison-free: the receives of the mismatched call (and of the calls enqueued after it before the
//     watchdog saw it) may already have written foreign bytes into the outputs; they raise instead of
//     returning them (a synchronous call has returned already: its error surfaces at the next call or wait).
//
// Locking (abort is safe by construction):
//   * enqueue_mu_ serialises all_reduce calls and close() (it guards the plan cache, the step events and the
//     streams' order). Nothing blocks for long under it: every NCCL call on the non-blocking communicator
//     returns promptly, and the in-progress poll checks the failure flag and the deadline.
//   * nccl_mu_ guards every use of the communicator handle comm_: the enqueue takes it around each transfer
//     group (ncclGroupStart .. ncclGroupEnd) and each in-progress query, the watchdog around its
//     ncclCommGetAsyncError and around ncclCommAbort. So ncclCommAbort never runs concurrently with another
//     NCCL call on the communicator from another thread, and the watchdog never waits more than one
//     non-blocking NCCL call for it. comm_ is set to null (under nccl_mu_ and state_mu_) by the abort; the
//     enqueue re-reads it under nccl_mu_ for every group and stops when it is null. Lock order: enqueue_mu_,
//     then nccl_mu_, then state_mu_.
//   * state_mu_ guards the failure record, the pending completions and the free completion events. It is only
//     held for bookkeeping, never across an NCCL or CUDA call that can block.
//   * The watchdog still breaks a stall within the timeout: a call whose completion passes its deadline or an
//     enqueue still in progress past its deadline fails the communicator; the enqueue leaves at its next poll
//     (microseconds), and the abort follows under nccl_mu_.
//   * Residual (not seen, argued only): NCCL launches its kernels from inside ncclGroupEnd; if a stream's launch
//     queue were full behind a kernel spinning on a dead peer, that launch would block while nccl_mu_ is held,
//     and the watchdog's abort would wait for it. It takes ~1000 queued operations on one stream, far more than
//     one call enqueues, and every pending call's deadline fails the communicator long before.
#pragma once

#ifndef PARACOMM_WITH_NCCL
#define PARACOMM_WITH_NCCL 1
#endif

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "allreduce/nccl_executor.h"
#include "allreduce/plan.h"
#include "allreduce/plan_waits.h"
#include "checks.h"

namespace paracomm {

// One collective call as the binding passes it (device pointers, DType codes already mapped). The fields a
// plan depends on form its PlanSpec (plan.h); the executor maps output/input/workspace to the plan's buffers.
struct NcclCall {
  Collective collective = Collective::kAllReduce;
  void* data = nullptr;              // kData: the output (all-reduce: numel elements, reduced in place)
  const void* input = nullptr;       // kInput (reduce-scatter: N x numel, all-gather: numel elements); null for all-reduce
  int64_t numel = 0;                 // PlanSpec::numel: all-reduce's tensor, reduce-scatter's output, all-gather's input
  DType dtype = DType::kFloat32;
  int32_t wire_dtype = kNoWire;      // kNoWire or float16/bfloat16 (float32 data only)
  double divisor = 1.0;              // N for avg, else 1
  const float* scale = nullptr;      // 1 float32 on the device, or null
  float* found_inf = nullptr;        // 1 float32 on the device, or null
  void* workspace = nullptr;         // >= make_plan(spec).workspace_bytes() device bytes
  int64_t workspace_bytes = 0;
  Algorithm algorithm = Algorithm::kRing;
  int64_t chunk_bytes = 0;           // 0: the plan's chunk policy
  std::vector<int32_t> node_of;      // rank -> node for the plan generator (hierarchical.h); empty: one node
  // The per-call signature header (paracomm._signature: HEADER_MAGIC + the signature), 0 words: no check. With
  // world size > 1 it is exchanged with every peer inside the call's first transfer group and compared on the
  // device (see "Per-call signature check" above); equal on every rank for equal calls.
  HeaderValues header{};
  int32_t header_words = 0;
  // true: the caller's stream waits for the call before all_reduce returns (dist.all_reduce). false (needs
  // services): the caller's stream is left free; wait on reduce_stream() after the call (Work.wait()).
  bool sync = true;
  // Torch-facing workspace allocation and keep-alive (nccl_executor.h). With services and workspace == null,
  // the workspace is allocated here from the plan's workspace_bytes.
  NcclCallServices* services = nullptr;
};
using NcclAllReduceCall = NcclCall;  // the name of the all-reduce-only days

class NcclComm {
 public:
  // unique_id: the NCCL_UNIQUE_ID_BYTES bytes of an ncclUniqueId (rank 0's ncclGetUniqueId, shared by all
  // ranks). device: the CUDA device of this rank. timeout_s: bound on init, on each enqueue, and on each
  // all_reduce's completion. Blocks until the communicator is ready; throws paracomm::Error on bad arguments,
  // an NCCL older than the one compiled against, NCCL failure or timeout (the calling thread's current CUDA
  // device is left unchanged).
  NcclComm(const std::string& unique_id, int world_size, int rank, int device, double timeout_s);
  ~NcclComm();
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  // One collective (call.collective: all-reduce in place, reduce-scatter or all-gather out of place) on data
  // ready on `stream` (the caller's stream, on this communicator's device): it runs on paracomm's streams after
  // everything enqueued on `stream` before the call; call.sync decides whether `stream` waits for it
  // (nccl_executor.h). Runs the plan of (collective, numel, dtype, wire_dtype, world size, rank, algorithm,
  // found_inf given, final op, chunk_bytes, node map).
  // Throws paracomm::Error if the communicator failed or was aborted, if the stream is capturing a CUDA
  // graph, or on invalid arguments (in these cases nothing was enqueued and the communicator stays as it
  // was); if enqueuing fails midway, the communicator is marked failed and aborted (the peers cannot finish
  // the plan) and the error is thrown.
  void run(const NcclCall& call, cudaStream_t stream);
  void all_reduce(const NcclCall& call, cudaStream_t stream) { run(call, stream); }

  // After a failure by the per-call signature check: every rank's header (row r = rank r's, header_words each);
  // empty otherwise.
  std::vector<std::vector<int64_t>> mismatch_headers() const;

  // Throws paracomm::Error if the communicator has failed (asynchronous NCCL error, timeout, abort()).
  void check();
  // What destruction does, now: waits for pending work (bounded, see Lifecycle), then finalizes or aborts.
  // Later all_reduce calls throw. Idempotent; never throws.
  void close() noexcept;
  // paracomm's reduce stream R: every call's `done` is recorded there last (wait on it after an async call).
  cudaStream_t reduce_stream() const { return reduce_stream_; }
  // Marks the communicator failed ("aborted by NcclComm.abort()") and has the watchdog abort it; returns once
  // ncclCommAbort has run (one watchdog round plus the enqueuing thread's current NCCL call at most; 5 s
  // bound). Later calls throw. Idempotent.
  void abort();

  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  int device() const { return device_; }
  double timeout_s() const { return timeout_s_; }
  // Host microseconds the last all_reduce spent in this class (plan lookup, checks, enqueue).
  double last_enqueue_us() const { return last_enqueue_us_.load(std::memory_order_relaxed); }

 private:
  using Clock = std::chrono::steady_clock;
  struct Pending {
    cudaEvent_t done;
    Clock::time_point deadline;
    uint64_t seq;
  };
  using PlanKey = std::tuple<int32_t, int64_t, int32_t, int32_t, int32_t, bool, bool, int64_t, std::vector<int32_t>>;
  struct CachedPlan {
    Plan plan;
    PlanWaits waits;
    std::vector<SchedOp> schedule_sync, schedule_async;  // without the signature header
    std::vector<SchedOp> header_sync, header_async;      // with it (plan_waits.h)
  };

  Clock::time_point deadline_from_now() const;
  std::shared_ptr<const CachedPlan> plan_for(const PlanSpec& spec);  // enqueue_mu_ held
  void ensure_step_events(int64_t steps);                       // enqueue_mu_ held
  void ensure_header_buffers();                                 // enqueue_mu_ held
  void check_header_record_locked();                            // state_mu_ held (watchdog)
  cudaEvent_t take_completion_event();                          // takes state_mu_
  void record_failure_locked(const std::string& reason);        // state_mu_ held
  [[noreturn]] void throw_failed_locked() const;                // state_mu_ held
  void watchdog_loop();
  void watchdog_round(std::unique_lock<std::mutex>& lock);      // state_mu_ held on entry and exit
  void release_cuda_resources() noexcept;

  const int world_size_;
  const int rank_;
  const int device_;
  const double timeout_s_;

  // ---- enqueue side (enqueue_mu_) ----
  std::mutex enqueue_mu_;
  bool closed_ = false;
  cudaStream_t comm_stream_ = nullptr, reduce_stream_ = nullptr;
  cudaEvent_t start_event_ = nullptr, begin_event_ = nullptr, end_event_ = nullptr;
  std::vector<cudaEvent_t> transfer_events_, reduce_events_;  // one per step of the longest plan seen
  std::map<PlanKey, std::shared_ptr<const CachedPlan>> plans_;
  uint64_t next_seq_ = 0;
  std::atomic<double> last_enqueue_us_{0.0};
  int64_t* header_slots_ = nullptr;  // device: the send slot, then world_size receive rows (kMaxHeaderWords each)

  // ---- shared state (state_mu_) ----
  std::mutex nccl_mu_;                // every use of comm_'s handle (see Locking)
  mutable std::mutex state_mu_;
  std::condition_variable wake_;      // wakes the watchdog
  std::condition_variable aborted_;   // signals abort() waiters
  std::condition_variable drained_;   // the watchdog finished a round (close() waits for pending work)
  ncclComm_t comm_ = nullptr;         // the non-blocking data-path communicator; null once aborted/destroyed
  bool failed_ = false;
  std::string failure_;
  std::atomic<bool> failed_flag_{false};  // == failed_, readable by the enqueue without the lock
  bool enqueue_active_ = false;
  Clock::time_point enqueue_deadline_;
  uint64_t enqueue_seq_ = 0;
  bool stop_ = false;
  std::deque<Pending> pending_;
  std::vector<cudaEvent_t> free_events_;  // completion events ready for reuse
  std::vector<cudaEvent_t> all_events_;   // every completion event ever created
  // Host-mapped mismatch record of the per-call signature check (header_check.h): written by the device, read
  // by the watchdog; null until the first call with a header. header_record_dev_ is its device pointer.
  HeaderMismatchRecord* header_record_ = nullptr;
  HeaderMismatchRecord* header_record_dev_ = nullptr;
  std::vector<std::vector<int64_t>> mismatch_;  // every rank's header, once the check failed the communicator
  std::thread watchdog_;
};

}  // namespace paracomm
