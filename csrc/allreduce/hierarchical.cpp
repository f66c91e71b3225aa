// The hierarchical all-reduce (hierarchical.h has the algorithm; plan.h the format and the invariants).
//
// The generator walks one *global* schedule (the same on every rank: a function of the spec without its rank)
// and keeps, of every transfer, the half that names this rank: whenever rank s sends to rank d in step i, rank d
// receives from s in step i, and two transfers between the same pair keep the same order on both sides because
// both sides see them in the schedule's order. Receive slots are a pure function of (receiver, column, sender),
// so any rank can name the slot its peer receives into.
#include "allreduce/hierarchical.h"

#include <algorithm>

#include "allreduce/pieces.h"
#include "allreduce/plan_builder.h"

#include "checks.h"

namespace paracomm {

namespace {

constexpr int64_t kMiB = 1024 * 1024;
// ---- Tunables (first guesses, like plan.cpp's) ----
// Phase B/C by direct exchange up to this many nodes (every node's owner talks to every other at once, and one
// reduction sums M inputs), a ring beyond.
constexpr int64_t kInterDirectMaxNodes = 8;
// The double-buffered receive slots of all four phases stay within this budget (pieces get smaller instead).
constexpr int64_t kHierWorkspaceBudget = 64 * kMiB;
// Pieces per column: enough to overlap the intra-node phases of one piece with the inter-node phases of the next
// (pieces of at least kHierMinPieceBytes of W, at most kHierMaxPieces of them), per backend [nccl, gloo]. gloo:
// 512 KiB pieces, measured on the emulated 2 x 2 cluster at 1 Gbit/s (bench/NOTES.md: 1.27-1.47x gloo's flat
// all-reduce against 1.11-1.33x with 2 MiB pieces, 1-64 MiB): the CPU-bound loopback phases of a piece hide
// behind the shaped link only when pieces are small. NCCL keeps 2 MiB (every piece is a group launch).
constexpr int64_t kHierMinPieceBytes[2] = {2 * kMiB, 512 * 1024};
constexpr int64_t kHierMaxPieces[2] = {16, 64};

int64_t default_pieces(const PlanSpec& s, int64_t bytes) {
  const int b = s.backend == Backend::kGloo ? 1 : 0;
  return std::clamp<int64_t>(ceil_div(bytes, kHierMinPieceBytes[b]), 1, kHierMaxPieces[b]);
}
// auto keeps one_shot for messages this small (one transfer group beats four when latency dominates), as the
// flat choice does, whatever the topology.
constexpr int64_t kOneShotMaxMessageBytes[2] = {256 * 1024, 512 * 1024};  // [nccl, gloo]
constexpr int64_t kOneShotMaxReceivedBytes = 1 * kMiB;


using plan_build::reduction;
using plan_build::span;

// Ranks by node, in global rank order.
struct Topology {
  int64_t n = 0, nodes = 0, columns = 0;
  std::vector<std::vector<int64_t>> members;  // node -> its ranks, ascending
  std::vector<int64_t> node, local;           // rank -> node, local index

