// Bucketed flatten / unflatten on the GPU (torch-free). Semantics: csrc/ops.cpp (flatten, flatten_out,
// unflatten_) and paracomm/_ops.py; arithmetic identical to the CPU op (csrc/cpu/flatten_cpu.cpp):
//   no scaling (scale == 1.0 and no scale_tensor): dst = cast(src), a bit copy for equal dtypes;
//   scaling: factor = C(scale) * C(*scale_tensor) (the tensor factor only when given),
//            dst = cast(C(src) * factor), C = float32, or float64 when the source or the destination is
//            float64, int32 or int64 (float32 would round large integers).
// Casts follow c10's static_casts (csrc/kernels/element_io.cuh). Segment i of the flat buffer starts at the
// sum of the numels of segments 0..i-1.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace paracomm {

enum class FlattenDirection : int32_t {
  kToFlat = 0,    // flatten: segments -> flat
  kFromFlat = 1,  // unflatten: flat -> segments
};

struct FlattenSegment {
  void* data = nullptr;  // contiguous device memory (read for kToFlat, written for kFromFlat)
  DType dtype = DType::kFloat32;
  int64_t numel = 0;
};

// Enqueues the copy on `stream`: one multi-tensor launch per distinct segment dtype (one for a bucket of one
// dtype). `flat` holds the sum of the segments' numels elements of `flat_dtype`; `scale_tensor` is a device
// pointer to one float, or null. Segments must not overlap `flat` except exactly at their own position.
// Throws paracomm::Error on a negative size or a launch failure.
void launch_flatten(FlattenDirection direction, const FlattenSegment* segments, int64_t count, void* flat,
                    DType flat_dtype, double scale, const float* scale_tensor, cudaStream_t stream);

}  // namespace paracomm
