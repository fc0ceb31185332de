// prefetch: an io_uring read-then-populate pipeline over a plan of extents, and its worker-thread
// fallback.
#include <kiln/memory/address.hpp>
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/prefetch.hpp>
#include <kiln/support/log.hpp>
#include <kiln/support/unique_fd.hpp>

#include <liburing.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22 // Linux 5.14
#endif

// What IORING_OP_MADVISE with MADV_POPULATE_READ does, measured on Linux 6.18 (x86-64):
//  - it works: CQE res 0, and every page of a 64 MiB MAP_PRIVATE file mapping (page cache
//    evicted first) was present in /proc/self/pagemap afterwards; 1 MiB ops one at a time took
//    ~19 ms for the 64 MiB, run by io-wq (io_uring forces madvise async), not the poller;
//  - over a PROT_NONE page it answers -EINVAL, exactly as ::madvise does (errno EINVAL), so an
//    -EINVAL alone does not mean "operation unsupported": the chunk is retried with ::madvise,
//    and only when that succeeds is the io_uring operation given up for the rest of the run;
//  - past the end of a truncated file it answers -EFAULT (as ::madvise does), with no SIGBUS.
// Kernels before 5.6 have no IORING_OP_MADVISE (the probe says so; ::madvise is used), and
// before 5.14 no MADV_POPULATE_READ (both ways -EINVAL: counted as populate failures).

namespace kiln::memory {
namespace {

using steady = std::chrono::steady_clock;

constexpr std::uint64_t max_chunk = 1ull << 30; // read and madvise lengths are 32-bit in SQEs
constexpr unsigned max_queue_depth = 256;
constexpr int max_retries = 16; // EAGAIN/EINTR retries of one populate

std::atomic<bool> fallback_reported{false};

void report_fallback(const char* why, int err) {
  if (fallback_reported.exchange(true)) return;
  log_message(log_level::warning, std::string("prefetch: io_uring unavailable (") + why + ": " +
                                      std::strerror(err) + "), using a worker thread");
}

void signal_fd(int fd) noexcept {
  const std::uint64_t one = 1;
  // EAGAIN means the counter is saturated: it is readable anyway.
  while (::write(fd, &one, sizeof one) < 0 && errno == EINTR) {
  }
}

void drain_fd(int fd) noexcept {
  std::uint64_t v;
  while (::read(fd, &v, sizeof v) < 0 && errno == EINTR) {
  }
}

/// ::madvise(MADV_POPULATE_READ), retrying EINTR/EAGAIN a few times. Returns 0 or the errno.
int populate_now(std::byte* host, std::uint64_t len) noexcept {
  for (int i = 0;; ++i) {
    if (::madvise(host, len, MADV_POPULATE_READ) == 0) return 0;
    if ((errno != EINTR && errno != EAGAIN) || i == max_retries) return errno;
  }
}

error invalid(std::string what) {
  return error(std::make_error_code(std::errc::invalid_argument), "prefetch: " + std::move(what));
}

result<void> validate(const std::vector<prefetch_extent>& plan, const prefetch_options& o) {
  if (o.chunk_bytes == 0 || o.chunk_bytes > max_chunk || !is_aligned(o.chunk_bytes, page_size))
    return invalid("chunk_bytes must be a page multiple in (0, 1 GiB]");
  if (o.queue_depth == 0 || o.queue_depth > max_queue_depth)
    return invalid("queue_depth must be in [1, 256]");
  if (o.working_set_extents > plan.size()) return invalid("working_set_extents exceeds the plan");
  for (std::size_t i = 0; i < plan.size(); ++i) {
    const prefetch_extent& e = plan[i];
    const std::string at = "extent " + std::to_string(i) + ": ";
    std::uint64_t end = 0;
    std::uintptr_t host_end = 0;
    if (e.fd < 0) return invalid(at + "no file descriptor");
    if (e.length == 0 || !is_aligned(e.length, page_size))
      return invalid(at + "length is zero or not a page multiple");
    if (!is_aligned(e.offset, page_size)) return invalid(at + "offset not page-aligned");
    if (__builtin_add_overflow(e.offset, e.length, &end) || end > std::uint64_t(LLONG_MAX))
      return invalid(at + "offset + length overflows");
    if (e.host) {
      const auto h = reinterpret_cast<std::uintptr_t>(e.host);
      if (!is_aligned(h, page_size)) return invalid(at + "host not page-aligned");
      if (__builtin_add_overflow(h, e.length, &host_end))
        return invalid(at + "host + length overflows");
    }
  }
  return ok();
}

} // namespace

struct prefetch::impl {
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

