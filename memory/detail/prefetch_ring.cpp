// prefetch_ring: the io_uring path of a prefetch, a read-then-populate pipeline over the plan
// driven by poll().
#include <kiln/memory/detail/prefetch_impl.hpp>
#include <kiln/memory/memory_errc.hpp>
#include <kiln/support/log.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <string>
#include <system_error>

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

using detail::populate_now;
using detail::prefetch_max_retries;
using detail::signal_fd;

std::atomic<bool> fallback_reported{false};

void report_fallback(const char* why, int err) {
  if (fallback_reported.exchange(true)) return;
  log_message(log_level::warning, std::string("prefetch: io_uring unavailable (") + why + ": " +
                                      std::strerror(err) + "), using a worker thread");
}

} // namespace

// ---- setting up ---------------------------------------------------------------------------------

bool prefetch::impl::open_ring() {
  const char* why = nullptr;
  int err = 0;
  if (int r = io_uring_queue_init(opt.queue_depth, &ring, 0); r < 0) {
    why = "io_uring_queue_init";
    err = -r;
  } else {
    have_ring = true;
    if (int r2 = io_uring_register_eventfd(&ring, evfd.get()); r2 < 0) {
      why = "io_uring_register_eventfd";
      err = -r2;
    } else if (io_uring_probe* probe = io_uring_get_probe_ring(&ring)) {
      if (!io_uring_opcode_supported(probe, IORING_OP_READ)) {
        why = "no IORING_OP_READ";
        err = ENOSYS;
      }
      ring_madvise = io_uring_opcode_supported(probe, IORING_OP_MADVISE);
      io_uring_free_probe(probe);
    } // no probe (before 5.6): IORING_OP_READ is missing too; the first read says so
  }
  if (!why) return true;
  release();
  report_fallback(why, err);
  return false;
}

void prefetch::impl::make_slots(unsigned buffers) {
  slots.resize(buffers);
  for (unsigned i = 0; i < buffers; ++i) {
    slots[i].buffer = scratch + std::size_t(i) * opt.chunk_bytes;
    idle.push_back(buffers - 1 - i); // slot 0 first
  }
}

// ---- the cursor over the plan -------------------------------------------------------------------

/// Moves the cursor past finished and stopped extents.
void prefetch::impl::skip_exhausted() {
  while (next_extent < plan.size() && (dead[next_extent] || next_pos >= plan[next_extent].length)) {
    ++next_extent;
    next_pos = 0;
  }
}

/// Takes the next chunk in plan order, if any.
bool prefetch::impl::next_chunk(std::size_t& extent, std::uint64_t& pos, std::uint64_t& len) {
  skip_exhausted();
  if (next_extent >= plan.size()) return false;
  extent = next_extent;
  pos = next_pos;
  len = std::min(opt.chunk_bytes, plan[extent].length - pos);
  next_pos += len;
  return true;
}

// ---- one slot: read, then populate --------------------------------------------------------------

io_uring_sqe* prefetch::impl::get_sqe() {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring);
  if (!sqe) { // cannot happen with one operation per slot and queue_depth SQEs; be safe
    io_uring_submit(&ring);
    sqe = io_uring_get_sqe(&ring);
  }
  return sqe;
}

void prefetch::impl::finish_slot(unsigned i) {
  slots[i].state = op::idle;
  idle.push_back(i);
  --in_flight;
}

void prefetch::impl::submit_read(unsigned i) {
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

void prefetch::impl::populate(unsigned i) {
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

void prefetch::impl::on_read(unsigned i, int res) {
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
  count_read(static_cast<std::uint64_t>(res));
  if (s.got < s.len) return submit_read(i); // short read: the rest, or 0 at the end of file
  if (opt.on_read) opt.on_read(s.extent, s.pos, std::span<const std::byte>(s.buffer, s.len));
  if (plan[s.extent].host) { // the bytes exist (even if a later chunk found the end early)
    s.retries = 0;
    return populate(i);
  }
  finish_slot(i);
}

void prefetch::impl::on_populate(unsigned i, int res) {
  slot& s = slots[i];
  std::byte* host = plan[s.extent].host + s.pos;
  if ((res == -EAGAIN || res == -EINTR) && s.retries++ < prefetch_max_retries) {
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

// ---- the pipeline -------------------------------------------------------------------------------

/// Starts a read in every idle slot, while the plan has chunks left.
void prefetch::impl::fill() {
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
void prefetch::impl::flush() {
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

void prefetch::impl::check_working_set() {
  if (opt.working_set_extents == 0) return;
  skip_exhausted();
  if (next_extent < opt.working_set_extents) return;
  for (const slot& s : slots)
    if (s.state != op::idle && s.extent < opt.working_set_extents) return;
  mark_working_set();
}

bool prefetch::impl::poll_ring() {
  detail::drain_fd(evfd.get()); // before reaping: a completion after this signals again
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

void prefetch::impl::cancel_ring() noexcept {
  stopping = true;
  for (int tries = 0; tries < prefetch_max_retries && !submit_broken; ++tries) {
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

} // namespace kiln::memory
