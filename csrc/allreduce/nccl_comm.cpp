// paracomm's NCCL communicator: bounded construction, the blocking data path, the watchdog, bounded
// destruction. Design, lifecycle and locking: nccl_comm.h.
#include "allreduce/nccl_comm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <functional>
#include <utility>

namespace paracomm {

namespace {

using Clock = std::chrono::steady_clock;

// Watchdog polling: tight while work is in flight, relaxed when idle (it still watches for asynchronous
// errors then, so check() reports a dead peer promptly).
constexpr auto kPollBusy = std::chrono::milliseconds(2);
constexpr auto kPollIdle = std::chrono::milliseconds(50);
// Plans cached per communicator (a training loop uses a handful: one per bucket size); past this the cache
// starts over rather than growing without bound.
constexpr size_t kMaxCachedPlans = 256;

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

// NCCL >= 2.9 encodes versions as major * 10000 + minor * 100 + patch.
std::string nccl_version_string(int code) {
  return concat(code / 10000, ".", code % 10000 / 100, ".", code % 100);
}

// Runs `on_expiry` on its own thread unless disarmed before `deadline`: bounds a blocking NCCL call (the
// split, the finalize) by aborting the communicator it waits on.
class AbortTimer {
 public:
  AbortTimer(int device, Clock::time_point deadline, std::function<void()> on_expiry)
      : thread_([this, device, deadline, f = std::move(on_expiry)] {
          std::unique_lock<std::mutex> lock(mu_);
          if (cv_.wait_until(lock, deadline, [this] { return disarmed_; })) return;
          fired_ = true;
          lock.unlock();
          (void)cudaSetDevice(device);
          f();
        }) {}
  // Returns true if the timer fired (then on_expiry has completed). Joins the thread.
  bool disarm() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      disarmed_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
    return fired_;
  }
  ~AbortTimer() { disarm(); }
  AbortTimer(const AbortTimer&) = delete;
  AbortTimer& operator=(const AbortTimer&) = delete;

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool disarmed_ = false;
  bool fired_ = false;
  std::thread thread_;  // last: starts once the members above exist
};

// Polls a non-blocking communicator until its pending operation settles; throws past `deadline`.
void wait_ready(ncclComm_t comm, const char* what, Clock::time_point deadline, double timeout_s,
                const std::string& who) {
  for (int spin = 0;; ++spin) {
    ncclResult_t state = ncclInProgress;
    const ncclResult_t q = ncclCommGetAsyncError(comm, &state);
    if (q != ncclSuccess) {
      PARACOMM_THROW(who, ": ncclCommGetAsyncError failed during ", what, ": ", nccl_error_text(q, comm));
    }
    if (state == ncclSuccess) return;
    if (state != ncclInProgress) PARACOMM_THROW(who, ": ", what, " failed: ", nccl_error_text(state, comm));
    if (Clock::now() >= deadline) PARACOMM_THROW(who, ": ", what, " did not complete within ", timeout_s, " s");
    if (spin < 256) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  }
}

}  // namespace

