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
// A call (any collective: the executor binds the plan's buffers and knows no collective) is one C++ call: copy
// the first transfer step's sends into this rank's eager area when they fit ("eager sends"), publish
// (seq + 1, signature, eager step) and wait for every peer to reach that seq; compare signatures (a mismatch
// returns every rank's signature before anything of the caller's is written, so every rank raises and the
// channels stay aligned); then run the plan step by step: eager receives are read in place from the sender's
// eager area, the other transfers progress together (a send copies pieces into the channel while there is
// room, a receive copies them out as they arrive; per channel in plan order), then the step's reductions
// (reduce_range, cpu/reduce_core.h). Plans are matched across ranks (plan.h's invariants), so the channels'
// FIFOs line up piece for piece and need no headers. Where the plan allows it (analyse_fusion), a reduction
// reads received pieces in place from the channel slots instead of from a copy ("receive in place"). A one_shot
// call thus synchronises once: its data travels with the entry.
//
// The segment also holds, per rank and call parity, an eager area (a table of world_size payload offsets, then
// the payload), written only by its rank before it publishes seq.
//
// Waiting: spin (PARACOMM_SHM_SPIN_US, default 50 us; a call's entry wait adapts it up to 20x), then sleep on the
// rank's futex in slices of at most 20 ms; at every slice the peers' `failed` flags and liveness (pidfd, or
// kill(pid, 0)) are checked, and the deadline. The entry wait also moves a rank off a core it shares with a peer
// (shm_comm.cpp, wait_until and core_share).
// Any failure sets this rank's `failed` flag and wakes every peer, so all ranks raise within a slice or two.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "allreduce/plan.h"

namespace paracomm {
namespace shm {

constexpr int kMaxSignature = 16;  // int64 values of a call signature (the caller's encoding)

// What one call is (everything its plan depends on; the caller's signature is separate and opaque). The executor
// knows no collective: `collective`, `node_of` and the algorithm only select the plan (plan.h), whose buffer list
// the executor binds (kData = data, kInput = input, workspace for the rest).
struct CallArgs {
  int32_t collective = 0;  // Collective code (plan.h)
  int64_t numel = 0;       // the plan's numel (plan.h: all-gather's is the input's)
  DType dtype = DType::kFloat32;
  int32_t wire_dtype = kNoWire;
  int32_t algorithm = -1;  // Algorithm code, or -1: the "auto" choice for the gloo backend (node map aware)
  double divisor = 1.0;
  bool has_found_inf = false;
  bool has_final_op = false;
  int64_t chunk_bytes = 0;
  std::vector<int32_t> node_of;  // rank -> node (hierarchical.h); empty: one node
};

// The user's memory of one call (raw pointers; the caller keeps it alive for the call).
struct CallBuffers {
  void* data = nullptr;          // kData: the output (all-reduce: in place)
  const void* input = nullptr;   // kInput: the out-of-place input (reduce-scatter, all-gather), else null
  const float* scale = nullptr;  // 1 float32 or null
  float* found_inf = nullptr;    // 1 float32 or null (must be given iff CallArgs::has_found_inf)
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

  // A call's constant part, made once per signature (the plan, its receive-in-place and eager analyses, the
  // signature): what `run` needs besides the pointers. Validates the arguments (throws paracomm::Error).
  struct Prepared;
  std::shared_ptr<Prepared> prepare(const CallArgs& a, const std::vector<int64_t>& signature);

  // One collective call: its plan over `b`. Returns an empty vector on success; on a signature mismatch, every
  // rank's signature (rank order) and nothing was written. Throws paracomm::Error on a dead / failed peer or the
  // timeout, naming the peer (and marks this rank failed, so its peers raise too).
  std::vector<std::vector<int64_t>> run(const Prepared& p, const CallBuffers& b, double timeout_s);

  // Mark this rank failed and wake every peer (the caller gave up on the communicator).
  void fail();
  // The algorithm code a call would run (resolves -1 like prepare does).
  int32_t resolve_algorithm(const CallArgs& a) const;
  // Bytes of each rank's eager area per call parity (0: eager sends off; see shm_comm.cpp, "eager sends").
  int64_t eager_bytes() const { return eager_bytes_; }

