// prefetch: pulls a lazily mapped snapshot's file pages into the page cache in a given order and
// pre-installs their private mappings, with io_uring or, where that is refused, a worker thread.
#pragma once

#include <kiln/support/result.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

namespace kiln::memory {

/// One piece of the plan: bring file bytes [offset, offset + length) of `fd` into the page cache,
/// then, if `host` is not null, pre-install the host pages [host, host + length) (where that file
/// range is mapped MAP_PRIVATE) with MADV_POPULATE_READ.
///
/// Nothing is ever written through `host`: a populate-read of a page the guest already made
/// private (written) is a no-op, so the guest's data is never clobbered.
struct prefetch_extent {
  int fd = -1;               // borrowed: must stay open until the prefetch is done or cancelled
  std::uint64_t offset = 0;  // page-aligned
  std::uint64_t length = 0;  // a page multiple, > 0
  std::byte* host = nullptr; // page-aligned when not null; must stay mapped (or be cancelled)
};

struct prefetch_options {
  std::uint64_t chunk_bytes = 256ull << 10; // each read and each populate covers at most this
                                            // (a page multiple, at most 1 GiB)
  unsigned queue_depth = 8;                 // reads in flight (1..256)
  bool force_thread = false;                // skip io_uring: use the worker-thread path (tests)
  std::size_t working_set_extents = 0;      // plan[0, this) is the working set (timed separately)
  /// Given each chunk's bytes once read in full, before they are populated: the plan extent,
  /// the chunk's offset inside it, the bytes. Runs on the thread that drives the prefetch (the
  /// poller, or the worker thread), one call at a time; must not throw. For checking the data
  /// as it comes in (load_check).
  std::function<void(std::size_t extent, std::uint64_t pos, std::span<const std::byte> bytes)>
      on_read;
};

struct prefetch_stats {
  bool used_io_uring = false;
  std::uint64_t bytes_read = 0;        // file bytes read (into the scratch buffers)
  std::uint64_t reads = 0;             // read calls or operations that returned data
  std::uint64_t populate_calls = 0;    // chunks populated (io_uring op or syscall; one each,
                                       // EAGAIN/EINTR retries and fallbacks not counted apart)
  std::uint64_t populate_failures = 0; // of those, failed ones (EINVAL on PROT_NONE, EFAULT past
                                       // the end of a file, ENOMEM...): not a hard error
  std::chrono::steady_clock::duration working_set_time{}; // start -> working set read+populated
  std::chrono::steady_clock::duration total_time{};       // start -> done (or cancelled)
  /// The working set is read and populated (true from the start when it is empty). Every
  /// working-set chunk is issued before any other, so this comes first.
  bool working_set_done = false;
  /// The prefetch ran to its end: every extent was read and populated, or it was stopped early
  /// by a failure (see `failure`).
  bool done = false;
  /// cancel() stopped it before its end.
  bool cancelled = false;
  /// The first hard error, if any: memory_errc::snapshot_truncated when a file was shorter than
  /// planned (that extent stops, the others go on), or a read's errno (everything stops).
  error failure;
};

/// A background prefetch of a plan of extents, in plan order.
///
/// With io_uring (the normal path) the work is driven by whoever calls poll(): it submits up to
/// `queue_depth` reads of `chunk_bytes` into scratch buffers, and after each chunk's read it
/// submits IORING_OP_MADVISE(MADV_POPULATE_READ) over the chunk's host pages (run by the kernel's
/// io-wq workers, so the polling thread never waits on it). Where the kernel refuses that
/// operation the populate is a ::madvise on the polling thread instead.
///
/// Where the ring cannot be created (io_uring disabled by sysctl or seccomp, too old a kernel,
/// ENOMEM) or `force_thread` is set, a worker thread does the same work in the same order with
/// pread and ::madvise; poll() then only reports its progress. The first fallback that is not
/// forced writes one line to stderr saying why (once per process).
///
/// Thread-safety: poll(), wait() and cancel() must not run concurrently with each other (one
/// driver at a time; runtime/detail/prefetch_driver serializes them); stats() may be called from
/// any thread at any time. The io_uring path completes buffered reads through task work queued
/// to the thread that submitted them, so that thread (the poller) should stay alive or keep
/// entering the kernel until the prefetch ends; cancel() from another thread is still correct.
class prefetch {
public:
  /// Validates the plan and starts. EINVAL: an extent with a negative fd, an unaligned offset or
  /// host, a zero or unaligned length, an overflowing end; a bad chunk size or queue depth; more
  /// working-set extents than the plan has. Otherwise the errno of eventfd/mmap/thread creation.
  /// Nothing is submitted until the first poll() (notify_fd() starts readable); the worker
  /// thread, when used, starts at once.
  static result<std::unique_ptr<prefetch>> start(std::vector<prefetch_extent> plan,
                                                 prefetch_options options);
  ~prefetch(); // cancel()
  prefetch(const prefetch&) = delete;
  prefetch& operator=(const prefetch&) = delete;

  /// Readable (an EFD_NONBLOCK eventfd) when there is something for poll() to do. poll() resets
  /// its counter itself before reaping, so no wakeup is lost.
  int notify_fd() const noexcept;
  /// Reaps completions, submits more, never blocks (except for a ::madvise of one chunk where the
  /// kernel refuses the io_uring populate). One call handles at most 4 x queue_depth completions
  /// and then leaves notify_fd() readable, so it never holds a shared executor for long. Returns
  /// true once the prefetch has ended (done, failed or cancelled); the ring and scratch buffers
  /// are released then.
  bool poll();
  /// Stops issuing work and waits for the operations in flight (no read may complete into freed
  /// memory, no populate may run after it returns); joins the worker thread. Idempotent. A
  /// prefetch that already ended stays `done`, otherwise it is `cancelled`.
  void cancel() noexcept;
  /// Blocks until the prefetch ends: poll() in a loop waiting on notify_fd(). For eager loading
  /// and tests.
  void wait();
  /// A copy of the statistics so far. Thread-safe.
  prefetch_stats stats() const;

  struct impl;

private:
  explicit prefetch(std::unique_ptr<impl> i);
  std::unique_ptr<impl> impl_;
};

} // namespace kiln::memory