NcclComm::NcclComm(const std::string& unique_id, int world_size, int rank, int device, double timeout_s)
    : world_size_(world_size), rank_(rank), device_(device), timeout_s_(timeout_s) {
  PARACOMM_CHECK(unique_id.size() == NCCL_UNIQUE_ID_BYTES, "NcclComm: unique_id must be ", NCCL_UNIQUE_ID_BYTES,
                 " bytes (nccl_unique_id()), got ", unique_id.size());
  PARACOMM_CHECK(world_size >= 1, "NcclComm: world_size must be >= 1, got ", world_size);
  PARACOMM_CHECK(rank >= 0 && rank < world_size, "NcclComm: rank must be in [0, ", world_size, "), got ", rank);
  PARACOMM_CHECK(std::isfinite(timeout_s) && timeout_s > 0 && timeout_s <= 1e9,
                 "NcclComm: timeout_s must be in (0, 1e9] seconds, got ", timeout_s);
  int loaded = 0;
  PARACOMM_NCCL_CHECK(ncclGetVersion(&loaded), nullptr);
  PARACOMM_CHECK(loaded >= NCCL_VERSION_CODE, "NcclComm: the NCCL library loaded at run time is ",
                 nccl_version_string(loaded), ", older than NCCL ", nccl_version_string(NCCL_VERSION_CODE),
                 " that paracomm was compiled against; install NCCL >= ", nccl_version_string(NCCL_VERSION_CODE),
                 " (e.g. the nvidia-nccl wheel) or rebuild paracomm against the older one");
  int device_count = 0;
  PARACOMM_CUDA_CHECK(cudaGetDeviceCount(&device_count));
  PARACOMM_CHECK(device >= 0 && device < device_count, "NcclComm: device must be in [0, ", device_count,
                 "), got ", device);
  const std::string who = concat("NcclComm (rank ", rank_, " of ", world_size_, ", device ", device_, ")");

  DeviceGuard guard(device_);
  ncclComm_t parent = nullptr;
  ncclComm_t child = nullptr;  // NCCL's split job stores the child handle here once it is complete
  try {
    PARACOMM_CUDA_CHECK(cudaStreamCreateWithFlags(&comm_stream_, cudaStreamNonBlocking));
    PARACOMM_CUDA_CHECK(cudaStreamCreateWithFlags(&reduce_stream_, cudaStreamNonBlocking));
    PARACOMM_CUDA_CHECK(cudaEventCreateWithFlags(&start_event_, cudaEventDisableTiming));
    PARACOMM_CUDA_CHECK(cudaEventCreateWithFlags(&begin_event_, cudaEventDisableTiming));
    PARACOMM_CUDA_CHECK(cudaEventCreateWithFlags(&end_event_, cudaEventDisableTiming));

    ncclUniqueId id;
    std::memcpy(id.internal, unique_id.data(), NCCL_UNIQUE_ID_BYTES);
    const Clock::time_point deadline = deadline_from_now();

    // 1. Bounded initialisation: a non-blocking communicator, polled against the deadline.
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    config.splitShare = 0;  // the child must own its resources (and its abort flag): the parent goes away
    ncclResult_t r = ncclCommInitRankConfig(&parent, world_size_, id, rank_, &config);
    if (r != ncclSuccess && r != ncclInProgress) {
      PARACOMM_THROW(who, ": ncclCommInitRankConfig failed: ", nccl_error_text(r, parent));
    }
    wait_ready(parent, "communicator initialisation", deadline, timeout_s_, who);

    // 2. The non-blocking child for the data path (non-blocking so that no NCCL call of the enqueuing thread
    // ever waits inside NCCL: nccl_comm.h, Locking). NCCL runs the split as a job of the parent's group, so with
    // this non-blocking parent ncclCommSplit returns ncclInProgress and the parent's async state reports the
    // job's outcome (the child handle is stored once it is complete): polled against the same deadline. Should
    // a library run the split synchronously instead, the timer bounds it by aborting the parent, which NCCL
    // forwards to a child still being initialised (the parent's childAbortFlag).
    ncclConfig_t child_config = NCCL_CONFIG_INITIALIZER;
    child_config.blocking = 0;
    child_config.splitShare = 0;
    {
      AbortTimer timer(device_, deadline, [parent] { (void)ncclCommAbort(parent); });
      r = ncclCommSplit(parent, 0, rank_, &child, &child_config);
      if (timer.disarm()) {
        parent = nullptr;  // aborted by the timer (the catch below releases a child that got made)
        PARACOMM_THROW(who, ": ncclCommSplit (the blocking communicator) did not complete within ", timeout_s_,
                       " s");
      }
    }
    if (r != ncclSuccess && r != ncclInProgress) {
      PARACOMM_THROW(who, ": ncclCommSplit failed: ", nccl_error_text(r, parent));
    }
    // On failure or timeout the catch below aborts the parent, which stops the split job.
    wait_ready(parent, "ncclCommSplit (the data-path communicator)", deadline, timeout_s_, who);
    // NCCL stores the handle from its job thread: read it atomically, and give a late store until the deadline.
    while ((comm_ = __atomic_load_n(&child, __ATOMIC_ACQUIRE)) == nullptr && Clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    PARACOMM_CHECK(comm_ != nullptr, who, ": ncclCommSplit returned no communicator");
    wait_ready(comm_, "initialising the data-path communicator", deadline, timeout_s_, who);

    // 3. Release the parent (it never ran an operation): finalize + destroy, polled; abort past the deadline.
    ncclComm_t p = parent;
    parent = nullptr;
    bool finalized = false;
    try {
      r = ncclCommFinalize(p);
      if (r != ncclSuccess && r != ncclInProgress) PARACOMM_THROW("ncclCommFinalize: ", nccl_error_text(r, p));
      wait_ready(p, "finalizing the bootstrap communicator", deadline_from_now(), timeout_s_, who);
      finalized = true;
    } catch (...) {
    }
    // Non-blocking: destroy (or abort) may complete in the background; the handle is not touched again.
    (void)(finalized ? ncclCommDestroy(p) : ncclCommAbort(p));
  } catch (...) {
    // Aborting the parent stops an init or split still waiting for absent ranks, and joins NCCL's job, so
    // the child handle (if the split got that far) is final afterwards.
    if (parent != nullptr) (void)ncclCommAbort(parent);
    child = __atomic_load_n(&child, __ATOMIC_ACQUIRE);
    if (child != nullptr && child != comm_) (void)ncclCommAbort(child);
    if (comm_ != nullptr) (void)ncclCommAbort(comm_);
    comm_ = nullptr;
    release_cuda_resources();
    throw;
  }
  watchdog_ = std::thread([this] { watchdog_loop(); });
}

NcclComm::~NcclComm() { close(); }

void NcclComm::close() noexcept {
  // No enqueue runs while this does (and none after: comm_ is null, so a later all_reduce throws).
  std::lock_guard<std::mutex> enqueue_lock(enqueue_mu_);
  if (closed_) return;
  closed_ = true;
  try {
    // 1. Healthy pending work is waited for: the watchdog keeps polling it, and records a failure (which ends
    // this wait) on an asynchronous error or once a call passes its deadline (timeout_s after its enqueue).
    // The extra bound only guards against a watchdog that stopped making progress.
    std::unique_lock<std::mutex> lock(state_mu_);
    Clock::time_point bound = Clock::now();
    for (const Pending& p : pending_) bound = std::max(bound, p.deadline);
    bound += std::chrono::seconds(2);
    drained_.wait_until(lock, bound, [this] { return pending_.empty() || failed_ || comm_ == nullptr; });
    if (!pending_.empty() && !failed_) {
      record_failure_locked(concat("destroyed while ", pending_.size(), " all_reduce(s) were still pending past "
                                   "their deadline"));
    }
    stop_ = true;
  } catch (...) {
  }
  wake_.notify_all();
  aborted_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
  // From here on this is the only thread touching the communicator: the enqueue lock is held, the watchdog has
  // stopped.
  try {
    DeviceGuard guard(device_);
    ncclComm_t comm = comm_;
    comm_ = nullptr;
    bool abort_now = failed_;
    for (const Pending& p : pending_) {
      if (cudaEventQuery(p.done) != cudaSuccess) abort_now = true;  // broken (the wait above saw it finish)
    }
    (void)cudaGetLastError();
    if (comm != nullptr) {
      if (abort_now) {
        (void)ncclCommAbort(comm);  // failed: pending work may wait on a peer that never comes
      } else {
        // Healthy and drained: finalize (non-blocking: polled against timeout_s) then destroy; abort past it so a
        // destructor never hangs on a dead peer.
        bool finalized = false;
        try {
          const ncclResult_t r = ncclCommFinalize(comm);
          if (r == ncclSuccess || r == ncclInProgress) {
            wait_ready(comm, "ncclCommFinalize", deadline_from_now(), timeout_s_, "NcclComm");
            finalized = true;
          }
        } catch (...) {
        }
        (void)(finalized ? ncclCommDestroy(comm) : ncclCommAbort(comm));
      }
    }
  } catch (...) {
    // Never throws (this can run at interpreter exit, when CUDA may already be unloading).
  }
  release_cuda_resources();
}

void NcclComm::release_cuda_resources() noexcept {
  auto destroy = [](cudaEvent_t& e) {
    if (e != nullptr) (void)cudaEventDestroy(e);
    e = nullptr;
  };
  destroy(start_event_);
  destroy(begin_event_);
  destroy(end_event_);
  for (auto& e : transfer_events_) destroy(e);
  for (auto& e : reduce_events_) destroy(e);
  for (auto& e : all_events_) destroy(e);
  transfer_events_.clear();
  reduce_events_.clear();
  all_events_.clear();
  free_events_.clear();
  pending_.clear();
  if (header_slots_ != nullptr) (void)cudaFree(header_slots_);
  header_slots_ = nullptr;
  if (header_record_ != nullptr) (void)cudaFreeHost(header_record_);
  header_record_ = nullptr;
  header_record_dev_ = nullptr;
  if (comm_stream_ != nullptr) (void)cudaStreamDestroy(comm_stream_);
  if (reduce_stream_ != nullptr) (void)cudaStreamDestroy(reduce_stream_);
  comm_stream_ = nullptr;
  reduce_stream_ = nullptr;
}

NcclComm::Clock::time_point NcclComm::deadline_from_now() const {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s_));
}

