// The shared-memory transport and plan executor (contract: shm_comm.h; protocol: docs/ARCHITECTURE.md).
#include "shm/shm_comm.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>

#include "checks.h"
#include "allreduce/hierarchical.h"
#include "cpu/reduce_core.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define PARACOMM_CPU_RELAX() _mm_pause()
#else
#define PARACOMM_CPU_RELAX() ((void)0)
#endif

namespace paracomm {
namespace shm {

namespace {

constexpr uint64_t kMagic = 0x324d48534d4f4350ull;  // "PCOMSHM2"
constexpr int64_t kHeaderBytes = 4096;
constexpr int64_t kPage = 4096;
constexpr int64_t kSlots = 4;                          // pieces in flight per channel
constexpr int64_t kMaxSlotBytes = 512 * 1024;          // a piece: few handshakes per call (bench/NOTES.md, round 4)
constexpr int64_t kMinSlotBytes = 4 * 1024;
constexpr int64_t kChannelBudget = 32 * 1024 * 1024;   // all channels' slots together, before kMinSlotBytes
constexpr double kSleepSlice = 0.02;                   // seconds per futex sleep between liveness checks
constexpr double kPureSpin = 5e-6;                     // seconds of pause-only spinning before yielding
constexpr int kMaxCoreCheckRanks = 64;                 // above this many ranks, waits skip the shared-core check
constexpr double kMoveInterval = 2e-4;                 // seconds between two moves off a shared core, per rank
constexpr double kSpinCapFactor = 20.0;                // the adaptive spin budget's cap over PARACOMM_SHM_SPIN_US
constexpr int64_t kEagerMaxRanks = 64;                 // eager areas hold a table of (step, peer, offset) entries
constexpr int64_t kEagerEntriesPerRank = 4;            // table entries per rank of the world, at most
constexpr int64_t kMaxEagerBytes = 1024 * 1024;        // one rank's eager payload per parity, at most
constexpr int64_t kEagerBudget = 32 * 1024 * 1024;     // all ranks' eager areas (both parities) together

struct Header {
  std::atomic<uint64_t> magic;
  int32_t world_size;
  int32_t slots;
  int64_t slot_bytes;
  int64_t eager_bytes;
  int64_t bytes;
};

double now() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Futexes on the shared mapping: not FUTEX_PRIVATE (the waker is another process).
void futex_wait(std::atomic<uint32_t>* word, uint32_t expected, double seconds) {
  timespec ts;
  ts.tv_sec = static_cast<time_t>(seconds);
  ts.tv_nsec = static_cast<long>((seconds - static_cast<double>(ts.tv_sec)) * 1e9);
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, &ts, nullptr, 0);
}

void futex_wake(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

int pidfd_open(int pid) {
#ifdef SYS_pidfd_open
  return static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
#else
  errno = ENOSYS;
  return -1;
#endif
}

std::string random_name() {
  unsigned char bytes[16];
  ssize_t got = getrandom(bytes, sizeof(bytes), 0);
  PARACOMM_CHECK(got == static_cast<ssize_t>(sizeof(bytes)), "getrandom failed: ", std::strerror(errno));
  static const char* hex = "0123456789abcdef";
  std::string name = "/paracomm-";
  for (unsigned char b : bytes) {
    name += hex[b >> 4];
    name += hex[b & 15];
  }
  return name;
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  PARACOMM_CHECK(end != v && *end == '\0' && x >= 0, name, " must be a non-negative integer, got '", v, "'");
  return static_cast<int64_t>(x);
}

enum Poll : int { kNothing = 0, kProgress = 1, kDone = 2 };

}  // namespace

// Written only by its rank, except wake/sleeping (own cache lines: peers write them to wake the rank).
struct ShmComm::RankCtl {
  alignas(128) std::atomic<uint64_t> seq;
  std::atomic<int32_t> pid;
  std::atomic<int32_t> cpu;  // the CPU this rank last ran on (call entry, waits): see core_share
  std::atomic<uint32_t> failed;
  int32_t sig_len[2];
  int32_t eager_first[2];  // call parity -> the first and last plan step whose sends this rank published at
  int32_t eager_last[2];   //   entry (its eager table lists them), -1: none
  int64_t sig[2][kMaxSignature];
  alignas(128) std::atomic<uint32_t> wake;
  std::atomic<uint32_t> sleeping;
};

// head: pieces written by src; tail: pieces consumed by dst (each on its own cache lines).
struct ShmComm::ChannelCtl {
  alignas(128) std::atomic<uint64_t> head;
  alignas(128) std::atomic<uint64_t> tail;
};

ShmComm::ShmComm(const std::string& name, bool create, int rank, int world_size)
    : rank_(rank), world_(world_size) {
  PARACOMM_CHECK(world_size >= 1 && world_size <= 4096, "shm: world_size must be in [1, 4096], got ", world_size);
  PARACOMM_CHECK(rank >= 0 && rank < world_size, "shm: rank must be in [0, ", world_size, "), got ", rank);
  spin_s_ = static_cast<double>(env_int("PARACOMM_SHM_SPIN_US", 50)) * 1e-6;
  spin_budget_ = spin_s_;
  spin_cap_ = kSpinCapFactor * spin_s_;
  const int64_t n = world_size;
  int fd = -1;
  if (create) {
    int64_t slot = env_int("PARACOMM_SHM_SLOT_BYTES", 0);
    if (slot == 0) slot = std::clamp<int64_t>(kChannelBudget / (n * n * kSlots) / kPage * kPage, kMinSlotBytes,
                                              kMaxSlotBytes);
    PARACOMM_CHECK(slot >= 64 && slot % 64 == 0, "PARACOMM_SHM_SLOT_BYTES must be a multiple of 64, got ", slot);
    slot_bytes_ = slot;
    int64_t eager = world_size > kEagerMaxRanks ? 0 : std::min(kMaxEagerBytes, kEagerBudget / (2 * n)) / kPage * kPage;
    eager = env_int("PARACOMM_SHM_EAGER_BYTES", eager);
    PARACOMM_CHECK(eager == 0 || world_size <= kEagerMaxRanks, "PARACOMM_SHM_EAGER_BYTES: eager sends serve at most ",
                   kEagerMaxRanks, " ranks, got world_size ", world_size, " (set it to 0)");
    PARACOMM_CHECK(eager % 64 == 0 && eager <= (int64_t{1} << 32), "PARACOMM_SHM_EAGER_BYTES must be a multiple of 64 "
                   "and at most 4 GiB, got ", eager);
    eager_bytes_ = eager;
    name_ = random_name();
    fd = shm_open(name_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    PARACOMM_CHECK(fd >= 0, "shm: shm_open(", name_, ", O_CREAT | O_EXCL) failed: ", std::strerror(errno));
  } else {
    name_ = name;
    fd = shm_open(name_.c_str(), O_RDWR | O_CLOEXEC, 0);
    PARACOMM_CHECK(fd >= 0, "shm: shm_open(", name_, ") failed: ", std::strerror(errno));
  }
  struct Closer {
    int fd;
    ~Closer() { close(fd); }
  } closer{fd};
  // Layout: header page, control blocks, channel controls, then each channel's slots on its own pages.
  ctl_offset_ = kHeaderBytes;
  channel_offset_ = ctl_offset_ + n * static_cast<int64_t>(sizeof(RankCtl));
  data_offset_ = round_up(channel_offset_ + n * n * static_cast<int64_t>(sizeof(ChannelCtl)), kPage);
  // After the channels: per rank and call parity an eager area (a table: the number of entries, then
  // (step, destination, payload offset) triples; then the payload); absent when eager_bytes is 0.
  auto eager_layout = [&]() {
    eager_offset_ = data_offset_ + n * n * channel_stride_;
    eager_table_bytes_ = round_up(8 + 24 * kEagerEntriesPerRank * n, 128);  // count, then (step, peer, offset)
    eager_stride_ = eager_bytes_ > 0 ? round_up(eager_table_bytes_ + eager_bytes_, kPage) : 0;
    return eager_offset_ + n * 2 * eager_stride_;
  };
  if (create) {
    channel_stride_ = round_up(kSlots * slot_bytes_, kPage);
    bytes_ = eager_layout();
    if (fchmod(fd, 0600) != 0 || posix_fallocate(fd, 0, bytes_) != 0) {
      const int err = errno;
      shm_unlink(name_.c_str());
      PARACOMM_THROW("shm: could not reserve ", bytes_, " bytes in /dev/shm for ", name_, ": ", std::strerror(err));
    }
  } else {
    struct stat st;
    PARACOMM_CHECK(fstat(fd, &st) == 0, "shm: fstat(", name_, ") failed: ", std::strerror(errno));
    // The segment must be this user's own, private one (rank 0 created it O_EXCL with mode 0600).
    PARACOMM_CHECK(st.st_uid == geteuid() && (st.st_mode & 0777) == 0600, "shm: ", name_,
                   " is not a private segment of this user (uid ", st.st_uid, ", mode ", (st.st_mode & 0777), ")");
    PARACOMM_CHECK(st.st_size >= data_offset_, "shm: ", name_, " is too small (", st.st_size, " bytes)");
    bytes_ = st.st_size;
  }
  void* p = mmap(nullptr, static_cast<size_t>(bytes_), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    if (create) shm_unlink(name_.c_str());
    PARACOMM_THROW("shm: mmap of ", bytes_, " bytes failed: ", std::strerror(err));
  }
  base_ = static_cast<char*>(p);
  auto* h = reinterpret_cast<Header*>(base_);
  if (create) {
    h->world_size = world_size;
    h->slots = static_cast<int32_t>(kSlots);
    h->slot_bytes = slot_bytes_;
    h->eager_bytes = eager_bytes_;
    h->bytes = bytes_;
    h->magic.store(kMagic, std::memory_order_release);
  } else {
    const bool ok = h->magic.load(std::memory_order_acquire) == kMagic && h->world_size == world_size &&
                    h->slots == kSlots && h->bytes == bytes_;
    if (!ok) {
      munmap(base_, static_cast<size_t>(bytes_));
      base_ = nullptr;
      PARACOMM_THROW("shm: ", name_, " does not hold a paracomm segment for ", world_size, " ranks");
    }
    slot_bytes_ = h->slot_bytes;
    eager_bytes_ = h->eager_bytes;
    channel_stride_ = round_up(kSlots * slot_bytes_, kPage);
    if (eager_layout() != bytes_) {
      munmap(base_, static_cast<size_t>(bytes_));
      base_ = nullptr;
      PARACOMM_THROW("shm: ", name_, " has an inconsistent layout (", bytes_, " bytes)");
    }
  }
  ctl(rank_).cpu.store(-1, std::memory_order_relaxed);  // none yet (the zeroed segment would say CPU 0)
  ctl(rank_).pid.store(static_cast<int32_t>(getpid()), std::memory_order_release);
  pidfds_.assign(static_cast<size_t>(n), -1);
  pids_.assign(static_cast<size_t>(n), 0);
}

ShmComm::~ShmComm() {
  for (int fd : pidfds_) {
    if (fd >= 0) close(fd);
  }
  if (base_ != nullptr) munmap(base_, static_cast<size_t>(bytes_));
}

bool ShmComm::unlink_name(const std::string& name) { return shm_unlink(name.c_str()) == 0; }

ShmComm::RankCtl& ShmComm::ctl(int r) const {
  return reinterpret_cast<RankCtl*>(base_ + ctl_offset_)[r];
}

ShmComm::ChannelCtl& ShmComm::channel(int src, int dst) const {
  return reinterpret_cast<ChannelCtl*>(base_ + channel_offset_)[static_cast<int64_t>(src) * world_ + dst];
}

char* ShmComm::slot(int src, int dst, uint64_t piece) const {
  return base_ + data_offset_ + (static_cast<int64_t>(src) * world_ + dst) * channel_stride_ +
         static_cast<int64_t>(piece % kSlots) * slot_bytes_;
}

char* ShmComm::eager_table(int r, int parity) const {
  return base_ + eager_offset_ + (static_cast<int64_t>(r) * 2 + parity) * eager_stride_;
}

char* ShmComm::eager_payload(int r, int parity) const { return eager_table(r, parity) + eager_table_bytes_; }

void ShmComm::attach_peers(double timeout_s) {
  const double deadline = now() + timeout_s;
  for (int r = 0; r < world_; ++r) {
    if (r == rank_) continue;
    int pid = 0;
    while ((pid = ctl(r).pid.load(std::memory_order_acquire)) == 0) {
      PARACOMM_CHECK(now() < deadline, "shm: rank ", r, " did not attach to ", name_, " in time");
      usleep(1000);
    }
    pids_[static_cast<size_t>(r)] = pid;
    pidfds_[static_cast<size_t>(r)] = pidfd_open(pid);  // -1: fall back to kill(pid, 0)
    PARACOMM_CHECK(pidfds_[static_cast<size_t>(r)] >= 0 || errno != ESRCH, "shm: rank ", r, " (pid ", pid,
                   ") is not running (ranks must share one pid namespace)");
  }
}

// The waker's half of the sleep protocol (the waiter's: wait_until). The caller has just stored what the peer
// may wait for; the fence orders that store before reading the peer's `sleeping`, and the waiter sets
// `sleeping` before re-polling, so either the waiter sees the store or the waker sees `sleeping`.
void ShmComm::notify(int peer) const {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  RankCtl& c = ctl(peer);
  if (c.sleeping.load(std::memory_order_relaxed) != 0) {
    c.wake.fetch_add(1, std::memory_order_release);
    futex_wake(&c.wake);
    wakes_.fetch_add(1, std::memory_order_relaxed);
  }
}

void ShmComm::notify_all() const {
  for (int r = 0; r < world_; ++r) {
    if (r != rank_) notify(r);
  }
}

void ShmComm::fail() {
  if (base_ == nullptr) return;
  failed_ = true;
  ctl(rank_).failed.store(1, std::memory_order_release);
  notify_all();
}

void ShmComm::raise(const std::string& what) {
  fail();
  PARACOMM_THROW("shared-memory transport (rank ", rank_, " of ", world_, "): ", what);
}

void ShmComm::check_peers(const char* what) {
  for (int r = 0; r < world_; ++r) {
    if (r == rank_) continue;
    if (ctl(r).failed.load(std::memory_order_acquire) != 0) {
      raise(concat("peer rank ", r, " failed while this rank waited for ", what));
    }
    const int fd = pidfds_[static_cast<size_t>(r)];
    bool dead = false;
    if (fd >= 0) {
      pollfd pfd{fd, POLLIN, 0};
      dead = ::poll(&pfd, 1, 0) > 0;  // a pidfd polls readable once its process has exited (zombie or reaped)
    } else if (pids_[static_cast<size_t>(r)] > 0) {
      dead = kill(pids_[static_cast<size_t>(r)], 0) != 0 && errno == ESRCH;
    }
    if (dead) raise(concat("peer rank ", r, " (pid ", pids_[static_cast<size_t>(r)], ") died while this rank waited for ", what));
  }
}

// Publishes the CPU this rank runs on, and says who else of this group last said it runs there: a peer that is
// awake (kWithRunner: it competes for the core now) or only asleep ones (kWithSleeper: it will compete when woken,
// since a wake-up tends to place it back). Two ranks on one core must not spin for each other: each spin (even one
// that yields) hands the core back and forth at every wait, and the scheduler leaves such a pair stacked for
// whole benchmark sets while another core idles (bench/NOTES.md, round 5: a futex wake-up places the wakee on its
// waker's busy core, and a core whose two ranks take turns never looks overloaded to the load balancer). A
// peer's CPU may be stale (it moved since it last published): the cost is one needless move or early sleep,
// never a wrong result.
ShmComm::CoreShare ShmComm::core_share() const {
  const int mine = sched_getcpu();
  ctl(rank_).cpu.store(mine, std::memory_order_relaxed);
  if (mine < 0 || world_ > kMaxCoreCheckRanks) return CoreShare::kAlone;
  CoreShare share = CoreShare::kAlone;
  for (int r = 0; r < world_; ++r) {
    if (r == rank_) continue;
    const RankCtl& c = ctl(r);
    if (c.cpu.load(std::memory_order_relaxed) != mine) continue;
    if (c.sleeping.load(std::memory_order_relaxed) == 0) return CoreShare::kWithRunner;
    share = CoreShare::kWithSleeper;
  }
  return share;
}

// Moves this thread off a core it shares with a peer, onto an allowed CPU that no rank of this group last
// published: the affinity mask is narrowed to that CPU (the kernel migrates the thread at once) and then set back
// to what it was, so the caller's affinity is unchanged and only the thread's place differs. At most once per
// kMoveInterval per rank; a host with more ranks than CPUs (or a rank pinned to one CPU) has no free CPU and
// never moves. False when it did not move.
bool ShmComm::move_off_shared_core() {
  const double t = now();
  if (t - last_move_ < kMoveInterval) return false;
  last_move_ = t;
  cpu_set_t original;
  CPU_ZERO(&original);
  if (sched_getaffinity(0, sizeof(original), &original) != 0 || CPU_COUNT(&original) < 2) return false;
  cpu_set_t allowed = original;
  for (int r = 0; r < world_; ++r) {  // the CPUs this group's ranks (this one included) last ran on
    const int cpu = ctl(r).cpu.load(std::memory_order_relaxed);
    if (cpu >= 0 && cpu < CPU_SETSIZE) CPU_CLR(cpu, &allowed);
  }
  int target = -1;
  for (int cpu = 0; cpu < CPU_SETSIZE && target < 0; ++cpu) {
    if (CPU_ISSET(cpu, &allowed)) target = cpu;
  }
  if (target < 0) return false;
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(target, &one);
  if (sched_setaffinity(0, sizeof(one), &one) != 0) return false;
  sched_setaffinity(0, sizeof(original), &original);  // the caller's mask again; the thread stays on `target`
  moves_.fetch_add(1, std::memory_order_relaxed);
  ctl(rank_).cpu.store(sched_getcpu(), std::memory_order_relaxed);
  return true;
}

// Spin while `poll` makes no progress for the spin budget, then sleep on this rank's futex word in slices,
// checking the peers and the deadline after each. poll() returns kDone, kProgress or kNothing.
//
// The entry wait (`entry`: a call's wait for its peers' entry, where small calls spend their waiting) does two
// things more. (1) It checks for a peer on this rank's core (core_share) and moves off it, or sleeps at once
// while a running peer has it. (2) Its budget adapts (spin_budget_, between PARACOMM_SHM_SPIN_US and
// kSpinCapFactor times it): an idle episode that had to sleep but ended within the cap doubles it, one longer
// than the cap resets it. Reason: a wake-up costs ~100 us on a VM (an idle vCPU must be scheduled by the host),
// longer than the default spin, so a sleep makes its waker's next entry overrun its spin and sleep in turn: a
// self-sustaining chain of one wake-up per call (bench/NOTES.md, round 5). After a short sleep the budget
// outgrows the wake-up and the chain breaks; a peer that is really away (computing between calls) still gets
// the core after one budget. The plan's own waits keep the fixed budget: on this VM, longer spins there slowed
// the peer's copies of large calls (the vCPUs share physical cores), and a large call's sleep costs little.
template <typename PollFn>
void ShmComm::wait_until(PollFn&& poll, const char* what, double deadline, const int* peer, bool entry) {
  RankCtl& me = ctl(rank_);
  double idle_since = -1.0;
  double episode = -1.0;   // start of the idle episode that slept (for the budget), -1: none
  bool deliberate = false; // that episode slept because a peer shared the core, not because the budget ran out
  const double budget = entry ? spin_budget_ : spin_s_;
  auto episode_ends = [&]() {
    if (episode < 0) return;
    if (entry && !deliberate) {
      spin_budget_ = now() - episode <= spin_cap_ ? std::min(spin_cap_, 2.0 * std::max(spin_budget_, 1e-6))
                                                  : spin_s_;
    }
    episode = -1.0;
    deliberate = false;
  };
  for (;;) {
    int r = poll();
    if (r == kDone) {
      episode_ends();
      return;
    }
    if (r == kProgress) {
      episode_ends();
      idle_since = -1.0;
      continue;
    }
    const double t = now();
    bool check_core = false;
    if (idle_since < 0) {
      idle_since = t;
      check_core = entry;
    }
    if (t - idle_since < budget) {
      // Spin: a few microseconds of pause, then yield between polls, so a peer (or anything else) waiting for
      // this core runs instead of being starved by the spin on a loaded machine.
      if (t - idle_since < kPureSpin) {
        for (int i = 0; i < 16; ++i) PARACOMM_CPU_RELAX();
      } else {
        sched_yield();
        check_core = entry;  // the peer may have just run here
      }
      // A peer on this core: move to a free one; failing that, with a running peer, sleep at the next poll that
      // finds nothing (a sleeping peer competes with no one: spin on).
      if (check_core) {
        const CoreShare share = core_share();
        if (share != CoreShare::kAlone && !move_off_shared_core() && share == CoreShare::kWithRunner) {
          if (episode < 0) deliberate = true;
          idle_since = t - budget;
        }
      }
      continue;
    }
    if (episode < 0) episode = idle_since;
    const uint32_t w = me.wake.load(std::memory_order_acquire);
    me.sleeping.store(1, std::memory_order_seq_cst);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    r = poll();
    if (r == kNothing) {
      futex_wait(&me.wake, w, std::max(1e-4, std::min(kSleepSlice, deadline - t)));
      sleeps_.fetch_add(1, std::memory_order_relaxed);
      slept_s_.store(slept_s_.load(std::memory_order_relaxed) + (now() - t), std::memory_order_relaxed);
    }
    me.cpu.store(sched_getcpu(), std::memory_order_relaxed);  // woken perhaps elsewhere: publish before awake
    me.sleeping.store(0, std::memory_order_release);
    if (r == kDone) {
      episode_ends();
      return;
    }
    check_peers(what);
    if (now() > deadline) {
      if (peer != nullptr && *peer >= 0 && *peer < world_) {
        raise(concat("timed out waiting for ", what, " from peer rank ", *peer, " (pid ",
                     pids_[static_cast<size_t>(*peer)], "; stalled, or its calls differ from this rank's)"));
      }
      raise(concat("timed out waiting for ", what, " (a peer may be stalled)"));
    }
    if (r == kProgress) {  // the re-poll before sleeping found progress: a new idle period spins again
      episode_ends();
      idle_since = -1.0;
    }
    // Otherwise still idle_since: a wake-up without progress (a slice's end, a notice meant for another wait)
    // sleeps again without a second spin.
  }
}

int32_t ShmComm::resolve_algorithm(const CallArgs& a) const {
  if (a.algorithm >= 0) return a.algorithm;
  const Collective c = static_cast<Collective>(a.collective);
  if (a.node_of.empty()) return static_cast<int32_t>(choose_algorithm(c, a.numel, a.dtype, a.wire_dtype, world_,
                                                                      Backend::kGloo));
  return static_cast<int32_t>(choose_algorithm_topology(c, a.numel, a.dtype, a.wire_dtype, world_, Backend::kGloo,
                                                        a.node_of, nullptr));
}

std::shared_ptr<ShmComm::Prepared> ShmComm::prepare(const CallArgs& a, const std::vector<int64_t>& signature) {
  PARACOMM_CHECK(signature.size() <= static_cast<size_t>(kMaxSignature), "shm: a signature holds at most ",
                 kMaxSignature, " values, got ", signature.size());
  PARACOMM_CHECK(a.collective >= 0 && a.collective <= static_cast<int32_t>(Collective::kAllGather),
                 "shm: bad collective code ", a.collective);
  if (!a.node_of.empty()) check_node_map(a.node_of, world_);
  auto p = std::make_shared<Prepared>();
  p->args = a;
  p->signature = signature;
  PlanSpec s;
  s.collective = static_cast<Collective>(a.collective);
  s.numel = a.numel;
  s.dtype = a.dtype;
  s.wire_dtype = a.wire_dtype;
  s.world_size = world_;
  s.rank = rank_;
  // The gloo path's plans (chunk policy and thresholds included): the same algorithm gives the same bits.
  s.algorithm = static_cast<Algorithm>(resolve_algorithm(a));
  s.backend = Backend::kGloo;
  s.has_found_inf = a.has_found_inf;
  s.has_final_op = a.has_final_op;
  s.chunk_bytes = a.chunk_bytes;
  s.node_of = a.node_of;
  p->plan = make_plan(s);  // validates the spec
  p->fusion = analyse_fusion(p->plan);
  p->eager = analyse_eager(p->plan, eager_bytes_, world_);
  return p;
}

std::vector<std::vector<int64_t>> ShmComm::run(const Prepared& p, const CallBuffers& b, double timeout_s) {
  std::lock_guard<std::mutex> lock(mu_);
  PARACOMM_CHECK(!failed_, "shared-memory transport: this communicator failed earlier");
  PARACOMM_CHECK(b.data != nullptr || p.plan.data_elems == 0, "shm: the call's output pointer is null");
  PARACOMM_CHECK(b.input != nullptr || p.plan.input_elems == 0, "shm: the call's input pointer is null");
  PARACOMM_CHECK((b.found_inf != nullptr) == p.args.has_found_inf, "shm: found_inf given ",
                 b.found_inf != nullptr, " but prepared for ", p.args.has_found_inf);
  const double deadline = now() + timeout_s;
  const uint64_t seq = seq_ + 1;
  const int parity = static_cast<int>(seq % 2);
  RankCtl& me = ctl(rank_);
  found_ = false;
  // 1. Before entry: the eager step's payload into this rank's eager area of this parity (and the workspace
  //    reductions it depends on). Nothing of the caller's is written, so a mismatch below still writes nothing.
  //    The area is free: a peer read it in call seq - 2, and this rank finished call seq - 1 only after every
  //    peer had entered it, i.e. finished call seq - 2.
  try {
    run_plan(p, b, deadline, parity, 0);
  } catch (...) {
    fail();
    throw;
  }
  // 2. Enter call seq: signature and eager step, then the release store of seq (peers acquire seq, then read).
  seq_ = seq;
  me.sig_len[parity] = static_cast<int32_t>(p.signature.size());
  std::copy(p.signature.begin(), p.signature.end(), me.sig[parity]);
  me.eager_first[parity] = p.eager.first;
  me.eager_last[parity] = p.eager.last;
  me.cpu.store(sched_getcpu(), std::memory_order_relaxed);
  me.seq.store(seq, std::memory_order_release);
  notify_all();
  // 3. Wait for every peer to enter it. A peer can be at most one call ahead (it cannot finish call seq + 1
  //    without this rank), so its parity-seq % 2 signature, eager steps and eager area still hold call seq's.
  //    For a plan whose transfers are all eager (one_shot, small direct) this is the call's only wait.
  int waiting_for = 0;
  wait_until(
      [&]() -> int {
        for (; waiting_for < world_; ++waiting_for) {
          if (waiting_for != rank_ && ctl(waiting_for).seq.load(std::memory_order_acquire) < seq) return kNothing;
        }
        return kDone;
      },
      "the peers to enter the call", deadline, &waiting_for, /*entry=*/true);
  // 4. Signatures: any difference and every rank returns all of them (each rank sees the same set).
  bool same = true;
  for (int r = 0; r < world_ && same; ++r) {
    const RankCtl& c = ctl(r);
    same = c.sig_len[parity] == me.sig_len[parity] &&
           std::equal(me.sig[parity], me.sig[parity] + me.sig_len[parity], c.sig[parity]);
  }
  if (!same) {
    std::vector<std::vector<int64_t>> all(static_cast<size_t>(world_));
    for (int r = 0; r < world_; ++r) {
      const RankCtl& c = ctl(r);
      const int len = std::clamp(c.sig_len[parity], 0, kMaxSignature);
      all[static_cast<size_t>(r)].assign(c.sig[parity], c.sig[parity] + len);
    }
    return all;
  }
  // 5. The plan.
  try {
    run_plan(p, b, deadline, parity, 1);
  } catch (...) {
    fail();
    throw;
  }
  if (found_) *b.found_inf = 1.0f;
  me.cpu.store(sched_getcpu(), std::memory_order_relaxed);  // fresh for the peers' next entry wait
  return {};
}

// ---- eager sends ----
// The first steps with transfers normally cost a synchronisation each after the entry barrier (pieces pass
// through the channels, each publish/consume a cache-line handshake). The sends of every step that depends on
// nothing the call computes after entry are instead copied into the sender's eager area *before* entry and
// published by the entry's own seq store: a receiver that has seen the sender's seq reads them in place (the
// step's fused reduction straight from the eager area, any other receive by one memcpy). A one_shot call then
// synchronises exactly once; direct's reduce-scatter pieces all travel with the entry. Conditions (per plan,
// from the plan alone, the same on every rank for the same signature):
//   * a step is eager when it has transfers and may start them after steps [0, transfers_after] only, all of
//     which come before the first step with transfers and have reductions that write only workspace
//     (kWire / kRecv / kStage): those run before entry, so nothing of the caller's is written before the
//     signature check. (The plan allows such a step's transfers to go out before any later step's
//     reductions, so copying its bytes at entry is one of the orders the plan permits.)
//   * each destination receives at most one send of an eager step (the table holds one entry per (step, peer));
//   * the distinct send spans fit in eager_bytes (one_shot sends one span to everyone: one copy), the entries
//     in the table; steps are taken in order while both fit.
// The receiver decides from the sender's published step range and table, not from its own plan, so a sender
// whose plan did not qualify simply sends through its channel. Eager areas are double-buffered by call parity;
// see run() for why parity seq % 2 is free when call seq starts. Bits are unchanged: the same bytes arrive,
// only from another address.
ShmComm::Eager ShmComm::analyse_eager(const Plan& plan, int64_t eager_bytes, int world) {
  Eager e;
  if (eager_bytes <= 0 || env_int("PARACOMM_SHM_EAGER", 1) == 0) return e;
  const size_t steps = plan.steps.size();
  size_t first = 0;
  while (first < steps && plan.steps[first].transfers.empty()) ++first;
  if (first == steps) return e;
  // Steps before the first transfer step from which on a reduction writes the caller's memory: eager steps may
  // depend only on steps before it.
  int64_t limit = static_cast<int64_t>(first);
  for (size_t i = 0; i < first && limit == static_cast<int64_t>(first); ++i) {
    for (const PlanReduction& r : plan.steps[i].reductions) {
      const bool user = r.out.buffer == PlanBuffer::kData || r.out.buffer == PlanBuffer::kInput ||
                        (r.round_to_wire && r.has_wire_out &&
                         (r.wire_out.buffer == PlanBuffer::kData || r.wire_out.buffer == PlanBuffer::kInput));
      if (user) limit = static_cast<int64_t>(i);
    }
  }
  const int64_t max_entries = kEagerEntriesPerRank * world;
  int64_t used = 0;
  std::vector<Eager::Copy> copies;
  std::vector<int64_t> entries;
  std::vector<uint8_t> is_step(steps, 0);
  std::vector<int64_t> offsets;
  std::vector<uint8_t> to(static_cast<size_t>(world));
  int32_t pre = 0, last = -1;
  for (size_t si = first; si < steps; ++si) {
    const PlanStep& st = plan.steps[si];
    if (st.transfers.empty() || st.transfers_after >= limit) continue;
    // This step's entries and new copies, kept only if all of it fits.
    std::fill(to.begin(), to.end(), 0);
    std::vector<Eager::Copy> add;
    std::vector<int64_t> add_entries;
    int64_t add_used = used;
    bool ok = true;
    for (const PlanTransfer& t : st.transfers) {
      if (!t.send) continue;
      if (to[static_cast<size_t>(t.peer)]) {
        ok = false;  // two sends to one destination in one step
        break;
      }
      to[static_cast<size_t>(t.peer)] = 1;
      const int64_t bytes = t.count * dtype_size(plan_buffer_dtype(plan.spec, t.span.buffer));
      int64_t offset = -1;
      for (const auto* list : {&copies, &add}) {
        for (const Eager::Copy& c : *list) {
          if (c.span.buffer == t.span.buffer && c.span.offset == t.span.offset && c.bytes == bytes) offset = c.offset;
        }
      }
      if (offset < 0) {
        offset = add_used;
        add_used = round_up(add_used + bytes, 64);
        add.push_back(Eager::Copy{t.span, bytes, offset});
      }
      add_entries.insert(add_entries.end(), {static_cast<int64_t>(si), static_cast<int64_t>(t.peer), offset});
    }
    if (!ok || add_used > eager_bytes ||
        static_cast<int64_t>(entries.size() + add_entries.size()) / 3 > max_entries) {
      break;  // steps are taken in order: a later one may reuse slots an earlier non-eager one frees
    }
    used = add_used;
    copies.insert(copies.end(), add.begin(), add.end());
    entries.insert(entries.end(), add_entries.begin(), add_entries.end());
    is_step[si] = 1;
    pre = std::max<int32_t>(pre, static_cast<int32_t>(st.transfers_after + 1));
    last = static_cast<int32_t>(si);
  }
  if (last < 0) return e;
  e.first = static_cast<int32_t>(first);
  e.last = last;
  e.pre_steps = pre;
  e.is_step = std::move(is_step);
  e.copies = std::move(copies);
  e.entries = std::move(entries);
  return e;
}

// ---- receive-in-place ("fusion") ----
// A receive whose bytes are read once, by the single reduction of its own step, and never again before they
// are overwritten, need not be copied into its workspace span at all: that reduction can read each piece
// straight from the sender's channel slot, piece by piece as they arrive, and release the slot after. This
// saves one copy of every such byte (one_shot's and direct's reduce-scatter receives, the ring's
// reduce-scatter hops). The analysis below decides it per step from the plan alone (no algorithm names):
//   * the step has exactly one reduction, and the receive's span is exactly one of its inputs (same count);
//   * the span is in a workspace buffer (kWire / kRecv / kStage: dead after the call, unlike the caller's data) and no
//     later step reads any of its bytes before a later receive or reduction overwrites all of them;
//   * the sender is this step's only receive from that peer (so the channel's next pieces are this transfer's);
//   * the reduction's output does not overlap another receive of the step, and its other inputs are not
//     received in this step. A send of the step that reads what the reduction writes (one_shot sends the data
//     it reduces into) is allowed: a piece is reduced only once every such send has copied past it.
// PARACOMM_SHM_FUSE=0 turns it off (the benchmark compares both; results are the same bits either way: the
// reduction's arithmetic does not depend on where its inputs live or how its range is cut).
namespace {

bool overlaps(const PlanSpan& a, int64_t na, const PlanSpan& b, int64_t nb) {
  return a.buffer == b.buffer && a.offset < b.offset + nb && b.offset < a.offset + na;
}
bool covers(const PlanSpan& a, int64_t na, const PlanSpan& b, int64_t nb) {
  return a.buffer == b.buffer && a.offset <= b.offset && b.offset + nb <= a.offset + na;
}

// True when nothing after step i reads [sp, sp + n) before it is entirely overwritten (or the call ends).
bool dead_after(const Plan& plan, size_t i, const PlanSpan& sp, int64_t n) {
  for (size_t j = i + 1; j < plan.steps.size(); ++j) {
    const PlanStep& st = plan.steps[j];
    bool overwritten = false;
    for (const PlanTransfer& t : st.transfers) {
      if (t.send && overlaps(t.span, t.count, sp, n)) return false;
      if (!t.send && covers(t.span, t.count, sp, n)) overwritten = true;
      else if (!t.send && overlaps(t.span, t.count, sp, n)) return false;
    }
    if (overwritten) return true;
    for (const PlanReduction& r : st.reductions) {
      for (const PlanSpan& in : r.inputs) {
        if (overlaps(in, r.count, sp, n)) return false;
      }
      if (covers(r.out, r.count, sp, n)) return true;
      if (overlaps(r.out, r.count, sp, n)) return false;
      if (r.round_to_wire && r.has_wire_out && overlaps(r.wire_out, r.count, sp, n)) return false;
    }
  }
  return true;
}

}  // namespace

std::vector<ShmComm::StepFusion> ShmComm::analyse_fusion(const Plan& plan) {
  std::vector<StepFusion> out(plan.steps.size());
  const bool enabled = env_int("PARACOMM_SHM_FUSE", 1) != 0;
  for (size_t i = 0; i < plan.steps.size(); ++i) {
    const PlanStep& st = plan.steps[i];
    StepFusion& f = out[i];
    f.input_of.assign(st.transfers.size(), -1);
    if (!enabled || st.reductions.size() != 1) continue;
    const PlanReduction& rd = st.reductions[0];
    std::map<int, int> receives;
    for (const PlanTransfer& t : st.transfers) {
      if (!t.send) ++receives[t.peer];
    }
    bool any = false;
    for (size_t k = 0; k < st.transfers.size(); ++k) {
      const PlanTransfer& t = st.transfers[k];
      const bool workspace = t.span.buffer == PlanBuffer::kWire || t.span.buffer == PlanBuffer::kRecv ||
                             t.span.buffer == PlanBuffer::kStage;
      if (t.send || !workspace || receives[t.peer] != 1 || t.count != rd.count) continue;
      int pos = -1, hits = 0;
      for (size_t j = 0; j < rd.inputs.size(); ++j) {
        if (rd.inputs[j].buffer == t.span.buffer && rd.inputs[j].offset == t.span.offset) {
          pos = static_cast<int>(j);
          ++hits;
        } else if (overlaps(rd.inputs[j], rd.count, t.span, t.count)) {
          hits += 2;
        }
      }
      if (hits != 1 || !dead_after(plan, i, t.span, t.count)) continue;
      f.input_of[k] = pos;
      any = true;
    }
    if (!any) continue;
    bool ok = true;
    for (size_t k = 0; k < st.transfers.size() && ok; ++k) {
      const PlanTransfer& t = st.transfers[k];
      if (t.send || f.input_of[k] >= 0) continue;
      // A receive that stays a copy: the reduction must neither write nor read its bytes while it lands.
      ok = !overlaps(rd.out, rd.count, t.span, t.count) &&
           !(rd.round_to_wire && rd.has_wire_out && overlaps(rd.wire_out, rd.count, t.span, t.count));
      for (const PlanSpan& in : rd.inputs) ok = ok && !overlaps(in, rd.count, t.span, t.count);
    }
    if (!ok) {
      f.input_of.assign(st.transfers.size(), -1);
      continue;
    }
    f.reduction = 0;
  }
  return out;
}

void ShmComm::run_plan(const Prepared& prepared, const CallBuffers& b, double deadline, int parity, int stage) {
  const Plan& plan = prepared.plan;
  const PlanSpec& s = plan.spec;
  const CallArgs& a = prepared.args;
  const Eager& eager = prepared.eager;
  if (stage == 0 && eager.first < 0) return;
  const DType travel = s.travel_dtype();
  const size_t ws_bytes = static_cast<size_t>(plan.workspace_bytes()) + 256;
  if (workspace_.size() < ws_bytes) workspace_.assign(ws_bytes, 0);
  char* ws = workspace_.data() + (256 - reinterpret_cast<uintptr_t>(workspace_.data()) % 256) % 256;
  // The plan's buffers by PlanBuffer code (plan.h): base pointer and element type. Nothing else of the call
  // (not even which collective it is) reaches the executor.
  struct Buffer {
    char* base;
    DType dtype;
  };
  const Buffer buffers[kNumPlanBuffers] = {
      {static_cast<char*>(b.data), s.dtype},                         // kData: the output
      {ws + plan.wire_offset_bytes(), travel},                       // kWire
      {ws + plan.recv_offset_bytes(), travel},                       // kRecv
      {const_cast<char*>(static_cast<const char*>(b.input)), s.dtype},  // kInput: read only
      {ws + plan.stage_offset_bytes(), s.dtype},                     // kStage
  };
  auto buffer = [&](const PlanSpan& sp) -> const Buffer& {
    const int k = static_cast<int>(sp.buffer);
    PARACOMM_CHECK(k >= 0 && k < kNumPlanBuffers, "shm: plan buffer ", k, " is not bound by this executor");
    return buffers[k];
  };
  auto esize = [&](const PlanSpan& sp) { return dtype_size(buffer(sp).dtype); };
  auto ptr = [&](const PlanSpan& sp) { return buffer(sp).base + sp.offset * esize(sp); };

  struct Xfer {
    bool send;
    bool fused;        // a receive the step's reduction reads in place (analyse_fusion)
    int peer;
    char* p;
    int64_t bytes;
    int64_t done;
    const char* src;   // a receive the peer published in its eager area: where its bytes are, else null
  };
  std::vector<Xfer> xs;
  busy_.assign(static_cast<size_t>(2 * world_), 0);
  std::vector<const void*> inputs, piece_inputs;
  const uint64_t K = static_cast<uint64_t>(kSlots);
  const int64_t S = slot_bytes_;

  // The reduction's arguments for its elements [begin, begin + n): inputs[j] points at element begin of input j
  // (for a fused input: at the start of the channel slot holding that piece, or into the eager area).
  auto reduce_piece = [&](const PlanReduction& r, const std::vector<const void*>& in, int64_t begin, int64_t n) {
    ReduceArgs ra;
    ra.n = n;
    ra.out = ptr(r.out) + begin * esize(r.out);
    ra.out_dtype = buffer(r.out).dtype;
    ra.num_inputs = static_cast<int32_t>(in.size());
    ra.inputs = in.data();
    ra.first_dtype = buffer(r.inputs[0]).dtype;
    ra.rest_dtype = r.inputs.size() > 1 ? buffer(r.inputs[1]).dtype : ra.first_dtype;
    ra.divisor = r.final ? a.divisor : 1.0;
    ra.scale = r.final ? b.scale : nullptr;
    ra.round = r.round_to_wire;
    if (ra.round) ra.wire_dtype = static_cast<DType>(s.wire_dtype);
    ra.wire_out = r.round_to_wire && r.has_wire_out ? ptr(r.wire_out) + begin * esize(r.wire_out) : nullptr;
    ra.check_inf = r.check_inf && b.found_inf != nullptr;
    found_ |= reduce_range(ra, 0, n);
  };
  auto reduce_all = [&](const PlanReduction& r) {
    inputs.clear();
    for (const PlanSpan& in : r.inputs) inputs.push_back(ptr(in));
    reduce_piece(r, inputs, 0, r.count);
  };

  if (stage == 0) {
    // Before entry: the workspace reductions the eager step waits for, then its distinct send spans.
    for (int32_t i = 0; i < eager.pre_steps; ++i) {
      for (const PlanReduction& r : plan.steps[static_cast<size_t>(i)].reductions) reduce_all(r);
    }
    char* payload = eager_payload(rank_, parity);
    for (const Eager::Copy& c : eager.copies) {
      std::memcpy(payload + c.offset, ptr(c.span), static_cast<size_t>(c.bytes));
    }
    auto* table = reinterpret_cast<int64_t*>(eager_table(rank_, parity));
    table[0] = static_cast<int64_t>(eager.entries.size() / 3);
    std::memcpy(table + 1, eager.entries.data(), eager.entries.size() * sizeof(int64_t));
    return;
  }

  int blocked_on = -1;  // the peer of the first unfinished transfer, named if the wait times out
  for (size_t si = 0; si < plan.steps.size(); ++si) {
    const PlanStep& step = plan.steps[si];
    const StepFusion& fusion = prepared.fusion[si];
    const PlanReduction* fused = fusion.reduction >= 0 ? &step.reductions[static_cast<size_t>(fusion.reduction)]
                                                       : nullptr;
    const bool my_eager = eager.first >= 0 && eager.is_step[si] != 0;
    // Transfers: all of the step's progress together (the peers run the matching ones now; sends and receives
    // in both directions interleave, so a full channel never blocks a receive). Per (direction, peer) only the
    // first unfinished transfer moves: the channel is a FIFO in plan order. Eager ones are already there.
    if (!step.transfers.empty()) {
      xs.clear();
      for (size_t k = 0; k < step.transfers.size(); ++k) {
        const PlanTransfer& t = step.transfers[k];
        Xfer x{t.send, fusion.input_of[k] >= 0, t.peer, ptr(t.span), t.count * esize(t.span), 0, nullptr};
        if (t.send && my_eager) x.done = x.bytes;  // published with the entry
        const RankCtl& pc = ctl(t.peer);
        const int32_t step_index = static_cast<int32_t>(si);
        if (!t.send && pc.eager_first[parity] >= 0 && pc.eager_first[parity] <= step_index &&
            step_index <= pc.eager_last[parity]) {
          const auto* table = reinterpret_cast<const int64_t*>(eager_table(t.peer, parity));
          const int64_t entries = std::min<int64_t>(table[0], kEagerEntriesPerRank * world_);
          int64_t off = -1;
          for (int64_t k = 0; k < entries && off < 0; ++k) {
            if (table[1 + 3 * k] == step_index && table[2 + 3 * k] == rank_) off = table[3 + 3 * k];
          }
          if (off >= 0) {
            PARACOMM_CHECK(off + x.bytes <= eager_bytes_, "shm: peer rank ", t.peer, " published an eager send of ",
                           x.bytes, " bytes at ", off, ", outside its area of ", eager_bytes_);
            x.src = eager_payload(t.peer, parity) + off;
            if (!x.fused) {
              std::memcpy(x.p, x.src, static_cast<size_t>(x.bytes));
              x.done = x.bytes;
            }
          }
        }
        xs.push_back(x);
      }
      // The fused reduction, piece by piece: piece_elems elements of the received dtype per channel slot (the
      // whole reduction at once when every fused input is in an eager area).
      int64_t reduced = 0;
      int64_t piece_elems = 0;
      if (fused != nullptr) {
        inputs.clear();
        for (const PlanSpan& in : fused->inputs) inputs.push_back(ptr(in));
        piece_inputs.assign(inputs.size(), nullptr);
        piece_elems = fused->count;
        for (size_t k = 0; k < xs.size(); ++k) {
          if (xs[k].fused && xs[k].src == nullptr) piece_elems = S / esize(step.transfers[k].span);
        }
      }
      auto reduce_ready_pieces = [&]() -> bool {
        bool moved = false;
        while (reduced < fused->count) {
          const int64_t n = std::min(piece_elems, fused->count - reduced);
          // Every fused input's next piece must be in its slot ...
          for (size_t k = 0; k < xs.size(); ++k) {
            if (!xs[k].fused || xs[k].src != nullptr) continue;
            const ChannelCtl& ch = channel(xs[k].peer, rank_);
            if (ch.head.load(std::memory_order_acquire) <= ch.tail.load(std::memory_order_relaxed)) {
              blocked_on = xs[k].peer;
              return moved;
            }
          }
          // ... and every send that reads what this piece writes must have copied past it (exactly past it: a
          // send waits for its peer's reduction to free slots, so waiting for more could close a cycle).
          for (size_t k = 0; k < xs.size(); ++k) {
            const PlanTransfer& t = step.transfers[k];
            if (!t.send || xs[k].done == xs[k].bytes) continue;
            int64_t need = 0;  // elements of the send that must have been copied
            auto require = [&](const PlanSpan& written) {
              const PlanSpan piece{written.buffer, written.offset + reduced};
              if (overlaps(t.span, t.count, piece, n)) {
                need = std::max(need, std::min(t.span.offset + t.count, piece.offset + n) - t.span.offset);
              }
            };
            require(fused->out);
            if (fused->round_to_wire && fused->has_wire_out) require(fused->wire_out);
            if (xs[k].done < need * esize(t.span)) {
              blocked_on = xs[k].peer;
              return moved;
            }
          }
          for (size_t j = 0; j < inputs.size(); ++j) {
            piece_inputs[j] = static_cast<const char*>(inputs[j]) + reduced * esize(fused->inputs[j]);
          }
          for (size_t k = 0; k < xs.size(); ++k) {
            if (!xs[k].fused) continue;
            const int64_t at = reduced * esize(step.transfers[k].span);
            piece_inputs[static_cast<size_t>(fusion.input_of[k])] =
                xs[k].src != nullptr ? xs[k].src + at
                                     : slot(xs[k].peer, rank_, channel(xs[k].peer, rank_).tail.load(
                                                                   std::memory_order_relaxed));
          }
          reduce_piece(*fused, piece_inputs, reduced, n);
          for (size_t k = 0; k < xs.size(); ++k) {
            if (!xs[k].fused) continue;
            if (xs[k].src != nullptr) {
              xs[k].done = (reduced + n) * esize(step.transfers[k].span);
              continue;
            }
            ChannelCtl& ch = channel(xs[k].peer, rank_);
            ch.tail.store(ch.tail.load(std::memory_order_relaxed) + 1, std::memory_order_release);
            notify(xs[k].peer);
            xs[k].done = std::min(xs[k].bytes, xs[k].done + S);
          }
          reduced += n;
          moved = true;
        }
        return moved;
      };
      // Copies as many pieces of x as the channel allows; true if any moved. Sends fill slots while fewer than
      // K are unconsumed; receives drain slots the sender has published. Acquire/release on head and tail
      // order the slot bytes against the counters.
      auto push = [&](Xfer& x) -> bool {
        ChannelCtl& ch = channel(rank_, x.peer);
        uint64_t h = ch.head.load(std::memory_order_relaxed);  // only this rank writes it
        uint64_t t = ch.tail.load(std::memory_order_acquire);
        bool moved = false;
        while (x.done < x.bytes && h - t < K) {
          const int64_t n = std::min(S, x.bytes - x.done);
          std::memcpy(slot(rank_, x.peer, h), x.p + x.done, static_cast<size_t>(n));
          x.done += n;
          ch.head.store(++h, std::memory_order_release);
          notify(x.peer);
          moved = true;
          if (h - t >= K) t = ch.tail.load(std::memory_order_acquire);
        }
        return moved;
      };
      auto pull = [&](Xfer& x) -> bool {
        ChannelCtl& ch = channel(x.peer, rank_);
        uint64_t t = ch.tail.load(std::memory_order_relaxed);  // only this rank writes it
        uint64_t h = ch.head.load(std::memory_order_acquire);
        bool moved = false;
        while (x.done < x.bytes && t < h) {
          const int64_t n = std::min(S, x.bytes - x.done);
          std::memcpy(x.p + x.done, slot(x.peer, rank_, t), static_cast<size_t>(n));
          x.done += n;
          ch.tail.store(++t, std::memory_order_release);
          notify(x.peer);
          moved = true;
          if (t >= h) h = ch.head.load(std::memory_order_acquire);
        }
        return moved;
      };
      wait_until(
          [&]() -> int {
            std::fill(busy_.begin(), busy_.end(), 0);
            bool progressed = false;
            for (Xfer& x : xs) {
              if (x.done == x.bytes || x.fused) continue;  // fused: consumed by the reduction below
              uint8_t& busy = busy_[static_cast<size_t>(x.send ? x.peer : world_ + x.peer)];
              if (!busy) {
                busy = 1;
                progressed |= x.send ? push(x) : pull(x);
              }
            }
            if (fused != nullptr && reduced < fused->count) progressed |= reduce_ready_pieces();
            bool left = fused != nullptr && reduced < fused->count;
            for (const Xfer& x : xs) {
              if (x.done < x.bytes && !left) blocked_on = x.peer;
              left |= x.done < x.bytes;
            }
            return !left ? kDone : progressed ? kProgress : kNothing;
          },
          "a transfer", deadline, &blocked_on);
    }
    // Reductions, in order, after every transfer of this step and the earlier ones (all complete by now); the
    // eager step's pre-steps ran before entry.
    if (eager.first >= 0 && static_cast<int32_t>(si) < eager.pre_steps) continue;
    for (size_t ri = 0; ri < step.reductions.size(); ++ri) {
      if (fused != nullptr && static_cast<int>(ri) == fusion.reduction) continue;  // done piece by piece above
      reduce_all(step.reductions[ri]);
    }
  }
}

}  // namespace shm
}  // namespace paracomm
