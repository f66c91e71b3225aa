// Plan generators for the three all-reduce algorithms and their reduce-scatter / all-gather halves, the chunk
// policy and the algorithm choice.
// Format, invariants and executor semantics: plan.h. Everything here is a pure function of a PlanSpec.
#include "allreduce/plan.h"

#include <algorithm>
#include <limits>

#include "allreduce/hierarchical.h"
#include "allreduce/pieces.h"
#include "allreduce/plan_builder.h"
#include "checks.h"

namespace paracomm {

namespace {

constexpr int64_t kKiB = 1024;
constexpr int64_t kMiB = 1024 * kKiB;
constexpr int64_t kWorkspaceAlignBytes = 256;

// ---- Tunables (first guesses; docs/ARCHITECTURE.md explains them, a GPU sweep will retune them) ----
// auto picks one_shot while every rank receives at most this many bytes in total ((N-1) x message) and the
// message itself is at most kOneShotMaxMessageBytes: one transfer group and one reduction beat two of each
// when latency dominates.
constexpr int64_t kOneShotMaxReceivedBytes[2] = {1 * kMiB, 1 * kMiB};  // [nccl, gloo]
constexpr int64_t kOneShotMaxMessageBytes[2] = {256 * kKiB, 512 * kKiB};
// auto picks direct up to this many ranks (one node: every rank talks to every other at once), ring beyond.
constexpr int64_t kDirectMaxRanks = 8;
// Ring: at most this many transfer groups in one call; chunks are at least kRingMinChunkBytes.
constexpr int64_t kRingMaxGroups = 64;
constexpr int64_t kRingMinChunkBytes[2] = {1 * kMiB, 4 * kMiB};
// Reduce-scatter: auto picks one_shot while every rank receives at most this many bytes ((N-1) x its output).
constexpr int64_t kRsOneShotMaxReceivedBytes[2] = {1 * kMiB, 1 * kMiB};  // [nccl, gloo]
// Direct: the double-buffered receive workspace stays within this budget; on NCCL a large segment is also
// cut into up to kDirectPipelineChunks pieces of at least kDirectMinChunkBytes so that chunk c+1's exchange
// overlaps chunk c's reduction.
constexpr int64_t kDirectWorkspaceBudget = 64 * kMiB;
constexpr int64_t kDirectPipelineChunks = 4;
constexpr int64_t kDirectMinChunkBytes = 4 * kMiB;

int64_t mod(int64_t a, int64_t n) { return ((a % n) + n) % n; }

int backend_index(Backend b) { return b == Backend::kGloo ? 1 : 0; }

bool is_all_reduce(const PlanSpec& s) { return s.collective == Collective::kAllReduce; }

// Segments and pieces. Segment j of N covers [j * seg, (j + 1) * seg) clipped to numel (trailing segments may
// be short or empty); piece c of a segment covers [c * chunk, (c + 1) * chunk) inside it, clipped likewise.
// seg and chunk are multiples of align_elems, so every piece starts on a kPlanAlignBytes boundary.
struct Geometry {
  int64_t numel = 0;
  int64_t seg = 0;
  int64_t chunk = 0;
  int64_t chunks = 0;

