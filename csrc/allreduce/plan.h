// Collective plans (all-reduce, reduce-scatter, all-gather): plain C++ (no CUDA, no NCCL, no torch).
//
// A collective is a *plan*, data produced by an algorithm and run by an executor that knows no algorithm:
//   * the NCCL executor (csrc/allreduce/nccl_executor.*): one ncclGroupStart/End per step with work, the
//     step's reductions on the caller's stream, CUDA events for the dependencies the plan states;
//   * the CPU executor (paracomm/_cpu_executor.py): gloo point-to-point on a private group, the CPU
//     reduction op (paracomm::reduce_).
// Both run the same plan, so both reduce in the same order and give the same bits.
//
// A plan is an ordered list of steps. A step is
//   1. a transfer group: sends and receives that go out together (peer, buffer, element offset, count);
//   2. then the step's reductions, in order. A reduction starts once this step's transfers, and every earlier
//      step's, have completed. It sums its inputs in the listed order, accumulating in acc(T) (float for
//      float32/float16/bfloat16 data, double for float64, int64 for integers), applies the owner's final
//      fusions when `final` is set (divide by the divisor, multiply by the scale), optionally rounds the value
//      through the wire dtype (keeping the rounded bits in `wire_out` when it has one), tests the stored value
//      for inf/nan when `check_inf` is set and the call has found_inf, and stores it in the output's dtype.
// A step's transfers may start only once the reductions and the transfers of every step <= `transfers_after`
// are done (the data they send was produced or received there, or the receive slot they fill was last read
// there); they never wait for anything else. (The NCCL executor issues transfers in step order on one stream,
// so the transfer half of that rule holds by construction there; the CPU executor waits for it.) Executors may therefore post step i+1's transfers before running step i's reductions whenever
// transfers_after(i+1) < i: that is the whole pipelining mechanism.
//
// Buffers, in elements of their own dtype (plan_buffer_dtype); an executor maps each to memory and knows
// nothing else about the call -- not even which collective it runs:
//   kData   the output, data_elems elements of T (all-reduce: the user's tensor, reduced in place, so also
//           the input); the only user buffer a plan writes;
//   kInput  an out-of-place input, input_elems elements of T, only ever read (0 elements for all-reduce);
//   kWire   staging for a compressed call, wire_elems elements of W (the wire dtype); absent when uncompressed;
//   kRecv   receive workspace, recv_elems elements of W (W == T when uncompressed);
//   kStage  T-typed receive workspace, stage_elems elements of T (only compressed hierarchical plans use it).
// The collectives (spec.collective; n = spec.numel, N = world size):
//   all-reduce      kData: n elements, reduced in place;
//   reduce-scatter  kInput: N x n elements, kData: n elements; rank r stores the reduction of input segment r
//                   ([r n, (r + 1) n) on every rank), as ncclReduceScatter / dist.reduce_scatter_tensor;
//   all-gather      kInput: n elements, kData: N x n elements; segment p of the output is rank p's input, as
//                   ncclAllGather / dist.all_gather_into_tensor. No wire dtype, no final op, no found_inf.
//
// Invariants every generator keeps (tests/test_plans.py checks them for every algorithm, world size and size):
//   * every rank's plan has the same number of steps, and whenever rank r sends (peer p, count c) in step i,
//     rank p receives (peer r, count c) in step i, in the same order among r's transfers to p;
//   * transfers with count 0 are never emitted;
//   * each output element is computed either by one rank (its owner) whose bits all others copy, or by every
//     rank from identical inputs in the same order: results are bitwise identical on every rank;
//   * all-reduce (ring, direct): segment and chunk boundaries are multiples of kPlanAlignBytes in both T and W,
//     so every piece starts on the kernels' vector boundary; reduce-scatter / all-gather: the caller's layout
//     puts segment p at p x n, so only piece boundaries *inside* a segment and every workspace slot are
//     multiples of kPlanAlignBytes (one_shot: none are; kernels handle any alignment, aligned is just faster);
//   * kInput is never written; each element of kData is written by one reduction or one receive per hop;
//   * no two transfers or reductions that may run concurrently touch the same bytes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dtype.h"