  void release() noexcept {
    if (have_ring) {
      io_uring_queue_exit(&ring);
      have_ring = false;
    }
    if (scratch) {
      ::munmap(scratch, scratch_len);
      scratch = nullptr;
    }
  }

  steady::duration elapsed() const { return steady::now() - t0; }

  void fail(error e) {
    std::lock_guard lock(stats_mutex);
    if (!st.failure.code) st.failure = std::move(e);
  }

  void truncated(std::size_t extent, std::uint64_t at) {
    dead[extent] = true;
    fail(error(memory_errc::snapshot_truncated, "prefetch: file ends at offset " +
                                                    std::to_string(at) + " inside extent " +
                                                    std::to_string(extent)));
  }

  void mark_working_set() {
    std::lock_guard lock(stats_mutex);
    if (st.working_set_done) return;
    st.working_set_done = true;
    st.working_set_time = elapsed();
  }

  void mark_done() {
    std::lock_guard lock(stats_mutex);
    if (st.done || st.cancelled) return;
    st.done = true;
    st.total_time = elapsed();
  }

  void count_populate(int err) {
    std::lock_guard lock(stats_mutex);
    ++st.populate_calls;
    if (err != 0) ++st.populate_failures;
  }

  /// Moves the cursor past finished and stopped extents.
  void skip_exhausted() {
    while (next_extent < plan.size() &&
           (dead[next_extent] || next_pos >= plan[next_extent].length)) {
      ++next_extent;
      next_pos = 0;
    }
  }

  /// Takes the next chunk in plan order, if any.
  bool next_chunk(std::size_t& extent, std::uint64_t& pos, std::uint64_t& len) {
    skip_exhausted();
    if (next_extent >= plan.size()) return false;
    extent = next_extent;
    pos = next_pos;
    len = std::min(opt.chunk_bytes, plan[extent].length - pos);
    next_pos += len;
    return true;
  }

  // ---- io_uring path (poller thread) ----

  io_uring_sqe* get_sqe() {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring);
    if (!sqe) { // cannot happen with one operation per slot and queue_depth SQEs; be safe
      io_uring_submit(&ring);
      sqe = io_uring_get_sqe(&ring);
    }
    return sqe;
  }

  void finish_slot(unsigned i) {
    slots[i].state = op::idle;
    idle.push_back(i);
    --in_flight;
  }

  void submit_read(unsigned i) {
    slot& s = slots[i];
    const prefetch_extent& e = plan[s.extent];
    io_uring_sqe* sqe = get_sqe();
    if (!sqe) {
      fail(error(std::make_error_code(std::errc::device_or_resource_busy), "prefetch: no SQE"));
      stopping = true;
      finish_slot(i);
      return;
    }
    io_uring_prep_read(sqe, e.fd, s.buffer + s.got, static_cast<unsigned>(s.len - s.got),
                       e.offset + s.pos + s.got);
    io_uring_sqe_set_data64(sqe, i);
    s.state = op::reading;
  }

  void populate(unsigned i) {
    slot& s = slots[i];
    std::byte* host = plan[s.extent].host + s.pos;
    if (ring_madvise) {
      if (io_uring_sqe* sqe = get_sqe()) {
        io_uring_prep_madvise(sqe, host, static_cast<off_t>(s.len), MADV_POPULATE_READ);
        io_uring_sqe_set_data64(sqe, i);
        s.state = op::populating;
        return;
      }
    }
    count_populate(populate_now(host, s.len));
    finish_slot(i);
  }