  int64_t seg_begin(int64_t j) const { return std::min(j * seg, numel); }
  int64_t seg_size(int64_t j) const { return std::min((j + 1) * seg, numel) - seg_begin(j); }
  int64_t piece_begin(int64_t j, int64_t c) const { return seg_begin(j) + std::min(c * chunk, seg_size(j)); }
  int64_t piece_size(int64_t j, int64_t c) const {
    const int64_t start = std::min(c * chunk, seg_size(j));
    return std::min(chunk, seg_size(j) - start);
  }
};

// The chunk policy: how many pieces each segment is cut into.
int64_t policy_chunks(const PlanSpec& s, int64_t seg_elems) {
  const int64_t elem = dtype_size(s.travel_dtype());
  const int64_t seg_bytes = seg_elems * elem;
  const int64_t n = s.world_size;
  const int b = backend_index(s.backend);
  if (s.chunk_bytes > 0) return std::max<int64_t>(1, ceil_div(seg_bytes, s.chunk_bytes));
  switch (s.algorithm) {
    case Algorithm::kRing: {
      // 2(N-1) groups per chunk round (N-1 for a reduce-scatter or an all-gather alone): the chunk count is a
      // pipelining depth bounded by kRingMaxGroups.
      const int64_t hops = is_all_reduce(s) ? 2 * (n - 1) : n - 1;
      const int64_t max_chunks = std::max<int64_t>(1, kRingMaxGroups / hops);
      return std::clamp<int64_t>(ceil_div(seg_bytes, kRingMinChunkBytes[b]), 1, max_chunks);
    }
    case Algorithm::kDirect: {
      // All-gather: one exchange straight into the output; nothing to stage, nothing to pipeline.
      if (s.collective == Collective::kAllGather) return 1;
      // Receive workspace: 2 slots x (N-1) peers x one piece.
      int64_t chunks = ceil_div(2 * (n - 1) * seg_bytes, kDirectWorkspaceBudget);
      if (s.backend == Backend::kNccl) {
        chunks = std::max(chunks, std::min(kDirectPipelineChunks, seg_bytes / kDirectMinChunkBytes));
      }
      return std::max<int64_t>(1, chunks);
    }
    case Algorithm::kOneShot:
    case Algorithm::kHierarchical:  // its own layout (hierarchical.cpp)
      return 1;
  }
  return 1;
}

// All-reduce: numel is cut into N aligned segments. Reduce-scatter / all-gather: the caller's layout fixes the
// segments (segment p = [p n, (p + 1) n) of the N x n buffer), only the pieces inside one are aligned.
Geometry make_geometry(const PlanSpec& s) {
  Geometry g;
  g.numel = is_all_reduce(s) ? s.numel : s.world_size * s.numel;
  const int64_t align = plan_align_elems(s);
  if (s.algorithm == Algorithm::kOneShot) {
    g.seg = s.numel;
    g.chunk = s.numel;
    g.chunks = s.numel > 0 ? 1 : 0;
    return g;
  }
  g.seg = is_all_reduce(s) ? round_up(ceil_div(s.numel, s.world_size), align) : s.numel;
  // Rounding pieces up to the alignment can push direct's receive workspace past its budget: cut finer.
  g.chunk = aligned_piece(g.seg, policy_chunks(s, g.seg), align, [&](int64_t piece) {
    return s.algorithm != Algorithm::kDirect || s.collective == Collective::kAllGather || s.chunk_bytes != 0 ||
           2 * (s.world_size - 1) * piece * dtype_size(s.travel_dtype()) <= kDirectWorkspaceBudget;
  });
  g.chunks = ceil_div(g.seg, g.chunk);
  return g;
}

using plan_build::final_reduction;
using plan_build::reduction;
using plan_build::span;

// The flat generators' builder: sends and receives by name (plan_builder.h drops the empty ones).
class Builder : public plan_build::StepBuilder {
 public:
  using StepBuilder::StepBuilder;
  void send(int64_t to, PlanSpan src, int64_t count) { transfer(true, to, src, count); }
  void recv(int64_t from, PlanSpan dst, int64_t count) { transfer(false, from, dst, count); }
};

// Compressed calls start by rounding [begin, begin + count) of the data into the staging buffer: the values
// this rank will send as its own contribution (rounded once, whatever the algorithm).
int64_t cast_step(const PlanSpec& s, Builder& b, int64_t begin, int64_t count) {
  if (!s.compressed()) return -1;
  const int64_t index = b.step(-1);
  b.reduce(reduction(count, {span(PlanBuffer::kData, begin)}, span(PlanBuffer::kWire, begin)));
  return index;
}

// ---- ring ----
// Ring positions: the ring visits ranks in ring_order(node_of) (hierarchical.h: node by node; the identity without
// a node map or with a contiguous one). Everything below is written for the rank at position p with the ring's
// segment q being the tensor's segment order[q]; with the identity order p = r and segment q = q.
struct RingPositions {
  std::vector<int64_t> order;  // position -> rank
  int64_t n = 0, pos = 0, next = 0, prev = 0;
  explicit RingPositions(const PlanSpec& s) : order(ring_order(s.node_of, s.world_size)), n(s.world_size) {
    pos = std::find(order.begin(), order.end(), s.rank) - order.begin();
    next = order[static_cast<size_t>((pos + 1) % n)];
    prev = order[static_cast<size_t>((pos + n - 1) % n)];
  }
  // The tensor segment of ring segment (pos + delta) mod n.
  int64_t seg(int64_t delta) const { return order[static_cast<size_t>(mod(pos + delta, n))]; }
};

// After NCCL's runRing (shown for the identity order). Segment j is owned by rank (j - 1) mod N, i.e. rank r owns
// segment (r + 1) mod N.
//   reduce-scatter, hops t = 0..N-2: rank r sends its partial sum of segment (r - t) mod N to r + 1 and receives
//     segment (r - t - 1) mod N from r - 1, adding its own contribution; after hop N-2 it holds the full sum of
//     the segment it owns (the owner's final reduction).
//   all-gather, hops t = 0..N-2: rank r sends segment (r + 1 - t) mod N and receives (r - t) mod N.
// Each segment is summed once, in ring order ending at its owner, and every rank copies the owner's bits.
// Compressed: partial sums travel (and are re-rounded) in W at every hop: the error grows with N (direct and
// one_shot round each input once instead).
// Steps are hop-major (all pieces of hop t, then hop t+1), so step u's send depends on step u - C (the same
// piece one hop earlier) and an executor can post step u+1 while it reduces step u.
void make_ring(Plan& plan, const Geometry& g) {
  const PlanSpec& s = plan.spec;
  const int64_t n = s.world_size, r = s.rank, C = g.chunks;
  const bool z = s.compressed();
  const PlanBuffer src = z ? PlanBuffer::kWire : PlanBuffer::kData;  // what travels, in place
  Builder b(&plan);
  plan.recv_elems = 2 * g.chunk;
  const int64_t base = cast_step(s, b, g.seg_begin(r), g.seg_size(r));  // hop 0 sends segment seg(0) = r
  const int64_t first = static_cast<int64_t>(plan.steps.size());
  const RingPositions ring(s);
  const int64_t next = ring.next, prev = ring.prev;
  for (int phase = 0; phase < 2; ++phase) {
    for (int64_t t = 0; t < n - 1; ++t) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t u = static_cast<int64_t>(plan.steps.size()) - first;  // ring op index
        const bool rs = phase == 0;
        const int64_t send_seg = rs ? ring.seg(-t) : ring.seg(1 - t);
        const int64_t recv_seg = rs ? ring.seg(-t - 1) : ring.seg(-t);
        // Data sent was produced C ops earlier (hop 0 of reduce-scatter: by the cast); receive slot u % 2 was
        // last read by op u - 2's reduction.
        const int64_t producer = (rs && t == 0) ? base : first + u - C;
        const int64_t slot_reader = u >= 2 ? first + u - 2 : -1;
        b.step(std::max(producer, slot_reader));
        const int64_t so = g.piece_begin(send_seg, c), sn = g.piece_size(send_seg, c);
        const int64_t ro = g.piece_begin(recv_seg, c), rn = g.piece_size(recv_seg, c);
        const PlanSpan slot = span(PlanBuffer::kRecv, (u % 2) * g.chunk);
        b.send(next, span(src, so), sn);
        b.recv(prev, rs ? slot : span(src, ro), rn);
        if (rs && t < n - 2) {
          b.reduce(reduction(rn, {span(PlanBuffer::kData, ro), slot}, span(src, ro)));
        } else if (rs) {
          b.reduce(final_reduction(s, rn, {span(PlanBuffer::kData, ro), slot}, span(PlanBuffer::kData, ro), true,
                                   span(PlanBuffer::kWire, ro)));
        } else if (z || s.has_found_inf) {
          // All-gather: widen what arrived compressed into the data, checking it.
          PlanReduction w = reduction(rn, {span(src, ro)}, span(PlanBuffer::kData, ro));
          w.check_inf = true;
          b.reduce(std::move(w));
        }
      }
    }
  }
}

