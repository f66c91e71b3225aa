#include "ring/nccl_plan.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "checks.h"

namespace paracomm {

namespace {
int64_t align_up(int64_t bytes) {
  return (bytes + kRingWorkspaceAlignment - 1) / kRingWorkspaceAlignment * kRingWorkspaceAlignment;
}
}  // namespace

DType dtype_from_code(int64_t code, const char* arg) {
  PARACOMM_CHECK(code >= 0 && code <= static_cast<int64_t>(DType::kInt64), arg,
                 " must be a DType code in [0, 5] (0 float32, 1 float16, 2 bfloat16, 3 float64, 4 int32, "
                 "5 int64), got ",
                 code);
  return static_cast<DType>(code);
}

void check_ring_all_reduce_spec(const RingAllReduceSpec& s) {
  PARACOMM_CHECK(s.numel >= 0, "numel must be >= 0, got ", s.numel);
  // Byte offsets are numel * 8 at most; keep them far from int64 overflow.
  PARACOMM_CHECK(s.numel <= std::numeric_limits<int64_t>::max() / 16, "numel is too large: ", s.numel);
  PARACOMM_CHECK(s.chunk_elems >= 1, "chunk_elems must be >= 1, got ", s.chunk_elems);
  dtype_from_code(static_cast<int64_t>(s.dtype), "dtype");
  if (s.compressed()) {
    PARACOMM_CHECK(s.wire_dtype == static_cast<int32_t>(DType::kFloat16) ||
                       s.wire_dtype == static_cast<int32_t>(DType::kBFloat16),
                   "wire_dtype must be -1 (none), 1 (float16) or 2 (bfloat16), got ", s.wire_dtype);
    PARACOMM_CHECK(s.dtype == DType::kFloat32, "wire_dtype is only supported for float32 data, got ",
                   dtype_name(s.dtype), " data");
  }
  PARACOMM_CHECK(std::isfinite(s.divisor) && s.divisor > 0, "divisor must be finite and > 0, got ", s.divisor);
  if (!dtype_is_floating(s.dtype)) {
    PARACOMM_CHECK(s.divisor == 1.0, "divisor must be 1 for ", dtype_name(s.dtype), " data (avg needs a "
                   "floating dtype), got ", s.divisor);
    PARACOMM_CHECK(!s.has_scale, "scale is only supported for floating dtypes, got ", dtype_name(s.dtype));
  }
}

RingWorkspaceLayout ring_workspace_layout(const RingAllReduceSpec& s) {
  check_ring_all_reduce_spec(s);
  RingWorkspaceLayout l;
  if (s.numel == 0) return l;
  const int64_t elem = dtype_size(s.travel_dtype());
  int64_t cursor = 0;
  if (s.compressed()) {
    l.wire_offset = 0;
    l.wire_bytes = s.numel * elem;
    cursor = align_up(l.wire_bytes);
  }
  l.recv_elems = std::min(s.chunk_elems, s.numel);
  l.recv_bytes = l.recv_elems * elem;
  for (int b = 0; b < 2; ++b) {
    l.recv_offset[b] = cursor;
    cursor = align_up(cursor + l.recv_bytes);
  }
  l.total_bytes = cursor;
  return l;
}

std::vector<RingOpEvents> plan_ring_events(const std::vector<RingOp>& ops, bool compressed, bool has_found_inf) {
  std::vector<RingOpEvents> plan(ops.size());
  // Ops whose local step records an event, in recording order; entry k was recorded into slot k % slots.
  std::vector<int64_t> recorded;
  recorded.reserve(ops.size());
  for (size_t u = 0; u < ops.size(); ++u) {
    const int64_t i = static_cast<int64_t>(u);
    const RingOp& op = ops[u];
    RingOpEvents& e = plan[u];
    e.transfer = op.send_count > 0 || op.recv_count > 0;
    e.local = op.recv_count > 0 && (op.phase == RingPhase::kReduceScatter || compressed || has_found_inf);
    if (e.transfer) {
      PARACOMM_CHECK(op.send_after < i, "plan_ring_events: op ", i, " sends after a later op ", op.send_after);
      const int64_t need = std::max(op.send_after, i - 2);
      // Latest recorded local step at or before `need` (recorded indices are increasing).
      auto it = std::upper_bound(recorded.begin(), recorded.end(), need);
      if (it != recorded.begin()) {
        const int64_t ordinal = static_cast<int64_t>(it - recorded.begin()) - 1;
        const int64_t newest = static_cast<int64_t>(recorded.size()) - 1;
        PARACOMM_CHECK(newest - ordinal < kRingLocalEventSlots, "plan_ring_events: op ", i,
                       " would wait on an event slot already re-recorded (", newest - ordinal,
                       " newer local steps)");
        e.wait_local = recorded[static_cast<size_t>(ordinal)];
        e.wait_slot = static_cast<int32_t>(ordinal % kRingLocalEventSlots);
      }
    }
    if (e.local) {
      e.local_slot = static_cast<int32_t>(recorded.size() % kRingLocalEventSlots);
      recorded.push_back(i);
    }
  }
  return plan;
}

}  // namespace paracomm
