// Waits of the NCCL executor for a plan; the rules and why they suffice: plan_waits.h and nccl_executor.cpp.
#include "allreduce/plan_waits.h"

namespace paracomm {

PlanWaits plan_waits(const Plan& plan) {
  const size_t n = plan.steps.size();
  PlanWaits w;
  w.comm_waits.assign(n, -1);
  w.stream_waits.assign(n, -1);
  w.record_transfer.assign(n, false);
  w.record_reduce.assign(n, false);
  std::vector<int64_t> latest_reduce(n, -1);  // latest step <= i with reductions
  int64_t comm_waited = -1, stream_waited = -1, last_transfer = -1;
  for (size_t u = 0; u < n; ++u) {
    const int64_t i = static_cast<int64_t>(u);
    const PlanStep& step = plan.steps[u];
    if (!step.transfers.empty()) {
      w.has_transfers = true;
      // transfers_after < i (check_plan), so latest_reduce is already known there.
      const int64_t j = step.transfers_after >= 0 ? latest_reduce[static_cast<size_t>(step.transfers_after)] : -1;
      if (j > comm_waited) {
        w.comm_waits[u] = j;
        w.record_reduce[static_cast<size_t>(j)] = true;
        comm_waited = j;
      }
      last_transfer = i;
    }
    if (!step.reductions.empty()) {
      if (last_transfer > stream_waited) {
        w.stream_waits[u] = last_transfer;
        w.record_transfer[static_cast<size_t>(last_transfer)] = true;
        stream_waited = last_transfer;
      }
      latest_reduce[u] = i;
    } else if (u > 0) {
      latest_reduce[u] = latest_reduce[u - 1];
    }
  }
  return w;
}

}  // namespace paracomm
