// How the plan generators cut a span of elements into aligned pieces (plan.cpp's segments, hierarchical.cpp's
// columns and shards): one rule, so that every generator's pieces start on a kPlanAlignBytes boundary in both the
// data's and the wire's dtype and shrink the same way when a workspace budget is exceeded. Plain C++.
#pragma once

#include <algorithm>
#include <cstdint>

#include "allreduce/plan.h"

namespace paracomm {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Elements per alignment unit: kPlanAlignBytes in the narrower of T and W, hence a whole number of bytes of both.
inline int64_t plan_align_elems(const PlanSpec& s) {
  return kPlanAlignBytes / std::min(dtype_size(s.dtype), dtype_size(s.travel_dtype()));
}

// The piece size (elements: a multiple of `align`, at least `align`) that cuts `total` elements into `chunks`
// pieces (the last one may be short), then into one more piece at a time while `fits(piece)` is false, down to
// pieces of one alignment unit (which are taken whatever `fits` says). `fits` is the caller's budget, e.g. the
// receive workspace the piece size implies.
template <typename Fits>
int64_t aligned_piece(int64_t total, int64_t chunks, int64_t align, Fits&& fits) {
  for (chunks = std::max<int64_t>(chunks, 1);; ++chunks) {
    const int64_t piece = std::max(align, round_up(ceil_div(total, chunks), align));
    if (piece == align || fits(piece)) return piece;
  }
}

}  // namespace paracomm