  void on_read(unsigned i, int res) {
    slot& s = slots[i];
    if (res == -EAGAIN || res == -EINTR) return submit_read(i);
    if (res < 0) {
      fail(error(std::error_code(-res, std::generic_category()), "prefetch: read"));
      stopping = true;
      return finish_slot(i);
    }
    if (res == 0) { // end of file before the planned end: the file is shorter than planned
      truncated(s.extent, plan[s.extent].offset + s.pos + s.got);
      return finish_slot(i);
    }
    s.got += static_cast<std::uint64_t>(res);
    {
      std::lock_guard lock(stats_mutex);
      st.bytes_read += static_cast<std::uint64_t>(res);
      ++st.reads;
    }
    if (s.got < s.len) return submit_read(i); // short read: the rest, or 0 at the end of file
    if (plan[s.extent].host) { // the bytes exist (even if a later chunk found the end early)
      s.retries = 0;
      return populate(i);
    }
    finish_slot(i);
  }

  void on_populate(unsigned i, int res) {
    slot& s = slots[i];
    std::byte* host = plan[s.extent].host + s.pos;
    if ((res == -EAGAIN || res == -EINTR) && s.retries++ < max_retries) {
      if (io_uring_sqe* sqe = get_sqe()) {
        io_uring_prep_madvise(sqe, host, static_cast<off_t>(s.len), MADV_POPULATE_READ);
        io_uring_sqe_set_data64(sqe, i);
        return;
      }
    }
    if (res == -EINVAL || res == -EOPNOTSUPP) {
      // Either the kernel does not take this advice through io_uring, or the range cannot be
      // populated (PROT_NONE gives EINVAL too): the syscall tells which.
      const int err = populate_now(host, s.len);
      if (err == 0) ring_madvise = false;
      count_populate(err);
      return finish_slot(i);
    }
    count_populate(res < 0 ? -res : 0);
    finish_slot(i);
  }

  void fill() {
    std::size_t extent = 0;
    std::uint64_t pos = 0, len = 0;
    while (!stopping && !idle.empty() && next_chunk(extent, pos, len)) {
      const unsigned i = idle.back();
      idle.pop_back();
      ++in_flight;
      slot& s = slots[i];
      s.extent = extent;
      s.pos = pos;
      s.len = len;
      s.got = 0;
      s.retries = 0;
      submit_read(i);
    }
  }

  /// Submits what is prepared. On a transient refusal the eventfd is signalled so that poll()
  /// runs again (nothing in flight might signal it otherwise).
  void flush() {
    if (submit_broken || io_uring_sq_ready(&ring) == 0) return;
    int r = io_uring_submit(&ring);
    while (r == -EINTR)
      r = io_uring_submit(&ring);
    if (r == -EAGAIN || r == -EBUSY) {
      signal_fd(evfd.get());
    } else if (r < 0) {
      fail(error(std::error_code(-r, std::generic_category()), "prefetch: io_uring_submit"));
      stopping = true;
      submit_broken = true;
    }
  }

  void check_working_set() {
    if (opt.working_set_extents == 0) return;
    skip_exhausted();
    if (next_extent < opt.working_set_extents) return;
    for (const slot& s : slots)
      if (s.state != op::idle && s.extent < opt.working_set_extents) return;
    mark_working_set();
  }