  explicit Topology(const PlanSpec& s) {
    n = s.world_size;
    node.assign(static_cast<size_t>(n), 0);
    local.assign(static_cast<size_t>(n), 0);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t m = s.node_of.empty() ? 0 : s.node_of[static_cast<size_t>(r)];
      if (m >= static_cast<int64_t>(members.size())) members.resize(static_cast<size_t>(m + 1));
      node[static_cast<size_t>(r)] = m;
      local[static_cast<size_t>(r)] = static_cast<int64_t>(members[static_cast<size_t>(m)].size());
      members[static_cast<size_t>(m)].push_back(r);
    }
    nodes = static_cast<int64_t>(members.size());
    for (const auto& ms : members) columns = std::max<int64_t>(columns, static_cast<int64_t>(ms.size()));
  }
  int64_t size(int64_t m) const { return static_cast<int64_t>(members[static_cast<size_t>(m)].size()); }
  int64_t owner(int64_t m, int64_t c) const { return members[static_cast<size_t>(m)][static_cast<size_t>(c % size(m))]; }
  int64_t node_of(int64_t r) const { return node[static_cast<size_t>(r)]; }
  int64_t local_of(int64_t r) const { return local[static_cast<size_t>(r)]; }
  // Columns rank r owns: local, local + K, local + 2K, ... < columns; column c is r's (c / K)-th.
  int64_t owned(int64_t r) const {
    const int64_t k = size(node_of(r));
    return ceil_div(columns - local_of(r), k);
  }
  int64_t max_owned() const {
    int64_t most = 0;
    for (int64_t m = 0; m < nodes; ++m) most = std::max(most, ceil_div(columns, size(m)));
    return most;
  }
};

// Column c covers [c * col, (c + 1) * col) clipped to numel; piece k of a column [k * chunk, ...) inside it;
// sub-piece j of a piece [j * sub, ...) inside the piece (node j's owner owns sub-piece j). col, chunk and sub
// are multiples of the alignment, so every piece and sub-piece starts on a kPlanAlignBytes boundary in T and W.
struct Layout {
  int64_t numel = 0, col = 0, chunk = 0, chunks = 0, sub = 0;
  int64_t col_begin(int64_t c) const { return std::min(c * col, numel); }
  int64_t col_size(int64_t c) const { return std::min((c + 1) * col, numel) - col_begin(c); }
  int64_t piece_begin(int64_t c, int64_t k) const { return col_begin(c) + std::min(k * chunk, col_size(c)); }
  int64_t piece_size(int64_t c, int64_t k) const { return std::min(chunk, col_size(c) - std::min(k * chunk, col_size(c))); }
  int64_t sub_begin(int64_t c, int64_t k, int64_t j) const {
    return piece_begin(c, k) + std::min(j * sub, piece_size(c, k));
  }
  int64_t sub_size(int64_t c, int64_t k, int64_t j) const {
    const int64_t p = piece_size(c, k);
    return std::min(sub, p - std::min(j * sub, p));
  }
};

// Receive slots of one rank, double-buffered by piece parity h = k % 2, u = the column's index among r's columns:
//   intra (phase A, T):  ((h * owned + u) * (K - 1) + sender's local index, skipping r's) x chunk
//   inter (phase B, W):  direct: ((h * owned + u) * (M - 1) + sender's node, skipping r's) x sub
//                        ring:   ((h * owned + u) * 2 + hop % 2) x sub
// Uncompressed (W == T): both live in kRecv, inter after intra. Compressed: intra in kStage (T), inter in kRecv.
struct Slots {
  const Topology* t = nullptr;
  const Layout* g = nullptr;
  bool z = false, ring = false;
  int64_t owned = 0;  // the most columns any rank owns (every rank sizes its slots for it: simple and bounded)
  int64_t intra_elems() const { return 2 * owned * (t->columns - 1) * g->chunk; }
  int64_t inter_per() const { return ring ? 2 : t->nodes - 1; }
  int64_t inter_elems() const { return 2 * owned * inter_per() * g->sub; }
  PlanSpan intra(int64_t r, int64_t c, int64_t k, int64_t sender) const {
    const int64_t m = t->node_of(r), K = t->size(m), u = c / K, ls = t->local_of(sender), lr = t->local_of(r);
    const int64_t index = ((k % 2) * owned + u) * (t->columns - 1) + (ls < lr ? ls : ls - 1);
    return span(z ? PlanBuffer::kStage : PlanBuffer::kRecv, index * g->chunk);
  }
  PlanSpan inter(int64_t r, int64_t c, int64_t k, int64_t which) const {
    const int64_t m = t->node_of(r), K = t->size(m), u = c / K;
    const int64_t j = ring ? which % 2 : (which < m ? which : which - 1);
    const int64_t index = ((k % 2) * owned + u) * inter_per() + j;
    return span(PlanBuffer::kRecv, (z ? 0 : intra_elems()) + index * g->sub);
  }
};

int64_t workspace_estimate(const PlanSpec& s, const Slots& sl) {
  const int64_t t = dtype_size(s.dtype), w = dtype_size(s.travel_dtype());
  return sl.intra_elems() * t + sl.inter_elems() * w;
}

// Emits this rank's half of the global schedule (plan_builder.h drops the empty entries).
class Emitter {
 public:
  Emitter(Plan* plan, int64_t rank) : b_(plan), rank_(rank) {}
  int64_t step(int64_t after) { return b_.step(after); }
  // Rank `from` sends [from_span, +count) to rank `to`, which receives it at to_span.
  void move(int64_t from, PlanSpan from_span, int64_t to, PlanSpan to_span, int64_t count) {
    if (from == to) return;
    if (rank_ == from) b_.transfer(true, to, from_span, count);
    if (rank_ == to) b_.transfer(false, from, to_span, count);
  }
  void reduce(int64_t on, PlanReduction r) {
    if (on == rank_) b_.reduce(std::move(r));
  }

