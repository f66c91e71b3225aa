// paracomm._C's view of the collective plans (csrc/allreduce/plan.h), for the CPU executor, explain_* and the
// tests. Plans cross into Python as plain tuples and dicts: the CPU executor walks them in a tight loop
// and caches them, so they must be cheap to read.
//
//   all_reduce_plan(numel, dtype, wire_dtype, world_size, rank, algorithm, backend, has_found_inf,
//                   has_final_op, chunk_bytes, node_map=[]) -> dict
//     dtype / wire_dtype: DType codes (csrc/dtype.h; wire -1: none); algorithm "auto" | "ring" | "direct" |
//     "one_shot" | "hierarchical"; backend "nccl" | "gloo"; chunk_bytes 0: the chunk policy's choice; node_map:
//     rank -> node (csrc/allreduce/hierarchical.h), [] for one node; with a node map "auto" is topology-aware.
//     keys: collective, algorithm (the resolved name), data_elems, input_elems, segment_elems, chunk_elems,
//     num_chunks, wire_elems, recv_elems, recv_offset_bytes, stage_elems, stage_offset_bytes, workspace_bytes,
//     steps: [(transfers_after, transfers, reductions)] with
//       transfer  = (is_send, peer, buffer, offset, count)   buffer: 0 data, 1 wire, 2 recv, 3 input, 4 stage (T)
//       reduction = (count, [(buffer, offset), ...], (buffer, offset), final, round_to_wire,
//                    wire_out (buffer, offset) or None, check_inf)
//   collective_plan(collective, <the same arguments>) -> dict: the same for "all_reduce" | "reduce_scatter" |
//     "all_gather" (numel: the all-reduce's tensor, the reduce-scatter's output per rank, the all-gather's input
//     per rank; hierarchical reduce_scatter / all_gather: nodes of equal size);
//   plan_summary(<same arguments>, collective="all_reduce", node_map=[]) -> dict: algorithm, chunk_bytes,
//     num_chunks, steps, transfer_groups, reductions, bytes_sent, bytes_received, workspace_bytes; with a node map
//     also nodes, inter_node_bytes, intra_node_bytes, inter_node_steps (hierarchical.h: TopologySummary) and
//     choice_reason; a ring plan with a node map also ring_order (the ranks in ring order, node by node) and
//     ring_inter_node_hops (ring hops between two nodes).
//   ring_order(node_map, world_size) -> [rank at ring position p] (hierarchical.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "allreduce/hierarchical.h"
#include "allreduce/plan.h"
#include "checks.h"

namespace py = pybind11;