// ---- direct (two-shot) ----
// Rank r owns segment r. For each piece c: reduce-scatter by direct exchange (every rank sends piece c of
// segment p to rank p, all peers in one transfer group), then the owner sums the N contributions in rank order
// 0..N-1 with the final fusions, then the all-gather sends the owner's result to every peer (one group).
// Steps run RS_0, RS_1, AG_0, RS_2, AG_1, ..., AG_{C-1}, so RS_{c+1} is on the wire while reduce_c runs.
// Receive workspace: two slots of (N-1) pieces, slot c % 2 for piece c (reused by piece c + 2 only after
// reduce_c read it). Compressed: every input is rounded to W once (the cast step), the owner accumulates in
// fp32 and rounds the result once; the error does not grow with N.
void make_direct(Plan& plan, const Geometry& g) {
  const PlanSpec& s = plan.spec;
  const int64_t n = s.world_size, r = s.rank, C = g.chunks;
  const bool z = s.compressed();
  const PlanBuffer src = z ? PlanBuffer::kWire : PlanBuffer::kData;
  Builder b(&plan);
  plan.recv_elems = 2 * (n - 1) * g.chunk;
  const int64_t base = cast_step(s, b, 0, s.numel);
  auto peer_slot = [&](int64_t c, int64_t p) {
    return span(PlanBuffer::kRecv, ((c % 2) * (n - 1) + (p < r ? p : p - 1)) * g.chunk);
  };
  std::vector<int64_t> rs_step(static_cast<size_t>(C), -1);
  auto reduce_scatter = [&](int64_t c) {
    const int64_t slot_reader = c >= 2 ? rs_step[static_cast<size_t>(c - 2)] : -1;
    rs_step[static_cast<size_t>(c)] = b.step(std::max(base, slot_reader));
    const int64_t mine = g.piece_begin(r, c), count = g.piece_size(r, c);
    std::vector<PlanSpan> inputs;
    for (int64_t p = 0; p < n; ++p) {
      if (p == r) {
        inputs.push_back(span(src, mine));
        continue;
      }
      b.send(p, span(src, g.piece_begin(p, c)), g.piece_size(p, c));
      b.recv(p, peer_slot(c, p), count);
      inputs.push_back(peer_slot(c, p));
    }
    b.reduce(final_reduction(s, count, std::move(inputs), span(PlanBuffer::kData, mine), true,
                             span(PlanBuffer::kWire, mine)));
  };
  auto all_gather = [&](int64_t c) {
    b.step(rs_step[static_cast<size_t>(c)]);
    for (int64_t p = 0; p < n; ++p) {
      if (p == r) continue;
      b.send(p, span(src, g.piece_begin(r, c)), g.piece_size(r, c));
      b.recv(p, span(src, g.piece_begin(p, c)), g.piece_size(p, c));
    }
  };
  for (int64_t c = 0; c < C; ++c) {
    reduce_scatter(c);
    if (c >= 1) all_gather(c - 1);
  }
  if (C > 0) all_gather(C - 1);
  if (z || s.has_found_inf) {
    // One pass over the whole tensor after the last transfer: widen what arrived compressed (the owned
    // segment is rewritten with the same bits) and check it.
    b.step(-1);
    PlanReduction w = reduction(s.numel, {span(src, 0)}, span(PlanBuffer::kData, 0));
    w.check_inf = true;
    b.reduce(std::move(w));
  }
}

