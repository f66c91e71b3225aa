// Topology-aware all-reduce: the `hierarchical` algorithm, its choice and its per-node byte counts.
// Plain C++ (no CUDA, no torch); the plan format and its invariants are plan.h's, unchanged except for the T-typed
// staging buffer kStage that a compressed hierarchical plan receives its exact intra-node traffic into.
//
// The node map (PlanSpec::node_of, rank -> node) is an input of the generator, never of an executor. Nodes are
// numbered by first appearance in rank order (rank 0 is on node 0; a rank on a new node gets the next number), so
// one map has one spelling on every rank. Within a node, ranks keep global rank order ("local index").
//
// hierarchical (M nodes, node m with K_m ranks, Q = max K_m "columns" of the tensor):
//   A. intra-node reduce-scatter, direct: column c of node m is owned by its local index c mod K_m; every other
//      rank of the node sends its piece of column c to that owner, who sums the K_m contributions in local-index
//      order (the node-partial). Exact: the data travels and is summed in its own dtype.
//   B. inter-node reduce-scatter among the M owners of column c (one per node, in node order): direct (node m's
//      owner owns sub-piece m and sums the M node-partials in node order, with the final fusions) for few nodes,
//      a ring over the nodes for many (inter_node_ring()).
//   C. inter-node all-gather of the sub-pieces among the same M owners (direct or ring).
//   D. intra-node all-gather, direct: the owner sends its column to every other rank of its node.
// Every reduction sums at most max(max K_m, M) inputs (2 for the ring), so the algorithm serves any world size
// with max K_m <= kMaxReduceInputs and, with the direct inter-node phase, M <= kMaxReduceInputs.
// Compressed wire: phase A sums exact inputs in fp32 and stores the node-partial in W (rounded once); B/C travel
// in W and accumulate in fp32, the result is rounded once (direct: the error is flat in N; the ring re-rounds at
// every hop among nodes); D travels in W too, which is exact (the result is representable in W).
// Uneven nodes are served: a rank of a node with fewer than Q ranks owns several columns.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "allreduce/plan.h"

namespace paracomm {

// Nodes of a canonical node map; 1 when node_of is empty (every rank on one node).
int64_t count_nodes(const std::vector<int32_t>& node_of);

// Throws paracomm::Error naming `node_map` unless node_of is empty or has world_size entries numbered by first
// appearance (node_of[0] == 0, each entry <= 1 + max of the entries before it).
void check_node_map(const std::vector<int32_t>& node_of, int64_t world_size);

// Pure predicates (thresholds in hierarchical.cpp, docs/ARCHITECTURE.md "Topology and the hierarchical plan"):
//   inter_node_ring(nodes): phase B/C run as a ring (true) or by direct exchange (false).
//   choose_algorithm_topology(...): what "auto" picks given the node map: the flat choice (choose_algorithm) on
//     one node, with one rank per node, or when a node has more than kMaxReduceInputs ranks; one_shot for messages
//     within its latency thresholds; else hierarchical. `why` (optional) receives a one-line reason.
bool inter_node_ring(int64_t nodes);

// The flat ring's rank order under a node map: ranks node by node (nodes in their canonical order, ranks of a node
// in rank order), so that the ring crosses between nodes once per node (M times for M > 1 nodes) whatever the
// placement: ranks 0, 2 on node 0 and 1, 3 on node 1 give the ring 0 -> 2 -> 1 -> 3 -> 0 (2 inter-node hops, not 4).
// order[p] is the rank at ring position p; the identity for an empty map (one node) and for contiguous maps, so
// those plans are exactly the ones made without a map. A pure function of the map: the same on every rank.
std::vector<int64_t> ring_order(const std::vector<int32_t>& node_of, int64_t world_size);
// Ring hops (position p -> p + 1 mod N) whose two ranks are on different nodes.
int64_t ring_inter_node_hops(const std::vector<int32_t>& node_of, const std::vector<int64_t>& order);
Algorithm choose_algorithm_topology(int64_t numel, DType dtype, int32_t wire_dtype, int64_t world_size, Backend backend,
                                    const std::vector<int32_t>& node_of, std::string* why);
// reduce_scatter / all_gather: hierarchical for nodes of equal size (1 < M < N, at most 8 nodes for
// reduce_scatter) above the flat choice's one-shot sizes, else the flat choice.
Algorithm choose_algorithm_topology(Collective collective, int64_t numel, DType dtype, int32_t wire_dtype,
                                    int64_t world_size, Backend backend, const std::vector<int32_t>& node_of,
                                    std::string* why);

// Fills plan.steps and the buffer sizes for spec.algorithm == kHierarchical (called by make_plan, which has
// validated the spec and handled numel 0 and world size 1): the all-reduce above, or (nodes of equal size)
// reduce_scatter / all_gather (hierarchical.cpp: intra-node then inter-node reduce-scatter; inter-node then
// intra-node all-gather).
void make_hierarchical(Plan& plan);
void make_hierarchical_reduce_scatter(Plan& plan);
void make_hierarchical_all_gather(Plan& plan);

// Throws paracomm::Error unless spec can have a hierarchical plan: at most kMaxReduceInputs ranks per node; for
// reduce_scatter / all_gather nodes of equal size (and reduce_scatter at most kMaxReduceInputs nodes).
void check_hierarchical(const PlanSpec& spec);

// Bytes over each kind of link, for explain_all_reduce(node_size=): for each sampled rank the bytes it sends to
// ranks on other nodes (inter) and on its own node (intra), and the steps in which it sends across nodes. The
// maxima over the sampled ranks are reported (every rank when world_size <= 64; else the first and last rank of
// every node, which are the busiest senders of every algorithm here).
struct TopologySummary {
  int64_t nodes = 1;
  int64_t inter_node_bytes = 0;
  int64_t intra_node_bytes = 0;
  int64_t inter_node_steps = 0;
};
TopologySummary summarize_topology(const PlanSpec& spec);

}  // namespace paracomm
