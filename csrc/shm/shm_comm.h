// The shared-memory transport for CPU ranks on one host, and its plan executor (torch-free: raw pointers,
// DType codes, POSIX shared memory, futexes). Protocol in full: docs/ARCHITECTURE.md, "Shared-memory transport".
//
// One segment per Communicator (created by rank 0 with a random name, mode 0600, unlinked by every rank as soon as
// all have mapped it: nothing stays in /dev/shm, whatever dies later). Inside it:
//   * a control block per rank, written only by that rank: `seq` (calls entered), the signature of call `seq`
//     (slot seq % 2), its pid, a `failed` flag; and, on its own cache line, the rank's futex word `wake` and its
//     `sleeping` flag (written by the peers that wake it);
//   * a channel per ordered pair (src, dst): a FIFO of kSlots pieces of slot_bytes, `head` (pieces written,
//     only src writes it) and `tail` (pieces consumed, only dst writes it), monotonic over the Communicator's life.
//
// A call (all_reduce) is one C++ call: publish (seq + 1, signature) and wait for every peer to reach that seq;
// compare signatures (a mismatch returns every rank's signature before any data moves, so every rank raises and
// the channels stay aligned); then run the plan step by step: a step's transfers progress together (a send copies
// pieces into the channel while there is room, a receive copies them out as they arrive; per channel in plan order),
// then its reductions (reduce_range, cpu/reduce_core.h). Plans are matched across ranks (plan.h's invariants), so
// the channels' FIFOs line up piece for piece and need no headers. Where the plan allows it (analyse_fusion), a
// reduction reads received pieces in place from the channel slots instead of from a copy ("receive in place").
//
// Waiting: spin (PARACOMM_SHM_SPIN_US, default 50 us), then sleep on the rank's futex in slices of at most 20 ms;
// at every slice the peers' `failed` flags and liveness (pidfd, or kill(pid, 0)) are checked, and the deadline.
// Any failure sets this rank's `failed` flag and wakes every peer, so all ranks raise within a slice or two.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "allreduce/plan.h"

namespace paracomm {
namespace shm {

constexpr int kMaxSignature = 16;  // int64 values of a call signature (the caller's encoding)

// What one all_reduce call is (everything the plan depends on; the caller's signature is separate and opaque).
struct CallArgs {
  void* data = nullptr;
  int64_t numel = 0;
  DType dtype = DType::kFloat32;
  int32_t wire_dtype = kNoWire;
  int32_t algorithm = -1;  // Algorithm code, or -1: choose_algorithm's choice (gloo thresholds)
  double divisor = 1.0;
  const float* scale = nullptr;
  float* found_inf = nullptr;
  bool has_final_op = false;
  int64_t chunk_bytes = 0;
  double timeout_s = 300.0;
};

class ShmComm {
 public:
  // create: make a new segment with a random name (rank 0); else open `name` (made by rank 0 of this group).
  ShmComm(const std::string& name, bool create, int rank, int world_size);
  ~ShmComm();
  ShmComm(const ShmComm&) = delete;
  ShmComm& operator=(const ShmComm&) = delete;

  const std::string& name() const { return name_; }
  int rank() const { return rank_; }
  int world_size() const { return world_; }
  int64_t slot_bytes() const { return slot_bytes_; }
  int64_t segment_bytes() const { return bytes_; }

  // Once every rank has mapped the segment (the caller's barrier): record the peers' pids for liveness checks.
  void attach_peers(double timeout_s);
  // shm_unlink(name); false when it was already gone.
  static bool unlink_name(const std::string& name);

  // One all-reduce. Returns an empty vector on success; on a signature mismatch, every rank's signature (rank
  // order) and nothing was written. Throws paracomm::Error on a dead / failed peer or the timeout (and marks this
  // rank failed, so its peers raise too).
  std::vector<std::vector<int64_t>> all_reduce(const CallArgs& a, const std::vector<int64_t>& signature);

  // Mark this rank failed and wake every peer (the caller gave up on the communicator).
  void fail();
  // The algorithm code a call would run (resolves -1 like all_reduce does).
  int32_t resolve_algorithm(int64_t numel, DType dtype, int32_t wire_dtype, int32_t algorithm) const;

 private:
  struct RankCtl;
  struct ChannelCtl;
  // Per plan step: the reduction that reads its received inputs in place from the channel slots (-1: none) and,
  // per transfer, the input position it feeds (-1: an ordinary copy). shm_comm.cpp, "receive-in-place".
  struct StepFusion {
    int32_t reduction = -1;
    std::vector<int32_t> input_of;
  };
  struct Prepared {
    Plan plan;
    std::vector<StepFusion> fusion;
  };
  static std::vector<StepFusion> analyse_fusion(const Plan& plan);

  RankCtl& ctl(int r) const;
  ChannelCtl& channel(int src, int dst) const;
  char* slot(int src, int dst, uint64_t piece) const;
  void notify(int peer) const;
  void notify_all() const;
  [[noreturn]] void raise(const std::string& what);
  void check_peers(const char* what);
  const Prepared& plan_for(const CallArgs& a);
  void run_plan(const Prepared& prepared, const CallArgs& a, double deadline);
  template <typename Poll>
  void wait_until(Poll&& poll, const char* what, double deadline);

  std::string name_;
  int rank_ = 0;
  int world_ = 1;
  int64_t slot_bytes_ = 0;
  int64_t bytes_ = 0;
  char* base_ = nullptr;
  int64_t ctl_offset_ = 0, channel_offset_ = 0, data_offset_ = 0, channel_stride_ = 0;
  std::vector<int> pidfds_;   // per rank; -1 for self / unavailable
  std::vector<int> pids_;
  uint64_t seq_ = 0;          // calls this rank has entered
  bool failed_ = false;
  double spin_s_ = 50e-6;
  std::mutex mu_;             // one call at a time
  std::vector<char> workspace_;
  // Plans by (numel, dtype, wire, algorithm, has_found_inf, has_final_op, chunk_bytes).
  std::map<std::tuple<int64_t, int, int, int, bool, bool, int64_t>, Prepared> plans_;
};

}  // namespace shm
}  // namespace paracomm
