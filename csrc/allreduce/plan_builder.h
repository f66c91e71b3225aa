// What every plan generator builds its plans from (plan.cpp's flat algorithms, hierarchical.cpp's phases): spans,
// the two kinds of reduction, and a builder that appends steps and drops empty transfers and reductions in one
// place, so that no generator can emit a zero-count entry. Plain C++ (plans know nothing of torch).
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "allreduce/plan.h"

namespace paracomm {
namespace plan_build {

inline PlanSpan span(PlanBuffer b, int64_t offset) { return PlanSpan{b, offset}; }

inline PlanReduction reduction(int64_t count, std::vector<PlanSpan> inputs, PlanSpan out) {
  PlanReduction r;
  r.count = count;
  r.inputs = std::move(inputs);
  r.out = out;
  return r;
}

// The owner's final reduction of `count` elements: divisor, scale, found_inf, and (compressed) the rounding to
// the bits it will send, kept at `wire_out` when `keep_wire` (the owner then sends exactly what it keeps).
inline PlanReduction final_reduction(const PlanSpec& s, int64_t count, std::vector<PlanSpan> inputs, PlanSpan out,
                                     bool keep_wire, PlanSpan wire_out) {
  PlanReduction r = reduction(count, std::move(inputs), out);
  r.final = true;
  r.check_inf = true;
  if (s.compressed()) {
    r.round_to_wire = true;
    r.has_wire_out = keep_wire;
    r.wire_out = wire_out;
  }
  return r;
}

// Appends steps to a plan; transfers and reductions go to the last step. Empty ones (count <= 0) are dropped.
class StepBuilder {
 public:
  explicit StepBuilder(Plan* plan) : plan_(plan) {}

  // A new step whose transfers may start once steps [0, transfers_after] are complete (-1: at once); its index.
  int64_t step(int64_t transfers_after) {
    PlanStep st;
    st.transfers_after = transfers_after;
    plan_->steps.push_back(std::move(st));
    return static_cast<int64_t>(plan_->steps.size()) - 1;
  }
  void transfer(bool is_send, int64_t peer, PlanSpan where, int64_t count) {
    if (count <= 0) return;
    PlanTransfer t;
    t.send = is_send;
    t.peer = static_cast<int32_t>(peer);
    t.span = where;
    t.count = count;
    plan_->steps.back().transfers.push_back(t);
  }
  void reduce(PlanReduction r) {
    if (r.count > 0) plan_->steps.back().reductions.push_back(std::move(r));
  }

 private:
  Plan* plan_;
};

}  // namespace plan_build
}  // namespace paracomm