namespace paracomm {

namespace {

Backend backend_from_name(const std::string& name) {
  if (name == "nccl") return Backend::kNccl;
  if (name == "gloo") return Backend::kGloo;
  PARACOMM_THROW("backend must be 'nccl' or 'gloo', got '", name, "'");
}

PlanSpec spec_from_args(const std::string& collective, int64_t numel, int64_t dtype, int64_t wire_dtype, int64_t world_size, int64_t rank,
                        const std::string& algorithm, const std::string& backend, bool has_found_inf,
                        bool has_final_op, int64_t chunk_bytes, const std::vector<int32_t>& node_map,
                        std::string* why = nullptr) {
  PlanSpec s;
  PARACOMM_CHECK(dtype >= 0 && dtype <= static_cast<int64_t>(DType::kInt64), "dtype must be a DType code in [0, 5], got ",
                 dtype);
  PARACOMM_CHECK(wire_dtype == kNoWire || wire_dtype == 1 || wire_dtype == 2,
                 "wire_dtype must be -1 (none), 1 (float16) or 2 (bfloat16), got ", wire_dtype);
  s.collective = collective_from_name(collective, "collective");
  s.numel = numel;
  s.dtype = static_cast<DType>(dtype);
  s.wire_dtype = static_cast<int32_t>(wire_dtype);
  s.world_size = world_size;
  s.rank = rank;
  s.backend = backend_from_name(backend);
  check_node_map(node_map, world_size);
  s.node_of = node_map;
  if (algorithm != "auto") {
    s.algorithm = algorithm_from_name(algorithm, "algorithm");
  } else if (node_map.empty()) {
    s.algorithm = choose_algorithm(s.collective, numel, s.dtype, s.wire_dtype, world_size, s.backend);
    if (why != nullptr) *why = "one node: the flat choice";
  } else {
    s.algorithm = choose_algorithm_topology(s.collective, numel, s.dtype, s.wire_dtype, world_size, s.backend,
                                            node_map, why);
  }
  s.has_found_inf = has_found_inf;
  s.has_final_op = has_final_op;
  s.chunk_bytes = chunk_bytes;
  return s;
}

py::tuple span_tuple(const PlanSpan& s) { return py::make_tuple(static_cast<int>(s.buffer), s.offset); }

py::dict plan_dict(const Plan& plan) {
  py::list steps;
  for (const PlanStep& step : plan.steps) {
    py::list transfers, reductions;
    for (const PlanTransfer& t : step.transfers) {
      transfers.append(py::make_tuple(t.send, t.peer, static_cast<int>(t.span.buffer), t.span.offset, t.count));
    }
    for (const PlanReduction& r : step.reductions) {
      py::list inputs;
      for (const PlanSpan& in : r.inputs) inputs.append(span_tuple(in));
      reductions.append(py::make_tuple(r.count, inputs, span_tuple(r.out), r.final, r.round_to_wire,
                                       r.has_wire_out ? py::object(span_tuple(r.wire_out)) : py::object(py::none()),
                                       r.check_inf));
    }
    steps.append(py::make_tuple(step.transfers_after, transfers, reductions));
  }
  py::dict d;
  d["collective"] = collective_name(plan.spec.collective);
  d["algorithm"] = algorithm_name(plan.spec.algorithm);
  d["data_elems"] = plan.data_elems;
  d["input_elems"] = plan.input_elems;
  d["segment_elems"] = plan.segment_elems;
  d["chunk_elems"] = plan.chunk_elems;
  d["num_chunks"] = plan.num_chunks;
  d["wire_elems"] = plan.wire_elems;
  d["recv_elems"] = plan.recv_elems;
  d["recv_offset_bytes"] = plan.recv_offset_bytes();
  d["stage_elems"] = plan.stage_elems;
  d["stage_offset_bytes"] = plan.stage_offset_bytes();
  d["workspace_bytes"] = plan.workspace_bytes();
  d["steps"] = steps;
  return d;
}

}  // namespace

void bind_plans(py::module_& m) {
  m.def(
      "ring_order",
      [](const std::vector<int32_t>& node_map, int64_t world_size) {
        PARACOMM_CHECK(world_size >= 1, "world_size must be >= 1, got ", world_size);
        check_node_map(node_map, world_size);
        return ring_order(node_map, world_size);
      },
      py::arg("node_map"), py::arg("world_size"),
      "The flat ring's rank order for a canonical node map (node by node; [] = one node: 0..N-1).");
  m.def(
      "inter_node_ring",
      [](int64_t nodes) {
        PARACOMM_CHECK(nodes >= 1, "nodes must be >= 1, got ", nodes);
        return inter_node_ring(nodes);
      },
      py::arg("nodes"),
      "Whether the hierarchical plan's inter-node phase among `nodes` nodes is a ring (else a direct exchange).");
  m.def(
      "all_reduce_plan",
      [](int64_t numel, int64_t dtype, int64_t wire_dtype, int64_t world_size, int64_t rank,
         const std::string& algorithm, const std::string& backend, bool has_found_inf, bool has_final_op,
         int64_t chunk_bytes, const std::vector<int32_t>& node_map) {
        return plan_dict(make_plan(spec_from_args("all_reduce", numel, dtype, wire_dtype, world_size, rank, algorithm,
                                                  backend, has_found_inf, has_final_op, chunk_bytes, node_map)));
      },
      py::arg("numel"), py::arg("dtype"), py::arg("wire_dtype"), py::arg("world_size"), py::arg("rank"),
      py::arg("algorithm"), py::arg("backend"), py::arg("has_found_inf"), py::arg("has_final_op"),
      py::arg("chunk_bytes") = 0, py::arg("node_map") = std::vector<int32_t>{},
      "The all-reduce plan `rank` runs (csrc/plan_binding.cpp documents the format).");
  m.def(
      "collective_plan",
      [](const std::string& collective, int64_t numel, int64_t dtype, int64_t wire_dtype, int64_t world_size,
         int64_t rank, const std::string& algorithm, const std::string& backend, bool has_found_inf,
         bool has_final_op, int64_t chunk_bytes, const std::vector<int32_t>& node_map) {
        return plan_dict(make_plan(spec_from_args(collective, numel, dtype, wire_dtype, world_size, rank, algorithm,
                                                  backend, has_found_inf, has_final_op, chunk_bytes, node_map)));
      },
      py::arg("collective"), py::arg("numel"), py::arg("dtype"), py::arg("wire_dtype"), py::arg("world_size"),
      py::arg("rank"), py::arg("algorithm"), py::arg("backend"), py::arg("has_found_inf"), py::arg("has_final_op"),
      py::arg("chunk_bytes") = 0, py::arg("node_map") = std::vector<int32_t>{},
      "The plan `rank` runs for `collective` (csrc/plan_binding.cpp documents the format).");
  m.def(
      "plan_summary",
      [](int64_t numel, int64_t dtype, int64_t wire_dtype, int64_t world_size, int64_t rank,
         const std::string& algorithm, const std::string& backend, bool has_found_inf, bool has_final_op,
         int64_t chunk_bytes, const std::string& collective, const std::vector<int32_t>& node_map) {
        std::string why;
        const Plan plan = make_plan(spec_from_args(collective, numel, dtype, wire_dtype, world_size, rank, algorithm,
                                                   backend, has_found_inf, has_final_op, chunk_bytes, node_map, &why));
        const PlanSummary s = summarize_plan(plan);
        py::dict d;
        d["algorithm"] = algorithm_name(plan.spec.algorithm);
        d["chunk_bytes"] = plan.chunk_elems * dtype_size(plan.spec.travel_dtype());
        d["num_chunks"] = plan.num_chunks;
        d["steps"] = s.steps;
        d["transfer_groups"] = s.transfer_groups;
        d["reductions"] = s.reductions;
        d["bytes_sent"] = s.bytes_sent;
        d["bytes_received"] = s.bytes_received;
        d["workspace_bytes"] = s.workspace_bytes;
        if (!node_map.empty()) {
          const TopologySummary t = summarize_topology(plan.spec);
          d["nodes"] = t.nodes;
          d["inter_node_bytes"] = t.inter_node_bytes;
          d["intra_node_bytes"] = t.intra_node_bytes;
          d["inter_node_steps"] = t.inter_node_steps;
          d["choice_reason"] = algorithm == "auto" ? why : std::string("requested");
          if (plan.spec.algorithm == Algorithm::kRing) {
            const std::vector<int64_t> order = ring_order(node_map, world_size);
            d["ring_order"] = order;
            d["ring_inter_node_hops"] = ring_inter_node_hops(node_map, order);
          }
        }
        return d;
      },
      py::arg("numel"), py::arg("dtype"), py::arg("wire_dtype"), py::arg("world_size"), py::arg("rank"),
      py::arg("algorithm"), py::arg("backend"), py::arg("has_found_inf"), py::arg("has_final_op"),
      py::arg("chunk_bytes") = 0, py::arg("collective") = "all_reduce",
      py::arg("node_map") = std::vector<int32_t>{},
      "Counts over the plan `rank` runs (transfer groups, reductions, bytes).");
}

}  // namespace paracomm
