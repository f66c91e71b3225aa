// Fused unscale-and-check kernels (see unscale.h for the contract).
//
// One multi-tensor launch per (grad dtype, out dtype, in place) group, in the order the groups first appear
// in the list; mixed-dtype lists (fp32 norms next to bf16 weights) therefore cost one launch per dtype.
// Blocks are numbered across all launches of a call (block_base), and block b writes its norm partial to
// workspace[b]: the partials' positions depend only on the list's sizes and dtypes, never on scheduling,
// and the finalize kernel adds them in index order, so the norm is bitwise reproducible run to run.
#include "kernels/unscale.h"

#include <cmath>
#include <vector>

#include "checks.h"
#include "kernels/element_io.cuh"
#include "kernels/multi_tensor_apply.cuh"

namespace paracomm {
namespace kernels {
namespace {

constexpr int kFinalizeThreads = 512;

template <typename InT, typename OutT, bool kNorm>
struct UnscaleOp {
  using In = InT;
  using Out = OutT;
  const float* inv_scale;
  float* found_inf;
  double* partials;    // workspace, one slot per block of the whole call (kNorm only)
  int64_t block_base;  // slot of this launch's block 0

  struct State {
    float inv;
    double sumsq;
    bool found;
  };

  __device__ __forceinline__ State init() const { return State{*inv_scale, 0.0, false}; }

  __device__ __forceinline__ Out apply(State& s, In g) const {
    const float x = static_cast<float>(widen(g));
    s.found |= !isfinite(x);  // the test is on the input, as torch's _amp_foreach_non_finite_check_and_unscale_
    const float v = x * s.inv;
    if constexpr (kNorm) s.sumsq += static_cast<double>(v) * static_cast<double>(v);
    return convert<Out>(v);
  }

  __device__ __forceinline__ void finish(State& s) const {
    // Every thread that saw a non-finite value stores the same 1.0: a benign race, and no block-wide vote.
    if (s.found) *found_inf = 1.0f;
    if constexpr (kNorm) {
      __shared__ double scratch[kMtaThreads / 32];
      const double total = block_sum_fixed_order(s.sumsq, scratch);
      if (threadIdx.x == 0) partials[block_base + blockIdx.x] = total;
    }
  }
};

// Adds the per-block partials in index order (each thread a fixed strided subset, then a fixed-order tree).
__global__ void __launch_bounds__(kFinalizeThreads)
    unscale_norm_finalize_kernel(const double* __restrict__ partials, int64_t count, float* norm) {
  __shared__ double scratch[kFinalizeThreads / 32];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) s += partials[i];
  const double total = block_sum_fixed_order(s, scratch);
  if (threadIdx.x == 0) *norm = static_cast<float>(sqrt(total));
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>) for a gradient dtype.
template <typename F>
void visit_grad_dtype(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32: f(TypeTag<float>{}); return;
    case DType::kFloat16: f(TypeTag<half_t>{}); return;
    case DType::kBFloat16: f(TypeTag<bf16_t>{}); return;
    default: break;
  }
  PARACOMM_THROW("unscale_and_check: unsupported gradient dtype ", dtype_name(t));
}

struct Group {
  DType in, out;
  bool in_place;
  std::vector<int64_t> members;  // indices into the caller's list
};

struct Pointers {
  const float* inv_scale;
  float* found_inf;
  double* partials;  // null without norm
};

template <typename In, typename Out, int Depth, bool kNorm>
void run_group_impl(const std::vector<MtaTensor<Depth>>& list, const Pointers& p, int64_t call_block_base,
                    cudaStream_t stream) {
  using Op = UnscaleOp<In, Out, kNorm>;
  launch_multi_tensor<Depth, Op>(
      list, [&](int64_t launch_base) { return Op{p.inv_scale, p.found_inf, p.partials, call_block_base + launch_base}; },
      stream);
}

template <typename In, typename Out>
void run_group(const Group& g, const UnscaleTensor* tensors, const Pointers& p, int64_t call_block_base,
               cudaStream_t stream) {
  if (g.in_place) {
    std::vector<MtaTensor<1>> list;
    for (int64_t i : g.members) list.push_back({{tensors[i].out}, tensors[i].numel});
    if (p.partials) {
      run_group_impl<In, Out, 1, true>(list, p, call_block_base, stream);
    } else {
      run_group_impl<In, Out, 1, false>(list, p, call_block_base, stream);
    }
  } else {
    std::vector<MtaTensor<2>> list;
    for (int64_t i : g.members)
      list.push_back({{const_cast<void*>(tensors[i].grad), tensors[i].out}, tensors[i].numel});
    if (p.partials) {
      run_group_impl<In, Out, 2, true>(list, p, call_block_base, stream);
    } else {
      run_group_impl<In, Out, 2, false>(list, p, call_block_base, stream);
    }
  }
}

int64_t num_blocks(int64_t numel) { return (numel + kMtaChunkElems - 1) / kMtaChunkElems; }

}  // namespace
}  // namespace kernels