  // What this rank's waits did over the Communicator's life (diagnostics: the benchmark prints them per set).
  struct WaitStats {
    uint64_t sleeps = 0;        // futex sleeps entered (a wait whose spin budget ran out)
    double slept_s = 0.0;       // seconds spent in them
    uint64_t wakes = 0;         // futex wake calls made for a sleeping peer
    uint64_t moves = 0;         // moves off a core shared with a peer (awake or asleep) (shm_comm.cpp, waits)
  };
  WaitStats wait_stats() const {
    return {sleeps_.load(std::memory_order_relaxed), slept_s_.load(std::memory_order_relaxed),
            wakes_.load(std::memory_order_relaxed), moves_.load(std::memory_order_relaxed)};
  }

 private:
  struct RankCtl;
  struct ChannelCtl;
  // Per plan step: the reduction that reads its received inputs in place from the channel slots (-1: none) and,
  // per transfer, the input position it feeds (-1: an ordinary copy). shm_comm.cpp, "receive-in-place".
  struct StepFusion {
    int32_t reduction = -1;
    std::vector<int32_t> input_of;
  };
  // The sends published with the call's entry (shm_comm.cpp, "eager sends").
  struct Eager {
    int32_t first = -1;      // the first and last eager step; -1: none
    int32_t last = -1;
    int32_t pre_steps = 0;   // steps [0, pre_steps) have only workspace-writing reductions, run before entry
    std::vector<uint8_t> is_step;  // per plan step: its sends are eager
    struct Copy {
      PlanSpan span;
      int64_t bytes = 0;
      int64_t offset = 0;    // in this rank's eager payload
    };
    std::vector<Copy> copies;      // distinct send spans (one_shot sends one span to every peer: one copy)
    std::vector<int64_t> entries;  // (step, destination rank, payload offset) triples, the published table
  };
  static Eager analyse_eager(const Plan& plan, int64_t eager_bytes, int world);

 public:
  struct Prepared {
    CallArgs args;
    std::vector<int64_t> signature;
    Plan plan;
    std::vector<StepFusion> fusion;
    Eager eager;
  };

 private:
  static std::vector<StepFusion> analyse_fusion(const Plan& plan);

  RankCtl& ctl(int r) const;
  ChannelCtl& channel(int src, int dst) const;
  char* slot(int src, int dst, uint64_t piece) const;
  void notify(int peer) const;
  enum class CoreShare { kAlone, kWithSleeper, kWithRunner };
  CoreShare core_share() const;
  bool move_off_shared_core();
  void notify_all() const;
  [[noreturn]] void raise(const std::string& what);
  void check_peers(const char* what);
  char* eager_table(int r, int parity) const;
  char* eager_payload(int r, int parity) const;
  // stage 0: before entry (the eager step's pre-steps and payload); stage 1: the plan after the signature check.
  void run_plan(const Prepared& prepared, const CallBuffers& b, double deadline, int parity, int stage);
  // `peer` (optional): where the poll records the rank it is blocked on, named in the error.
  template <typename Poll>
  // entry: the call's entry wait (the only one that checks for a core shared with a peer; wait_until).
  void wait_until(Poll&& poll, const char* what, double deadline, const int* peer = nullptr, bool entry = false);

  std::string name_;
  int rank_ = 0;
  int world_ = 1;
  int64_t slot_bytes_ = 0;
  int64_t bytes_ = 0;
  char* base_ = nullptr;
  int64_t ctl_offset_ = 0, channel_offset_ = 0, data_offset_ = 0, channel_stride_ = 0;
  int64_t eager_offset_ = 0, eager_stride_ = 0, eager_bytes_ = 0, eager_table_bytes_ = 0;
  std::vector<int> pidfds_;   // per rank; -1 for self / unavailable
  std::vector<int> pids_;
  uint64_t seq_ = 0;          // calls this rank has entered
  bool failed_ = false;
  double spin_s_ = 50e-6;     // PARACOMM_SHM_SPIN_US: the spin budget's floor
  double spin_budget_ = 50e-6; // the adaptive spin budget (wait_until), in [spin_s_, spin_cap_]
  double spin_cap_ = 1e-3;
  std::mutex mu_;             // one call at a time
  std::vector<char> workspace_;
  bool found_ = false;        // found_inf of the running call (written to the user's flag at its very end)
  std::vector<uint8_t> busy_;
  // WaitStats (relaxed: counters only; `notify` may run on another thread through fail()).
  std::atomic<uint64_t> sleeps_{0};
  std::atomic<double> slept_s_{0.0};
  mutable std::atomic<uint64_t> wakes_{0};
  std::atomic<uint64_t> moves_{0};
  double last_move_ = -1.0;   // now() of the last move_off_shared_core

};

}  // namespace shm
}  // namespace paracomm
