// The state of a prefetch, shared by its io_uring path (prefetch_ring.cpp) and its worker-thread
// path (prefetch_worker.cpp); prefetch.cpp starts either and keeps the statistics.
#pragma once

#include <kiln/memory/prefetch.hpp>
#include <kiln/support/result.hpp>
#include <kiln/support/unique_fd.hpp>

#include <liburing.h>
#include <sys/mman.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22 // Linux 5.14
#endif

namespace kiln::memory {
namespace detail {

inline constexpr int prefetch_max_retries = 16; // EAGAIN/EINTR retries of one populate

/// Makes the eventfd readable.
void signal_fd(int fd) noexcept;
/// Resets the eventfd's counter.
void drain_fd(int fd) noexcept;
/// ::madvise(MADV_POPULATE_READ), retrying EINTR/EAGAIN a few times. Returns 0 or the errno.
int populate_now(std::byte* host, std::uint64_t len) noexcept;

} // namespace detail

struct prefetch::impl {
  using steady = std::chrono::steady_clock;

  enum class op : std::uint8_t { idle, reading, populating };
  /// One in-flight chunk and its scratch buffer.
  struct slot {
    op state = op::idle;
    std::size_t extent = 0;
    std::uint64_t pos = 0; // offset of the chunk inside its extent
    std::uint64_t len = 0;
    std::uint64_t got = 0; // bytes read so far (short reads are resubmitted for the rest)
    int retries = 0;
    std::byte* buffer = nullptr;
  };

  std::vector<prefetch_extent> plan;
  prefetch_options opt;
  steady::time_point t0 = steady::now();
  unique_fd evfd;

  mutable std::mutex stats_mutex;
  prefetch_stats st; // guarded by stats_mutex

  // The cursor over the plan and the extents stopped by a short read. io_uring path: poller
  // only; thread path: worker only.
  std::size_t next_extent = 0;
  std::uint64_t next_pos = 0;
  std::vector<bool> dead;
  bool stopping = false; // a hard error or cancel: issue nothing more
  bool ended = false;    // poll() reported the end, or cancel() ran

  // Scratch: queue_depth buffers of chunk_bytes (io_uring), or one (thread).
  std::byte* scratch = nullptr;
  std::size_t scratch_len = 0;

  // io_uring path.
  bool have_ring = false;
  io_uring ring{};
  bool ring_madvise = true;   // IORING_OP_MADVISE usable for MADV_POPULATE_READ
  bool submit_broken = false; // io_uring_submit failed hard: what it left is never submitted
  std::vector<slot> slots;
  std::vector<unsigned> idle;
  unsigned in_flight = 0; // slots with an operation prepared or in the kernel

  // Thread path.
  std::thread worker;
  std::atomic<bool> stop_flag{false};
  std::atomic<bool> worker_done{false};

  ~impl() { release(); }

  // ---- both paths (prefetch.cpp) ----

  /// Frees the ring and the scratch buffers (idempotent).
  void release() noexcept;
  /// Maps the scratch area: `buffers` buffers of chunk_bytes (none for an empty plan).
  result<void> map_scratch(unsigned buffers);
  steady::duration elapsed() const { return steady::now() - t0; }
  /// Records `e` as the failure, unless one was recorded before.
  void fail(error e);
  /// Stops `extent`, whose file ends at offset `at`, and records that as the failure.
  void truncated(std::size_t extent, std::uint64_t at);
  void mark_working_set();
  void mark_done();
  /// Counts one read that returned `bytes`.
  void count_read(std::uint64_t bytes);
  /// Counts one populate that ended with errno `err` (0: it succeeded).
  void count_populate(int err);

  // ---- io_uring path, driven by the poller (prefetch_ring.cpp) ----

  /// Creates the ring with the eventfd registered and probes its operations. False, after
  /// saying why (once per process), where io_uring cannot be used.
  bool open_ring();
  /// One slot per scratch buffer, all idle.
  void make_slots(unsigned buffers);
  void skip_exhausted();
  bool next_chunk(std::size_t& extent, std::uint64_t& pos, std::uint64_t& len);
  io_uring_sqe* get_sqe();
  void finish_slot(unsigned i);
  void submit_read(unsigned i);
  void populate(unsigned i);
  void on_read(unsigned i, int res);
  void on_populate(unsigned i, int res);
  void fill();
  void flush();
  void check_working_set();
  bool poll_ring();
  void cancel_ring() noexcept;

  // ---- thread path, on the worker (prefetch_worker.cpp) ----

  void run_worker() noexcept;
  void finish_worker() noexcept;
};

} // namespace kiln::memory
