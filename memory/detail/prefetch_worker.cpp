// prefetch_worker: the worker-thread path of a prefetch, where io_uring is refused or not wanted:
// the same reads and populates in the same order, with pread and ::madvise.
#include <kiln/memory/detail/prefetch_impl.hpp>

#include <unistd.h>

#include <algorithm>
#include <cerrno>

namespace kiln::memory {

void prefetch::impl::run_worker() noexcept {
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
        count_read(static_cast<std::uint64_t>(r));
      }
      if (dead[x] || hard_stop) break;
      if (opt.on_read) opt.on_read(x, pos, std::span<const std::byte>(scratch, len));
      if (e.host) count_populate(detail::populate_now(e.host + pos, len));
      detail::signal_fd(evfd.get());
    }
  }
  if (!hard_stop && ws == plan.size() && ws != 0) mark_working_set();
  finish_worker();
}

void prefetch::impl::finish_worker() noexcept {
  if (!stop_flag.load(std::memory_order_relaxed)) mark_done();
  worker_done.store(true, std::memory_order_release);
  detail::signal_fd(evfd.get());
}

} // namespace kiln::memory
