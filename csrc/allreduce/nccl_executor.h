// The NCCL plan executor (torch-free CUDA + NCCL): runs ANY plan of the generators (csrc/allreduce/plan.h:
// all-reduce, reduce-scatter, all-gather; flat or hierarchical) and knows no algorithm and no collective: it maps
// the plan's five buffers (kData, kInput, kWire, kRecv, kStage) to pointers and follows the steps. It
// enqueues exactly the schedule plan_schedule() lists (plan_waits.h): per step with transfers
// one ncclGroupStart / ncclSend+ncclRecv... / ncclGroupEnd on paracomm's comm stream C, per step with reductions
// one launch_reduce per PlanReduction on paracomm's reduce stream R, and CUDA events for exactly the
// dependencies below. It only enqueues; it never synchronises with the device. The stream semantics are
// torch's WorkNCCL's: nothing of a call runs on the caller's stream S, which is blocked only by a synchronous
// call or by Work.wait().
//
// Ordering argument (tests/test_plan_waits.py replays plan_schedule() with vector clocks over S, R and C, two
// calls in a row, the caller's earlier and later work, and buffer releases, for every algorithm's plans):
//
//   S:  rec(start)                                                      [sync: wait(done)]
//   R:  wait(start) rec(begin) ..[wait(T_t)] reductions_i [rec(R_i)].. [wait(end)] rec(done) [async: keep-alive]
//   C:               wait(begin) ..[wait(R_j)] group_i [rec(T_i)]..  [rec(end)]
//
// * Inputs ready: R waits for S once, and C waits for R after that (begin), so every reduction and transfer
//   sees the data, scale, found_inf and everything the caller enqueued on S before the call.
// * Earlier calls: R and C each run paracomm's calls in issue order, and `begin` also orders this call's
//   transfers after every earlier call's reductions (R's tail) -- which may still read the data or a workspace
//   block this call's receives overwrite; an earlier call's transfers precede its `end`, which R waited for
//   before this call's `start` wait. So consecutive calls (even on the same tensor) never overlap each other.
// * Within a call: transfers of step i wait for R_j, j = the latest step <= transfers_after(i) with
//   reductions (R runs reductions in step order, so R_j covers every one the plan names); reductions of step i
//   wait for T_t, t = the latest step <= i with transfers (C runs groups in step order). A transfer group never
//   overtakes an earlier one on C, which orders a send of bytes an earlier step received (the ring's
//   all-gather). Everything else may overlap; the plan guarantees that whatever may run concurrently touches
//   disjoint bytes: that is how step i+1's transfers overlap step i's reductions.
// * Completion: C records `end` after its last group and R waits for it (skipped when R already waited for
//   that group's T_t, as in one_shot, whose last step reduces everything received), so `done` (recorded on R
//   last) follows every operation of the call on both streams. A synchronous call makes S wait for `done` before
//   returning (dist.all_reduce's semantics); an async one leaves S free, and Work.wait() / the CUDA-aware
//   future (completed with R current) makes the then-current stream wait for an event recorded on R after
//   `done`. The watchdog polls `done` (nccl_comm.h).
// * Buffers: the workspace comes from torch's caching allocator pool of R and is released right after the
//   enqueue: the allocator hands it only to a later allocation on R, i.e. a later paracomm call, whose work is
//   ordered after this call's by the second point. The caller's buffers: in a sync call, S waits for `done`,
//   so the allocator's reuse on S (the blocks' stream) is ordered after every use; in an async call the
//   keep-alive (record_stream on R, after `done` was recorded) holds their blocks until R's work so far --
//   hence every use on R and C -- has completed, whatever the caller frees before wait().
// * Events are reused by every call: cudaStreamWaitEvent captures an event's latest record at the time it is
//   enqueued, and every wait is enqueued (under the communicator's enqueue lock) after the record it refers to
//   in the same call, so a later call re-recording an event cannot change what an earlier wait waits for.
// * On an error after the first NCCL call, `end` and `done` are still recorded and a sync call still makes S
//   wait (best effort), so the caller's buffers stay ordered; the communicator then aborts (nccl_comm.h), which
//   releases NCCL's kernels.
#pragma once

#ifndef PARACOMM_WITH_NCCL
#define PARACOMM_WITH_NCCL 1
#endif

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <vector>

#include "allreduce/plan.h"
#include "allreduce/plan_waits.h"
#include "checks.h"
#include "kernels/header_check.h"

