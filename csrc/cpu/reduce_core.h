// The CPU arithmetic of the all-reduce's local reduction, torch-free (raw pointers and DType codes): shared by
// the torch op paracomm::reduce_ (csrc/cpu/reduce_cpu.cpp, which spreads blocks over threads) and the
// shared-memory executor (csrc/shm/, which runs it serially on L2-sized pieces). One implementation, so both
// give the same bits.
//
//   v = acc(inputs[0][i]) + acc(inputs[1][i]) + ...  (left to right);  v /= divisor;  v *= scale[0];
//   if round: w = W(v), wire_out[i] = w (if given), v = acc(w);  out[i] = O(v);
//   found |= !isfinite(out[i])  (the stored value: after the wire round trip and the cast to O)
//
// acc is float for float32/float16/bfloat16, double for float64, int64 for int32/int64 (integer sums wrap like
// two's complement). Every element's arithmetic is independent of how the range is cut into calls.
// The caller has validated the combination (csrc/validate_reduce.cpp documents the legal ones); the only
// dependency outside paracomm is c10's header-only Half/BFloat16 (through cpu/half_convert.h).
#pragma once

#include <cstdint>

#include "dtype.h"

namespace paracomm {

// Elements per accumulator block (the unit threads split ranges at; results do not depend on it).
constexpr int64_t kReduceBlock = 1024;

struct ReduceArgs {
  int64_t n = 0;                     // elements
  void* out = nullptr;
  DType out_dtype = DType::kFloat32;
  int32_t num_inputs = 0;            // 1..32
  const void* const* inputs = nullptr;
  DType first_dtype = DType::kFloat32;  // inputs[0]
  DType rest_dtype = DType::kFloat32;   // inputs[1:]
  double divisor = 1.0;              // floating only; 1 for integers
  const float* scale = nullptr;      // multiply by scale[0] (floating only), or nullptr
  bool round = false;                // round through wire_dtype before the store
  DType wire_dtype = DType::kFloat16;
  void* wire_out = nullptr;          // with round: keep W(v) here, or nullptr
  bool check_inf = false;            // report whether a stored value is non-finite (floating only)
};

// Elements [begin, end) of the reduction `a` (0 <= begin, end <= a.n). An input may be
// out or wire_out itself (each block is read before it is written). Returns true when check_inf is set and a
// stored value in the range is inf or nan. Throws paracomm::Error for a dtype outside the accumulation family.
bool reduce_range(const ReduceArgs& a, int64_t begin, int64_t end);

}  // namespace paracomm