 private:
  plan_build::StepBuilder b_;
  int64_t rank_;
};

// The owner's final reduction: divisor, scale, found_inf, and (compressed) the rounding to the bits it sends.
PlanReduction final_reduction(const PlanSpec& s, int64_t count, std::vector<PlanSpan> inputs, int64_t offset) {
  return plan_build::final_reduction(s, count, std::move(inputs), span(PlanBuffer::kData, offset), true,
                                     span(PlanBuffer::kWire, offset));
}

Layout make_layout(const PlanSpec& s, const Topology& t, Slots& sl) {
  Layout g;
  g.numel = s.numel;
  const int64_t align = plan_align_elems(s);
  g.col = round_up(ceil_div(s.numel, t.columns), align);
  int64_t chunks = default_pieces(s, g.col * dtype_size(s.travel_dtype()));
  if (s.chunk_bytes > 0) chunks = std::max<int64_t>(1, ceil_div(g.col * dtype_size(s.travel_dtype()), s.chunk_bytes));
  auto cut = [&](int64_t piece) {  // pieces of a column, and each piece's sub-pieces (one per node)
    g.chunk = piece;
    g.chunks = ceil_div(g.col, g.chunk);
    g.sub = std::max(align, round_up(ceil_div(g.chunk, t.nodes), align));
  };
  sl.g = &g;
  cut(aligned_piece(g.col, chunks, align, [&](int64_t piece) {
    cut(piece);
    return s.chunk_bytes > 0 || workspace_estimate(s, sl) <= kHierWorkspaceBudget;
  }));
  sl.g = nullptr;
  return g;
}

}  // namespace

void make_hierarchical_reduce_scatter(Plan& plan);
void make_hierarchical_all_gather(Plan& plan);

int64_t count_nodes(const std::vector<int32_t>& node_of) {
  int64_t most = 0;
  for (int32_t m : node_of) most = std::max<int64_t>(most, m);
  return node_of.empty() ? 1 : most + 1;
}

void check_node_map(const std::vector<int32_t>& node_of, int64_t world_size) {
  if (node_of.empty()) return;
  PARACOMM_CHECK(static_cast<int64_t>(node_of.size()) == world_size, "node_map must have world_size (", world_size,
                 ") entries, got ", node_of.size());
  int32_t next = 0;
  for (size_t r = 0; r < node_of.size(); ++r) {
    PARACOMM_CHECK(node_of[r] >= 0 && node_of[r] <= next, "node_map must number nodes by first appearance in rank ",
                   "order (rank ", r, " is on node ", node_of[r], ", expected one of 0..", next, ")");
    if (node_of[r] == next) ++next;
  }
}

bool inter_node_ring(int64_t nodes) { return nodes > kInterDirectMaxNodes; }

std::vector<int64_t> ring_order(const std::vector<int32_t>& node_of, int64_t world_size) {
  std::vector<int64_t> order(static_cast<size_t>(world_size));
  for (int64_t r = 0; r < world_size; ++r) order[static_cast<size_t>(r)] = r;
  if (node_of.empty()) return order;
  // Stable: ranks of one node keep rank order, so a contiguous map gives the identity.
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return node_of[static_cast<size_t>(a)] < node_of[static_cast<size_t>(b)];
  });
  return order;
}

int64_t ring_inter_node_hops(const std::vector<int32_t>& node_of, const std::vector<int64_t>& order) {
  if (node_of.empty()) return 0;
  const size_t n = order.size();
  int64_t hops = 0;
  for (size_t p = 0; p < n; ++p) {
    if (node_of[static_cast<size_t>(order[p])] != node_of[static_cast<size_t>(order[(p + 1) % n])]) ++hops;
  }
  return hops;
}

