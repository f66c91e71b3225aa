// The NCCL plan executor; the ordering argument is at the top of nccl_executor.h.
#include "allreduce/nccl_executor.h"

#include <cmath>
#include <string>
#include <thread>

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
    case PlanBuffer::kStage: return plan.stage_elems;
  }
  return -1;
}

const char* buffer_name(PlanBuffer b) {
  switch (b) {
    case PlanBuffer::kData: return "data";
    case PlanBuffer::kWire: return "wire";
    case PlanBuffer::kRecv: return "recv";
    case PlanBuffer::kInput: return "input";
    case PlanBuffer::kStage: return "stage";
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
  if (plan.stage_elems > 0) {
    PARACOMM_CHECK(plan.stage_offset_bytes() >= 0 &&
                       plan.stage_offset_bytes() + plan.stage_elems * dtype_size(spec.dtype) <= plan.workspace_bytes(),
                   "plan: the stage buffer does not fit the workspace");
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
      PARACOMM_CHECK(t.send || t.span.buffer != PlanBuffer::kInput, "plan step ", i, ": a receive into the input");
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
      PARACOMM_CHECK(r.out.buffer != PlanBuffer::kInput && (!r.has_wire_out || r.wire_out.buffer != PlanBuffer::kInput),
                     "plan step ", i, ": a reduction writes the input");
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

namespace {

// Throws unless *ctx.nccl.comm is live; returns it (*ctx.nccl.mu held by the caller).
ncclComm_t live_comm(const NcclExecContext& ctx) {
  ncclComm_t comm = *ctx.nccl.comm;
  PARACOMM_CHECK(comm != nullptr, "the communicator was aborted while this call was being enqueued");
  return comm;
}

// Polls the non-blocking communicator until step i's group has been enqueued on C (ncclInProgress means NCCL is
// still connecting or launching in the background; nothing on C may be recorded before it settles). The lock is
// taken per query so the watchdog can abort in between; a failure flag, an abort or the deadline ends the wait.
void wait_group_enqueued(const NcclExecContext& ctx, int64_t i) {
  for (int spin = 0;; ++spin) {
    PARACOMM_CHECK(!ctx.failed->load(std::memory_order_acquire), "the communicator failed while step ", i,
                   "'s NCCL group was in progress");
    ncclResult_t state = ncclInProgress;
    {
      std::lock_guard<std::mutex> g(*ctx.nccl.mu);
      const ncclComm_t comm = live_comm(ctx);
      const ncclResult_t q = ncclCommGetAsyncError(comm, &state);
      if (q != ncclSuccess) {
        PARACOMM_THROW("NCCL error ", ncclGetErrorString(q), " in ncclCommGetAsyncError (step ", i, "): ",
                       ncclGetLastError(comm));
      }
      if (state != ncclSuccess && state != ncclInProgress) {
        PARACOMM_THROW("NCCL error ", ncclGetErrorString(state), " in ncclGroupEnd (step ", i, "): ",
                       ncclGetLastError(comm));
      }
    }
    if (state == ncclSuccess) return;
    PARACOMM_CHECK(std::chrono::steady_clock::now() < ctx.deadline, "step ", i, "'s NCCL group was still in "
                   "progress after ", ctx.timeout_s, " s (NCCL waits for a peer that is absent or dead)");
    if (spin < 256) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
}

}  // namespace

void enqueue_plan(const NcclExecContext& ctx, const Plan& plan, const std::vector<SchedOp>& schedule,
                  const PlanBuffers& buf, double divisor) {
  const PlanSpec& spec = plan.spec;
  const int64_t num_steps = static_cast<int64_t>(plan.steps.size());
  const PlanEvents& ev = ctx.events;
  PARACOMM_CHECK(ctx.nccl_issued != nullptr && ctx.failed != nullptr && ctx.nccl.mu != nullptr &&
                     ctx.nccl.comm != nullptr && ev.steps >= num_steps && ev.start != nullptr &&
                     ev.begin != nullptr && ev.end != nullptr && (schedule.empty() || ev.done != nullptr),
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
      case PlanBuffer::kStage: return ws + plan.stage_offset_bytes() + s.offset * dtype_size(T);  // T-typed (plan.h)
    }
    return nullptr;
  };
  auto stream_of = [&](SchedStream s) {
    return s == SchedStream::kCaller ? ctx.stream : s == SchedStream::kReduce ? ctx.reduce_stream : ctx.comm_stream;
  };
  auto event_of = [&](const SchedOp& op) -> cudaEvent_t {
    switch (op.event) {
      case SchedEvent::kStart: return ev.start;
      case SchedEvent::kBegin: return ev.begin;
      case SchedEvent::kTransfer: return ev.transfer[op.step];
      case SchedEvent::kReduce: return ev.reduce[op.step];
      case SchedEvent::kEnd: return ev.end;
      case SchedEvent::kDone: return ev.done;
      case SchedEvent::kNone: break;
    }
    PARACOMM_THROW("enqueue_plan: schedule op without an event");
  };

  const HeaderExchange* const hdr = ctx.header;
  auto need_header = [&]() {
    PARACOMM_CHECK(hdr != nullptr && hdr->send_slot != nullptr && hdr->recv_slots != nullptr &&
                       hdr->record != nullptr && hdr->words > 0 && hdr->words <= kMaxHeaderWords,
                   "enqueue_plan: a schedule with the signature header needs its HeaderExchange");
  };
  // Step i's transfer group (i == -1: a header-only group). with_header: the header to and from every peer goes
  // first, so per peer the headers are the group's first messages and always match each other.
  auto transfers = [&](int64_t i, bool with_header) {
    static const PlanStep kNoStep{};
    const PlanStep& step = i >= 0 ? plan.steps[static_cast<size_t>(i)] : kNoStep;
    if (with_header) need_header();
    PARACOMM_CHECK(!ctx.failed->load(std::memory_order_acquire),
                   "the communicator failed while this call was being enqueued");
    ncclResult_t ended = ncclSuccess;
    {
      std::lock_guard<std::mutex> g(*ctx.nccl.mu);
      const ncclComm_t comm = live_comm(ctx);
      *ctx.nccl_issued = true;
      PARACOMM_NCCL_CHECK(ncclGroupStart(), comm);
      // Inside a group NCCL only records the calls; a failure must still close the group before it is raised.
      ncclResult_t queued = ncclSuccess;
      const char* failed_call = nullptr;
      if (with_header) {
        const size_t words = static_cast<size_t>(hdr->words);
        for (int32_t p = 0; p < static_cast<int32_t>(spec.world_size) && failed_call == nullptr; ++p) {
          if (p == static_cast<int32_t>(spec.rank)) continue;
          ncclResult_t r = ncclSend(hdr->send_slot, words, ncclInt64, p, comm, ctx.comm_stream);
          if (r != ncclSuccess && r != ncclInProgress) {
            queued = r;
            failed_call = "ncclSend (header)";
            break;
          }
          r = ncclRecv(hdr->recv_slots + static_cast<int64_t>(p) * kMaxHeaderWords, words, ncclInt64, p, comm,
                       ctx.comm_stream);
          if (r != ncclSuccess && r != ncclInProgress) {
            queued = r;
            failed_call = "ncclRecv (header)";
          }
        }
      }
      for (const PlanTransfer& t : step.transfers) {
        if (failed_call != nullptr) break;
        const ncclDataType_t dt = to_nccl_dtype(buffer_dtype(spec, t.span.buffer));
        const size_t count = static_cast<size_t>(t.count);
        const ncclResult_t r = t.send ? ncclSend(address(t.span), count, dt, t.peer, comm, ctx.comm_stream)
                                      : ncclRecv(address(t.span), count, dt, t.peer, comm, ctx.comm_stream);
        if (r != ncclSuccess && r != ncclInProgress) {
          queued = r;
          failed_call = t.send ? "ncclSend" : "ncclRecv";
          break;
        }
      }
      // Non-blocking communicator: a warm group returns ncclSuccess here; a cold one (connecting) ncclInProgress.
      ended = ncclGroupEnd();
      if (failed_call != nullptr) {
        PARACOMM_THROW("NCCL error ", ncclGetErrorString(queued), " in ", failed_call, " (step ", i, "): ",
                       ncclGetLastError(comm));
      }
      if (ended != ncclSuccess && ended != ncclInProgress) {
        PARACOMM_THROW("NCCL error ", ncclGetErrorString(ended), " in ncclGroupEnd (step ", i, "): ",
                       ncclGetLastError(comm));
      }
    }
    if (ended == ncclInProgress) wait_group_enqueued(ctx, i);
  };

  auto reductions = [&](int64_t i) {
    for (const PlanReduction& r : plan.steps[static_cast<size_t>(i)].reductions) {
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
      launch_reduce(a, ctx.reduce_stream);
    }
  };

  try {
    for (const SchedOp& op : schedule) {
      switch (op.action) {
        case SchedAction::kRecord:
          PARACOMM_CUDA_CHECK(cudaEventRecord(event_of(op), stream_of(op.stream)));
          break;
        case SchedAction::kWait:
          PARACOMM_CUDA_CHECK(cudaStreamWaitEvent(stream_of(op.stream), event_of(op), 0));
          break;
        case SchedAction::kTransfers:
          transfers(op.step, op.with_header);
          break;
        case SchedAction::kHeaderFill:
          need_header();
          launch_header_fill(hdr->send_slot, hdr->values, hdr->words, stream_of(op.stream));
          break;
        case SchedAction::kHeaderCheck:
          need_header();
          launch_header_check(hdr->recv_slots, hdr->values, hdr->words, static_cast<int32_t>(spec.world_size),
                              static_cast<int32_t>(spec.rank), hdr->record, hdr->seq, stream_of(op.stream));
          break;
        case SchedAction::kReductions:
          reductions(op.step);
          break;
        case SchedAction::kKeepAlive:
          PARACOMM_CHECK(ctx.services != nullptr, "enqueue_plan: an async schedule needs the keep-alive service");
          ctx.services->keep_alive(stream_of(op.stream));
          break;
      }
    }
  } catch (...) {
    // Keep the caller's buffers ordered after whatever reached the streams (see the header's last point).
    if (!schedule.empty()) {
      bool sync_schedule = false;
      for (const SchedOp& op : schedule) {
        sync_schedule |= op.action == SchedAction::kWait && op.stream == SchedStream::kCaller;
      }
      if (cudaEventRecord(ev.end, ctx.comm_stream) == cudaSuccess) {
        (void)cudaStreamWaitEvent(ctx.reduce_stream, ev.end, 0);
      }
      (void)cudaEventRecord(ev.done, ctx.reduce_stream);
      if (sync_schedule) {
        (void)cudaStreamWaitEvent(ctx.stream, ev.done, 0);
      } else if (ctx.services != nullptr) {
        try {
          ctx.services->keep_alive(ctx.reduce_stream);
        } catch (...) {
        }
      }
      (void)cudaGetLastError();
    }
    throw;
  }
}

}  // namespace paracomm
