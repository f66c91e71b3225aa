// The CUDA ring all-reduce executor over NCCL point-to-point (torch-free).
//
// Runs ring_schedule's op list (csrc/ring/schedule.h) for one all_reduce, with the semantics of
// /work/briefs/executor.md shared with the gloo executor: per op one ncclGroupStart / ncclSend / ncclRecv /
// ncclGroupEnd on the communicator's own stream, the local reductions (launch_ring_reduce) on the caller's
// stream, and CUDA events between the two so that op i+1's transfer overlaps op i's reduction.
// Only enqueues work; never synchronises with the device.
#pragma once

// This transport exists only in builds that link NCCL; checks.h defines PARACOMM_NCCL_CHECK under this macro.
#ifndef PARACOMM_WITH_NCCL
#define PARACOMM_WITH_NCCL 1
#endif

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <functional>

#include "checks.h"
#include "ring/nccl_plan.h"

namespace paracomm {

// NCCL's type for a paracomm DType (wire transfers pass the wire dtype).
ncclDataType_t to_nccl_dtype(DType t);

// Events owned by the communicator and reused by every call (see plan_ring_events for why a handful is enough:
// cudaStreamWaitEvent captures an event's latest record when it is enqueued, so re-recording later is safe).
struct RingEvents {
  cudaEvent_t start = nullptr;  // caller's stream -> comm stream, before the first transfer
  cudaEvent_t end = nullptr;    // comm stream -> caller's stream, after the last transfer
  cudaEvent_t transfer[kRingTransferEventSlots] = {};
  cudaEvent_t local[kRingLocalEventSlots] = {};
};

// Device memory of one call.
struct RingBuffers {
  void* data = nullptr;            // numel elements of spec.dtype, reduced in place
  const float* scale = nullptr;    // 1 float32 or null
  float* found_inf = nullptr;      // 1 float32 or null
  void* workspace = nullptr;       // ring_workspace_layout(spec).total_bytes or more
  int64_t workspace_bytes = 0;
};

struct RingExecContext {
  ncclComm_t comm = nullptr;
  int rank = 0;
  int world_size = 1;
  cudaStream_t comm_stream = nullptr;
  cudaStream_t stream = nullptr;  // the caller's stream
  const RingEvents* events = nullptr;
  // Settles the result of an NCCL call on a non-blocking communicator: throws paracomm::Error on failure,
  // waits (bounded by the call's deadline) while the call is ncclInProgress.
  std::function<void(ncclResult_t, const char*)> settle;
  // Set to true just before the first NCCL call: an exception after that leaves the peers mid-ring, so the
  // communicator must be aborted.
  bool* nccl_issued = nullptr;
};

// Bytes of device workspace an all_reduce of `spec` needs at world size `world_size` (0 when nothing
// travels: world size 1 or numel 0). Validates `spec`.
int64_t ring_required_workspace(const RingAllReduceSpec& spec, int world_size);

// Enqueues one all_reduce. Validates everything (spec, pointers, workspace size) before enqueuing anything.
// World size 1: no communication; one in-place ring_reduce when divisor/scale/found_inf ask for it.
void enqueue_ring_all_reduce(const RingExecContext& ctx, const RingAllReduceSpec& spec, const RingBuffers& buf);

}  // namespace paracomm