void NcclComm::throw_failed_locked() const {
  PARACOMM_THROW("NcclComm (rank ", rank_, " of ", world_size_, ") is unusable: ", failure_);
}

void NcclComm::record_failure_locked(const std::string& reason) {
  if (failed_) return;  // keep the first reason: later ones are consequences
  failed_ = true;
  failure_ = reason;
  failed_flag_.store(true, std::memory_order_release);
}

std::shared_ptr<const NcclComm::CachedPlan> NcclComm::plan_for(const PlanSpec& spec) {
  const PlanKey key{static_cast<int32_t>(spec.collective), spec.numel, static_cast<int32_t>(spec.dtype),
                    spec.wire_dtype, static_cast<int32_t>(spec.algorithm), spec.has_found_inf, spec.has_final_op,
                    spec.chunk_bytes, spec.node_of};
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second;
  auto cached = std::make_shared<CachedPlan>();
  cached->plan = make_plan(spec);  // validates spec, naming the argument
  check_plan(cached->plan);
  PARACOMM_CHECK(cached->plan.spec.world_size == world_size_ && cached->plan.spec.rank == rank_ &&
                     cached->plan.spec.numel == spec.numel,
                 "make_plan returned a plan for another call");
  cached->waits = plan_waits(cached->plan);
  cached->schedule_sync = plan_schedule(cached->plan, cached->waits, true);
  cached->schedule_async = plan_schedule(cached->plan, cached->waits, false);
  cached->header_sync = plan_schedule(cached->plan, cached->waits, true, true);
  cached->header_async = plan_schedule(cached->plan, cached->waits, false, true);
  if (plans_.size() >= kMaxCachedPlans) plans_.clear();
  plans_.emplace(key, cached);
  return cached;
}

