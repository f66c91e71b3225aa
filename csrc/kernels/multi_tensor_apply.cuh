// Multi-tensor apply: one kernel launch runs an elementwise op over a whole list of tensors (torch-free).
//
// After apex's multi_tensor_apply, written fresh, with three differences: sizes are int64 throughout; the
// block -> (tensor, chunk) map is a per-tensor prefix sum of chunk counts (`first_block`) that each block
// binary-searches, instead of a per-block table, so one launch takes any number of chunks (a 4-billion
// element tensor is one launch, not 50) and only the tensor count is bounded; and ops may keep per-thread
// state that is reduced per block at the end (the unscale kernel's norm).
//
// Work split: every tensor is cut into chunks of `chunk_elems` elements, one thread block per chunk, so one
// huge tensor and a thousand tiny ones both give the GPU many equal-sized blocks. The tensor list travels by
// value as a kernel parameter (TensorListMeta, under 4 KB), so a launch needs no host-to-device copy and no
// synchronisation. A list longer than kMaxTensors is split into several launches, at tensor boundaries.
//
// Inside a chunk: the head elements up to the first index where the tensor's pointers are all 16-byte aligned
// go one per thread (fewer than one vector: threads 0..head-1), then each thread moves whole 16-byte vectors
// (two in flight per iteration), then the chunk's last elements (fewer than one vector) go one by one. So a
// slice of a flat bucket that starts mid-vector (the parameters before it had numels that are not multiples of
// 4 or 8) still moves 16 bytes per load. Only a tensor whose pointers can never be aligned together (an input
// and an output misaligned by different amounts) takes the scalar path throughout. Chunk starts are multiples
// of chunk_elems elements, a multiple of every vector width, so every chunk of a tensor peels the same head.
// Each thread visits its elements in a fixed order (which depends only on the addresses), so per-thread state
// is deterministic. (The head is peeled in the kernel, before the chunk loop, rather than inside it: a peel
// inside the loop cost a register spill in the float64 -> 16-bit flatten on sm_80.)
// An op is a struct with
//   using In = ...; using Out = ...;         element types read and written
//   struct State {...};                       per-thread state
//   __device__ State init() const;            once per thread, before the chunk
//   __device__ Out apply(State&, In) const;   per element
//   __device__ void finish(State&) const;     once per thread at the end; every thread of the block calls it,
//                                             so it may use __syncthreads (block-wide reductions).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "checks.h"
#include "kernels/element_io.cuh"

namespace paracomm {
namespace kernels {

constexpr int kMtaThreads = 512;
constexpr int64_t kMtaChunkElems = 65536;  // per block; a multiple of every vector width (<= 8 elements)

// Tensors per launch for `Depth` pointers per tensor, chosen to keep TensorListMeta under ~3.6 KB so the
// whole parameter block (meta + the op's fields) stays below the classic 4 KB kernel-parameter limit.
template <int Depth>
struct MtaCapacity;
template <>
struct MtaCapacity<1> {
  static constexpr int kMaxTensors = 176;  // 176 * (8 + 8 + 4) = 3520 bytes
};
template <>
struct MtaCapacity<2> {
  static constexpr int kMaxTensors = 128;  // 128 * (16 + 8 + 4) = 3584 bytes
};

// Depth 1: ptrs[0] is read and written (in place). Depth 2: ptrs[0] is read, ptrs[1] written.
template <int Depth>
struct TensorListMeta {
  static constexpr int kMaxTensors = MtaCapacity<Depth>::kMaxTensors;
  void* ptrs[Depth][kMaxTensors];
  int64_t sizes[kMaxTensors];        // elements, > 0
  int32_t first_block[kMaxTensors];  // block index of each tensor's chunk 0 (strictly increasing, [0] = 0)
  int32_t num_tensors;
};
static_assert(sizeof(TensorListMeta<1>) <= 3600, "kernel parameters must stay under 4 KB");
static_assert(sizeof(TensorListMeta<2>) <= 3600, "kernel parameters must stay under 4 KB");

// One tensor of the list handed to the host-side driver.
template <int Depth>
struct MtaTensor {
  void* ptrs[Depth];
  int64_t numel;
};

// Elements to skip from `in` / `out` so that both in + h and out + h are 16-byte aligned, h in [0, kVec); -1 when
// no such h exists (the two pointers are misaligned differently, or not element-aligned). The alignment of
// T* + h repeats every 16 / sizeof(T) elements; for the narrower type that period is kVec, so its one candidate
// in [0, kVec) is the only possible h, and it only remains to check the wider type there. (Closed form, no
// loop: a search loop here cost a register spill in the widest instantiations.)
template <int kVec, typename In, typename Out>
__host__ __device__ __forceinline__ int peel_to_aligned16(const In* in, const Out* out) {
  constexpr bool kInNarrower = sizeof(In) <= sizeof(Out);
  constexpr unsigned kNarrow = kInNarrower ? sizeof(In) : sizeof(Out);
  static_assert(16 / kNarrow == kVec, "kVec is one 16-byte vector of the narrower type");
  const uintptr_t a = kInNarrower ? reinterpret_cast<uintptr_t>(in) : reinterpret_cast<uintptr_t>(out);
  const unsigned mis = static_cast<unsigned>(a & 15u);
  if (mis % kNarrow != 0) return -1;
  const int h = static_cast<int>(((16u - mis) & 15u) / kNarrow);
  return aligned16(in + h) && aligned16(out + h) ? h : -1;
}

// The chunk loop of one block: out[i] = op.apply(state, in[i]) for i in [0, n).
template <typename Op>
__device__ __forceinline__ void mta_process_chunk(const typename Op::In* in, typename Op::Out* out,
                                                  int64_t n, const Op& op, typename Op::State& state) {
  using In = typename Op::In;
  using Out = typename Op::Out;
  constexpr int kVec = vec_elems_v<In, Out>;
  int64_t scalar_begin = 0;
  if (aligned16(in) && aligned16(out)) {
    const int64_t num_vecs = n / kVec;
    const int64_t stride = static_cast<int64_t>(blockDim.x);
    for (int64_t v0 = threadIdx.x; v0 < num_vecs; v0 += 2 * stride) {
      // Both loads are issued before either vector is used: two 16-byte words in flight per thread.
      const int64_t v1 = v0 + stride;
      In x0[kVec], x1[kVec];
      load_pack(x0, in + v0 * kVec);
      if (v1 < num_vecs) load_pack(x1, in + v1 * kVec);
      Out y[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) y[k] = op.apply(state, x0[k]);
      store_pack(out + v0 * kVec, y);
      if (v1 < num_vecs) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) y[k] = op.apply(state, x1[k]);
        store_pack(out + v1 * kVec, y);
      }
    }
    scalar_begin = num_vecs * kVec;
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < n; i += blockDim.x) out[i] = op.apply(state, in[i]);
}

