// The cross-stream waits the NCCL executor (nccl_executor.cpp) enqueues for a plan: plain C++ (no CUDA, no NCCL,
// no torch), so the ordering argument can be checked on a machine without a GPU (tests/test_plan_waits.py runs
// it on every algorithm's plans and checks that every two operations touching the same bytes are ordered).
//
// S = the caller's stream (every step's reductions, in step order); C = the comm stream (every step's transfer
// group, in step order). R_i = the event recorded on S after step i's reductions, T_i = the event recorded on C
// after step i's transfer group.
//   * start / end: when the plan has transfers, C waits for S before the first group and S waits for C after
//     the last one;
//   * comm_waits[i] = j >= 0: before step i's transfer group, C waits for R_j, j = the latest step <=
//     transfers_after(i) that has reductions (reductions run in order on S, so R_j covers all of them);
//     -1 when there is none, or when an earlier wait on C already covers it;
//   * transfer groups need no waits among themselves: C runs them one after the other, which also orders a send
//     of bytes an earlier step received (the ring's all-gather), a dependency transfers_after does not name;
//   * stream_waits[i] = t >= 0: before step i's reductions, S waits for T_t, t = the latest step <= i with
//     transfers (groups run in order on C, so T_t covers this step's and every earlier one); -1 when there is
//     none, or when an earlier wait on S already covers it.
#pragma once

#include <cstdint>
#include <vector>

#include "allreduce/plan.h"

namespace paracomm {

struct PlanWaits {
  bool has_transfers = false;
  std::vector<int64_t> comm_waits;    // one per step
  std::vector<int64_t> stream_waits;  // one per step
  // Whether some wait refers to T_i / R_i: events nobody waits for are not recorded (each record is ~1 us of
  // host time; a 16-group plan saves a dozen).
  std::vector<bool> record_transfer;  // one per step
  std::vector<bool> record_reduce;    // one per step
};

PlanWaits plan_waits(const Plan& plan);

}  // namespace paracomm