void NcclComm::ensure_step_events(int64_t steps) {
  auto grow = [steps](std::vector<cudaEvent_t>& events) {
    while (static_cast<int64_t>(events.size()) < steps) {
      cudaEvent_t e = nullptr;
      PARACOMM_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      events.push_back(e);
    }
  };
  grow(transfer_events_);
  grow(reduce_events_);
}

void NcclComm::ensure_header_buffers() {
  if (header_slots_ != nullptr) return;
  // Once per communicator (cudaMalloc / cudaHostAlloc may synchronise the device: only on the first checked
  // call). The record starts zeroed: no mismatch seen.
  void* slots = nullptr;
  PARACOMM_CUDA_CHECK(cudaMalloc(&slots, static_cast<size_t>(1 + world_size_) * kMaxHeaderWords * sizeof(int64_t)));
  void* record = nullptr;
  const cudaError_t e = cudaHostAlloc(&record, header_record_bytes(world_size_), cudaHostAllocMapped);
  if (e != cudaSuccess) {
    (void)cudaFree(slots);
    PARACOMM_CUDA_CHECK(e);
  }
  std::memset(record, 0, header_record_bytes(world_size_));
  void* record_dev = nullptr;
  const cudaError_t d = cudaHostGetDevicePointer(&record_dev, record, 0);
  if (d != cudaSuccess) {
    (void)cudaFree(slots);
    (void)cudaFreeHost(record);
    PARACOMM_CUDA_CHECK(d);
  }
  header_slots_ = static_cast<int64_t*>(slots);
  {
    std::lock_guard<std::mutex> lock(state_mu_);
    header_record_dev_ = static_cast<HeaderMismatchRecord*>(record_dev);
    header_record_ = static_cast<HeaderMismatchRecord*>(record);
  }
}