// ---- one_shot ----
// Every rank sends its whole (compressed: rounded) buffer to every peer in one transfer group and sums all N in
// rank order: every rank computes every element from identical inputs in the same order, so all agree bitwise.
// Compressed: the result is rounded through W once, as direct's is, so the choice of algorithm does not change
// what a compressed call returns beyond the order of a sum.
void make_one_shot(Plan& plan) {
  const PlanSpec& s = plan.spec;
  const int64_t n = s.world_size, r = s.rank, numel = s.numel;
  const bool z = s.compressed();
  const PlanBuffer src = z ? PlanBuffer::kWire : PlanBuffer::kData;
  Builder b(&plan);
  plan.recv_elems = (n - 1) * numel;
  const int64_t base = cast_step(s, b, 0, numel);
  b.step(base);
  std::vector<PlanSpan> inputs;
  for (int64_t p = 0; p < n; ++p) {
    if (p == r) {
      inputs.push_back(span(src, 0));
      continue;
    }
    const PlanSpan slot = span(PlanBuffer::kRecv, (p < r ? p : p - 1) * numel);
    b.send(p, span(src, 0), numel);
    b.recv(p, slot, numel);
    inputs.push_back(slot);
  }
  b.reduce(final_reduction(s, numel, std::move(inputs), span(PlanBuffer::kData, 0), false, PlanSpan{}));
}


// ---- reduce-scatter halves ----
// Common to the three: rank r owns output segment r; kInput is only read; the owner's final reduction writes
// kData (fp32 accumulation of a compressed call, *no* rounding of the result: the shard stays local, so the
// error of direct/one_shot is one rounding per input whatever N). found_inf, when given, reflects this rank's
// shard only (ranks may differ: reduce it across ranks for a global decision).

// Compressed direct/one_shot start by rounding the whole input once into kWire (N x n elements of W): every
// contribution, the owner's own included, is the wire value, so the result does not depend on who owns what.
int64_t rs_cast_step(const PlanSpec& s, Builder& b, int64_t total) {
  if (!s.compressed()) return -1;
  const int64_t index = b.step(-1);
  b.reduce(reduction(total, {span(PlanBuffer::kInput, 0)}, span(PlanBuffer::kWire, 0)));
  return index;
}

// The owner's final reduction of an output piece: divisor, scale, found_inf; never rounded to the wire.
PlanReduction rs_final(int64_t count, std::vector<PlanSpan> inputs, PlanSpan out) {
  PlanReduction r = reduction(count, std::move(inputs), out);
  r.final = true;
  r.check_inf = true;
  return r;
}

