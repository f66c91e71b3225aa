#include "ring/schedule.h"

#include <algorithm>

#include "checks.h"

namespace paracomm {

namespace {
// Python-style modulo: always in [0, n).
int64_t mod(int64_t a, int64_t n) { return ((a % n) + n) % n; }
}  // namespace

int64_t RingGeometry::segment_begin(int64_t segment) const {
  const int64_t base = numel / num_ranks, extra = numel % num_ranks;
  return segment * base + std::min(segment, extra);
}

int64_t RingGeometry::segment_size(int64_t segment) const {
  const int64_t base = numel / num_ranks, extra = numel % num_ranks;
  return base + (segment < extra ? 1 : 0);
}

RingGeometry ring_geometry(int64_t num_ranks, int64_t numel, int64_t chunk_elems) {
  PARACOMM_CHECK(num_ranks >= 1, "ring_geometry: num_ranks must be >= 1, got ", num_ranks);
  PARACOMM_CHECK(numel >= 0, "ring_geometry: numel must be >= 0, got ", numel);
  PARACOMM_CHECK(chunk_elems >= 1, "ring_geometry: chunk_elems must be >= 1, got ", chunk_elems);
  RingGeometry g{num_ranks, numel, chunk_elems, 0};
  const int64_t largest_segment = (numel + num_ranks - 1) / num_ranks;
  g.chunks_per_segment = (largest_segment + chunk_elems - 1) / chunk_elems;
  return g;
}

std::vector<RingOp> ring_schedule(int64_t num_ranks, int64_t rank, int64_t numel, int64_t chunk_elems) {
  const RingGeometry g = ring_geometry(num_ranks, numel, chunk_elems);
  PARACOMM_CHECK(rank >= 0 && rank < num_ranks, "ring_schedule: rank must be in [0, ", num_ranks, "), got ",
                 rank);
  std::vector<RingOp> ops;
  if (num_ranks == 1 || g.chunks_per_segment == 0) return ops;
  const int64_t C = g.chunks_per_segment, N = num_ranks;
  ops.reserve(static_cast<size_t>(2 * (N - 1) * C));

  // Offset and count of chunk `k` of `segment`, clamped like NCCL's `min(chunkSize, size - offset)`.
  auto chunk_of = [&](int64_t segment, int64_t k, int64_t* offset, int64_t* count) {
    const int64_t size = g.segment_size(segment);
    const int64_t start = std::min(k * chunk_elems, size);
    *offset = g.segment_begin(segment) + start;
    *count = std::min(chunk_elems, size - start);
  };

  for (int phase = 0; phase < 2; ++phase) {
    for (int64_t t = 0; t < N - 1; ++t) {
      for (int64_t k = 0; k < C; ++k) {
        RingOp op{};
        op.phase = phase == 0 ? RingPhase::kReduceScatter : RingPhase::kAllGather;
        op.step = t;
        op.chunk = k;
        if (phase == 0) {
          op.send_segment = mod(rank - t, N);
          op.recv_segment = mod(rank - t - 1, N);
          op.final_reduce = (t == N - 2);
        } else {
          op.send_segment = mod(rank + 1 - t, N);
          op.recv_segment = mod(rank - t, N);
          op.final_reduce = false;
        }
        chunk_of(op.send_segment, k, &op.send_offset, &op.send_count);
        chunk_of(op.recv_segment, k, &op.recv_offset, &op.recv_count);
        // Reduce-scatter step 0 sends the rank's own input; every later op forwards what the same chunk's
        // previous op produced (its reduction, or for all-gather the chunk it received), C ops earlier.
        const int64_t index = static_cast<int64_t>(ops.size());
        op.send_after = (phase == 0 && t == 0) ? -1 : index - C;
        ops.push_back(op);
      }
    }
  }
  return ops;
}

}  // namespace paracomm