namespace paracomm {

enum class Algorithm : int32_t {
  kRing = 0,     // reduce-scatter + all-gather around a ring; the compressed wire re-rounds at every hop
  kDirect = 1,   // two-shot: reduce-scatter by direct exchange, owner sums in rank order, direct all-gather
  kOneShot = 2,  // every rank sends its whole buffer to every peer and sums all N in rank order
  kHierarchical = 3,  // topology-aware: intra-node RS, inter-node AR per shard, intra-node AG (hierarchical.h)
};

enum class Backend : int32_t { kNccl = 0, kGloo = 1 };

// What a plan computes (the buffer table above). Generators use it; executors never need it.
enum class Collective : int32_t { kAllReduce = 0, kReduceScatter = 1, kAllGather = 2 };

// kStage: T-typed workspace, stage_elems elements after kRecv, for receives that must stay exact in a compressed
// plan (hierarchical's intra-node reduce-scatter); 0 elements otherwise.
enum class PlanBuffer : int32_t { kData = 0, kWire = 1, kRecv = 2, kInput = 3, kStage = 4 };
constexpr int32_t kNumPlanBuffers = 5;

// wire_dtype value meaning "no compression": data travels in its own dtype.
constexpr int32_t kNoWire = -1;
// Segment and chunk boundaries are multiples of this many bytes in every buffer they index.
constexpr int64_t kPlanAlignBytes = 128;
// A reduction sums at most this many inputs (the CUDA kernel takes its pointers by value); direct and
// one_shot therefore serve at most this many ranks.
constexpr int64_t kMaxReduceInputs = 32;

struct PlanSpan {
  PlanBuffer buffer = PlanBuffer::kData;
  int64_t offset = 0;  // elements of the buffer's dtype
};

struct PlanTransfer {
  bool send = true;     // false: receive
  int32_t peer = 0;     // rank in the communicator
  PlanSpan span;        // where the data comes from (send) or lands (receive)
  int64_t count = 0;    // elements of the buffer's dtype, > 0
};

struct PlanReduction {
  int64_t count = 0;                 // elements, > 0
  std::vector<PlanSpan> inputs;      // summed in this order; inputs[1:] share one buffer dtype
  PlanSpan out;
  bool final = false;                // apply divisor and scale (the owner's final reduction)
  bool round_to_wire = false;        // v = acc(W(v)) before the store (compressed calls only)
  bool has_wire_out = false;         // with round_to_wire: also store W(v) at wire_out
  PlanSpan wire_out;
  bool check_inf = false;            // found_inf |= !isfinite(stored v), when the call has found_inf
};

struct PlanStep {
  std::vector<PlanTransfer> transfers;    // one transfer group; may be empty
  std::vector<PlanReduction> reductions;  // after the transfers; may be empty
  int64_t transfers_after = -1;           // see the file comment; < this step's index
};

// What a plan depends on. Plans do not depend on the divisor's or scale's value, only on whether the final
// reductions have anything to fuse (needed for world size 1, where no reduction is otherwise necessary).
struct PlanSpec {
  Collective collective = Collective::kAllReduce;
  int64_t numel = 0;              // all-reduce: the tensor's; reduce-scatter: output per rank; all-gather: input per rank
  DType dtype = DType::kFloat32;
  int32_t wire_dtype = kNoWire;   // DType code of W (float16/bfloat16, float32 data only), or kNoWire
  int64_t world_size = 1;
  int64_t rank = 0;
  Algorithm algorithm = Algorithm::kRing;
  Backend backend = Backend::kNccl;
  bool has_found_inf = false;
  bool has_final_op = false;      // avg, scale or found_inf: world size 1 must still run one reduction
  int64_t chunk_bytes = 0;        // 0: the chunk policy's choice; else bytes of W per piece (see plan.cpp)
  std::vector<int32_t> node_of;   // rank -> node (hierarchical.h: numbered by first appearance); empty: one node