int64_t unscale_norm_workspace_elems(const UnscaleTensor* tensors, int64_t count) {
  int64_t blocks = 0;
  for (int64_t i = 0; i < count; ++i) blocks += kernels::num_blocks(tensors[i].numel);
  return blocks;
}

void launch_unscale_and_check(const UnscaleTensor* tensors, int64_t count, const float* inv_scale,
                              float* found_inf, float* norm, double* norm_workspace, int64_t workspace_elems,
                              cudaStream_t stream) {
  using namespace kernels;
  PARACOMM_CHECK(inv_scale != nullptr && found_inf != nullptr, "unscale_and_check: inv_scale and found_inf are required");
  // Group by dtype pair, checking every entry before anything is launched.
  std::vector<Group> groups;
  for (int64_t i = 0; i < count; ++i) {
    const UnscaleTensor& t = tensors[i];
    PARACOMM_CHECK(t.numel >= 0, "unscale_and_check: tensor ", i, " has negative size ", t.numel);
    PARACOMM_CHECK(t.grad_dtype == DType::kFloat32 || t.grad_dtype == DType::kFloat16 ||
                       t.grad_dtype == DType::kBFloat16,
                   "unscale_and_check: tensor ", i, " has unsupported dtype ", dtype_name(t.grad_dtype));
    const bool in_place = t.out == t.grad;
    PARACOMM_CHECK(t.out_dtype == t.grad_dtype || (!in_place && t.out_dtype == DType::kFloat32),
                   "unscale_and_check: tensor ", i, ": cannot write ", dtype_name(t.grad_dtype), " into ",
                   dtype_name(t.out_dtype), in_place ? " in place" : "");
    if (t.numel == 0) continue;
    PARACOMM_CHECK(t.grad != nullptr && t.out != nullptr, "unscale_and_check: tensor ", i, " has a null pointer");
    Group* g = nullptr;
    for (Group& existing : groups)
      if (existing.in == t.grad_dtype && existing.out == t.out_dtype && existing.in_place == in_place) g = &existing;
    if (g == nullptr) {
      groups.push_back(Group{t.grad_dtype, t.out_dtype, in_place, {}});
      g = &groups.back();
    }
    g->members.push_back(i);
  }
  const int64_t total_blocks = unscale_norm_workspace_elems(tensors, count);
  if (norm != nullptr && total_blocks > 0)
    PARACOMM_CHECK(norm_workspace != nullptr && workspace_elems >= total_blocks, "unscale_and_check: the norm needs ",
                   total_blocks, " workspace doubles, got ", norm_workspace ? workspace_elems : 0);

  const Pointers p{inv_scale, found_inf, norm != nullptr ? norm_workspace : nullptr};
  int64_t block_base = 0;
  for (const Group& g : groups) {
    visit_grad_dtype(g.in, [&](auto in_tag) {
      using In = typename decltype(in_tag)::type;
      if (g.out == g.in) {
        run_group<In, In>(g, tensors, p, block_base, stream);
      } else {
        run_group<In, float>(g, tensors, p, block_base, stream);
      }
    });
    for (int64_t i : g.members) block_base += num_blocks(tensors[i].numel);
  }
  if (norm != nullptr) {
    unscale_norm_finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(norm_workspace, total_blocks, norm);
    PARACOMM_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace paracomm