// Ring reduce-scatter: the reduce-scatter half of make_ring, re-indexed so that rank r ends with segment r.
// Hop t = 0..N-2: rank r sends its partial sum of segment (r - t - 1) mod N to r + 1 and receives segment
// (r - t - 2) mod N from r - 1, adding its own input; after hop N-2 it holds segment r, summed in ring order
// r+1, r+2, ..., r (each reduction: own input first, then what arrived). Partial sums live in a workspace area
// of one segment (kRecv after the two receive slots), in W: the compressed wire re-rounds at every hop, as the
// all-reduce ring does. Hop 0 sends the raw input (compressed: its rounding, made by a cast into the partial
// area). Steps are hop-major, so op u's send depends on op u - C (the same piece one hop earlier) and the slot
// it fills on op u - 2's reduction: step u + 1 may go out while step u reduces. Written with ring positions
// (RingPositions: r + k means the rank k positions further along ring_order, segment r + k its segment).
void make_ring_reduce_scatter(Plan& plan, const Geometry& g) {
  const PlanSpec& s = plan.spec;
  const int64_t n = s.world_size, C = g.chunks;
  const bool z = s.compressed();
  Builder b(&plan);
  plan.recv_elems = (2 + C) * g.chunk;
  auto partial = [&](int64_t c) { return span(PlanBuffer::kRecv, (2 + c) * g.chunk); };
  auto in_piece = [&](int64_t seg, int64_t c) { return span(PlanBuffer::kInput, g.piece_begin(seg, c)); };
  const RingPositions ring(s);  // ring.seg(0) == r: the segment this rank ends with
  const int64_t first_seg = ring.seg(-1);
  int64_t base = -1;
  if (z) {
    base = b.step(-1);
    b.reduce(reduction(g.seg_size(first_seg), {in_piece(first_seg, 0)}, partial(0)));
  }
  const int64_t first = static_cast<int64_t>(plan.steps.size());
  const int64_t next = ring.next, prev = ring.prev;
  for (int64_t t = 0; t < n - 1; ++t) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t u = static_cast<int64_t>(plan.steps.size()) - first;
      const int64_t send_seg = ring.seg(-t - 1), recv_seg = ring.seg(-t - 2);
      const int64_t producer = t == 0 ? base : first + u - C;
      const int64_t slot_reader = u >= 2 ? first + u - 2 : -1;
      b.step(std::max(producer, slot_reader));
      const int64_t count = g.piece_size(send_seg, c);  // every segment has n elements: same for all
      const PlanSpan slot = span(PlanBuffer::kRecv, (u % 2) * g.chunk);
      b.send(next, (t == 0 && !z) ? in_piece(send_seg, c) : partial(c), count);
      b.recv(prev, slot, count);
      if (t < n - 2) {
        b.reduce(reduction(count, {in_piece(recv_seg, c), slot}, partial(c)));
      } else {
        b.reduce(rs_final(count, {in_piece(recv_seg, c), slot}, span(PlanBuffer::kData, g.piece_begin(0, c))));
      }
    }
  }
}

// Direct reduce-scatter: the reduce-scatter half of make_direct. For each piece c, one transfer group sends
// piece c of input segment p to rank p (every peer at once) and receives the peers' piece c of segment r into
// slot c % 2; the owner then sums the N contributions in rank order 0..N-1 into kData. RS_{c+1} goes out
// while reduce_c runs; slot c % 2 is reused by piece c + 2 only after reduce_c read it.
void make_direct_reduce_scatter(Plan& plan, const Geometry& g) {
  const PlanSpec& s = plan.spec;
  const int64_t n = s.world_size, r = s.rank, C = g.chunks;
  const PlanBuffer src = s.compressed() ? PlanBuffer::kWire : PlanBuffer::kInput;
  Builder b(&plan);
  plan.recv_elems = std::min<int64_t>(C, 2) * (n - 1) * g.chunk;  // one slot when there is one piece
  plan.wire_elems = s.compressed() ? g.numel : 0;
  const int64_t base = rs_cast_step(s, b, g.numel);
  auto peer_slot = [&](int64_t c, int64_t p) {
    return span(PlanBuffer::kRecv, ((c % 2) * (n - 1) + (p < r ? p : p - 1)) * g.chunk);
  };
  std::vector<int64_t> rs_step(static_cast<size_t>(C), -1);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t slot_reader = c >= 2 ? rs_step[static_cast<size_t>(c - 2)] : -1;
    rs_step[static_cast<size_t>(c)] = b.step(std::max(base, slot_reader));
    const int64_t count = g.piece_size(r, c);
    std::vector<PlanSpan> inputs;
    for (int64_t p = 0; p < n; ++p) {
      if (p == r) {
        inputs.push_back(span(src, g.piece_begin(r, c)));
        continue;
      }
      b.send(p, span(src, g.piece_begin(p, c)), count);
      b.recv(p, peer_slot(c, p), count);
      inputs.push_back(peer_slot(c, p));
    }
    b.reduce(rs_final(count, std::move(inputs), span(PlanBuffer::kData, g.piece_begin(0, c))));
  }
}

// One-shot reduce-scatter: direct without pipelining, for small messages. One transfer group, one reduction,
// and a packed receive workspace of (N-1) x n elements (no alignment padding, no second slot).
void make_one_shot_reduce_scatter(Plan& plan) {
  const PlanSpec& s = plan.spec;
  const int64_t n = s.world_size, r = s.rank, numel = s.numel;
  const PlanBuffer src = s.compressed() ? PlanBuffer::kWire : PlanBuffer::kInput;
  Builder b(&plan);
  plan.recv_elems = (n - 1) * numel;
  plan.wire_elems = s.compressed() ? n * numel : 0;
  const int64_t base = rs_cast_step(s, b, n * numel);
  b.step(base);
  std::vector<PlanSpan> inputs;
  for (int64_t p = 0; p < n; ++p) {
    if (p == r) {
      inputs.push_back(span(src, r * numel));
      continue;
    }
    const PlanSpan slot = span(PlanBuffer::kRecv, (p < r ? p : p - 1) * numel);
    b.send(p, span(src, p * numel), numel);
    b.recv(p, slot, numel);
    inputs.push_back(slot);
  }
  b.reduce(rs_final(numel, std::move(inputs), span(PlanBuffer::kData, 0)));
}

