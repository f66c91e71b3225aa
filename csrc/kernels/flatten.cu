// Flatten / unflatten kernels (see flatten.h for the contract).
//
// Segments are grouped by dtype (in order of first appearance) and each group is one multi-tensor launch
// with two pointers per segment: the segment and its slice of the flat buffer, read and written in the
// direction asked. Each (source, destination) dtype pair is its own kernel, so the element loop is a
// straight conversion; whether to scale is a uniform run-time flag (a copy and a scaled copy cost the same
// memory traffic, and it halves the number of kernels).
#include "kernels/flatten.h"

#include <type_traits>
#include <vector>

#include "checks.h"
#include "kernels/element_io.cuh"
#include "kernels/multi_tensor_apply.cuh"

namespace paracomm {
namespace kernels {
namespace {

template <typename T>
inline constexpr bool needs_double_v =
    std::is_same_v<T, double> || std::is_same_v<T, int32_t> || std::is_same_v<T, int64_t>;

template <typename InT, typename OutT>
struct FlattenOp {
  using In = InT;
  using Out = OutT;
  using Compute = std::conditional_t<needs_double_v<In> || needs_double_v<Out>, double, float>;
  bool scaled;
  double scale;
  const float* scale_tensor;  // device pointer or null

  struct State {
    Compute factor;
  };

  __device__ __forceinline__ State init() const {
    // The CPU op's factor: C(scale) * C(scale_tensor[0]); with no tensor, C(scale) * 1 == C(scale).
    Compute factor = static_cast<Compute>(scale);
    if (scale_tensor != nullptr) factor = factor * static_cast<Compute>(*scale_tensor);
    return State{factor};
  }

  __device__ __forceinline__ Out apply(State& s, In x) const {
    if (!scaled) return convert<Out>(x);
    return convert<Out>(static_cast<Compute>(widen(x)) * s.factor);
  }

  __device__ __forceinline__ void finish(State&) const {}
};

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
void visit_dtype(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32: f(TypeTag<float>{}); return;
    case DType::kFloat16: f(TypeTag<half_t>{}); return;
    case DType::kBFloat16: f(TypeTag<bf16_t>{}); return;
    case DType::kFloat64: f(TypeTag<double>{}); return;
    case DType::kInt32: f(TypeTag<int32_t>{}); return;
    case DType::kInt64: f(TypeTag<int64_t>{}); return;
  }
  PARACOMM_THROW("flatten: unsupported dtype code ", static_cast<int>(t));
}

template <typename In, typename Out>
void run_pair(const std::vector<MtaTensor<2>>& list, bool scaled, double scale, const float* scale_tensor,
              cudaStream_t stream) {
  using Op = FlattenOp<In, Out>;
  launch_multi_tensor<2, Op>(list, [&](int64_t) { return Op{scaled, scale, scale_tensor}; }, stream);
}

}  // namespace
}  // namespace kernels

void launch_flatten(FlattenDirection direction, const FlattenSegment* segments, int64_t count, void* flat,
                    DType flat_dtype, double scale, const float* scale_tensor, cudaStream_t stream) {
  using namespace kernels;
  PARACOMM_CHECK(direction == FlattenDirection::kToFlat || direction == FlattenDirection::kFromFlat,
                 "flatten: bad direction ", static_cast<int>(direction));
  const int64_t flat_elem = dtype_size(flat_dtype);
  PARACOMM_CHECK(flat_elem > 0, "flatten: unsupported flat dtype code ", static_cast<int>(flat_dtype));
  struct Group {
    DType dtype;
    std::vector<MtaTensor<2>> list;
  };
  std::vector<Group> groups;
  int64_t offset = 0;
  for (int64_t i = 0; i < count; ++i) {
    const FlattenSegment& s = segments[i];
    PARACOMM_CHECK(s.numel >= 0, "flatten: segment ", i, " has negative size ", s.numel);
    PARACOMM_CHECK(dtype_size(s.dtype) > 0, "flatten: segment ", i, " has unsupported dtype code ",
                   static_cast<int>(s.dtype));
    if (s.numel > 0) {
      PARACOMM_CHECK(s.data != nullptr && flat != nullptr, "flatten: segment ", i, " has a null pointer");
      void* slice = static_cast<char*>(flat) + offset * flat_elem;
      Group* g = nullptr;
      for (Group& existing : groups)
        if (existing.dtype == s.dtype) g = &existing;
      if (g == nullptr) {
        groups.push_back(Group{s.dtype, {}});
        g = &groups.back();
      }
      if (direction == FlattenDirection::kToFlat) {
        g->list.push_back({{s.data, slice}, s.numel});
      } else {
        g->list.push_back({{slice, s.data}, s.numel});
      }
    }
    offset += s.numel;
  }
  const bool scaled = scale != 1.0 || scale_tensor != nullptr;
  for (const Group& g : groups) {
    const DType src = direction == FlattenDirection::kToFlat ? g.dtype : flat_dtype;
    const DType dst = direction == FlattenDirection::kToFlat ? flat_dtype : g.dtype;
    visit_dtype(src, [&](auto src_tag) {
      visit_dtype(dst, [&](auto dst_tag) {
        using In = typename decltype(src_tag)::type;
        using Out = typename decltype(dst_tag)::type;
        run_pair<In, Out>(g.list, scaled, scale, scale_tensor, stream);
      });
    });
  }
}

}  // namespace paracomm