  bool poll_ring() {
    drain_fd(evfd.get()); // before reaping: a completion after this signals again
    // A bound on the work of one call, so that a fast device cannot keep a shared executor
    // (the runtime's service thread) busy: past it, the eventfd asks for another call.
    const std::size_t budget = 4 * slots.size();
    for (std::size_t total = 0;;) {
      fill();
      flush();
      if (total >= budget) {
        signal_fd(evfd.get());
        break;
      }
      unsigned reaped = 0;
      io_uring_cqe* cqe = nullptr;
      while (io_uring_peek_cqe(&ring, &cqe) == 0) {
        const auto i = static_cast<unsigned>(io_uring_cqe_get_data64(cqe));
        const int res = cqe->res;
        io_uring_cqe_seen(&ring, cqe);
        ++reaped;
        if (slots[i].state == op::reading)
          on_read(i, res);
        else if (slots[i].state == op::populating)
          on_populate(i, res);
      }
      if (reaped == 0) break;
      total += reaped;
    }
    check_working_set();
    // Operations left unsubmitted by a broken submit never complete: wait for the others only.
    if (in_flight > (submit_broken ? io_uring_sq_ready(&ring) : 0)) return false;
    skip_exhausted();
    if (!stopping && next_extent < plan.size()) return false; // only after a refused submit
    mark_done();
    ended = true;
    release();
    return true;
  }

  void cancel_ring() noexcept {
    stopping = true;
    for (int tries = 0; tries < max_retries && !submit_broken; ++tries) {
      const int r = io_uring_submit(&ring);
      if (r >= 0 || (r != -EINTR && r != -EAGAIN && r != -EBUSY)) break;
    }
    // Whatever is still unsubmitted never reaches the kernel: only wait for the rest.
    const unsigned unsubmitted = io_uring_sq_ready(&ring);
    while (in_flight > unsubmitted) {
      io_uring_cqe* cqe = nullptr;
      const int w = io_uring_wait_cqe(&ring, &cqe);
      if (w == -EINTR || w == -EAGAIN) continue;
      if (w < 0) { // cannot wait: keep the buffers (leak them) rather than free them under a read
        scratch = nullptr;
        break;
      }
      const auto i = static_cast<unsigned>(io_uring_cqe_get_data64(cqe));
      io_uring_cqe_seen(&ring, cqe);
      if (slots[i].state != op::idle) finish_slot(i);
    }
    release();
  }

  // ---- thread path (worker) ----

  void run_worker() noexcept {
    const std::size_t ws = opt.working_set_extents;
    bool hard_stop = false;
    for (std::size_t x = 0; x < plan.size() && !hard_stop; ++x) {
      if (x == ws && ws != 0) mark_working_set();
      const prefetch_extent& e = plan[x];
      for (std::uint64_t pos = 0; pos < e.length && !hard_stop; pos += opt.chunk_bytes) {
        if (stop_flag.load(std::memory_order_relaxed)) return finish_worker();
        const std::uint64_t len = std::min(opt.chunk_bytes, e.length - pos);
        std::uint64_t got = 0;
        while (got < len) {
          const ssize_t r =
              ::pread(e.fd, scratch + got, len - got, static_cast<off_t>(e.offset + pos + got));
          if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
          if (r < 0) {
            fail(errno_error("prefetch: pread"));
            hard_stop = true;
            break;
          }
          if (r == 0) {
            truncated(x, e.offset + pos + got);
            break;
          }
          got += static_cast<std::uint64_t>(r);
          std::lock_guard lock(stats_mutex);
          st.bytes_read += static_cast<std::uint64_t>(r);
          ++st.reads;
        }
        if (dead[x] || hard_stop) break;
        if (e.host) count_populate(populate_now(e.host + pos, len));
        signal_fd(evfd.get());
      }
    }
    if (!hard_stop && ws == plan.size() && ws != 0) mark_working_set();
    finish_worker();
  }

  void finish_worker() noexcept {
    if (!stop_flag.load(std::memory_order_relaxed)) mark_done();
    worker_done.store(true, std::memory_order_release);
    signal_fd(evfd.get());
  }
};

prefetch::prefetch(std::unique_ptr<impl> i) : impl_(std::move(i)) {}

prefetch::~prefetch() {
  cancel();
}