// ---- all-gather halves ----
// Both start with the local copy of the input into output segment r (a one-input reduction: exact in every
// dtype) in a step of its own, and their first transfers wait for nothing (transfers_after -1): an executor
// posts them before it runs the copy. No transfer touches segment r, so the two overlap safely.
void all_gather_copy_step(const PlanSpec& s, Builder& b) {
  b.step(-1);
  b.reduce(reduction(s.numel, {span(PlanBuffer::kInput, 0)}, span(PlanBuffer::kData, s.rank * s.numel)));
}

// Ring all-gather: the all-gather half of make_ring with rank r's own segment r. Hop t = 0..N-2: rank r
// sends segment (r - t) mod N to r + 1 (hop 0: straight from kInput) and receives (r - t - 1) mod N from
// r - 1 into kData, where hop t + 1 forwards it: op u's send depends on op u - C's receive (transfers_after
// names that step; the executor waits for its transfers, not only for its reductions). Ring positions as in
// make_ring_reduce_scatter.
void make_ring_all_gather(Plan& plan, const Geometry& g) {
  const PlanSpec& s = plan.spec;
  const int64_t n = s.world_size, C = g.chunks;
  Builder b(&plan);
  all_gather_copy_step(s, b);
  const int64_t first = static_cast<int64_t>(plan.steps.size());
  const RingPositions ring(s);  // ring.seg(0) == r: hop 0 sends this rank's own segment
  const int64_t next = ring.next, prev = ring.prev;
  for (int64_t t = 0; t < n - 1; ++t) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t u = static_cast<int64_t>(plan.steps.size()) - first;
      const int64_t send_seg = ring.seg(-t), recv_seg = ring.seg(-t - 1);
      b.step(t == 0 ? -1 : first + u - C);
      const int64_t count = g.piece_size(send_seg, c);
      b.send(next, t == 0 ? span(PlanBuffer::kInput, g.piece_begin(0, c)) : span(PlanBuffer::kData, g.piece_begin(send_seg, c)),
             count);
      b.recv(prev, span(PlanBuffer::kData, g.piece_begin(recv_seg, c)), count);
    }
  }
}

// Direct all-gather: the all-gather half of make_direct: one transfer group sends the input to every peer and
// receives every peer's input straight into its output segment. No workspace.
void make_direct_all_gather(Plan& plan) {
  const PlanSpec& s = plan.spec;
  const int64_t n = s.world_size, r = s.rank, numel = s.numel;
  Builder b(&plan);
  all_gather_copy_step(s, b);
  b.step(-1);
  for (int64_t p = 0; p < n; ++p) {
    if (p == r) continue;
    b.send(p, span(PlanBuffer::kInput, 0), numel);
    b.recv(p, span(PlanBuffer::kData, p * numel), numel);
  }
}

int64_t align_workspace(int64_t bytes) { return round_up(bytes, kWorkspaceAlignBytes); }

}  // namespace

int64_t Plan::recv_offset_bytes() const {
  return align_workspace(wire_elems * dtype_size(spec.travel_dtype()));
}

int64_t Plan::stage_offset_bytes() const {
  return align_workspace(recv_offset_bytes() + recv_elems * dtype_size(spec.travel_dtype()));
}

int64_t Plan::workspace_bytes() const {
  if (wire_elems == 0 && recv_elems == 0 && stage_elems == 0) return 0;
  if (stage_elems > 0) return stage_offset_bytes() + stage_elems * dtype_size(spec.dtype);
  return recv_offset_bytes() + recv_elems * dtype_size(spec.travel_dtype());
}

const char* algorithm_name(Algorithm a) {
  switch (a) {
    case Algorithm::kRing: return "ring";
    case Algorithm::kDirect: return "direct";
    case Algorithm::kOneShot: return "one_shot";
    case Algorithm::kHierarchical: return "hierarchical";
  }
  return "unknown";
}

const char* collective_name(Collective c) {
  switch (c) {
    case Collective::kAllReduce: return "all_reduce";
    case Collective::kReduceScatter: return "reduce_scatter";
    case Collective::kAllGather: return "all_gather";
  }
  return "unknown";
}

Collective collective_from_name(const std::string& name, const char* arg) {
  if (name == "all_reduce") return Collective::kAllReduce;
  if (name == "reduce_scatter") return Collective::kReduceScatter;
  if (name == "all_gather") return Collective::kAllGather;
  PARACOMM_THROW(arg, " must be 'all_reduce', 'reduce_scatter' or 'all_gather', got '", name, "'");
}

