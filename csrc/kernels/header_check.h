// The NCCL path's per-call signature check on the device (torch-free): two one-thread kernels on paracomm's
// reduce stream R (csrc/allreduce/plan_waits.h places them; nccl_comm.h "Per-call signature check" says why).
//
//   header_fill:  send_slot[0..words) = this call's header (the values travel in the kernel's parameters);
//   header_check: compares every peer's received header (recv_slots[p * words ..]) with this rank's; on the
//                 first mismatch seen by this communicator it copies every rank's header into the host-mapped
//                 record (row r = rank r's header; this rank's own row from the parameters), makes those writes
//                 visible to the host (__threadfence_system) and only then stores seq + 1 in record->seq_plus1,
//                 which the watchdog polls. Later mismatches leave the record alone (the first one fails the
//                 communicator). Calls are serialised on R, so no two checks race on the record.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace paracomm {

constexpr int32_t kMaxHeaderWords = 16;  // paracomm._signature's header: len(FIELDS) + 1 words (11 today)

struct HeaderValues {
  int64_t v[kMaxHeaderWords];
};

// Host-mapped (cudaHostAllocMapped) memory the device writes and the watchdog reads; headers has world_size rows
// of kMaxHeaderWords words (the first `words` of each are meaningful).
struct HeaderMismatchRecord {
  volatile int64_t seq_plus1;  // 0: no mismatch seen; else 1 + the sequence number of the call that had one
  int64_t words;
  int64_t headers[1];          // world_size x kMaxHeaderWords (allocated with the record)
};

inline size_t header_record_bytes(int64_t world_size) {
  return sizeof(HeaderMismatchRecord) + static_cast<size_t>(world_size * kMaxHeaderWords) * sizeof(int64_t);
}

// Throws paracomm::Error on bad arguments or a launch failure.
void launch_header_fill(int64_t* send_slot, const HeaderValues& values, int32_t words, cudaStream_t stream);
void launch_header_check(const int64_t* recv_slots, const HeaderValues& own, int32_t words, int32_t world_size,
                         int32_t rank, HeaderMismatchRecord* record_device, int64_t seq, cudaStream_t stream);

}  // namespace paracomm