void NcclComm::check_header_record_locked() {
  if (header_record_ == nullptr || failed_) return;
  const int64_t seq_plus1 = header_record_->seq_plus1;  // volatile: the device's last store
  if (seq_plus1 == 0) return;
  std::atomic_thread_fence(std::memory_order_acquire);  // the rows were made visible before the flag
  const int64_t words = std::min<int64_t>(std::max<int64_t>(header_record_->words, 0), kMaxHeaderWords);
  std::vector<std::vector<int64_t>> rows(static_cast<size_t>(world_size_));
  std::string text;
  for (int r = 0; r < world_size_; ++r) {
    const int64_t* row = header_record_->headers + static_cast<int64_t>(r) * kMaxHeaderWords;
    rows[static_cast<size_t>(r)].assign(row, row + words);
    text += concat(r ? "; " : "", "rank ", r, ": [");
    for (int64_t w = 0; w < words; ++w) text += concat(w ? "," : "", row[w]);
    text += "]";
  }
  mismatch_ = std::move(rows);
  record_failure_locked(concat("call #", seq_plus1 - 1, ": ranks called the collective with different arguments "
                               "(per-call signature check; signature headers ", text, "); the communicator was "
                               "aborted"));
}

std::vector<std::vector<int64_t>> NcclComm::mismatch_headers() const {
  std::lock_guard<std::mutex> lock(state_mu_);
  return mismatch_;
}

cudaEvent_t NcclComm::take_completion_event() {
  {
    std::lock_guard<std::mutex> lock(state_mu_);
    if (!free_events_.empty()) {
      cudaEvent_t e = free_events_.back();
      free_events_.pop_back();
      return e;
    }
  }
  cudaEvent_t e = nullptr;
  PARACOMM_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  std::lock_guard<std::mutex> lock(state_mu_);
  all_events_.push_back(e);
  return e;
}

namespace {

// Releases a workspace from NcclCallServices at scope exit (after the enqueue, or on a refusal or failure:
// either way every use of it was enqueued on streams the allocator's pool of R orders; nccl_executor.h).
struct WorkspaceLease {
  NcclCallServices* services = nullptr;
  void* ptr = nullptr;
  ~WorkspaceLease() {
    if (ptr != nullptr) services->release_workspace(ptr);
  }
};

}  // namespace

