// The NCCL plan executor (torch-free CUDA + NCCL): runs ANY all-reduce plan (csrc/allreduce/plan.h) and knows
// no algorithm. Per step with transfers: one ncclGroupStart / ncclSend+ncclRecv... / ncclGroupEnd on the
// communicator's stream; per step with reductions: one launch_reduce per PlanReduction on the caller's stream;
// CUDA events carry exactly the dependencies the plan states. Only enqueues work; never synchronises with the
// device. The ordering argument is written out at the top of nccl_executor.cpp.
#pragma once

#ifndef PARACOMM_WITH_NCCL
#define PARACOMM_WITH_NCCL 1
#endif

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <atomic>
#include <cstdint>
#include <vector>

#include "allreduce/plan.h"
#include "allreduce/plan_waits.h"
#include "checks.h"

namespace paracomm {

// NCCL's type for a paracomm DType.
ncclDataType_t to_nccl_dtype(DType t);

// Device memory of one call.
struct PlanBuffers {
  void* data = nullptr;            // kData: plan.data_elems elements of spec.dtype (the output; in place for all-reduce)
  const void* input = nullptr;     // kInput: plan.input_elems elements of spec.dtype, only read (null for all-reduce)
  const float* scale = nullptr;    // 1 float32 or null (applied by final reductions)
  float* found_inf = nullptr;      // 1 float32 or null (set by check_inf reductions)
  void* workspace = nullptr;       // kWire then kRecv, plan.workspace_bytes() or more
  int64_t workspace_bytes = 0;
};

// Events the communicator owns and reuses for every call. transfer[i] / reduce[i] are recorded after step
// i's transfer group (comm stream) / reductions (caller's stream); `steps` is how many of each exist.
// Re-recording an event in a later call is safe: cudaStreamWaitEvent captures the event's latest record at
// the time it is enqueued, and every wait of a call is enqueued after the record it refers to.
struct PlanEvents {
  cudaEvent_t start = nullptr;  // caller's stream -> comm stream, before the first transfer
  cudaEvent_t end = nullptr;    // comm stream -> caller's stream, after the last transfer
  const cudaEvent_t* transfer = nullptr;
  const cudaEvent_t* reduce = nullptr;
  int64_t steps = 0;
};

struct NcclExecContext {
  ncclComm_t comm = nullptr;       // a blocking communicator of plan.spec.world_size ranks
  cudaStream_t comm_stream = nullptr;
  cudaStream_t stream = nullptr;   // the caller's stream
  PlanEvents events;
  // Checked before every transfer group: once set (the watchdog recorded a failure), nothing more is issued.
  const std::atomic<bool>* failed = nullptr;
  // Set to true just before the first NCCL call: an exception after that leaves the peers mid-plan, so the
  // communicator must be aborted.
  bool* nccl_issued = nullptr;
};

// Checks a plan's structure once (plans are cached): step count, transfers_after < index, peers in range and
// never this rank, counts > 0, every span inside its buffer (kData: data_elems, kInput: input_elems, kWire: wire_elems and only when
// compressed, kRecv: recv_elems), reductions of 1..kMaxReduceInputs inputs with inputs[1:] in one buffer
// dtype and a dtype combination the kernel supports, wire_out only with round_to_wire. Throws
// paracomm::Error naming the step on the first violation.
void check_plan(const Plan& plan);

// Per call, before anything is enqueued: data non-null when numel > 0; workspace_bytes >= plan.workspace_bytes()
// and workspace non-null when that is > 0; divisor finite and > 0 (exactly 1, and no scale, for integers);
// spec.has_found_inf / has_final_op consistent with the buffers and divisor. Throws paracomm::Error.
void check_plan_buffers(const Plan& plan, const PlanBuffers& buf, double divisor);

// Enqueues `plan` (already checked with check_plan and check_plan_buffers) on ctx.comm, with the waits
// plan_waits(plan) computed for it. The caller's stream
// must not be capturing (the caller checks: a refusal must come before anything is enqueued). Throws
// paracomm::Error on an NCCL or CUDA failure; when *ctx.nccl_issued is set by then, the caller must abort the
// communicator (this function has already made the caller's stream wait for the comm stream, best effort).
void enqueue_plan(const NcclExecContext& ctx, const Plan& plan, const PlanWaits& waits, const PlanBuffers& buf,
                  double divisor);


}  // namespace paracomm
