// The ring all-reduce's local reduction kernel (contract: ring_reduce.h; semantics: csrc/ops.cpp).
//
// One elementwise pass over n elements: load a (and b), accumulate, divide, scale, optionally round through
// the wire dtype (the owner keeps exactly the bits it sends), store. Arithmetic, element by element, as the
// CPU op (csrc/cpu/ring_reduce_cpu.cpp), so the NCCL and gloo rings give the same bits:
//   acc = float for float32/float16/bfloat16, double for float64, int64 for int32/int64 (wrapping add);
//   division and scale only for floating accumulation;
//   found_inf tests the value finally stored, i.e. after the wire round-trip (a finite float32 sum that
//   overflows float16 is a non-finite result on every rank). This is a superset of testing before it.
//
// Layout: a grid-stride loop over 16-byte vectors of the narrowest type involved (8 elements when a
// 16-bit buffer takes part), each thread loading all its inputs before computing; the n % vec tail and
// misaligned buffers go element by element. The ring calls this once per chunk (~1 MiB), so the grid is
// sized to the chunk (one vector per thread) and capped for whole-tensor calls.
#include "kernels/ring_reduce.h"

#include <type_traits>

#include "checks.h"
#include "kernels/element_io.cuh"

namespace paracomm {
namespace kernels {
namespace {

constexpr int kRingThreads = 256;
constexpr int64_t kRingMaxBlocks = 8192;

struct RingParams {
  void* out;
  const void* a;
  const void* b;  // null: no b
  void* wire;     // null: no wire round-trip
  int64_t n;
  double divisor;
  bool divide;
  const float* scale;  // null: no scale
  float* found_inf;    // null: no check
  bool vectorized;     // every pointer is 16-byte aligned
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

// Everything after the loads for one element: returns the value to store in out, writes the wire value.
template <typename Acc, typename WT>
struct Finisher {
  bool divide, has_scale, check;
  Acc divisor, scale;

