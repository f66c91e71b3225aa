// Pure planning for the NCCL ring executor (plain C++: no CUDA, no NCCL, no torch).
//
// Everything the executor (nccl_ring.cpp) decides before it touches a stream lives here, so it can be checked
// on a machine without a GPU (tests/test_nccl_binding_contract.py compiles this file on its own):
//   * which all_reduce calls are valid (dtype, wire dtype, divisor, chunk size);
//   * the device workspace layout: wire staging and the two receive buffers (nccl_workspace_bytes uses it too);
//   * the event plan: which local-reduction event each op's transfer waits for, and which event slots are
//     recorded, so that a fixed handful of CUDA events serves every call (no per-call allocation).
#pragma once

#include <cstdint>
#include <vector>

#include "dtype.h"
#include "ring/schedule.h"

namespace paracomm {

// wire_dtype value meaning "no compression": data travels in its own dtype.
constexpr int32_t kNoWireDType = -1;

// Receive buffers and the wire staging buffer start on this boundary inside the workspace (NCCL and the
// vectorised reduction kernels both like aligned buffers; 256 matches cudaMalloc's guarantee).
constexpr int64_t kRingWorkspaceAlignment = 256;

// Event slots the executor cycles through. The plan checks that a slot is never re-recorded while a
// transfer still has to wait on its previous record (see plan_ring_events).
constexpr int kRingLocalEventSlots = 3;
constexpr int kRingTransferEventSlots = 2;

// One all_reduce as the executor sees it. DType codes as in dtype.h.
struct RingAllReduceSpec {
  int64_t numel = 0;
  DType dtype = DType::kFloat32;
  int32_t wire_dtype = kNoWireDType;  // DType code of the wire type (float16/bfloat16), or kNoWireDType
  double divisor = 1.0;               // N for avg, else 1
  bool has_scale = false;
  bool has_found_inf = false;
  int64_t chunk_elems = 1;            // elements of the travelling dtype per ring op

  bool compressed() const { return wire_dtype != kNoWireDType; }
  // The dtype that crosses the wire and fills the receive buffers.
  DType travel_dtype() const { return compressed() ? static_cast<DType>(wire_dtype) : dtype; }
};

// Maps a DType code from the Python binding onto DType; paracomm::Error naming `arg` for unknown codes.
DType dtype_from_code(int64_t code, const char* arg);

// Throws paracomm::Error (naming the argument) unless: numel >= 0; chunk_elems >= 1; wire_dtype is
// kNoWireDType or float16/bfloat16, and only with float32 data; divisor finite and > 0, exactly 1 for
// integer dtypes; no scale for integer dtypes.
void check_ring_all_reduce_spec(const RingAllReduceSpec& spec);

// Byte layout of the device workspace. Receive buffers hold min(chunk_elems, numel) elements of the
// travelling dtype (a ring op never moves more than one chunk, nor more than the whole tensor, whatever the
// world size, so the layout does not depend on it). Compressed calls add a staging buffer of numel wire
// elements. numel == 0 needs nothing.
struct RingWorkspaceLayout {
  int64_t wire_offset = 0;   // staging buffer w (compressed only)
  int64_t wire_bytes = 0;
  int64_t recv_offset[2] = {0, 0};
  int64_t recv_elems = 0;    // capacity of each receive buffer, in travelling-dtype elements
  int64_t recv_bytes = 0;
  int64_t total_bytes = 0;   // what nccl_workspace_bytes reports
};

// Validates `spec` (check_ring_all_reduce_spec) and lays the workspace out.
RingWorkspaceLayout ring_workspace_layout(const RingAllReduceSpec& spec);

// How op i of a ring schedule uses events. Local reductions all run on the caller's stream in op order, so
// waiting for the latest recorded local step at or before an index covers every earlier one: that is how a
// single wait per transfer replaces "wait for op send_after's local step and for op i-2's".
struct RingOpEvents {
  bool transfer = false;    // ncclSend/ncclRecv are issued (some count > 0)
  bool local = false;       // a local reduction follows on the caller's stream (after the transfer)
  int64_t wait_local = -1;  // op whose local-step event the transfer waits for, -1 for none
  int32_t wait_slot = -1;   // event slot holding that record
  int32_t local_slot = -1;  // slot recorded after this op's local step, -1 when there is none
};

// The event plan for `ops` (ring_schedule's list). A transfer of op i must not start before the local step of
// op send_after (it produced the data sent) nor before op i-2's local step (it reads receive buffer i % 2,
// which op i refills); in-place all-gather receives only touch chunks whose last local step is older still.
// Local steps exist for every reduce-scatter op that receives data, and for all-gather ops when the data
// arrives compressed (it must be widened into x) or found_inf must be checked.
// Throws paracomm::Error if a slot would be re-recorded before its last waiter (cannot happen for
// ring_schedule's lists; the check guards future schedule changes).
std::vector<RingOpEvents> plan_ring_events(const std::vector<RingOp>& ops, bool compressed, bool has_found_inf);

}  // namespace paracomm