result<std::unique_ptr<prefetch>> prefetch::start(std::vector<prefetch_extent> plan,
                                                  prefetch_options options) {
  KILN_TRY(validate(plan, options));
  auto p = std::make_unique<impl>();
  p->opt = options;
  p->dead.assign(plan.size(), false);
  p->plan = std::move(plan);
  p->evfd.reset(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!p->evfd) return errno_error("prefetch: eventfd");
  if (options.working_set_extents == 0) p->mark_working_set();

  bool use_ring = !options.force_thread && !p->plan.empty();
  if (use_ring) {
    const char* why = nullptr;
    int err = 0;
    if (int r = io_uring_queue_init(options.queue_depth, &p->ring, 0); r < 0) {
      why = "io_uring_queue_init";
      err = -r;
    } else {
      p->have_ring = true;
      if (int r2 = io_uring_register_eventfd(&p->ring, p->evfd.get()); r2 < 0) {
        why = "io_uring_register_eventfd";
        err = -r2;
      } else if (io_uring_probe* probe = io_uring_get_probe_ring(&p->ring)) {
        if (!io_uring_opcode_supported(probe, IORING_OP_READ)) {
          why = "no IORING_OP_READ";
          err = ENOSYS;
        }
        p->ring_madvise = io_uring_opcode_supported(probe, IORING_OP_MADVISE);
        io_uring_free_probe(probe);
      } // no probe (before 5.6): IORING_OP_READ is missing too; the first read says so
    }
    if (why) {
      p->release();
      report_fallback(why, err);
      use_ring = false;
    }
  }
  {
    std::lock_guard lock(p->stats_mutex);
    p->st.used_io_uring = use_ring;
  }

  const unsigned buffers = use_ring ? options.queue_depth : 1;
  if (!p->plan.empty()) {
    p->scratch_len = static_cast<std::size_t>(options.chunk_bytes) * buffers;
    void* m = ::mmap(nullptr, p->scratch_len, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return errno_error("prefetch: mmap scratch");
    p->scratch = static_cast<std::byte*>(m);
  }
  if (use_ring) {
    p->slots.resize(buffers);
    for (unsigned i = 0; i < buffers; ++i) {
      p->slots[i].buffer = p->scratch + std::size_t(i) * options.chunk_bytes;
      p->idle.push_back(buffers - 1 - i); // slot 0 first
    }
  } else if (p->plan.empty()) {
    p->mark_done();
    p->worker_done.store(true);
  }
  impl* raw = p.get();
  std::unique_ptr<prefetch> owner(new prefetch(std::move(p))); // before the worker can run
  if (!use_ring && !raw->plan.empty()) {
    try {
      raw->worker = std::thread([raw] { raw->run_worker(); });
    } catch (const std::system_error& e) {
      return error(e.code(), "prefetch: worker thread");
    }
  }
  signal_fd(raw->evfd.get()); // the first poll() submits
  return owner;
}

int prefetch::notify_fd() const noexcept {
  return impl_->evfd.get();
}

bool prefetch::poll() {
  impl& p = *impl_;
  if (p.ended) return true;
  if (p.have_ring) return p.poll_ring();
  drain_fd(p.evfd.get());
  if (!p.worker_done.load(std::memory_order_acquire)) return false;
  p.ended = true;
  return true;
}

void prefetch::cancel() noexcept {
  if (!impl_) return;
  impl& p = *impl_;
  if (p.have_ring && !p.ended) p.cancel_ring();
  if (p.worker.joinable()) {
    p.stop_flag.store(true, std::memory_order_relaxed);
    p.worker.join();
  }
  p.ended = true;
  p.release();
  std::lock_guard lock(p.stats_mutex);
  if (!p.st.done && !p.st.cancelled) {
    p.st.cancelled = true;
    p.st.total_time = p.elapsed();
  }
}

void prefetch::wait() {
  while (!poll()) {
    pollfd pfd{notify_fd(), POLLIN, 0};
    ::poll(&pfd, 1, -1); // EINTR (task work, signals): just poll again
  }
}

prefetch_stats prefetch::stats() const {
  std::lock_guard lock(impl_->stats_mutex);
  return impl_->st;
}

} // namespace kiln::memory
