// The stream schedule of the NCCL executor (nccl_executor.cpp) for a plan: plain C++ (no CUDA, no NCCL, no
// torch), so the ordering argument can be checked on a machine without a GPU. tests/test_plan_waits.py replays
// plan_schedule() on every algorithm's plans, with the caller's stream and the caller's later work, and checks
// that every two operations touching the same bytes are ordered, that an async call blocks none of the caller's
// later work, and that every buffer's last use precedes its release.
//
// Three streams: S = the caller's current stream (it only records `start`, and waits for `done` in a
// synchronous call), R = paracomm's reduce stream (every step's reductions, in step order), C = paracomm's comm
// stream (every step's transfer group, in step order). R_i = the event recorded on R after step i's reductions,
// T_i = the event recorded on C after step i's transfer group.
//   * comm_waits[i] = j >= 0: before step i's transfer group, C waits for R_j, j = the latest step <=
//     transfers_after(i) that has reductions (reductions run in order on R, so R_j covers all of them);
//     -1 when there is none, or when an earlier wait on C already covers it;
//   * transfer groups need no waits among themselves: C runs them one after the other, which also orders a send
//     of bytes an earlier step received (the ring's all-gather), a dependency transfers_after does not name;
//   * stream_waits[i] = t >= 0: before step i's reductions, R waits for T_t, t = the latest step <= i with
//     transfers (groups run in order on C, so T_t covers this step's and every earlier one); -1 when there is
//     none, or when an earlier wait on R already covers it.
// plan_schedule() wraps those in the call protocol (the argument for each wait: nccl_executor.h).
//
// The per-call signature header (PARACOMM_CHECK_SHAPES != 0, world size > 1; nccl_comm.h "Per-call signature
// check"): every rank sends its fixed-size int64 header to every peer and receives theirs, inside the call's
// first transfer group (a group of its own when the plan has no transfers), so the check costs no extra group
// and no extra round trip. Its three operations, placed by plan_schedule():
//   * kHeaderFill on R, between wait(start) and rec(begin): writes this call's header into the send slot (the
//     header travels by value in the kernel's parameters, so no host buffer outlives the enqueue). C reads the
//     slot only after `begin`; the previous call's group that read it precedes this call's `start` wait on R
//     (R waited for that call's last group before its `done`).
//   * the header sends/receives, first in the first transfer group (SchedOp::with_header), so per peer they
//     are the first messages of the group and always match each other (the same size on every rank);
//   * kHeaderCheck on R, right after R's first wait for a transfer event that covers that group (T_t with t >=
//     the group's step, or `end`), before the reductions that follow it: compares the received headers with
//     this rank's and records a mismatch in host-mapped memory for the watchdog. The next call's group that
//     overwrites the receive slots runs after that call's `begin`, which R records after this check.
#pragma once

#include <cstdint>
#include <vector>

#include "allreduce/plan.h"

namespace paracomm {

struct PlanWaits {
  bool has_transfers = false;
  bool has_reductions = false;
  std::vector<int64_t> comm_waits;    // one per step
  std::vector<int64_t> stream_waits;  // one per step (waits of the reduce stream R)
  // Whether some wait refers to T_i / R_i: events nobody waits for are not recorded (each record is ~1 us of
  // host time; a 16-group plan saves a dozen).
  std::vector<bool> record_transfer;  // one per step
  std::vector<bool> record_reduce;    // one per step
};

PlanWaits plan_waits(const Plan& plan);

enum class SchedStream : int32_t { kCaller = 0, kReduce = 1, kComm = 2 };
enum class SchedAction : int32_t {
  kRecord = 0,      // cudaEventRecord(event, stream)
  kWait = 1,        // cudaStreamWaitEvent(stream, event)
  kTransfers = 2,   // step `step`'s transfer group (C)
  kReductions = 3,  // step `step`'s reductions (R)
  kKeepAlive = 4,   // the caller's buffers (data, input, scale, found_inf) are not reused before the work
                    // enqueued on `stream` so far completes (torch: record_stream on R); async calls only
  kHeaderFill = 5,  // R: this call's signature header into the header send slot
  kHeaderCheck = 6, // R: received headers vs this rank's; a mismatch is recorded for the watchdog
};
enum class SchedEvent : int32_t {
  kNone = 0,
  kStart = 1,     // S -> R: everything the caller enqueued before the call
  kBegin = 2,     // R -> C: the above, plus every earlier call's reductions
  kTransfer = 3,  // T_step
  kReduce = 4,    // R_step
  kEnd = 5,       // C -> R: after the last transfer group
  kDone = 6,      // on R after everything: the call's completion event (watchdog, Work.wait, sync call)
};

struct SchedOp {
  SchedAction action;
  SchedStream stream;
  SchedEvent event = SchedEvent::kNone;
  int64_t step = -1;  // kTransfers / kReductions / kTransfer / kReduce; kTransfers -1: a header-only group
  bool with_header = false;  // kTransfers: the header sends/receives go first in this group
};

// Every operation the executor enqueues for one call of `plan`, in enqueue order (empty when the plan has no
// work). `sync`: the caller's stream waits for `done` before the call returns (as dist.all_reduce); otherwise
// the caller's stream is left free and the buffers are kept alive on R instead (Work.wait() makes the then-
// current stream wait for `done`). `header`: add the per-call signature header (above); needs world size > 1,
// and then a plan without work still gets a schedule (the header-only group), so every rank of a call
// exchanges headers whatever its own plan holds.
std::vector<SchedOp> plan_schedule(const Plan& plan, const PlanWaits& waits, bool sync, bool header = false);

}  // namespace paracomm