Algorithm choose_algorithm_topology(int64_t numel, DType dtype, int32_t wire_dtype, int64_t world_size, Backend backend,
                                    const std::vector<int32_t>& node_of, std::string* why) {
  auto say = [&](const char* reason) {
    if (why != nullptr) *why = reason;
  };
  const Algorithm flat = choose_algorithm(numel, dtype, wire_dtype, world_size, backend);
  const int64_t nodes = count_nodes(node_of);
  if (world_size <= 1 || nodes <= 1) {
    say("one node: the flat choice");
    return flat;
  }
  if (nodes == world_size) {
    say("one rank per node: hierarchical would be the flat algorithm");
    return flat;
  }
  const PlanSpec probe = [&] {
    PlanSpec p;
    p.world_size = world_size;
    p.node_of = node_of;
    return p;
  }();
  const Topology t(probe);
  if (t.columns > kMaxReduceInputs) {
    say("a node has more than 32 ranks (phase A sums all of them in one reduction): the flat choice");
    return flat;
  }
  const DType travel = wire_dtype == kNoWire ? dtype : static_cast<DType>(wire_dtype);
  const int64_t message = numel * dtype_size(travel);
  const int b = backend == Backend::kGloo ? 1 : 0;
  if (message <= kOneShotMaxMessageBytes[b] && (world_size - 1) * message <= kOneShotMaxReceivedBytes &&
      world_size <= kMaxReduceInputs) {
    say("a small message: one_shot (one transfer group) beats four phases when latency dominates");
    return Algorithm::kOneShot;
  }
  say(inter_node_ring(nodes) ? "more than one node: hierarchical, a ring among the nodes (more than 8 nodes)"
                             : "more than one node: hierarchical, direct exchange among the nodes");
  return Algorithm::kHierarchical;
}

Algorithm choose_algorithm_topology(Collective collective, int64_t numel, DType dtype, int32_t wire_dtype,
                                    int64_t world_size, Backend backend, const std::vector<int32_t>& node_of,
                                    std::string* why) {
  if (collective == Collective::kAllReduce) {
    return choose_algorithm_topology(numel, dtype, wire_dtype, world_size, backend, node_of, why);
  }
  auto say = [&](const char* reason) {
    if (why != nullptr) *why = reason;
  };
  const Algorithm flat = choose_algorithm(collective, numel, dtype, wire_dtype, world_size, backend);
  PlanSpec probe;
  probe.world_size = world_size;
  probe.node_of = node_of;
  const Topology t(probe);
  bool even = true;
  for (int64_t m = 0; m < t.nodes; ++m) even = even && t.size(m) == t.columns;
  if (t.nodes <= 1 || t.nodes == world_size || !even || t.columns > kMaxReduceInputs ||
      (collective == Collective::kReduceScatter && inter_node_ring(t.nodes))) {
    say(t.nodes <= 1 ? "one node: the flat choice"
        : !even      ? "nodes of different sizes: the flat choice (hierarchical reduce_scatter / all_gather need equal nodes)"
                     : "the flat choice (one rank per node, more than 32 ranks per node, or more than 8 nodes)");
    return flat;
  }
  if (flat == Algorithm::kOneShot) {
    say("a small message: one_shot (one transfer group) beats two phases when latency dominates");
    return flat;
  }
  say("more than one node: hierarchical");
  return Algorithm::kHierarchical;
}

