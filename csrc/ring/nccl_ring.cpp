// The ring executor. Ordering argument, in one place:
//
//   caller's stream:  [cast own segment into w]  rec(start)  ..wait(T_i) local_i rec(L_i)..  wait(end)
//   comm stream:      wait(start)  ..wait(L_need) send/recv_i rec(T_i)..  rec(end)
//
// * The comm stream waits for the caller's stream once at the start (x and the workspace are ready; for a
//   compressed call the staging cast of this rank's own segment, which reduce-scatter step 0 sends, is done).
// * Transfer i waits for the latest local step at or before need = max(send_after, i - 2): op send_after's
//   local step produced the data sent, op i-2's local step reads receive buffer i % 2, which op i refills.
//   Local steps run in op order on one stream, so that one wait covers all earlier ones.
// * Local step i waits for transfer i only; it may therefore run while transfer i+1 is on the wire (transfer
//   i+1 needs local steps <= i-1 unless chunks_per_segment == 1, where send_after = i forces the wait).
//   Concurrent steps never touch the same bytes: consecutive ops address different chunks or segments, and
//   alternate receive buffers.
// * At the end the caller's stream waits for the comm stream, so the workspace (allocated by the caller on its
//   stream) can be released as soon as the call returns.
#include "ring/nccl_ring.h"

#include "kernels/ring_reduce.h"

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

int64_t ring_required_workspace(const RingAllReduceSpec& spec, int world_size) {
  const RingWorkspaceLayout layout = ring_workspace_layout(spec);  // validates spec
  return world_size > 1 ? layout.total_bytes : 0;
}

namespace {

char* at(void* base, int64_t elem_offset, DType t) {
  return static_cast<char*>(base) + elem_offset * dtype_size(t);
}

// One local reduction; n == 0 is skipped by the callers.
void reduce(cudaStream_t stream, void* out, DType out_t, const void* a, DType a_t, const void* b, DType b_t,
            int64_t n, double divisor = 1.0, const float* scale = nullptr, float* found_inf = nullptr,
            void* wire_out = nullptr, DType wire_t = DType::kFloat16) {
  RingReduceArgs r;
  r.out = out;
  r.out_dtype = out_t;
  r.a = a;
  r.a_dtype = a_t;
  r.b = b;
  r.b_dtype = b_t;
  r.n = n;
  r.divisor = divisor;
  r.scale = scale;
  r.found_inf = found_inf;
  r.wire_out = wire_out;
  r.wire_dtype = wire_t;
  launch_ring_reduce(r, stream);
}

}  // namespace