  bool compressed() const { return wire_dtype != kNoWire; }
  DType travel_dtype() const { return compressed() ? static_cast<DType>(wire_dtype) : dtype; }
};

// The dtype of a buffer's elements: T for the user's buffers (kData, kInput), W for the workspace.
inline DType plan_buffer_dtype(const PlanSpec& spec, PlanBuffer b) {
  return b == PlanBuffer::kData || b == PlanBuffer::kInput || b == PlanBuffer::kStage ? spec.dtype
                                                                                    : spec.travel_dtype();
}

struct Plan {
  PlanSpec spec;
  int64_t data_elems = 0;      // kData size (all-reduce, reduce-scatter: numel; all-gather: N x numel)
  int64_t input_elems = 0;     // kInput size (all-reduce: 0; reduce-scatter: N x numel; all-gather: numel)
  int64_t segment_elems = 0;   // elements per rank segment (ring, direct); numel for one_shot
  int64_t chunk_elems = 0;     // elements per piece of a segment (the pipelining unit)
  int64_t num_chunks = 0;      // pieces per segment
  int64_t wire_elems = 0;      // kWire size (numel when compressed, else 0)
  int64_t recv_elems = 0;      // kRecv size
  int64_t stage_elems = 0;     // kStage size (elements of T)
  std::vector<PlanStep> steps;

  // Device/host workspace in bytes: kWire, kRecv, then kStage, each starting on a 256-byte boundary.
  int64_t wire_offset_bytes() const { return 0; }
  int64_t recv_offset_bytes() const;
  int64_t stage_offset_bytes() const;
  int64_t workspace_bytes() const;
};

// Throws paracomm::Error naming the argument unless: collective valid; numel >= 0; world_size >= 1;
// 0 <= rank < world_size; dtype valid; wire_dtype kNoWire or float16/bfloat16 with float32 data; chunk_bytes
// >= 0; direct and one_shot with world_size <= kMaxReduceInputs (all-gather's direct sums nothing: any N);
// all-gather: algorithm ring or direct, no wire dtype, no found_inf, no final op; node_of empty or a canonical
// map of world_size ranks.
void check_plan_spec(const PlanSpec& spec);

// The algorithm "auto" picks (pure; thresholds documented in plan.cpp and docs/ARCHITECTURE.md).
Algorithm choose_algorithm(Collective collective, int64_t numel, DType dtype, int32_t wire_dtype, int64_t world_size,
                           Backend backend);
// The all-reduce's choice.
inline Algorithm choose_algorithm(int64_t numel, DType dtype, int32_t wire_dtype, int64_t world_size,
                                  Backend backend) {
  return choose_algorithm(Collective::kAllReduce, numel, dtype, wire_dtype, world_size, backend);
}

// The plan rank spec.rank runs. Validates spec.
Plan make_plan(const PlanSpec& spec);

// Counts over one rank's plan (rank 0's for explain_all_reduce): transfer groups (steps with transfers),
// reduction launches, bytes this rank sends and receives, workspace bytes.
struct PlanSummary {
  int64_t steps = 0;
  int64_t transfer_groups = 0;
  int64_t reductions = 0;
  int64_t bytes_sent = 0;
  int64_t bytes_received = 0;
  int64_t workspace_bytes = 0;
};
PlanSummary summarize_plan(const Plan& plan);

const char* algorithm_name(Algorithm a);
const char* collective_name(Collective c);
// "all_reduce" | "reduce_scatter" | "all_gather"; throws paracomm::Error naming `arg` otherwise.
Collective collective_from_name(const std::string& name, const char* arg);
// "ring" | "direct" | "one_shot" | "hierarchical"; throws paracomm::Error naming `arg` otherwise.
Algorithm algorithm_from_name(const std::string& name, const char* arg);

}  // namespace paracomm
