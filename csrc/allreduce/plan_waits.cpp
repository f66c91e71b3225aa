// Waits and stream schedule of the NCCL executor for a plan; the rules and why they suffice: plan_waits.h and
// nccl_executor.h.
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
      w.has_reductions = true;
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

std::vector<SchedOp> plan_schedule(const Plan& plan, const PlanWaits& waits, bool sync, bool header) {
  std::vector<SchedOp> ops;
  header = header && plan.spec.world_size > 1;
  if (!waits.has_transfers && !waits.has_reductions && !header) return ops;
  using A = SchedAction;
  using S = SchedStream;
  using E = SchedEvent;
  // The header rides in the first transfer group; a plan without transfers gets a header-only group (step -1).
  int64_t first_transfer = -1;
  for (size_t u = 0; u < plan.steps.size() && first_transfer < 0; ++u) {
    if (!plan.steps[u].transfers.empty()) first_transfer = static_cast<int64_t>(u);
  }
  const bool has_groups = waits.has_transfers || header;
  bool check_pending = header;
  // R joins the caller once; C joins R (so C also follows every earlier call's reductions, which may still read
  // a workspace block or data this call's transfers overwrite).
  ops.push_back({A::kRecord, S::kCaller, E::kStart});
  ops.push_back({A::kWait, S::kReduce, E::kStart});
  if (header) ops.push_back({A::kHeaderFill, S::kReduce});
  if (has_groups) {
    ops.push_back({A::kRecord, S::kReduce, E::kBegin});
    ops.push_back({A::kWait, S::kComm, E::kBegin});
  }
  if (header && first_transfer < 0) {
    SchedOp group{A::kTransfers, S::kComm, E::kNone, -1};
    group.with_header = true;
    ops.push_back(group);
  }
  for (size_t u = 0; u < plan.steps.size(); ++u) {
    const int64_t i = static_cast<int64_t>(u);
    const PlanStep& step = plan.steps[u];
    if (!step.transfers.empty()) {
      if (waits.comm_waits[u] >= 0) ops.push_back({A::kWait, S::kComm, E::kReduce, waits.comm_waits[u]});
      SchedOp group{A::kTransfers, S::kComm, E::kNone, i};
      group.with_header = header && i == first_transfer;
      ops.push_back(group);
      if (waits.record_transfer[u]) ops.push_back({A::kRecord, S::kComm, E::kTransfer, i});
    }
    if (!step.reductions.empty()) {
      if (waits.stream_waits[u] >= 0) {
        ops.push_back({A::kWait, S::kReduce, E::kTransfer, waits.stream_waits[u]});
        // T_t covers every group <= t, so also the one that carried the headers.
        if (check_pending && first_transfer >= 0 && waits.stream_waits[u] >= first_transfer) {
          ops.push_back({A::kHeaderCheck, S::kReduce});
          check_pending = false;
        }
      }
      ops.push_back({A::kReductions, S::kReduce, E::kNone, i});
      if (waits.record_reduce[u]) ops.push_back({A::kRecord, S::kReduce, E::kReduce, i});
    }
  }
  // C -> R after the last transfer group, unless R already waited for that group (a plan ending in a reduction
  // of everything received, as one_shot's): then `end` would add nothing. A header-only group always needs it.
  int64_t last_transfer = -1, last_stream_wait = -1;
  for (size_t u = 0; u < plan.steps.size(); ++u) {
    if (!plan.steps[u].transfers.empty()) last_transfer = static_cast<int64_t>(u);
    if (waits.stream_waits[u] >= 0) last_stream_wait = waits.stream_waits[u];
  }
  if ((waits.has_transfers && last_stream_wait < last_transfer) || (header && first_transfer < 0)) {
    ops.push_back({A::kRecord, S::kComm, E::kEnd});
    ops.push_back({A::kWait, S::kReduce, E::kEnd});
  }
  // Still pending here only when R never waited for a transfer event after the header's group; `end` (or the
  // last stream wait, which then covers the last group) orders it.
  if (check_pending) ops.push_back({A::kHeaderCheck, S::kReduce});
  ops.push_back({A::kRecord, S::kReduce, E::kDone});
  if (sync) {
    ops.push_back({A::kWait, S::kCaller, E::kDone});
  } else {
    ops.push_back({A::kKeepAlive, S::kReduce});
  }
  return ops;
}

}  // namespace paracomm