void make_hierarchical(Plan& plan) {
  const PlanSpec& s = plan.spec;
  if (s.collective == Collective::kReduceScatter) return make_hierarchical_reduce_scatter(plan);
  if (s.collective == Collective::kAllGather) return make_hierarchical_all_gather(plan);
  const Topology t(s);
  const int64_t M = t.nodes, Q = t.columns;
  PARACOMM_CHECK(Q <= kMaxReduceInputs, "algorithm hierarchical: a node has ", Q, " ranks; at most ",
                 kMaxReduceInputs, " (phase A sums all of them in one reduction)");
  const bool z = s.compressed();
  const bool ring = inter_node_ring(M);
  Slots sl;
  sl.t = &t;
  sl.z = z;
  sl.ring = ring;
  sl.owned = t.max_owned();
  const Layout g = make_layout(s, t, sl);
  sl.g = &g;
  plan.segment_elems = g.col;
  plan.chunk_elems = g.chunk;
  plan.num_chunks = g.chunks;
  plan.wire_elems = z ? s.numel : 0;
  plan.recv_elems = z ? sl.inter_elems() : sl.intra_elems() + sl.inter_elems();
  plan.stage_elems = z ? sl.intra_elems() : 0;
  // What the inter-node and the final intra-node hops send: the wire copy when compressed, else the data.
  const PlanBuffer src = z ? PlanBuffer::kWire : PlanBuffer::kData;
  Emitter e(&plan, s.rank);
  const int64_t C = g.chunks;
  std::vector<int64_t> phase_a(static_cast<size_t>(C), -1), finished(static_cast<size_t>(C), -1);

  // ---- A: intra-node reduce-scatter of piece k of every column. Sends read the untouched input; receive slots
  // of parity k % 2 were last read by piece k - 2's phase-A reductions.
  auto phase_A = [&](int64_t k) {
    phase_a[static_cast<size_t>(k)] = e.step(k >= 2 ? phase_a[static_cast<size_t>(k - 2)] : -1);
    for (int64_t c = 0; c < Q; ++c) {
      const int64_t count = g.piece_size(c, k), at = g.piece_begin(c, k);
      for (int64_t m = 0; m < M; ++m) {
        const int64_t o = t.owner(m, c);
        for (int64_t p : t.members[static_cast<size_t>(m)]) e.move(p, span(PlanBuffer::kData, at), o, sl.intra(o, c, k, p), count);
        // The node-partial: the node's contributions in local-index order.
        std::vector<PlanSpan> inputs;
        for (int64_t p : t.members[static_cast<size_t>(m)]) {
          inputs.push_back(p == o ? span(PlanBuffer::kData, at) : sl.intra(o, c, k, p));
        }
        if (M == 1) {
          e.reduce(o, final_reduction(s, count, std::move(inputs), at));  // one node: phase A is the whole sum
        } else if (z) {
          e.reduce(o, reduction(count, std::move(inputs), span(PlanBuffer::kWire, at)));  // stored in W: rounded once
        } else if (inputs.size() > 1) {
          e.reduce(o, reduction(count, std::move(inputs), span(PlanBuffer::kData, at)));
        }  // a node of one rank, uncompressed: its data is its node-partial
      }
    }
    if (M == 1) finished[static_cast<size_t>(k)] = phase_a[static_cast<size_t>(k)];
  };
  auto mod = [&](int64_t x) { return ((x % M) + M) % M; };
  // ---- B: inter-node reduce-scatter of piece k among the M owners of each column; returns its last step.
  auto phase_B = [&](int64_t k) {
    const int64_t a = phase_a[static_cast<size_t>(k)];
    if (!ring) {
      // Direct: node m's owner of column c owns sub-piece m and sums the M node-partials in node order. Sends
      // read phase A's node-partials; the slots of parity k % 2 were last read by piece k - 2's B, before A_k.
      const int64_t last = e.step(a);
      for (int64_t c = 0; c < Q; ++c) {
        for (int64_t m = 0; m < M; ++m) {
          const int64_t o = t.owner(m, c), count = g.sub_size(c, k, m), at = g.sub_begin(c, k, m);
          std::vector<PlanSpan> inputs;
          for (int64_t q = 0; q < M; ++q) {
            const int64_t from = t.owner(q, c);
            e.move(from, span(src, at), o, sl.inter(o, c, k, q), count);
            inputs.push_back(q == m ? span(src, at) : sl.inter(o, c, k, q));
          }
          e.reduce(o, final_reduction(s, count, std::move(inputs), at));
        }
      }
      return last;
    }
    // Ring over the nodes in node order: at hop h node position m sends its partial of sub-piece (m - h) mod M to
    // position m + 1 and adds its own node-partial to sub-piece (m - h - 1) mod M; after M - 1 hops position m
    // holds the full sum of sub-piece (m + 1) mod M, summed once in ring order ending there.
    int64_t last = a;
    for (int64_t h = 0; h < M - 1; ++h) {
      // Data sent was produced one hop earlier (hop 0: by phase A); slot h % 2 was read two hops earlier.
      last = e.step(last);
      for (int64_t c = 0; c < Q; ++c) {
        for (int64_t m = 0; m < M; ++m) {
          const int64_t from = t.owner(m, c), to = t.owner(mod(m + 1), c), j = mod(m - h);
          const int64_t at = g.sub_begin(c, k, j), count = g.sub_size(c, k, j);
          e.move(from, span(src, at), to, sl.inter(to, c, k, h), count);
          std::vector<PlanSpan> inputs{span(src, at), sl.inter(to, c, k, h)};
          if (h < M - 2) {
            e.reduce(to, reduction(count, std::move(inputs), span(src, at)));
          } else {
            e.reduce(to, final_reduction(s, count, std::move(inputs), at));
          }
        }
      }
    }
    return last;
  };
  // ---- C: inter-node all-gather of piece k's finished sub-pieces; returns its last step.
  auto phase_C = [&](int64_t k, int64_t after) {
    int64_t last = after;
    if (!ring) {
      last = e.step(last);  // every owner sends its finished sub-piece to the other nodes' owners of the column
      for (int64_t c = 0; c < Q; ++c) {
        for (int64_t m = 0; m < M; ++m) {
          const int64_t from = t.owner(m, c), count = g.sub_size(c, k, m), at = g.sub_begin(c, k, m);
          for (int64_t q = 0; q < M; ++q) e.move(from, span(src, at), t.owner(q, c), span(src, at), count);
        }
      }
      return last;
    }
    for (int64_t h = 0; h < M - 1; ++h) {  // ring: forward sub-piece (m + 1 - h) mod M, finished or just received
      last = e.step(last);
      for (int64_t c = 0; c < Q; ++c) {
        for (int64_t m = 0; m < M; ++m) {
          const int64_t at = g.sub_begin(c, k, mod(m + 1 - h));
          e.move(t.owner(m, c), span(src, at), t.owner(mod(m + 1), c), span(src, at), g.sub_size(c, k, mod(m + 1 - h)));
        }
      }
    }
    return last;
  };
  // ---- D: intra-node all-gather: the owner's finished piece to every other rank of its node (in W when
  // compressed, which is exact: the result is representable in W).
  auto phase_D = [&](int64_t k) {
    e.step(finished[static_cast<size_t>(k)]);
    for (int64_t c = 0; c < Q; ++c) {
      const int64_t count = g.piece_size(c, k), at = g.piece_begin(c, k);
      for (int64_t m = 0; m < M; ++m) {
        const int64_t o = t.owner(m, c);
        for (int64_t p : t.members[static_cast<size_t>(m)]) e.move(o, span(src, at), p, span(src, at), count);
      }
    }
  };
  // The software pipeline: A_0, then per piece k: B_k, D_{k-1}, A_{k+1}, C_k; then D_{C-1}. Adjacent steps pair a
  // slow inter-node phase with a fast intra-node one of another piece, so an executor that posts step i+1 before
  // reducing step i keeps the node's link and its loopback busy at once. (Each step's transfers_after names only
  // what it reads or overwrites; the order is free otherwise.)
  phase_A(0);
  for (int64_t k = 0; k < C; ++k) {
    const int64_t b = M > 1 ? phase_B(k) : -1;
    if (k >= 1) phase_D(k - 1);
    if (k + 1 < C) phase_A(k + 1);
    if (M > 1) finished[static_cast<size_t>(k)] = phase_C(k, b);
  }
  if (C > 0) phase_D(C - 1);
  if (z || s.has_found_inf) {
    // After the last transfer, one pass over the whole tensor on every rank: widen what arrived compressed (what
    // this rank finished itself is rewritten with the same bits) and check it, so found_inf is set on every rank.
    e.step(-1);
    for (int64_t r = 0; r < t.n; ++r) {
      PlanReduction w = reduction(s.numel, {span(src, 0)}, span(PlanBuffer::kData, 0));
      w.check_inf = true;
      e.reduce(r, std::move(w));
    }
  }
}

