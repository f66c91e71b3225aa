// The NCCL plan executor. Ordering argument, in one place (S = the caller's stream, C = the comm stream):
//
//   S:  rec(start)  ..[wait(T_t)] reductions_i rec(R_i)..                     wait(end)
//   C:  wait(start) ..[wait(R_j)] group_i rec(T_i)..                 rec(end)
//
// The waits themselves are computed by plan_waits (plan_waits.h, pure C++), which tests/test_plan_waits.py
// checks on the CPU against every algorithm's plans; this file enqueues exactly those.
//
// * Start: C waits for S once (only when the plan has transfers), so every transfer sees the data, the
//   workspace and everything the caller enqueued on S before the call.
// * Transfers of step i wait for R_j, j = the latest step <= transfers_after(i) that has reductions. All
//   reductions run on S in step order, so R_j covers every reduction of every step <= transfers_after(i),
//   which is exactly what the plan asks (plan.h: the data sent was produced there, the receive slot filled
//   was last read there). Transfer groups run on C in step order, one after the other, so they never overtake
//   each other: a send of bytes an earlier step *received* (the ring's all-gather forwards what arrived one
//   hop before, and that step has no reduction for transfers_after to name) is ordered by the stream itself.
//   An executor that posts transfer groups concurrently (gloo) must order that case by other means.
//   A wait that an earlier wait of this call already covers is skipped (j <= the last R waited for).
// * Reductions of step i wait for T_t, t = the latest step <= i with transfers: transfer groups run on C in
//   order, so T_t covers this step's transfers and every earlier one (plan.h: "a reduction starts once this
//   step's transfers, and every earlier step's, have completed"). Again skipped when already covered.
// * Everything else may overlap, and the plan guarantees that whatever may run concurrently touches
//   disjoint bytes: that is how step i+1's transfers overlap step i's reductions.
// * End: S waits for C's `end` (recorded after the last transfer group), so every use of the data, the
//   workspace, scale and found_inf -- on either stream -- is ordered before anything enqueued on S after the
//   call. The caller allocated the workspace on S with torch's caching allocator: when it frees the block
//   right after the call returns, the allocator may hand it to a later allocation on S, whose work S runs
//   after `end`, i.e. after the last NCCL transfer that touched it. No record_stream is needed, and the
//   allocator may free or reuse every buffer as soon as the call returns.
// * Events are reused by every call: cudaStreamWaitEvent captures an event's latest record at the time it
//   is enqueued, and every wait above is enqueued after the record it refers to (in this call), so a later
//   call re-recording the same event cannot change what an earlier wait waits for.
// * On an error after the first NCCL call, `end` is still recorded and waited for (best effort), so the
//   caller's buffers stay ordered; the communicator then aborts (nccl_comm.cpp), which releases NCCL's
//   kernels.
#include "allreduce/nccl_executor.h"

#include <cmath>
#include <string>

#include "kernels/reduce.h"