  template <bool kWire>
  __device__ __forceinline__ Acc apply(Acc v, WT& wire_value, bool& found) const {
    if constexpr (std::is_floating_point_v<Acc>) {
      if (divide) v = v / divisor;
      if (has_scale) v = v * scale;
    }
    if constexpr (kWire) {
      wire_value = convert<WT>(v);
      v = to_acc<Acc>(wire_value);
    }
    if constexpr (std::is_floating_point_v<Acc>) {
      if (check && !isfinite(v)) found = true;
    }
    return v;
  }
};

template <typename Acc, typename OutT, typename AT, typename BT, typename WT>
__global__ void __launch_bounds__(kRingThreads) ring_reduce_kernel(const RingParams p) {
  OutT* out = static_cast<OutT*>(p.out);
  const AT* a = static_cast<const AT*>(p.a);
  const BT* b = static_cast<const BT*>(p.b);
  WT* wire = static_cast<WT*>(p.wire);
  const bool has_b = b != nullptr;
  Finisher<Acc, WT> fin{p.divide, p.scale != nullptr, p.found_inf != nullptr,
                        static_cast<Acc>(p.divisor), Acc(1)};
  if constexpr (std::is_floating_point_v<Acc>) {
    if (p.scale != nullptr) fin.scale = static_cast<Acc>(*p.scale);
  }
  bool found = false;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;

  int64_t scalar_begin = 0;
  if (p.vectorized) {
    constexpr int kVec = vec_elems_v<OutT, AT, BT, WT>;
    const int64_t num_vecs = p.n / kVec;
    // The wire round-trip is a separate instantiation of the loop body, so calls without it keep no wire
    // values alive (on sm_80 one shared body spilled a few registers).
    auto vector_loop = [&](auto with_wire) {
      constexpr bool kWire = decltype(with_wire)::value;
      for (int64_t v = tid; v < num_vecs; v += stride) {
        const int64_t base = v * kVec;
        AT xa[kVec];
        BT xb[kVec];
        load_pack(xa, a + base);
        if (has_b) load_pack(xb, b + base);
        OutT y[kVec];
        WT w[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          Acc acc = to_acc<Acc>(xa[k]);
          if (has_b) acc = acc_add(acc, to_acc<Acc>(xb[k]));
          y[k] = convert<OutT>(fin.template apply<kWire>(acc, w[k], found));
        }
        if constexpr (kWire) store_pack(wire + base, w);
        store_pack(out + base, y);
      }
    };
    if (wire != nullptr) {
      vector_loop(std::true_type{});
    } else {
      vector_loop(std::false_type{});
    }
    scalar_begin = num_vecs * kVec;
  }
  for (int64_t i = scalar_begin + tid; i < p.n; i += stride) {
    Acc acc = to_acc<Acc>(a[i]);
    if (has_b) acc = acc_add(acc, to_acc<Acc>(b[i]));
    WT w;
    Acc v;
    if (wire != nullptr) {
      v = fin.template apply<true>(acc, w, found);
      wire[i] = w;
    } else {
      v = fin.template apply<false>(acc, w, found);
    }
    out[i] = convert<OutT>(v);
  }
  if (found) *p.found_inf = 1.0f;  // every finder stores the same 1.0
}

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename Acc, typename OutT, typename AT, typename BT, typename WT>
void launch_typed(const RingParams& p, cudaStream_t stream) {
  constexpr int kVec = vec_elems_v<OutT, AT, BT, WT>;
  const int64_t work = p.vectorized ? (p.n + kVec - 1) / kVec : p.n;
  int64_t blocks = (work + kRingThreads - 1) / kRingThreads;
  if (blocks > kRingMaxBlocks) blocks = kRingMaxBlocks;
  if (blocks < 1) blocks = 1;
  ring_reduce_kernel<Acc, OutT, AT, BT, WT><<<static_cast<unsigned>(blocks), kRingThreads, 0, stream>>>(p);
  PARACOMM_CUDA_CHECK_LAUNCH();
}

// float32 accumulation: each buffer is float32 or the call's one 16-bit wire type W.
template <typename W, typename F>
void visit_float_member(DType t, F&& f) {
  if (t == DType::kFloat32) {
    f(TypeTag<float>{});
  } else {
    f(TypeTag<W>{});
  }
}

template <typename W>
void launch_float_family(const RingReduceArgs& args, const RingParams& p, cudaStream_t stream) {
  const DType b_dtype = args.b != nullptr ? args.b_dtype : args.a_dtype;  // absent: any instantiated type
  const DType w_dtype = args.wire_out != nullptr ? args.wire_dtype : DType::kFloat32;
  visit_float_member<W>(args.out_dtype, [&](auto out_tag) {
    visit_float_member<W>(args.a_dtype, [&](auto a_tag) {
      visit_float_member<W>(b_dtype, [&](auto b_tag) {
        visit_float_member<W>(w_dtype, [&](auto w_tag) {
          launch_typed<float, typename decltype(out_tag)::type, typename decltype(a_tag)::type,
                       typename decltype(b_tag)::type, typename decltype(w_tag)::type>(p, stream);
        });
      });
    });
  });
}

bool is_float_family(DType t) {
  return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16;
}

}  // namespace
}  // namespace kernels

void launch_ring_reduce(const RingReduceArgs& args, cudaStream_t stream) {
  using namespace kernels;
  PARACOMM_CHECK(args.n >= 0, "ring_reduce: negative element count ", args.n);
  if (args.n == 0) return;
  PARACOMM_CHECK(args.out != nullptr && args.a != nullptr, "ring_reduce: out and a are required");
  PARACOMM_CHECK(args.divisor > 0.0, "ring_reduce: divisor must be > 0, got ", args.divisor);

  const bool has_b = args.b != nullptr, has_wire = args.wire_out != nullptr;
  const bool vectorized = aligned16(args.out) && aligned16(args.a) && (!has_b || aligned16(args.b)) &&
                          (!has_wire || aligned16(args.wire_out));
  RingParams p{args.out,     args.a,      args.b,          args.wire_out, args.n,
               args.divisor, args.divisor != 1.0, args.scale, args.found_inf, vectorized};

  auto describe = [&]() {
    return concat("out ", dtype_name(args.out_dtype), ", a ", dtype_name(args.a_dtype), ", b ",
                  has_b ? dtype_name(args.b_dtype) : "none", ", wire_out ",
                  has_wire ? dtype_name(args.wire_dtype) : "none");
  };
  // All present buffers of one dtype: float64 and integers must be; float32 family may.
  bool uniform = args.a_dtype == args.out_dtype && (!has_b || args.b_dtype == args.out_dtype) &&
                 (!has_wire || args.wire_dtype == args.out_dtype);
  switch (args.out_dtype) {
    case DType::kFloat64:
      PARACOMM_CHECK(uniform, "ring_reduce: unsupported dtype combination (", describe(), ")");
      launch_typed<double, double, double, double, double>(p, stream);
      return;
    case DType::kInt32:
    case DType::kInt64:
      PARACOMM_CHECK(uniform, "ring_reduce: unsupported dtype combination (", describe(), ")");
      PARACOMM_CHECK(args.divisor == 1.0 && args.scale == nullptr,
                     "ring_reduce: integer dtypes take neither a divisor nor a scale");
      if (args.out_dtype == DType::kInt32) {
        launch_typed<int64_t, int32_t, int32_t, int32_t, int32_t>(p, stream);
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
  take(true, args.a_dtype);
  take(has_b, args.b_dtype);
  take(has_wire, args.wire_dtype);
  PARACOMM_CHECK(ok, "ring_reduce: unsupported dtype combination (", describe(), ")");
  if (w == DType::kBFloat16) {
    launch_float_family<bf16_t>(args, p, stream);
  } else {
    launch_float_family<half_t>(args, p, stream);
  }
}

}  // namespace paracomm