void NcclComm::run(const NcclCall& call, cudaStream_t stream) {
  std::lock_guard<std::mutex> enqueue_lock(enqueue_mu_);
  const Clock::time_point t0 = Clock::now();
  {
    std::lock_guard<std::mutex> lock(state_mu_);
    if (failed_) throw_failed_locked();
    PARACOMM_CHECK(!closed_, "NcclComm (rank ", rank_, " of ", world_size_, ") was closed");
  }
  PARACOMM_CHECK(call.sync || call.services != nullptr,
                 "an asynchronous call needs NcclCallServices (its buffers' keep-alive)");
  PARACOMM_CHECK(call.header_words >= 0 && call.header_words <= kMaxHeaderWords, "header_words must be in [0, ",
                 kMaxHeaderWords, "], got ", call.header_words);
  PlanSpec spec;
  spec.collective = call.collective;
  spec.node_of = call.node_of;
  spec.numel = call.numel;
  spec.dtype = call.dtype;
  spec.wire_dtype = call.wire_dtype;
  spec.world_size = world_size_;
  spec.rank = rank_;
  spec.algorithm = call.algorithm;
  spec.backend = Backend::kNccl;
  spec.has_found_inf = call.found_inf != nullptr;
  spec.has_final_op = call.divisor != 1.0 || call.scale != nullptr || call.found_inf != nullptr;
  spec.chunk_bytes = call.chunk_bytes;

  DeviceGuard guard(device_);
  // Refuse a capturing stream before anything is enqueued: paracomm's streams would join the capture and the
  // NCCL enqueue is not capturable through this path.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  PARACOMM_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  PARACOMM_CHECK(capture == cudaStreamCaptureStatusNone,
                 "all_reduce cannot be captured in a CUDA graph (the stream is capturing)");

  const std::shared_ptr<const CachedPlan> cached = plan_for(spec);
  const Plan& plan = cached->plan;
  // The per-call signature check needs peers to exchange with (world size 1 has none).
  const bool with_header = call.header_words > 0 && world_size_ > 1;
  const std::vector<SchedOp>& schedule =
      with_header ? (call.sync ? cached->header_sync : cached->header_async)
                  : (call.sync ? cached->schedule_sync : cached->schedule_async);
  if (with_header) ensure_header_buffers();
  WorkspaceLease lease;
  PlanBuffers buf;
  buf.data = call.data;
  buf.input = call.input;
  buf.scale = call.scale;
  buf.found_inf = call.found_inf;
  buf.workspace = call.workspace;
  buf.workspace_bytes = call.workspace_bytes;
  if (call.services != nullptr && call.workspace == nullptr && plan.workspace_bytes() > 0 && !schedule.empty()) {
    lease.services = call.services;
    lease.ptr = call.services->allocate_workspace(plan.workspace_bytes(), reduce_stream_);
    buf.workspace = lease.ptr;
    buf.workspace_bytes = plan.workspace_bytes();
  }
  check_plan_buffers(plan, buf, call.divisor);
  ensure_step_events(static_cast<int64_t>(plan.steps.size()));
  cudaEvent_t done = schedule.empty() ? nullptr : take_completion_event();
  const uint64_t seq = next_seq_++;

  {
    std::lock_guard<std::mutex> lock(state_mu_);
    if (failed_ || comm_ == nullptr) {
      if (done != nullptr) free_events_.push_back(done);
      if (!failed_) record_failure_locked("the communicator was aborted");
      throw_failed_locked();
    }
    enqueue_active_ = true;
    enqueue_deadline_ = deadline_from_now();
    enqueue_seq_ = seq;
  }
  bool nccl_issued = false;
  NcclExecContext ctx;
  ctx.nccl.mu = &nccl_mu_;
  ctx.nccl.comm = &comm_;
  ctx.comm_stream = comm_stream_;
  ctx.reduce_stream = reduce_stream_;
  ctx.stream = stream;
  ctx.events.start = start_event_;
  ctx.events.begin = begin_event_;
  ctx.events.end = end_event_;
  ctx.events.done = done;
  ctx.events.transfer = transfer_events_.data();
  ctx.events.reduce = reduce_events_.data();
  ctx.events.steps = static_cast<int64_t>(transfer_events_.size());
  ctx.failed = &failed_flag_;
  ctx.deadline = deadline_from_now();
  ctx.timeout_s = timeout_s_;
  ctx.nccl_issued = &nccl_issued;
  ctx.services = call.services;
  HeaderExchange header;
  if (with_header) {
    header.values = call.header;
    header.words = call.header_words;
    header.send_slot = header_slots_;
    header.recv_slots = header_slots_ + kMaxHeaderWords;
    header.record = header_record_dev_;
    header.seq = static_cast<int64_t>(seq);
    ctx.header = &header;
  }
  try {
    enqueue_plan(ctx, plan, schedule, buf, call.divisor);
  } catch (const std::exception& e) {
    std::string failure;
    {
      std::lock_guard<std::mutex> lock(state_mu_);
      enqueue_active_ = false;
      // Before the first NCCL call nothing was sent: the refusal leaves the communicator usable. After it,
      // the peers are mid-plan and would wait forever: fail (the watchdog aborts, so they fail too).
      if (nccl_issued) record_failure_locked(concat("call #", seq, " failed while being enqueued: ", e.what()));
      if (done != nullptr) free_events_.push_back(done);
      if (failed_) failure = failure_;
    }
    wake_.notify_all();
    if (failure.empty()) throw;
    // The first reason (e.g. the watchdog's enqueue deadline) says more than NCCL's error after an abort.
    PARACOMM_THROW("NcclComm (rank ", rank_, " of ", world_size_, ") is unusable: ", failure,
                   " [this call: ", e.what(), "]");
  }
  {
    std::lock_guard<std::mutex> lock(state_mu_);
    enqueue_active_ = false;
    if (done != nullptr) pending_.push_back(Pending{done, deadline_from_now(), seq});
  }
  wake_.notify_one();
  last_enqueue_us_.store(std::chrono::duration<double, std::micro>(Clock::now() - t0).count(),
                         std::memory_order_relaxed);
}