Algorithm algorithm_from_name(const std::string& name, const char* arg) {
  if (name == "ring") return Algorithm::kRing;
  if (name == "direct") return Algorithm::kDirect;
  if (name == "one_shot") return Algorithm::kOneShot;
  if (name == "hierarchical") return Algorithm::kHierarchical;
  PARACOMM_THROW(arg, " must be 'ring', 'direct', 'one_shot' or 'hierarchical', got '", name, "'");
}

void check_plan_spec(const PlanSpec& s) {
  const int32_t coll = static_cast<int32_t>(s.collective);
  PARACOMM_CHECK(coll >= 0 && coll <= 2, "collective must be 0 (all_reduce), 1 (reduce_scatter) or 2 (all_gather), "
                 "got ", coll);
  PARACOMM_CHECK(s.numel >= 0, "numel must be >= 0, got ", s.numel);
  PARACOMM_CHECK(s.world_size >= 1 && s.world_size <= (1 << 20), "world_size must be in [1, 2^20], got ",
                 s.world_size);
  // Byte offsets reach total * 8 * world_size in the one_shot workspace; keep far from int64 overflow
  // (total: the largest buffer, N x numel for reduce-scatter and all-gather).
  constexpr int64_t kMaxTotal = std::numeric_limits<int64_t>::max() / (64 * kMiB);
  PARACOMM_CHECK(s.numel <= kMaxTotal && (is_all_reduce(s) || s.numel <= kMaxTotal / s.world_size),
                 "numel is too large: ", s.numel);
  PARACOMM_CHECK(s.rank >= 0 && s.rank < s.world_size, "rank must be in [0, ", s.world_size, "), got ", s.rank);
  const int32_t d = static_cast<int32_t>(s.dtype);
  PARACOMM_CHECK(d >= 0 && d <= static_cast<int32_t>(DType::kInt64), "dtype must be a DType code in [0, 5], got ",
                 d);
  if (s.compressed()) {
    PARACOMM_CHECK(s.wire_dtype == static_cast<int32_t>(DType::kFloat16) ||
                       s.wire_dtype == static_cast<int32_t>(DType::kBFloat16),
                   "wire_dtype must be -1 (none), 1 (float16) or 2 (bfloat16), got ", s.wire_dtype);
    PARACOMM_CHECK(s.dtype == DType::kFloat32, "wire_dtype needs float32 data, got ", dtype_name(s.dtype));
  }
  PARACOMM_CHECK(s.chunk_bytes >= 0, "chunk_bytes must be >= 0 (0: the default policy), got ", s.chunk_bytes);
  const int32_t a = static_cast<int32_t>(s.algorithm);
  PARACOMM_CHECK(a >= 0 && a <= 3, "algorithm must be 0 (ring), 1 (direct), 2 (one_shot) or 3 (hierarchical), got ",
                 a);
  check_node_map(s.node_of, s.world_size);
  if (s.algorithm == Algorithm::kHierarchical) check_hierarchical(s);
  if (s.collective == Collective::kAllGather) {
    PARACOMM_CHECK(s.algorithm != Algorithm::kOneShot, "algorithm for all_gather must be 'ring' or 'direct' "
                   "(its direct exchange is already one shot), got 'one_shot'");
    PARACOMM_CHECK(!s.compressed(), "wire_dtype must be -1 (none) for all_gather, got ", s.wire_dtype);
    PARACOMM_CHECK(!s.has_found_inf && !s.has_final_op, "all_gather has no found_inf and no final op");
    return;  // direct all-gather sums nothing: no rank limit
  }
  PARACOMM_CHECK(s.algorithm == Algorithm::kRing || s.algorithm == Algorithm::kHierarchical ||
                     s.world_size <= kMaxReduceInputs, "algorithm ",
                 algorithm_name(s.algorithm), " serves at most ", kMaxReduceInputs, " ranks (one reduction sums all "
                 "of them), got world_size ", s.world_size, "; use 'ring'");
}

Algorithm choose_algorithm(Collective collective, int64_t numel, DType dtype, int32_t wire_dtype, int64_t world_size,
                           Backend backend) {
  // All-gather: one direct exchange while every rank can talk to every other at once (one node), else ring.
  if (collective == Collective::kAllGather) {
    return world_size <= kDirectMaxRanks ? Algorithm::kDirect : Algorithm::kRing;
  }
  if (world_size <= 1) return Algorithm::kOneShot;  // nothing travels; at most one local reduction
  const DType travel = wire_dtype == kNoWire ? dtype : static_cast<DType>(wire_dtype);
  const int64_t message = numel * dtype_size(travel);
  const int b = backend_index(backend);
  if (world_size > kMaxReduceInputs) return Algorithm::kRing;
  if (collective == Collective::kReduceScatter) {
    // Reduce-scatter: direct is already one exchange and one reduction per piece; one_shot drops the
    // pipelining and packs the workspace, which is all a small message wants.
    if ((world_size - 1) * message <= kRsOneShotMaxReceivedBytes[b]) return Algorithm::kOneShot;
    return world_size <= kDirectMaxRanks ? Algorithm::kDirect : Algorithm::kRing;
  }
  if (message <= kOneShotMaxMessageBytes[b] && (world_size - 1) * message <= kOneShotMaxReceivedBytes[b]) {
    return Algorithm::kOneShot;
  }
  return world_size <= kDirectMaxRanks ? Algorithm::kDirect : Algorithm::kRing;
}