namespace paracomm {

ncclDataType_t to_nccl_dtype(DType t) {
  switch (t) {
    case DType::kFloat32: return ncclFloat32;
    case DType::kFloat16: return ncclFloat16;
    case DType::kBFloat16: return ncclBfloat16;
    case DType::kFloat64: return ncclFloat64;
    case DType::kInt32: return ncclInt32;
    case DType::kInt64: return ncclInt64;
  }
  PARACOMM_THROW("to_nccl_dtype: unknown DType ", static_cast<int>(t));
}

namespace {

DType buffer_dtype(const PlanSpec& spec, PlanBuffer b) { return plan_buffer_dtype(spec, b); }

int64_t buffer_elems(const Plan& plan, PlanBuffer b) {
  switch (b) {
    case PlanBuffer::kData: return plan.data_elems;
    case PlanBuffer::kInput: return plan.input_elems;
    case PlanBuffer::kWire: return plan.spec.compressed() ? plan.wire_elems : 0;
    case PlanBuffer::kRecv: return plan.recv_elems;
  }
  return -1;
}

const char* buffer_name(PlanBuffer b) {
  switch (b) {
    case PlanBuffer::kData: return "data";
    case PlanBuffer::kWire: return "wire";
    case PlanBuffer::kRecv: return "recv";
    case PlanBuffer::kInput: return "input";
  }
  return "unknown";
}

bool is_integer(DType t) { return t == DType::kInt32 || t == DType::kInt64; }

// [offset, offset + count) inside its buffer.
void check_span(const Plan& plan, const PlanSpan& s, int64_t count, size_t step, const char* what) {
  const int b = static_cast<int>(s.buffer);
  PARACOMM_CHECK(b >= 0 && b < kNumPlanBuffers, "plan step ", step, ": ", what, " names unknown buffer ", b);
  const int64_t elems = buffer_elems(plan, s.buffer);
  PARACOMM_CHECK(s.offset >= 0 && count >= 0 && s.offset <= elems && count <= elems - s.offset, "plan step ", step,
                 ": ", what, " [", s.offset, ", ", s.offset, " + ", count, ") is outside the ", buffer_name(s.buffer),
                 " buffer of ", elems, " elements");
}

}  // namespace

void check_plan(const Plan& plan) {
  const PlanSpec& spec = plan.spec;
  PARACOMM_CHECK(spec.numel >= 0 && spec.world_size >= 1 && spec.rank >= 0 && spec.rank < spec.world_size,
                 "plan: bad spec (numel ", spec.numel, ", rank ", spec.rank, " of ", spec.world_size, ")");
  PARACOMM_CHECK(!spec.compressed() || (spec.dtype == DType::kFloat32 && (spec.wire_dtype == int32_t(DType::kFloat16) ||
                                                                         spec.wire_dtype == int32_t(DType::kBFloat16))),
                 "plan: wire dtype ", spec.wire_dtype, " with data ", dtype_name(spec.dtype));
  PARACOMM_CHECK(plan.wire_elems >= 0 && plan.recv_elems >= 0, "plan: negative buffer sizes");
  PARACOMM_CHECK(plan.workspace_bytes() >= 0, "plan: negative workspace");
  if (plan.recv_elems > 0) {
    PARACOMM_CHECK(plan.recv_offset_bytes() >= 0 &&
                       plan.recv_offset_bytes() + plan.recv_elems * dtype_size(spec.travel_dtype()) <=
                           plan.workspace_bytes(),
                   "plan: the recv buffer does not fit the workspace");
  }
  if (spec.compressed() && plan.wire_elems > 0) {
    PARACOMM_CHECK(plan.wire_offset_bytes() + plan.wire_elems * dtype_size(spec.travel_dtype()) <=
                       (plan.recv_elems > 0 ? plan.recv_offset_bytes() : plan.workspace_bytes()),
                   "plan: the wire buffer does not fit before the recv buffer");
  }
  const DType W = spec.travel_dtype();
  for (size_t i = 0; i < plan.steps.size(); ++i) {
    const PlanStep& step = plan.steps[i];
    PARACOMM_CHECK(step.transfers_after >= -1 && step.transfers_after < static_cast<int64_t>(i), "plan step ", i,
                   ": transfers_after ", step.transfers_after, " must be in [-1, ", i, ")");
    for (const PlanTransfer& t : step.transfers) {
      PARACOMM_CHECK(t.peer >= 0 && t.peer < spec.world_size, "plan step ", i, ": peer ", t.peer, " out of range");
      PARACOMM_CHECK(t.count > 0, "plan step ", i, ": transfer of ", t.count, " elements");
      check_span(plan, t.span, t.count, i, t.send ? "send" : "recv");
    }
    for (const PlanReduction& r : step.reductions) {
      const int64_t k = static_cast<int64_t>(r.inputs.size());
      PARACOMM_CHECK(r.count > 0, "plan step ", i, ": reduction of ", r.count, " elements");
      PARACOMM_CHECK(k >= 1 && k <= kMaxReduceInputs && k <= kReduceMaxInputs, "plan step ", i, ": reduction with ",
                     k, " inputs (1..", kMaxReduceInputs, ")");
      for (const PlanSpan& in : r.inputs) check_span(plan, in, r.count, i, "reduction input");
      for (int64_t j = 2; j < k; ++j) {
        PARACOMM_CHECK(buffer_dtype(spec, r.inputs[j].buffer) == buffer_dtype(spec, r.inputs[1].buffer), "plan step ",
                       i, ": reduction inputs[1:] of different dtypes");
      }
      check_span(plan, r.out, r.count, i, "reduction output");
      PARACOMM_CHECK(!r.round_to_wire || spec.compressed(), "plan step ", i, ": round_to_wire without a wire dtype");
      PARACOMM_CHECK(!r.has_wire_out || r.round_to_wire, "plan step ", i, ": wire_out without round_to_wire");
      if (r.has_wire_out) {
        check_span(plan, r.wire_out, r.count, i, "reduction wire_out");
        PARACOMM_CHECK(buffer_dtype(spec, r.wire_out.buffer) == W, "plan step ", i,
                       ": wire_out must be a buffer of the wire dtype");
      }
      // Every buffer of a plan is T or W, and W != T only for float32 data with a 16-bit wire: the kernel's
      // float family (float32 + one 16-bit type). float64 / integer plans have T everywhere.
    }
  }
}

void check_plan_buffers(const Plan& plan, const PlanBuffers& buf, double divisor) {
  const PlanSpec& spec = plan.spec;
  PARACOMM_CHECK(std::isfinite(divisor) && divisor > 0.0, "divisor must be finite and > 0, got ", divisor);
  if (is_integer(spec.dtype)) {
    PARACOMM_CHECK(divisor == 1.0, "divisor must be 1 for integer dtype ", dtype_name(spec.dtype), ", got ", divisor);
    PARACOMM_CHECK(buf.scale == nullptr, "scale_ptr must be 0 for integer dtype ", dtype_name(spec.dtype));
  }
  PARACOMM_CHECK(spec.has_found_inf == (buf.found_inf != nullptr), "plan and call disagree on found_inf");
  PARACOMM_CHECK(spec.has_final_op == (divisor != 1.0 || buf.scale != nullptr || buf.found_inf != nullptr),
                 "plan and call disagree on the final op");
  PARACOMM_CHECK(plan.data_elems == 0 || buf.data != nullptr, "ptr is null but numel is ", spec.numel);
  PARACOMM_CHECK(plan.input_elems == 0 || buf.input != nullptr, "input_ptr is null but the plan reads ",
                 plan.input_elems, " input elements");
  const int64_t required = plan.workspace_bytes();
  PARACOMM_CHECK(buf.workspace_bytes >= required, "workspace_bytes must be >= ", required,
                 " (the plan's workspace_bytes), got ", buf.workspace_bytes);
  PARACOMM_CHECK(required == 0 || buf.workspace != nullptr, "workspace_ptr is null but ", required,
                 " bytes are needed");
}

void enqueue_plan(const NcclExecContext& ctx, const Plan& plan, const PlanWaits& waits, const PlanBuffers& buf,
                  double divisor) {
  const PlanSpec& spec = plan.spec;
  const int64_t num_steps = static_cast<int64_t>(plan.steps.size());
  PARACOMM_CHECK(ctx.nccl_issued != nullptr && ctx.failed != nullptr && ctx.events.steps >= num_steps &&
                     ctx.events.start != nullptr && ctx.events.end != nullptr,
                 "enqueue_plan: incomplete context");
  const DType T = spec.dtype, W = spec.travel_dtype();
  char* const ws = static_cast<char*>(buf.workspace);
  char* const data = static_cast<char*>(buf.data);
  // kInput is only ever read (plan.h); NCCL and the kernel take it through non-const pointers.
  char* const input = const_cast<char*>(static_cast<const char*>(buf.input));
  auto address = [&](const PlanSpan& s) -> char* {
    switch (s.buffer) {
      case PlanBuffer::kData: return data + s.offset * dtype_size(T);
      case PlanBuffer::kInput: return input + s.offset * dtype_size(T);
      case PlanBuffer::kWire: return ws + plan.wire_offset_bytes() + s.offset * dtype_size(W);
      case PlanBuffer::kRecv: return ws + plan.recv_offset_bytes() + s.offset * dtype_size(W);
    }
    return nullptr;
  };
  const cudaStream_t S = ctx.stream, C = ctx.comm_stream;
  const PlanEvents& ev = ctx.events;
  PARACOMM_CHECK(waits.comm_waits.size() == plan.steps.size() && waits.stream_waits.size() == plan.steps.size() &&
                     waits.record_transfer.size() == plan.steps.size() &&
                     waits.record_reduce.size() == plan.steps.size(),
                 "enqueue_plan: waits computed for another plan");

  if (waits.has_transfers) {
    PARACOMM_CUDA_CHECK(cudaEventRecord(ev.start, S));
    PARACOMM_CUDA_CHECK(cudaStreamWaitEvent(C, ev.start, 0));
  }
  try {
    for (int64_t i = 0; i < num_steps; ++i) {
      const PlanStep& step = plan.steps[static_cast<size_t>(i)];
      if (!step.transfers.empty()) {
        const int64_t j = waits.comm_waits[static_cast<size_t>(i)];
        if (j >= 0) PARACOMM_CUDA_CHECK(cudaStreamWaitEvent(C, ev.reduce[j], 0));
        PARACOMM_CHECK(!ctx.failed->load(std::memory_order_acquire),
                       "the communicator failed while this all_reduce was being enqueued");
        *ctx.nccl_issued = true;
        PARACOMM_NCCL_CHECK(ncclGroupStart(), ctx.comm);
        // Inside a group NCCL only records the calls; a failure must still close the group before it is raised.
        ncclResult_t queued = ncclSuccess;
        const char* failed_call = nullptr;
        for (const PlanTransfer& t : step.transfers) {
          const DType dt = buffer_dtype(spec, t.span.buffer);
          const ncclResult_t r =
              t.send ? ncclSend(address(t.span), static_cast<size_t>(t.count), to_nccl_dtype(dt), t.peer, ctx.comm, C)
                     : ncclRecv(address(t.span), static_cast<size_t>(t.count), to_nccl_dtype(dt), t.peer, ctx.comm, C);
          if (r != ncclSuccess) {
            queued = r;
            failed_call = t.send ? "ncclSend" : "ncclRecv";
            break;
          }
        }
        const ncclResult_t ended = ncclGroupEnd();  // blocking communicator: may wait while peers connect
        if (failed_call != nullptr) {
          PARACOMM_THROW("NCCL error ", ncclGetErrorString(queued), " in ", failed_call, " (step ", i, "): ",
                         ncclGetLastError(ctx.comm));
        }
        if (ended != ncclSuccess) {
          PARACOMM_THROW("NCCL error ", ncclGetErrorString(ended), " in ncclGroupEnd (step ", i, "): ",
                         ncclGetLastError(ctx.comm));
        }
        if (waits.record_transfer[static_cast<size_t>(i)]) PARACOMM_CUDA_CHECK(cudaEventRecord(ev.transfer[i], C));
      }
      if (!step.reductions.empty()) {
        const int64_t t = waits.stream_waits[static_cast<size_t>(i)];
        if (t >= 0) PARACOMM_CUDA_CHECK(cudaStreamWaitEvent(S, ev.transfer[t], 0));
        for (const PlanReduction& r : step.reductions) {
          ReduceArgs a;
          a.out = address(r.out);
          a.out_dtype = buffer_dtype(spec, r.out.buffer);
          a.num_inputs = static_cast<int32_t>(r.inputs.size());
          for (size_t k = 0; k < r.inputs.size(); ++k) a.inputs[k] = address(r.inputs[k]);
          a.first_dtype = buffer_dtype(spec, r.inputs[0].buffer);
          a.rest_dtype = r.inputs.size() > 1 ? buffer_dtype(spec, r.inputs[1].buffer) : a.first_dtype;
          a.n = r.count;
          a.divisor = r.final ? divisor : 1.0;
          a.scale = r.final ? buf.scale : nullptr;
          a.found_inf = r.check_inf ? buf.found_inf : nullptr;
          a.round_to_wire = r.round_to_wire;
          a.wire_dtype = r.round_to_wire ? W : DType::kFloat16;
          a.wire_out = r.round_to_wire && r.has_wire_out ? address(r.wire_out) : nullptr;
          launch_reduce(a, S);
        }
        if (waits.record_reduce[static_cast<size_t>(i)]) PARACOMM_CUDA_CHECK(cudaEventRecord(ev.reduce[i], S));
      }
    }
    if (waits.has_transfers) {
      PARACOMM_CUDA_CHECK(cudaEventRecord(ev.end, C));
      PARACOMM_CUDA_CHECK(cudaStreamWaitEvent(S, ev.end, 0));
    }
  } catch (...) {
    if (waits.has_transfers) {
      // Keep the caller's buffers ordered after whatever reached the comm stream (see the file comment).
      if (cudaEventRecord(ev.end, C) == cudaSuccess) (void)cudaStreamWaitEvent(S, ev.end, 0);
      (void)cudaGetLastError();
    }
    throw;
  }
}

}  // namespace paracomm