// ---- reduce-scatter and all-gather (nodes of equal size K; rank r = (m, j): local index j on node m) ----
// S_j = the M segments of the ranks with local index j, one per node (members[m'][j], m' in node order).

// Reduce-scatter (kInput: N x n, kData: n; rank r ends with segment r summed over all ranks):
//   A_k. intra-node reduce-scatter by direct exchange: for every segment d in S_j, every other rank of node m
//        sends its piece k of input segment d to (m, j), which sums the K contributions in local order (the
//        node-partial of d; exact, stored in W when compressed: rounded once).
//   B_k. inter-node reduce-scatter by direct exchange among the ranks with local index j: (m, j) sends its
//        node-partial of segment members[m'][j] to that rank and sums the M node-partials of its own segment in
//        node order with the final fusions (never rounded to the wire: nothing travels after it).
// Steps: A_0, A_1, B_0, A_2, B_1, ...: B_k's inter-node exchange is on the wire while A_{k+1}'s intra-node one is.
// Workspace per piece parity (h = k % 2): intra slots M (K - 1) pieces (T: kRecv, compressed kStage);
// node-partials M pieces (kRecv, compressed kWire in W); inter slots (M - 1) pieces (kRecv, W).
void make_hierarchical_reduce_scatter(Plan& plan) {
  const PlanSpec& s = plan.spec;
  const Topology t(s);
  const int64_t M = t.nodes, K = t.columns, n = s.numel;
  const bool z = s.compressed();
  const int64_t align = plan_align_elems(s);
  const int64_t tb = dtype_size(s.dtype), wb = dtype_size(s.travel_dtype());
  int64_t chunks = default_pieces(s, n * wb);
  if (s.chunk_bytes > 0) chunks = std::max<int64_t>(1, ceil_div(n * wb, s.chunk_bytes));
  const int64_t chunk = aligned_piece(n, chunks, align, [&](int64_t piece) {
    const int64_t ws = 2 * piece * (M * (K - 1) * tb + M * (z ? wb : tb) + (M - 1) * wb);
    return s.chunk_bytes > 0 || ws <= kHierWorkspaceBudget;
  });
  const int64_t C = ceil_div(n, chunk);
  plan.segment_elems = n;
  plan.chunk_elems = chunk;
  plan.num_chunks = C;
  const int64_t intra_elems = 2 * M * (K - 1) * chunk, part_elems = 2 * M * chunk, inter_elems = 2 * (M - 1) * chunk;
  if (z) {
    plan.stage_elems = intra_elems;
    plan.wire_elems = part_elems;
    plan.recv_elems = inter_elems;
  } else {
    plan.recv_elems = intra_elems + part_elems + inter_elems;
  }
  auto piece_size = [&](int64_t k) { return std::min(chunk, n - std::min(k * chunk, n)); };
  // Slots of the receiving rank `to` (their layout is the same on every rank: K and M are).
  auto intra_slot = [&](int64_t to, int64_t k, int64_t node, int64_t from) {
    const int64_t lf = t.local_of(from), lt = t.local_of(to);
    const int64_t index = ((k % 2) * M + node) * (K - 1) + (lf < lt ? lf : lf - 1);
    return span(z ? PlanBuffer::kStage : PlanBuffer::kRecv, index * chunk);
  };
  auto partial = [&](int64_t owner, int64_t k, int64_t node) {
    if (K == 1 && !z) return span(PlanBuffer::kInput, t.members[static_cast<size_t>(node)][0] * n + k * chunk);
    (void)owner;
    const int64_t index = (k % 2) * M + node;
    return z ? span(PlanBuffer::kWire, index * chunk) : span(PlanBuffer::kRecv, intra_elems + index * chunk);
  };
  auto inter_slot = [&](int64_t to, int64_t k, int64_t from_node) {
    const int64_t m = t.node_of(to);
    const int64_t index = (k % 2) * (M - 1) + (from_node < m ? from_node : from_node - 1);
    return span(PlanBuffer::kRecv, (z ? 0 : intra_elems + part_elems) + index * chunk);
  };
  Emitter e(&plan, s.rank);
  std::vector<int64_t> a_step(static_cast<size_t>(C), -1), b_step(static_cast<size_t>(C), -1);
  auto phase_A = [&](int64_t k) {
    a_step[static_cast<size_t>(k)] = e.step(k >= 2 ? b_step[static_cast<size_t>(k - 2)] : -1);
    const int64_t count = piece_size(k);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t j = 0; j < K; ++j) {
        const int64_t o = t.members[static_cast<size_t>(m)][static_cast<size_t>(j)];
        for (int64_t q = 0; q < M; ++q) {
          const int64_t d = t.members[static_cast<size_t>(q)][static_cast<size_t>(j)];
          const PlanSpan in = span(PlanBuffer::kInput, d * n + k * chunk);
          std::vector<PlanSpan> inputs;
          for (int64_t p : t.members[static_cast<size_t>(m)]) {
            e.move(p, in, o, intra_slot(o, k, q, p), count);
            inputs.push_back(p == o ? in : intra_slot(o, k, q, p));
          }
          if (z || K > 1) e.reduce(o, reduction(count, std::move(inputs), partial(o, k, q)));
        }
      }
    }
  };
  auto phase_B = [&](int64_t k) {
    b_step[static_cast<size_t>(k)] = e.step(a_step[static_cast<size_t>(k)]);
    const int64_t count = piece_size(k);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t j = 0; j < K; ++j) {
        const int64_t o = t.members[static_cast<size_t>(m)][static_cast<size_t>(j)];
        std::vector<PlanSpan> inputs;
        for (int64_t q = 0; q < M; ++q) {
          const int64_t from = t.members[static_cast<size_t>(q)][static_cast<size_t>(j)];
          e.move(from, partial(from, k, m), o, inter_slot(o, k, q), count);
          inputs.push_back(q == m ? partial(o, k, m) : inter_slot(o, k, q));
        }
        PlanReduction r = reduction(count, std::move(inputs), span(PlanBuffer::kData, k * chunk));
        r.final = true;
        r.check_inf = true;
        e.reduce(o, std::move(r));
      }
    }
  };
  phase_A(0);
  for (int64_t k = 0; k < C; ++k) {
    if (k + 1 < C) phase_A(k + 1);
    phase_B(k);
  }
}