void NcclComm::check() {
  std::lock_guard<std::mutex> lock(state_mu_);
  if (failed_) throw_failed_locked();
}

void NcclComm::abort() {
  std::unique_lock<std::mutex> lock(state_mu_);
  record_failure_locked("aborted by NcclComm.abort()");
  wake_.notify_all();
  // The watchdog aborts within one round plus the enqueuing thread's current NCCL call (non-blocking).
  aborted_.wait_for(lock, std::chrono::seconds(5), [this] { return comm_ == nullptr || stop_; });
}

void NcclComm::watchdog_loop() {
  // Event queries and ncclCommAbort act on this device's context.
  (void)cudaSetDevice(device_);
  // Relaxed capture mode for this thread: cudaEventQuery is "unsafe" under a global-mode capture started by
  // any other thread and would invalidate it; relaxed mode lets this thread's queries proceed.
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  (void)cudaThreadExchangeStreamCaptureMode(&mode);
  std::unique_lock<std::mutex> lock(state_mu_);
  while (!stop_) {
    const bool busy = !pending_.empty() || enqueue_active_ || (failed_ && comm_ != nullptr);
    wake_.wait_for(lock, busy ? kPollBusy : kPollIdle);
    if (stop_) break;
    try {
      watchdog_round(lock);
    } catch (...) {
      // Only allocation failures can land here; the next round tries again.
    }
    drained_.notify_all();
  }
}

