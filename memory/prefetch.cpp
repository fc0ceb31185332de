// prefetch: validates a plan of extents, starts it on io_uring or a worker thread, and keeps its
// statistics.
#include <kiln/memory/address.hpp>
#include <kiln/memory/detail/prefetch_impl.hpp>
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/prefetch.hpp>

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <string>
#include <system_error>
#include <utility>

namespace kiln::memory {

namespace detail {

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

int populate_now(std::byte* host, std::uint64_t len) noexcept {
  for (int i = 0;; ++i) {
    if (::madvise(host, len, MADV_POPULATE_READ) == 0) return 0;
    if ((errno != EINTR && errno != EAGAIN) || i == prefetch_max_retries) return errno;
  }
}

} // namespace detail

namespace {

constexpr std::uint64_t max_chunk = 1ull << 30; // read and madvise lengths are 32-bit in SQEs
constexpr unsigned max_queue_depth = 256;

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

// ---- prefetch::impl, both paths -----------------------------------------------------------------

void prefetch::impl::release() noexcept {
  if (have_ring) {
    io_uring_queue_exit(&ring);
    have_ring = false;
  }
  if (scratch) {
    ::munmap(scratch, scratch_len);
    scratch = nullptr;
  }
}

result<void> prefetch::impl::map_scratch(unsigned buffers) {
  if (plan.empty()) return ok();
  scratch_len = static_cast<std::size_t>(opt.chunk_bytes) * buffers;
  void* m = ::mmap(nullptr, scratch_len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return errno_error("prefetch: mmap scratch");
  scratch = static_cast<std::byte*>(m);
  return ok();
}

void prefetch::impl::fail(error e) {
  std::lock_guard lock(stats_mutex);
  if (!st.failure.code) st.failure = std::move(e);
}

void prefetch::impl::truncated(std::size_t extent, std::uint64_t at) {
  dead[extent] = true;
  fail(error(memory_errc::snapshot_truncated, "prefetch: file ends at offset " +
                                                  std::to_string(at) + " inside extent " +
                                                  std::to_string(extent)));
}

void prefetch::impl::mark_working_set() {
  std::lock_guard lock(stats_mutex);
  if (st.working_set_done) return;
  st.working_set_done = true;
  st.working_set_time = elapsed();
}

void prefetch::impl::mark_done() {
  std::lock_guard lock(stats_mutex);
  if (st.done || st.cancelled) return;
  st.done = true;
  st.total_time = elapsed();
}

void prefetch::impl::count_read(std::uint64_t bytes) {
  std::lock_guard lock(stats_mutex);
  st.bytes_read += bytes;
  ++st.reads;
}

void prefetch::impl::count_populate(int err) {
  std::lock_guard lock(stats_mutex);
  ++st.populate_calls;
  if (err != 0) ++st.populate_failures;
}

// ---- prefetch -----------------------------------------------------------------------------------

prefetch::prefetch(std::unique_ptr<impl> i) : impl_(std::move(i)) {}

prefetch::~prefetch() {
  cancel();
}

result<std::unique_ptr<prefetch>> prefetch::start(std::vector<prefetch_extent> plan,
                                                  prefetch_options options) {
  KILN_TRY(validate(plan, options));
  auto p = std::make_unique<impl>();
  p->opt = std::move(options);
  p->dead.assign(plan.size(), false);
  p->plan = std::move(plan);
  p->evfd.reset(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!p->evfd) return errno_error("prefetch: eventfd");
  if (p->opt.working_set_extents == 0) p->mark_working_set();

  const bool use_ring = !p->opt.force_thread && !p->plan.empty() && p->open_ring();
  {
    std::lock_guard lock(p->stats_mutex);
    p->st.used_io_uring = use_ring;
  }
  const unsigned buffers = use_ring ? p->opt.queue_depth : 1;
  KILN_TRY(p->map_scratch(buffers));
  if (use_ring) {
    p->make_slots(buffers);
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
  detail::signal_fd(raw->evfd.get()); // the first poll() submits
  return owner;
}

int prefetch::notify_fd() const noexcept {
  return impl_->evfd.get();
}

bool prefetch::poll() {
  impl& p = *impl_;
  if (p.ended) return true;
  if (p.have_ring) return p.poll_ring();
  detail::drain_fd(p.evfd.get());
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