// All-gather (kInput: n, kData: N x n): copy the input into output segment r; C. inter-node all-gather among
// the ranks with local index j (each sends its input to the others: segments S_j); D. intra-node all-gather:
// (m, j) sends the M segments of S_j to every other rank of its node. Inter-node bytes per rank (M - 1) n, where
// the flat direct all-gather sends (N - K) n across nodes.
void make_hierarchical_all_gather(Plan& plan) {
  const PlanSpec& s = plan.spec;
  const Topology t(s);
  const int64_t M = t.nodes, K = t.columns, n = s.numel;
  plan.segment_elems = plan.chunk_elems = n;
  plan.num_chunks = 1;
  Emitter e(&plan, s.rank);
  e.step(-1);
  e.reduce(s.rank, reduction(n, {span(PlanBuffer::kInput, 0)}, span(PlanBuffer::kData, s.rank * n)));
  const int64_t inter = e.step(-1);  // never touches segment r: overlaps the copy
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < K; ++j) {
      const int64_t r = t.members[static_cast<size_t>(m)][static_cast<size_t>(j)];
      for (int64_t q = 0; q < M; ++q) {
        e.move(r, span(PlanBuffer::kInput, 0), t.members[static_cast<size_t>(q)][static_cast<size_t>(j)],
               span(PlanBuffer::kData, r * n), n);
      }
    }
  }
  e.step(inter);  // forwards what the copy wrote and what arrived in step `inter`
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < K; ++j) {
      const int64_t src = t.members[static_cast<size_t>(m)][static_cast<size_t>(j)];
      for (int64_t dst : t.members[static_cast<size_t>(m)]) {
        for (int64_t q = 0; q < M; ++q) {
          const int64_t d = t.members[static_cast<size_t>(q)][static_cast<size_t>(j)];
          e.move(src, span(PlanBuffer::kData, d * n), dst, span(PlanBuffer::kData, d * n), n);
        }
      }
    }
  }
}