namespace paracomm {

// NCCL's type for a paracomm DType.
ncclDataType_t to_nccl_dtype(DType t);

// Device memory of one call.
struct PlanBuffers {
  void* data = nullptr;            // kData: plan.data_elems elements of spec.dtype (the output; in place for all-reduce)
  const void* input = nullptr;     // kInput: plan.input_elems elements of spec.dtype, only read (null for all-reduce)
  const float* scale = nullptr;    // 1 float32 or null (applied by final reductions)
  float* found_inf = nullptr;      // 1 float32 or null (set by check_inf reductions)
  void* workspace = nullptr;       // kWire, kRecv then kStage, plan.workspace_bytes() or more
  int64_t workspace_bytes = 0;
};

// The per-call signature header of a schedule made with header = true (plan_waits.h): this call's words, the
// communicator's device slots (send: kMaxHeaderWords words; receive: world_size rows of kMaxHeaderWords, row p
// from rank p) and its host-mapped mismatch record (device pointer), and the call's sequence number.
struct HeaderExchange {
  HeaderValues values;
  int32_t words = 0;
  int64_t* send_slot = nullptr;
  int64_t* recv_slots = nullptr;
  HeaderMismatchRecord* record = nullptr;
  int64_t seq = 0;
};

// Events the communicator owns and reuses for every call (the ordering argument above says why reuse is safe).
// transfer[i] / reduce[i] are recorded after step i's transfer group (C) / reductions (R); `steps` is how many
// of each exist. `done` is the call's own completion event (from the communicator's pool).
struct PlanEvents {
  cudaEvent_t start = nullptr;  // S -> R
  cudaEvent_t begin = nullptr;  // R -> C
  cudaEvent_t end = nullptr;    // C -> R, after the last transfer group
  cudaEvent_t done = nullptr;   // on R after everything
  const cudaEvent_t* transfer = nullptr;
  const cudaEvent_t* reduce = nullptr;
  int64_t steps = 0;
};

// Torch-facing services a call may bring (csrc/cuda/nccl_tensor_call.cpp); the executor and the communicator
// stay torch-free and only call these.
struct NcclCallServices {
  virtual ~NcclCallServices() = default;
  // `bytes` (> 0) of device memory whose reuse is ordered on `stream` (torch's caching allocator, pool of that
  // stream): released right after the enqueue, it is handed only to later allocations on `stream`.
  virtual void* allocate_workspace(int64_t bytes, cudaStream_t stream) = 0;
  virtual void release_workspace(void* ptr) noexcept = 0;
  // The caller's buffers (data, input, scale, found_inf) are not reused before the work enqueued on `stream`
  // so far has completed (torch: record_stream). Async calls only.
  virtual void keep_alive(cudaStream_t stream) = 0;
};

// NCCL access for the executor. The communicator is NON-blocking and its handle is only used under *mu: the
// watchdog takes the same lock to abort, so ncclCommAbort never runs concurrently with an NCCL call of the
// enqueuing thread (nccl_comm.h, Locking). *comm is null once aborted.
struct NcclAccess {
  std::mutex* mu = nullptr;
  ncclComm_t* comm = nullptr;
};

struct NcclExecContext {
  NcclAccess nccl;
  cudaStream_t comm_stream = nullptr;    // C
  cudaStream_t reduce_stream = nullptr;  // R
  cudaStream_t stream = nullptr;         // S, the caller's
  PlanEvents events;
  // Checked before every transfer group and while a group is in progress: once set (the watchdog recorded a
  // failure), nothing more is issued.
  const std::atomic<bool>* failed = nullptr;
  // A transfer group still in progress (ncclInProgress) past this is a failure.
  std::chrono::steady_clock::time_point deadline;
  double timeout_s = 0;
  // Set to true just before the first NCCL call: an exception after that leaves the peers mid-plan, so the
  // communicator must be aborted.
  bool* nccl_issued = nullptr;
  NcclCallServices* services = nullptr;  // kKeepAlive; may be null only for synchronous schedules
  const HeaderExchange* header = nullptr;  // required by a schedule with kHeaderFill / with_header / kHeaderCheck
};

// Checks a plan's structure once (plans are cached): step count, transfers_after < index, peers in range and
// never this rank, counts > 0, every span inside its buffer (kData: data_elems, kInput: input_elems, kWire:
// wire_elems and only when compressed, kRecv: recv_elems, kStage: stage_elems), nothing written to kInput,
// reductions of 1..kMaxReduceInputs inputs with inputs[1:] in one buffer
// dtype and a dtype combination the kernel supports, wire_out only with round_to_wire. Throws
// paracomm::Error naming the step on the first violation.
void check_plan(const Plan& plan);

// Per call, before anything is enqueued: data non-null when numel > 0; workspace_bytes >= plan.workspace_bytes()
// and workspace non-null when that is > 0; divisor finite and > 0 (exactly 1, and no scale, for integers);
// spec.has_found_inf / has_final_op consistent with the buffers and divisor. Throws paracomm::Error.
void check_plan_buffers(const Plan& plan, const PlanBuffers& buf, double divisor);

// Enqueues `schedule` = plan_schedule(plan, plan_waits(plan), sync) for `plan` (already checked with check_plan
// and check_plan_buffers), exactly as listed, nothing else. The caller's stream must not be capturing (the
// caller checks: a refusal must come before anything is enqueued). Throws paracomm::Error on an NCCL or CUDA
// failure, an abort or the deadline; when *ctx.nccl_issued is set by then, the caller must have the
// communicator aborted (this function has already recorded `done` after whatever reached the streams and, for
// a synchronous schedule, made the caller's stream wait for it, best effort).
void enqueue_plan(const NcclExecContext& ctx, const Plan& plan, const std::vector<SchedOp>& schedule,
                  const PlanBuffers& buf, double divisor);

}  // namespace paracomm
