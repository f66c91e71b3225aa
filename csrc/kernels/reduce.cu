// The all-reduce's N-input local reduction kernel (contract: reduce.h; semantics: csrc/ops.cpp, op reduce_).
//
// One elementwise pass over n elements: load every input, accumulate left to right, divide, scale, optionally
// round through the wire dtype (the owner keeps exactly the bits it sends), test for inf/nan, store. The
// arithmetic is element by element that of the CPU op (csrc/cpu/reduce_cpu.cpp), so the NCCL and gloo
// executors give the same bits:
//   acc = float for float32/float16/bfloat16, double for float64, int64 for int32/int64 (wrapping add);
//   divisor (as acc) and scale only for floating accumulation, in that order, IEEE division (no fast math);
//   found_inf tests the value stored in out, i.e. after the wire round trip and the cast to out's dtype (a
//   finite float32 sum that overflows a float16 wire or out is a non-finite result); integers are always finite.
//
// Layout: a grid-stride loop over 16-byte vectors of the narrowest type involved (8 elements when a 16-bit
// buffer takes part), each thread loading its vector from every input before it stores anything, so an input
// that *is* out or wire_out (same pointer, same length) is read before it is overwritten: no pointer here is
// __restrict__. Buffers that start mid-vector peel their head elements up to the first index where every
// pointer is 16-byte aligned (one by one), then vectorise; the tail goes element by element. Only buffers that
// can never be aligned together (misaligned by different amounts) go element by element throughout.
//
// Kernel template: <Acc, Out, First, Rest, Wire>. Wire == Acc means "no wire rounding" (a round trip through
// the accumulation type is the identity, so the compiler removes it). The inputs' pointers travel by value in
// a __grid_constant__ parameter block (32 pointers, 256 bytes) indexed at run time straight from constant
// memory, without a local-memory copy (checked with -Xptxas -v: no stack frame).
#include "kernels/reduce.h"

#include <cmath>
#include <type_traits>

#include "checks.h"
#include "kernels/element_io.cuh"

namespace paracomm {
namespace kernels {
namespace {

constexpr int kReduceThreads = 256;
constexpr int64_t kReduceMaxBlocks = 8192;

struct ReduceParams {
  void* out;
  void* wire_out;  // null: rounded bits are not kept
  const void* inputs[kReduceMaxInputs];
  int32_t num_inputs;
  int64_t n;
  double divisor;
  bool divide;
  const float* scale;  // null: no scale
  float* found_inf;    // null: no check
  bool vectorized;     // [head, head + vectors) in 16-byte vectors
  int64_t head;        // elements before every pointer is 16-byte aligned (done one by one)
};

template <typename Acc, typename T>
__device__ __forceinline__ Acc to_acc(T x) {
  return static_cast<Acc>(widen(x));
}

template <typename Acc>
__device__ __forceinline__ Acc acc_add(Acc x, Acc y) {
  if constexpr (std::is_integral_v<Acc>) {
    return static_cast<Acc>(static_cast<uint64_t>(x) + static_cast<uint64_t>(y));  // two's complement wrap
  } else {
    return x + y;
  }
}

// Everything after the sum for one element: divisor, scale, wire round trip, the cast to out's dtype, and the
// inf check of that stored value (a finite float32 sum can overflow a float16 wire or out).
template <typename Acc, typename WT, typename OutT>
struct Finisher {
  bool divide, has_scale, check;
  Acc divisor, scale;