Plan make_plan(const PlanSpec& spec) {
  check_plan_spec(spec);
  Plan plan;
  plan.spec = spec;
  const int64_t n = spec.world_size;
  switch (spec.collective) {
    case Collective::kAllReduce: plan.data_elems = spec.numel; break;
    case Collective::kReduceScatter: plan.data_elems = spec.numel; plan.input_elems = n * spec.numel; break;
    case Collective::kAllGather: plan.data_elems = n * spec.numel; plan.input_elems = spec.numel; break;
  }
  if (spec.numel == 0) return plan;
  if (!is_all_reduce(spec) && n == 1) {
    // One rank: the output is the input (reduce-scatter: with avg/scale/found_inf applied; nothing travels,
    // so the wire dtype rounds nothing), one copy.
    plan.segment_elems = plan.chunk_elems = spec.numel;
    plan.num_chunks = 1;
    Builder b(&plan);
    b.step(-1);
    PlanReduction r = reduction(spec.numel, {span(PlanBuffer::kInput, 0)}, span(PlanBuffer::kData, 0));
    r.final = r.check_inf = spec.collective == Collective::kReduceScatter;
    b.reduce(std::move(r));
    return plan;
  }
  if (!is_all_reduce(spec)) {
    if (spec.algorithm == Algorithm::kHierarchical) {
      make_hierarchical(plan);  // hierarchical.cpp: node map in the spec
      return plan;
    }
    if (spec.collective == Collective::kReduceScatter && spec.algorithm == Algorithm::kOneShot) {
      plan.segment_elems = plan.chunk_elems = spec.numel;
      plan.num_chunks = 1;
      make_one_shot_reduce_scatter(plan);
      return plan;
    }
    const Geometry g = make_geometry(spec);
    plan.segment_elems = g.seg;
    plan.chunk_elems = g.chunk;
    plan.num_chunks = g.chunks;
    const bool rs = spec.collective == Collective::kReduceScatter;
    if (spec.algorithm == Algorithm::kRing) {
      rs ? make_ring_reduce_scatter(plan, g) : make_ring_all_gather(plan, g);
    } else {
      rs ? make_direct_reduce_scatter(plan, g) : make_direct_all_gather(plan);
      if (!rs) plan.chunk_elems = spec.numel;
    }
    return plan;
  }
  if (spec.world_size == 1) {
    // Nothing travels, so the wire dtype rounds nothing; only avg/scale/found_inf touch the data.
    plan.segment_elems = plan.chunk_elems = spec.numel;
    plan.num_chunks = 1;
    if (spec.has_final_op) {
      Builder b(&plan);
      b.step(-1);
      PlanReduction r = reduction(spec.numel, {span(PlanBuffer::kData, 0)}, span(PlanBuffer::kData, 0));
      r.final = true;
      r.check_inf = true;
      b.reduce(std::move(r));
    }
    return plan;
  }
  const Geometry g = make_geometry(spec);
  plan.segment_elems = g.seg;
  plan.chunk_elems = g.chunk;
  plan.num_chunks = g.chunks;
  plan.wire_elems = spec.compressed() ? spec.numel : 0;
  switch (spec.algorithm) {
    case Algorithm::kRing: make_ring(plan, g); break;
    case Algorithm::kDirect: make_direct(plan, g); break;
    case Algorithm::kOneShot: make_one_shot(plan); break;
    case Algorithm::kHierarchical: make_hierarchical(plan); break;
  }
  return plan;
}

PlanSummary summarize_plan(const Plan& plan) {
  PlanSummary s;
  s.steps = static_cast<int64_t>(plan.steps.size());
  for (const PlanStep& step : plan.steps) {
    if (!step.transfers.empty()) ++s.transfer_groups;
    s.reductions += static_cast<int64_t>(step.reductions.size());
    for (const PlanTransfer& x : step.transfers) {
      const int64_t bytes = x.count * dtype_size(plan_buffer_dtype(plan.spec, x.span.buffer));
      (x.send ? s.bytes_sent : s.bytes_received) += bytes;
    }
  }
  s.workspace_bytes = plan.workspace_bytes();
  return s;
}

}  // namespace paracomm
