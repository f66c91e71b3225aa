// The per-call signature header kernels (contract: header_check.h). One thread each: the header is at most
// kMaxHeaderWords words per rank, so a launch costs its launch latency and nothing else.
#include "kernels/header_check.h"

#include "checks.h"

namespace paracomm {
namespace kernels {
namespace {

__global__ void header_fill_kernel(int64_t* send_slot, const __grid_constant__ HeaderValues values, int32_t words) {
  for (int32_t w = 0; w < words; ++w) send_slot[w] = values.v[w];
}

__global__ void header_check_kernel(const int64_t* recv_slots, const __grid_constant__ HeaderValues own,
                                    int32_t words, int32_t world_size, int32_t rank, HeaderMismatchRecord* record,
                                    int64_t seq) {
  bool differs = false;
  for (int32_t p = 0; p < world_size && !differs; ++p) {
    if (p == rank) continue;
    for (int32_t w = 0; w < words; ++w) differs |= recv_slots[static_cast<int64_t>(p) * kMaxHeaderWords + w] != own.v[w];
  }
  if (!differs || record->seq_plus1 != 0) return;
  record->words = words;
  for (int32_t p = 0; p < world_size; ++p) {
    for (int32_t w = 0; w < words; ++w) {
      record->headers[static_cast<int64_t>(p) * kMaxHeaderWords + w] =
          p == rank ? own.v[w] : recv_slots[static_cast<int64_t>(p) * kMaxHeaderWords + w];
    }
  }
  __threadfence_system();  // the rows reach the host before the flag that publishes them
  record->seq_plus1 = seq + 1;
}

}  // namespace
}  // namespace kernels

void launch_header_fill(int64_t* send_slot, const HeaderValues& values, int32_t words, cudaStream_t stream) {
  PARACOMM_CHECK(send_slot != nullptr && words > 0 && words <= kMaxHeaderWords, "header_fill: bad arguments (",
                 words, " words)");
  kernels::header_fill_kernel<<<1, 1, 0, stream>>>(send_slot, values, words);
  PARACOMM_CUDA_CHECK_LAUNCH();
}

void launch_header_check(const int64_t* recv_slots, const HeaderValues& own, int32_t words, int32_t world_size,
                         int32_t rank, HeaderMismatchRecord* record_device, int64_t seq, cudaStream_t stream) {
  PARACOMM_CHECK(recv_slots != nullptr && record_device != nullptr && words > 0 && words <= kMaxHeaderWords &&
                     rank >= 0 && rank < world_size,
                 "header_check: bad arguments (", words, " words, rank ", rank, " of ", world_size, ")");
  kernels::header_check_kernel<<<1, 1, 0, stream>>>(recv_slots, own, words, world_size, rank, record_device, seq);
  PARACOMM_CUDA_CHECK_LAUNCH();
}

}  // namespace paracomm