void enqueue_ring_all_reduce(const RingExecContext& ctx, const RingAllReduceSpec& spec, const RingBuffers& buf) {
  // ---- validation: nothing is enqueued before all of it passed ----
  PARACOMM_CHECK(ctx.events != nullptr && ctx.settle && ctx.nccl_issued != nullptr,
                 "enqueue_ring_all_reduce: incomplete context");
  PARACOMM_CHECK(ctx.world_size >= 1 && ctx.rank >= 0 && ctx.rank < ctx.world_size,
                 "enqueue_ring_all_reduce: bad rank ", ctx.rank, " of ", ctx.world_size);
  const int64_t required = ring_required_workspace(spec, ctx.world_size);  // validates spec
  PARACOMM_CHECK(spec.has_scale == (buf.scale != nullptr) && spec.has_found_inf == (buf.found_inf != nullptr),
                 "enqueue_ring_all_reduce: spec and buffers disagree on scale/found_inf");
  PARACOMM_CHECK(spec.numel == 0 || buf.data != nullptr, "ptr is null but numel is ", spec.numel);
  PARACOMM_CHECK(buf.workspace_bytes >= required, "workspace_bytes must be >= ", required,
                 " (nccl_workspace_bytes), got ", buf.workspace_bytes);
  PARACOMM_CHECK(required == 0 || buf.workspace != nullptr, "workspace_ptr is null but ", required,
                 " bytes are needed");
  if (spec.numel == 0) return;

  const DType T = spec.dtype;
  cudaStream_t stream = ctx.stream;

  // ---- world size 1: no communication ----
  if (ctx.world_size == 1) {
    if (spec.divisor != 1.0 || buf.scale != nullptr || buf.found_inf != nullptr) {
      reduce(stream, buf.data, T, buf.data, T, nullptr, T, spec.numel, spec.divisor, buf.scale, buf.found_inf);
    }
    return;
  }

  const bool compressed = spec.compressed();
  const DType W = spec.travel_dtype();  // what travels; == T when uncompressed
  const ncclDataType_t wire_nccl = to_nccl_dtype(W);
  const RingWorkspaceLayout layout = ring_workspace_layout(spec);
  char* ws = static_cast<char*>(buf.workspace);
  void* w = compressed ? ws + layout.wire_offset : nullptr;  // staging: numel elements of W
  void* recvbuf[2] = {ws + layout.recv_offset[0], ws + layout.recv_offset[1]};
  void* x = buf.data;

  const std::vector<RingOp> ops = ring_schedule(ctx.world_size, ctx.rank, spec.numel, spec.chunk_elems);
  const std::vector<RingOpEvents> plan = plan_ring_events(ops, compressed, buf.found_inf != nullptr);
  const RingGeometry geo = ring_geometry(ctx.world_size, spec.numel, spec.chunk_elems);
  const int next = (ctx.rank + 1) % ctx.world_size;
  const int prev = (ctx.rank + ctx.world_size - 1) % ctx.world_size;
  const RingEvents& ev = *ctx.events;

  // Refuse a stream under graph capture before anything is enqueued (the comm stream would join the capture).
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  PARACOMM_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  PARACOMM_CHECK(capture == cudaStreamCaptureStatusNone, "all_reduce cannot be captured in a CUDA graph");

  // ---- start ----
  if (compressed) {
    // Reduce-scatter step 0 sends this rank's own segment: w[S] = cast(x[S]) for all its chunks, in one launch.
    const int64_t begin = geo.segment_begin(ctx.rank), size = geo.segment_size(ctx.rank);
    if (size > 0) reduce(stream, at(w, begin, W), W, at(x, begin, T), T, nullptr, T, size);
  }
  PARACOMM_CUDA_CHECK(cudaEventRecord(ev.start, stream));
  PARACOMM_CUDA_CHECK(cudaStreamWaitEvent(ctx.comm_stream, ev.start, 0));

  // ---- the ring ----
  for (size_t u = 0; u < ops.size(); ++u) {
    const RingOp& op = ops[u];
    const RingOpEvents& e = plan[u];
    const bool rs = op.phase == RingPhase::kReduceScatter;
    cudaEvent_t transfer_done = ev.transfer[u % kRingTransferEventSlots];

    if (e.transfer) {
      if (e.wait_local >= 0) PARACOMM_CUDA_CHECK(cudaStreamWaitEvent(ctx.comm_stream, ev.local[e.wait_slot], 0));
      const void* send_ptr = compressed ? at(w, op.send_offset, W) : at(x, op.send_offset, T);
      void* recv_ptr = rs ? recvbuf[u % 2] : (compressed ? at(w, op.recv_offset, W) : at(x, op.recv_offset, T));

      *ctx.nccl_issued = true;
      ctx.settle(ncclGroupStart(), "ncclGroupStart");
      // Inside a group NCCL only records the calls; an error must still close the group before it is raised.
      ncclResult_t queued = ncclSuccess;
      const char* failed_call = nullptr;
      if (op.send_count > 0) {
        ncclResult_t r = ncclSend(send_ptr, static_cast<size_t>(op.send_count), wire_nccl, next, ctx.comm,
                                  ctx.comm_stream);
        if (r != ncclSuccess && r != ncclInProgress) queued = r, failed_call = "ncclSend";
      }
      if (op.recv_count > 0 && queued == ncclSuccess) {
        ncclResult_t r = ncclRecv(recv_ptr, static_cast<size_t>(op.recv_count), wire_nccl, prev, ctx.comm,
                                  ctx.comm_stream);
        if (r != ncclSuccess && r != ncclInProgress) queued = r, failed_call = "ncclRecv";
      }
      const ncclResult_t ended = ncclGroupEnd();
      if (failed_call != nullptr) ctx.settle(queued, failed_call);
      ctx.settle(ended, "ncclGroupEnd");
      if (e.local) PARACOMM_CUDA_CHECK(cudaEventRecord(transfer_done, ctx.comm_stream));
    }

    if (!e.local) continue;
    PARACOMM_CUDA_CHECK(cudaStreamWaitEvent(stream, transfer_done, 0));
    const int64_t n = op.recv_count;
    void* xr = at(x, op.recv_offset, T);
    if (rs && !op.final_reduce) {
      // Partial sum of a chunk this rank forwards next step: kept in the wire type when compressed.
      if (compressed) {
        reduce(stream, at(w, op.recv_offset, W), W, xr, T, recvbuf[u % 2], W, n);
      } else {
        reduce(stream, xr, T, xr, T, recvbuf[u % 2], T, n);
      }
    } else if (rs) {
      // Final reduction of an owned chunk: divisor, scale and found_inf applied once, by the owner; compressed,
      // the owner rounds through W and keeps exactly the bits the other ranks will receive.
      reduce(stream, xr, T, xr, T, recvbuf[u % 2], W, n, spec.divisor, buf.scale, buf.found_inf,
             compressed ? at(w, op.recv_offset, W) : nullptr, compressed ? W : DType::kFloat16);
    } else if (compressed) {
      reduce(stream, xr, T, at(w, op.recv_offset, W), W, nullptr, W, n, 1.0, nullptr, buf.found_inf);
    } else {
      reduce(stream, xr, T, xr, T, nullptr, T, n, 1.0, nullptr, buf.found_inf);
    }
    PARACOMM_CUDA_CHECK(cudaEventRecord(ev.local[e.local_slot], stream));
  }

  // ---- end ----
  PARACOMM_CUDA_CHECK(cudaEventRecord(ev.end, ctx.comm_stream));
  PARACOMM_CUDA_CHECK(cudaStreamWaitEvent(stream, ev.end, 0));
}

}  // namespace paracomm