void NcclComm::watchdog_round(std::unique_lock<std::mutex>& lock) {
  const Clock::time_point now = Clock::now();
  // A mismatch found by the per-call signature check fails the communicator even while the call is pending
  // (its data transfers may never complete): the abort below releases them.
  if (comm_ != nullptr) check_header_record_locked();
  if (!failed_ && comm_ != nullptr) {
    if (enqueue_active_ && now >= enqueue_deadline_) {
      // The enqueue polls this flag between its NCCL queries and leaves; the abort below then releases NCCL.
      record_failure_locked(concat("call #", enqueue_seq_, " was still being enqueued after ", timeout_s_,
                                   " s (NCCL waits for a peer that is absent or dead); the communicator was aborted"));
    } else {
      // Event queries outside both locks (pending entries are only appended by others, so the snapshot stays
      // valid); the NCCL query under nccl_mu_ (never concurrent with the enqueue's NCCL calls or an abort).
      const std::vector<Pending> snapshot(pending_.begin(), pending_.end());
      lock.unlock();
      ncclResult_t state = ncclSuccess, q = ncclSuccess;
      std::string q_text;
      {
        std::lock_guard<std::mutex> g(nccl_mu_);
        if (comm_ != nullptr) {
          q = ncclCommGetAsyncError(comm_, &state);
          if (q != ncclSuccess) q_text = nccl_error_text(q, comm_);
          else if (state != ncclSuccess && state != ncclInProgress) q_text = nccl_error_text(state, comm_);
        }
      }
      std::vector<cudaError_t> status(snapshot.size(), cudaErrorNotReady);
      for (size_t k = 0; k < snapshot.size(); ++k) {
        status[k] = cudaEventQuery(snapshot[k].done);
        if (status[k] != cudaSuccess) (void)cudaGetLastError();  // a not-ready query must not linger
      }
      lock.lock();
      if (q != ncclSuccess) {
        record_failure_locked(concat("ncclCommGetAsyncError failed: ", q_text));
      } else if (state != ncclSuccess && state != ncclInProgress) {
        record_failure_locked(concat("asynchronous NCCL error (a peer may have died): ", q_text));
      }
      // pending_ still starts with the snapshot (only the watchdog removes entries).
      std::deque<Pending> keep;
      for (size_t k = 0; k < snapshot.size(); ++k) {
        const Pending& p = snapshot[k];
        if (status[k] == cudaSuccess) {
          free_events_.push_back(p.done);
          continue;
        }
        if (status[k] != cudaErrorNotReady) {
          record_failure_locked(concat("call #", p.seq, ": CUDA error ", cudaGetErrorName(status[k]), " (",
                                       cudaGetErrorString(status[k]), ") while waiting for it to complete"));
        } else if (now >= p.deadline) {
          record_failure_locked(concat("call #", p.seq, " did not complete within ", timeout_s_,
                                       " s (a peer may have died or stalled); the communicator was aborted"));
        }
        keep.push_back(p);
      }
      for (size_t k = snapshot.size(); k < pending_.size(); ++k) keep.push_back(pending_[k]);
      pending_.swap(keep);
    }
  }
  if (failed_ && comm_ != nullptr) {
    // nccl_mu_ excludes the enqueuing thread's NCCL calls, each of which returns promptly (non-blocking
    // communicator), so this waits microseconds at most; the enqueue sees the failure flag (or the null handle)
    // at its next NCCL section and stops. Lock order: nccl_mu_ before state_mu_.
    lock.unlock();
    {
      std::lock_guard<std::mutex> g(nccl_mu_);
      if (comm_ != nullptr) {
        (void)ncclCommAbort(comm_);
        std::lock_guard<std::mutex> relock(state_mu_);
        comm_ = nullptr;
      }
    }
    lock.lock();
    aborted_.notify_all();
  }
  if (failed_ && comm_ == nullptr) {
    // Nothing more completes or matters once aborted: recycle the completion events.
    for (const Pending& p : pending_) free_events_.push_back(p.done);
    pending_.clear();
  }
}

}  // namespace paracomm
