// The ring all-reduce schedule: plain C++, no CUDA, no torch.
//
// Both transports execute the list this file builds: the NCCL executor (nccl_ring.cpp) with ncclSend/ncclRecv
// and CUDA reduction kernels, the gloo executor (paracomm/comm.py) with torch.distributed point-to-point and
// the CPU reduction op. Keeping the schedule in one place is what makes the two paths reduce in the same order
// and so give the same bits.
//
// Algorithm (after NCCL's runRing): the tensor of `numel` elements is cut into `num_ranks` contiguous
// segments; segment s is owned by rank (s - 1) mod N, i.e. rank r owns segment (r + 1) mod N.
//   reduce-scatter, steps t = 0..N-2: rank r sends its partial sum of segment (r - t) mod N to rank r+1 and
//     receives segment (r - t - 1) mod N from rank r-1, adding its own contribution. After step N-2 rank r
//     holds the full sum of segment (r + 1) mod N, the segment it owns ("final" reduction: avg's division,
//     an unscale, the rounding to the wire type all happen there, once, on one rank).
//   all-gather, steps t = 0..N-2: rank r sends segment (r + 1 - t) mod N and receives (r - t) mod N, copying
//     the owner's final values.
// Every segment is then summed in one fixed order (starting at rank owner+1, ending at the owner) and every
// rank ends with the owner's bits: results are bitwise identical on all ranks and deterministic run to run.
//
// Pipelining: each segment is cut into chunks of at most `chunk_elems` elements and the op list is
// step-major (all chunks of step t, then step t+1). Op i's send only depends on the local reduction of op
// i - chunks_per_segment (the same chunk one step earlier), so an executor can start op i+1's transfer while
// it reduces op i.
#pragma once

#include <cstdint>
#include <vector>

namespace paracomm {

enum class RingPhase : int32_t { kReduceScatter = 0, kAllGather = 1 };

struct RingOp {
  RingPhase phase;
  int64_t step;           // 0..N-2 within its phase
  int64_t chunk;          // chunk index inside the segment, 0..chunks_per_segment-1
  int64_t send_segment;   // segment whose chunk this rank sends to (rank + 1) mod N
  int64_t recv_segment;   // segment whose chunk this rank receives from (rank - 1) mod N
  int64_t send_offset;    // element offset of the sent chunk in the whole tensor
  int64_t send_count;     // elements sent; 0 means this rank sends nothing for the op
  int64_t recv_offset;    // element offset of the received chunk
  int64_t recv_count;     // elements received; equals the sender's send_count for the same op index
  bool final_reduce;      // reduce-scatter's last step: the received chunk completes a segment this rank owns
  int64_t send_after;     // index of the op whose local reduction produced the data sent here, or -1
};

struct RingGeometry {
  int64_t num_ranks;
  int64_t numel;
  int64_t chunk_elems;
  int64_t chunks_per_segment;  // 0 when numel == 0
  int64_t segment_begin(int64_t segment) const;
  int64_t segment_size(int64_t segment) const;
};

// Segment sizes differ by at most one element: the first numel % N segments get one extra.
RingGeometry ring_geometry(int64_t num_ranks, int64_t numel, int64_t chunk_elems);

// The ops rank `rank` executes, in order. Empty for num_ranks == 1 or numel == 0. Ops whose send and receive
// counts are both zero (possible when numel < N * chunks) are kept so every rank's list has the same length
// and op i on rank r always pairs with op i on ranks r +- 1; executors skip the zero-sized transfers.
// Throws paracomm::Error on num_ranks < 1, rank outside [0, N), numel < 0 or chunk_elems < 1.
std::vector<RingOp> ring_schedule(int64_t num_ranks, int64_t rank, int64_t numel, int64_t chunk_elems);

// The segment rank `rank` owns (its reduce-scatter result): (rank + 1) mod N.
inline int64_t ring_owned_segment(int64_t num_ranks, int64_t rank) { return (rank + 1) % num_ranks; }

}  // namespace paracomm