void check_hierarchical(const PlanSpec& s) {
  const Topology t(s);
  PARACOMM_CHECK(t.columns <= kMaxReduceInputs, "algorithm hierarchical: a node has ", t.columns, " ranks; at most ",
                 kMaxReduceInputs, " (phase A sums all of them in one reduction)");
  if (s.collective == Collective::kAllReduce) return;
  for (int64_t m = 0; m < t.nodes; ++m) {
    PARACOMM_CHECK(t.size(m) == t.columns, "algorithm hierarchical for ", collective_name(s.collective),
                   " needs nodes of equal size; node ", m, " has ", t.size(m), " ranks, node 0 ", t.size(0));
  }
  PARACOMM_CHECK(s.collective == Collective::kAllGather || t.nodes <= kMaxReduceInputs,
                 "algorithm hierarchical for reduce_scatter serves at most ", kMaxReduceInputs, " nodes, got ",
                 t.nodes);
}

TopologySummary summarize_topology(const PlanSpec& spec) {
  TopologySummary out;
  out.nodes = count_nodes(spec.node_of);
  const Topology t(spec);
  std::vector<int64_t> ranks;
  if (spec.world_size <= 64) {
    for (int64_t r = 0; r < spec.world_size; ++r) ranks.push_back(r);
  } else {
    for (const auto& ms : t.members) {
      ranks.push_back(ms.front());
      if (ms.back() != ms.front()) ranks.push_back(ms.back());
    }
  }
  for (int64_t r : ranks) {
    PlanSpec s = spec;
    s.rank = r;
    const Plan plan = make_plan(s);
    int64_t inter = 0, intra = 0, steps = 0;
    for (const PlanStep& st : plan.steps) {
      bool crosses = false;
      for (const PlanTransfer& x : st.transfers) {
        if (!x.send) continue;
        // Each buffer's own element type (plan.h: kData/kInput/kStage hold T, kWire/kRecv the travel dtype), as
        // summarize_plan counts bytes_sent.
        const int64_t bytes = x.count * dtype_size(plan_buffer_dtype(plan.spec, x.span.buffer));
        if (t.node_of(x.peer) != t.node_of(r)) {
          inter += bytes;
          crosses = true;
        } else {
          intra += bytes;
        }
      }
      steps += crosses ? 1 : 0;
    }
    out.inter_node_bytes = std::max(out.inter_node_bytes, inter);
    out.intra_node_bytes = std::max(out.intra_node_bytes, intra);
    out.inter_node_steps = std::max(out.inter_node_steps, steps);
  }
  return out;
}

}  // namespace paracomm