template <int Depth, typename Op>
__global__ void __launch_bounds__(kMtaThreads) multi_tensor_apply_kernel(const __grid_constant__ TensorListMeta<Depth> meta,
                                                                         const int64_t chunk_elems, const Op op) {
  // The tensor this block works on: the last one whose first block is <= blockIdx.x.
  const int32_t block = static_cast<int32_t>(blockIdx.x);
  int lo = 0, hi = meta.num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (meta.first_block[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int64_t begin = static_cast<int64_t>(block - meta.first_block[lo]) * chunk_elems;
  const int64_t remaining = meta.sizes[lo] - begin;
  const int64_t n = remaining < chunk_elems ? remaining : chunk_elems;
  const auto* in = static_cast<const typename Op::In*>(meta.ptrs[0][lo]) + begin;
  auto* out = static_cast<typename Op::Out*>(meta.ptrs[Depth - 1][lo]) + begin;
  typename Op::State state = op.init();
  // A tensor that starts mid-vector: its head (< one vector) element by element, one element per thread, then
  // the rest from the first index where in and out are both 16-byte aligned (the vector path).
  constexpr int kVec = vec_elems_v<typename Op::In, typename Op::Out>;
  int64_t head = peel_to_aligned16<kVec>(in, out);
  if (head < 0 || head > n) head = 0;  // never aligned together: the whole chunk goes element by element
  if (threadIdx.x < head) out[threadIdx.x] = op.apply(state, in[threadIdx.x]);
  mta_process_chunk(in + head, out + head, n - head, op, state);
  op.finish(state);
}

// Number of blocks (= chunks) the list needs; the unscale norm keeps one partial sum per block.
template <int Depth>
int64_t mta_num_blocks(const std::vector<MtaTensor<Depth>>& tensors, int64_t chunk_elems) {
  int64_t blocks = 0;
  for (const auto& t : tensors) blocks += (t.numel + chunk_elems - 1) / chunk_elems;
  return blocks;
}

// Host driver: packs `tensors` (in order, empty ones skipped) into as few launches as the metadata allows and
// calls `launch(meta, num_blocks, block_base)` for each, where block_base counts the blocks of all earlier
// launches (block b of a launch is block block_base + b of the whole list). Returns the total block count.
template <int Depth, typename Launch>
int64_t multi_tensor_apply(const std::vector<MtaTensor<Depth>>& tensors, int64_t chunk_elems, Launch&& launch) {
  constexpr int64_t kMaxGridBlocks = std::numeric_limits<int32_t>::max();
  TensorListMeta<Depth> meta;
  meta.num_tensors = 0;
  int64_t blocks = 0, block_base = 0;
  auto flush = [&]() {
    if (meta.num_tensors == 0) return;
    launch(meta, blocks, block_base);
    block_base += blocks;
    blocks = 0;
    meta.num_tensors = 0;
  };
  for (const auto& t : tensors) {
    if (t.numel == 0) continue;
    PARACOMM_CHECK(t.numel > 0, "multi_tensor_apply: negative tensor size ", t.numel);
    const int64_t chunks = (t.numel + chunk_elems - 1) / chunk_elems;
    PARACOMM_CHECK(chunks <= kMaxGridBlocks, "multi_tensor_apply: tensor of ", t.numel,
                   " elements needs more blocks than one launch can have");
    if (meta.num_tensors == TensorListMeta<Depth>::kMaxTensors || blocks + chunks > kMaxGridBlocks) flush();
    const int i = meta.num_tensors++;
    for (int d = 0; d < Depth; ++d) meta.ptrs[d][i] = t.ptrs[d];
    meta.sizes[i] = t.numel;
    meta.first_block[i] = static_cast<int32_t>(blocks);
    blocks += chunks;
  }
  flush();
  return block_base;
}

// Launches multi_tensor_apply_kernel<Depth, Op> over `tensors`; make_op(block_base) builds each launch's op.
template <int Depth, typename Op, typename MakeOp>
int64_t launch_multi_tensor(const std::vector<MtaTensor<Depth>>& tensors, MakeOp&& make_op, cudaStream_t stream) {
  return multi_tensor_apply<Depth>(
      tensors, kMtaChunkElems, [&](const TensorListMeta<Depth>& meta, int64_t num_blocks, int64_t block_base) {
        const Op op = make_op(block_base);
        multi_tensor_apply_kernel<Depth, Op>
            <<<static_cast<unsigned>(num_blocks), kMtaThreads, 0, stream>>>(meta, kMtaChunkElems, op);
        PARACOMM_CUDA_CHECK_LAUNCH();
      });
}

}  // namespace kernels
}  // namespace paracomm