  __device__ __forceinline__ OutT apply(Acc v, WT& wire_value, bool& found) const {
    if constexpr (std::is_floating_point_v<Acc>) {
      if (divide) v = v / divisor;
      if (has_scale) v = v * scale;
    }
    wire_value = convert<WT>(v);
    if constexpr (!std::is_same_v<WT, Acc>) v = to_acc<Acc>(wire_value);
    const OutT y = convert<OutT>(v);
    if constexpr (std::is_floating_point_v<Acc>) {
      if (check && !isfinite(to_acc<Acc>(y))) found = true;
    }
    return y;
  }
};

template <typename Acc, typename OutT, typename FirstT, typename RestT, typename WT>
__global__ void __launch_bounds__(kReduceThreads) reduce_kernel(const __grid_constant__ ReduceParams p) {
  constexpr bool kRound = !std::is_same_v<WT, Acc>;
  OutT* out = static_cast<OutT*>(p.out);
  WT* wire = static_cast<WT*>(p.wire_out);
  const FirstT* first = static_cast<const FirstT*>(p.inputs[0]);
  const int num_inputs = p.num_inputs;
  Finisher<Acc, WT, OutT> fin{p.divide, p.scale != nullptr, p.found_inf != nullptr, static_cast<Acc>(p.divisor),
                              Acc(1)};
  if constexpr (std::is_floating_point_v<Acc>) {
    if (p.scale != nullptr) fin.scale = static_cast<Acc>(*p.scale);
  }
  bool found = false;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;

  int64_t head = 0, body_end = 0;  // [0, head) and [body_end, n) element by element, [head, body_end) vectors
  if (p.vectorized) {
    constexpr int kVec = vec_elems_v<OutT, FirstT, RestT, WT>;
    head = p.head;
    const int64_t num_vecs = (p.n - head) / kVec;
    auto vector_loop = [&](auto with_wire_out) {
      constexpr bool kStoreWire = decltype(with_wire_out)::value;
      for (int64_t v = tid; v < num_vecs; v += stride) {
        const int64_t base = head + v * kVec;
        Acc acc[kVec];
        {
          FirstT x[kVec];
          load_pack(x, first + base);
#pragma unroll
          for (int k = 0; k < kVec; ++k) acc[k] = to_acc<Acc>(x[k]);
        }
        // Left to right; unrolled by two so that two inputs' loads are in flight before their adds (by
        // four, ptxas spilled a few registers in the wire-rounding instantiations).
#pragma unroll 2
        for (int j = 1; j < num_inputs; ++j) {
          RestT x[kVec];
          load_pack(x, static_cast<const RestT*>(p.inputs[j]) + base);
#pragma unroll
          for (int k = 0; k < kVec; ++k) acc[k] = acc_add(acc[k], to_acc<Acc>(x[k]));
        }
        OutT y[kVec];
        WT w[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) y[k] = fin.apply(acc[k], w[k], found);
        if constexpr (kStoreWire) store_pack(wire + base, w);
        store_pack(out + base, y);
      }
    };
    // Keeping the rounded bits is its own instantiation of the loop body: calls without wire_out hold no
    // wire values live across the store.
    if (kRound && wire != nullptr) {
      vector_loop(std::integral_constant<bool, kRound>{});
    } else {
      vector_loop(std::false_type{});
    }
    body_end = head + num_vecs * kVec;
  }
  auto element = [&](int64_t i) {
    Acc acc = to_acc<Acc>(first[i]);
    for (int j = 1; j < num_inputs; ++j) acc = acc_add(acc, to_acc<Acc>(static_cast<const RestT*>(p.inputs[j])[i]));
    WT w;
    const OutT y = fin.apply(acc, w, found);
    if constexpr (kRound) {
      if (wire != nullptr) wire[i] = w;
    }
    out[i] = y;
  };
  for (int64_t i = tid; i < head; i += stride) element(i);
  for (int64_t i = body_end + tid; i < p.n; i += stride) element(i);
  if (found) *p.found_inf = 1.0f;  // every finder stores the same 1.0; never cleared
}

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename Acc, typename OutT, typename FirstT, typename RestT, typename WT>
void launch_typed(const ReduceParams& params, cudaStream_t stream) {
  constexpr int kVec = vec_elems_v<OutT, FirstT, RestT, WT>;
  ReduceParams p = params;
  // The head to peel: the first h in [0, kVec) at which every pointer is 16-byte aligned (the alignment of
  // T* + h repeats every 16 / sizeof(T) elements; kVec is a multiple of every such period). None: scalar.
  auto aligned_at = [&](int64_t h) {
    auto ok = [h](const void* ptr, size_t size) {
      return ptr == nullptr || aligned16(static_cast<const char*>(ptr) + h * static_cast<int64_t>(size));
    };
    bool all = ok(p.out, sizeof(OutT)) && ok(p.wire_out, sizeof(WT)) && ok(p.inputs[0], sizeof(FirstT));
    for (int j = 1; j < p.num_inputs; ++j) all = all && ok(p.inputs[j], sizeof(RestT));
    return all;
  };
  p.vectorized = false;
  p.head = 0;
  for (int64_t h = 0; h < kVec && h < p.n; ++h) {
    if (aligned_at(h)) {
      p.vectorized = true;
      p.head = h;
      break;
    }
  }
  const int64_t work = p.vectorized ? p.head + (p.n - p.head + kVec - 1) / kVec : p.n;
  int64_t blocks = (work + kReduceThreads - 1) / kReduceThreads;
  if (blocks > kReduceMaxBlocks) blocks = kReduceMaxBlocks;
  if (blocks < 1) blocks = 1;
  reduce_kernel<Acc, OutT, FirstT, RestT, WT><<<static_cast<unsigned>(blocks), kReduceThreads, 0, stream>>>(p);
  PARACOMM_CUDA_CHECK_LAUNCH();
}

// float32 accumulation: each buffer is float32 or the call's one 16-bit type W.
template <typename W, typename F>
void visit_float_member(DType t, F&& f) {
  if (t == DType::kFloat32) {
    f(TypeTag<float>{});
  } else {
    f(TypeTag<W>{});
  }
}

template <typename W>
void launch_float_family(const ReduceArgs& args, const ReduceParams& p, cudaStream_t stream) {
  // Absent roles take a type that is instantiated anyway: rest = first with one input; no rounding = float.
  const DType rest = args.num_inputs > 1 ? args.rest_dtype : args.first_dtype;
  const DType wire = args.round_to_wire ? args.wire_dtype : DType::kFloat32;
  visit_float_member<W>(args.out_dtype, [&](auto out_tag) {
    visit_float_member<W>(args.first_dtype, [&](auto first_tag) {
      visit_float_member<W>(rest, [&](auto rest_tag) {
        visit_float_member<W>(wire, [&](auto wire_tag) {
          launch_typed<float, typename decltype(out_tag)::type, typename decltype(first_tag)::type,
                       typename decltype(rest_tag)::type, typename decltype(wire_tag)::type>(p, stream);
        });
      });
    });
  });
}

bool is_float_family(DType t) {
  return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16;
}

bool is_known(DType t) {
  switch (t) {
    case DType::kFloat32:
    case DType::kFloat16:
    case DType::kBFloat16:
    case DType::kFloat64:
    case DType::kInt32:
    case DType::kInt64:
      return true;
  }
  return false;
}

}  // namespace
}  // namespace kernels

void launch_reduce(const ReduceArgs& args, cudaStream_t stream) {
  using namespace kernels;
  static_assert(kReduceMaxInputs == 32, "ReduceParams is sized for 32 inputs (256 bytes of pointers)");
  PARACOMM_CHECK(args.n >= 0, "reduce: negative element count ", args.n);
  PARACOMM_CHECK(args.num_inputs >= 1 && args.num_inputs <= kReduceMaxInputs, "reduce: num_inputs must be in [1, ",
                 kReduceMaxInputs, "], got ", args.num_inputs);
  PARACOMM_CHECK(is_known(args.out_dtype) && is_known(args.first_dtype) && is_known(args.rest_dtype) &&
                     (!args.round_to_wire || is_known(args.wire_dtype)),
                 "reduce: unknown DType code");
  PARACOMM_CHECK(args.divisor > 0.0 && std::isfinite(args.divisor), "reduce: divisor must be finite and > 0, got ",
                 args.divisor);
  PARACOMM_CHECK(args.wire_out == nullptr || args.round_to_wire, "reduce: wire_out requires round_to_wire");
  if (args.n == 0) return;
  PARACOMM_CHECK(args.out != nullptr, "reduce: out is null");
  for (int j = 0; j < args.num_inputs; ++j) {
    PARACOMM_CHECK(args.inputs[j] != nullptr, "reduce: inputs[", j, "] is null");
  }

  const bool has_rest = args.num_inputs > 1;

  ReduceParams p{};
  p.out = args.out;
  p.wire_out = args.wire_out;
  for (int j = 0; j < args.num_inputs; ++j) p.inputs[j] = args.inputs[j];
  p.num_inputs = args.num_inputs;
  p.n = args.n;
  p.divisor = args.divisor;
  p.divide = args.divisor != 1.0;
  p.scale = args.scale;
  p.found_inf = args.found_inf;
  p.vectorized = false;  // launch_typed decides, with the head to peel for its vector width
  p.head = 0;

  auto describe = [&]() {
    return concat("out ", dtype_name(args.out_dtype), ", inputs[0] ", dtype_name(args.first_dtype), ", inputs[1:] ",
                  has_rest ? dtype_name(args.rest_dtype) : "none", ", wire ",
                  args.round_to_wire ? dtype_name(args.wire_dtype) : "none");
  };
  // float64 and integers: one dtype throughout, no wire rounding.
  const bool uniform = args.first_dtype == args.out_dtype && (!has_rest || args.rest_dtype == args.out_dtype) &&
                       !args.round_to_wire;
  switch (args.out_dtype) {
    case DType::kFloat64:
      PARACOMM_CHECK(uniform, "reduce: unsupported dtype combination (", describe(), ")");
      launch_typed<double, double, double, double, double>(p, stream);
      return;
    case DType::kInt32:
    case DType::kInt64:
      PARACOMM_CHECK(uniform, "reduce: unsupported dtype combination (", describe(), ")");
      PARACOMM_CHECK(args.divisor == 1.0 && args.scale == nullptr,
                     "reduce: integer dtypes take neither a divisor nor a scale");
      p.found_inf = nullptr;  // integers are always finite
      if (args.out_dtype == DType::kInt32) {
        launch_typed<int64_t, int32_t, int32_t, int32_t, int64_t>(p, stream);
      } else {
        launch_typed<int64_t, int64_t, int64_t, int64_t, int64_t>(p, stream);
      }
      return;
    default:
      break;
  }
  // float32 accumulation: find the one 16-bit type W among the buffers (float16 when all are float32).
  DType w = DType::kFloat32;
  bool ok = true;
  auto take = [&](bool present, DType t) {
    if (!present) return;
    if (!is_float_family(t)) {
      ok = false;
    } else if (t != DType::kFloat32) {
      if (w != DType::kFloat32 && w != t) ok = false;
      w = t;
    }
  };
  take(true, args.out_dtype);
  take(true, args.first_dtype);
  take(has_rest, args.rest_dtype);
  take(args.round_to_wire, args.wire_dtype);
  ok = ok && (!args.round_to_wire || args.wire_dtype != DType::kFloat32);
  PARACOMM_CHECK(ok, "reduce: unsupported dtype combination (", describe(), ")");
  if (w == DType::kBFloat16) {
    launch_float_family<bf16_t>(args, p, stream);
  } else {
    launch_float_family<half_t>(args, p, stream);
  }
}

}  // namespace paracomm
