// Loading a sandbox from a snapshot file (eager, demand, prefetch) and recording the working set
// that the prefetch reads first.
#include <kiln/memory/load_plan.hpp>
#include <kiln/memory/prefetch.hpp>
#include <kiln/runtime/detail/prefetch_driver.hpp>
#include <kiln/runtime/detail/sandbox_impl.hpp>

#include <fmt/format.h>

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <algorithm>

namespace kiln {

using memory::guest_phys_addr;

namespace {

std::chrono::nanoseconds since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t);
}

} // namespace

// ---- loading ------------------------------------------------------------------------------------

result<void> sandbox::impl::start_loading(const detail::snapshot_state& s,
                                          boost::asio::any_io_executor ex) {
  auto& ls = stats.load;
  ls = {};
  if (!s.image || s.image->file_layers() == 0) return {}; // in memory already
  const load_options& o = config.load;
  ls.from_file = true;
  ls.mode = o.mode;
  ls.working_set_pages = s.working_set.size();
  awaiting_first_result = true;
  load_complete = false;
  if (o.mode == load_mode::demand) return {};

  memory::load_plan plan =
      memory::plan_load(*s.image, mem,
                        o.mode == load_mode::eager ? std::span<const std::uint32_t>{}
                                                   : std::span<const std::uint32_t>(s.working_set));
  memory::prefetch_options po;
  po.chunk_bytes = o.chunk_bytes;
  po.queue_depth = o.queue_depth;
  po.force_thread = !o.use_io_uring;
  po.working_set_extents = plan.working_set_extents;
  prefetch_image = s.image;
  // A selective working-set phase reads through descriptors of its own, with the kernel's
  // read-ahead off: a read of 256 KiB then reads 256 KiB, where the file's shared description
  // would read up to the device's read-ahead window past it (8 MiB here), spending the disk on
  // pages the working set does not need yet (lazy_load_bench, clustered working set on a disk
  // throttled to 200 MiB/s: working set resident after 570 ms, for 24 MiB, 371 ms without). The
  // pass in address order keeps read-ahead, which pipelines it (without: 182 ms for 256 MiB
  // where it takes 51 ms).
  prefetch_fds.clear();
  for (const auto& layer : s.image->layers()) {
    if (!layer->file() || plan.one_pass) continue;
    unique_fd own(
        ::open(fmt::format("/proc/self/fd/{}", layer->fd()).c_str(), O_RDONLY | O_CLOEXEC));
    struct stat a {
    }, b{};
    if (!own || ::fstat(own.get(), &a) != 0 || ::fstat(layer->fd(), &b) != 0 ||
        a.st_dev != b.st_dev || a.st_ino != b.st_ino)
      continue; // no /proc: the shared description, read-ahead and all
    ::posix_fadvise(own.get(), 0, 0, POSIX_FADV_RANDOM);
    for (std::size_t i = 0; i < plan.working_set_extents; ++i)
      if (plan.extents[i].fd == layer->fd()) plan.extents[i].fd = own.get();
    prefetch_fds.push_back(std::move(own));
  }
  prefetch_started = std::chrono::steady_clock::now();
  if (cpu->kind() == vcpu::backend_kind::kvm) { // see prefault_resident()
    const auto ws_end = plan.guest.begin() + static_cast<std::ptrdiff_t>(plan.working_set_extents);
    prefault_ws.assign(plan.guest.begin(), ws_end);
    prefault_all.assign(ws_end, plan.guest.end());
  }
  if (o.mode == load_mode::eager) {
    // Everything in before the guest may run, driven on this thread.
    KILN_TRY_ASSIGN(auto p, memory::prefetch::start(plan.extents, po));
    p->wait();
    const auto st = p->stats();
    if (st.failure.code) return st.failure;
    ls.io_uring = st.used_io_uring;
    ls.bytes_prefetched = st.bytes_read;
    ls.to_working_set = ls.to_everything = since(load_started);
    ls.working_set_resident = ls.everything_resident = true;
    load_complete = true;
    prefault_resident();
    return {};
  }
  // While a selective working set leads, a guest fault reads only its page: the prefetch knows
  // what the guest needs, and the kernel's read-around would spend the disk on pages around it
  // (lazy_load_bench, clustered 24 MiB working set, disk throttled to 200 MiB/s: working set
  // resident after 371 ms with read-around, 168 ms without; demand paging: 1,159 ms). A plan
  // that is one pass keeps read-around: there the guest's faults read what the pass would
  // (the scattered working set took 185 ms to everything without it, 88-120 ms with it).
  if (!plan.one_pass) {
    KILN_TRY(mem.set_read_around(false));
    read_around_off = true;
  }
  KILN_TRY_ASSIGN(prefetcher, detail::prefetch_driver::start(std::move(ex), plan.extents, po));
  return {};
}

void sandbox::impl::cancel_loading() noexcept {
  if (!prefetcher) return;
  prefetcher->cancel();
  update_load_stats();
  prefetcher.reset();
  prefetch_fds.clear();
  prefault_ws.clear(); // they were the old image's; nothing says what is resident now
  prefault_all.clear();
  prefetch_image.reset();
  load_complete = true; // nothing more will come in by itself
}

void sandbox::impl::update_load_stats() {
  if (!prefetcher || load_complete) return; // once complete, the figures are final
  const auto st = prefetcher->stats();
  auto& ls = stats.load;
  ls.io_uring = st.used_io_uring;
  ls.bytes_prefetched = st.bytes_read;
  const auto offset =
      std::chrono::duration_cast<std::chrono::nanoseconds>(prefetch_started - load_started);
  if (st.working_set_done && !ls.working_set_resident) {
    ls.working_set_resident = true;
    ls.to_working_set =
        offset + std::chrono::duration_cast<std::chrono::nanoseconds>(st.working_set_time);
  }
  if (st.done && !ls.everything_resident && !st.failure.code) {
    ls.everything_resident = true;
    ls.to_everything = offset + std::chrono::duration_cast<std::chrono::nanoseconds>(st.total_time);
  }
  if (st.done || st.cancelled) {
    load_complete = true;
    if (read_around_off) { // everything is in: faults after an eviction read around again
      read_around_off = false;
      (void)mem.set_read_around(true);
    }
  }
}

void sandbox::impl::prefault_resident() noexcept {
  // Resident pages only: pre-faulting others would read them in here, synchronously.
  auto& ls = stats.load;
  auto run = [&](std::vector<memory::byte_range>& ranges) {
    for (const auto& [lo, hi] : ranges) {
      if (!cpu->prefault(guest_phys_addr{lo}, hi - lo)) break; // the guest faults them itself
      ls.bytes_prefaulted += hi - lo;
    }
    ranges.clear();
  };
  if (!prefault_ws.empty() && ls.working_set_resident) run(prefault_ws);
  if (!prefault_all.empty() && ls.everything_resident) {
    run(prefault_ws);
    run(prefault_all);
  }
}

void sandbox::impl::before_run(std::uint64_t& faults, std::uint64_t& major) const noexcept {
  if (!counting_faults()) return;
  struct rusage ru {};
  ::getrusage(RUSAGE_THREAD, &ru);
  faults = static_cast<std::uint64_t>(ru.ru_minflt + ru.ru_majflt);
  major = static_cast<std::uint64_t>(ru.ru_majflt);
}

void sandbox::impl::after_run(std::uint64_t faults, std::uint64_t major, bool call_ended) noexcept {
  auto& ls = stats.load;
  if (counting_faults()) {
    struct rusage ru {};
    ::getrusage(RUSAGE_THREAD, &ru);
    ls.faults += static_cast<std::uint64_t>(ru.ru_minflt + ru.ru_majflt) - faults;
    ls.major_faults += static_cast<std::uint64_t>(ru.ru_majflt) - major;
  }
  update_load_stats();
  if (!call_ended) return;
  if (awaiting_first_result) {
    awaiting_first_result = false;
    ls.to_first_result = since(load_started);
  }
  if (rec && cpu->kind() == vcpu::backend_kind::kvm) record_touched_pages();
}

void sandbox::wait_loaded() {
  if (!impl_->prefetcher) return;
  impl_->prefetcher->wait();
  impl_->update_load_stats();
}

// ---- working-set recording ----------------------------------------------------------------------

result<void> sandbox::impl::start_recording() {
  if (calling) return error(errc::not_ready, "recording starts between calls");
  if (rec) return error(errc::not_ready, "already recording");
  if (!base)
    return error(errc::not_ready,
                 "recording needs a sandbox created from or restored to a snapshot");
  const std::uint64_t pages = mem.size() / memory::page_size;
  // From here on only the guest makes pages resident: a prefetch would look like its touches.
  cancel_loading();
  recording r;
  r.snapshot_id = base->id;
  if (cpu->kind() == vcpu::backend_kind::emulated) {
    // The host protection of every RAM page now: read-write, except where the guest tightened.
    std::vector<memory::protection> prot_of(pages, memory::prot_rw);
    for (const auto& c : prot.list())
      if (const auto* reg = mem.find(c.start))
        std::fill_n(prot_of.begin() +
                        static_cast<std::ptrdiff_t>(c.start.value / memory::page_size),
                    c.size / memory::page_size, detail::host_level(*reg, c.to));
    KILN_TRY_ASSIGN(r.recorder, mem.record_touches(prot_of));
  } else {
    // KVM touches guest RAM from the kernel, where a protection fault fails KVM_RUN with a bare
    // EFAULT (Linux 6.12 gives no address for it): instead, every page that still holds only
    // the image's bytes (or the zero page) is unmapped now, so that its next touch, a read as
    // much as a write, maps it again, and the pages mapped after each call are recorded. Pages
    // the sandbox wrote before recording began stay mapped and are not seen: record right
    // after create() or restore(), where those are few.
    KILN_TRY(mem.unmap_clean());
    r.seen.assign(pages, false);
    rec.emplace(std::move(r));
    record_touched_pages();
    rec->pages.clear();
    recorded.reset();
    return {};
  }
  rec.emplace(std::move(r));
  recorded.reset();
  return {};
}

void sandbox::impl::record_touched_pages() {
  auto ranges = mem.touched_ranges();
  if (!ranges) return; // a scan that fails records nothing more; the list stays a valid prefix
  for (const auto& [b, e] : *ranges)
    for (std::uint64_t a = b; a < e; a += memory::page_size) {
      const auto pg = static_cast<std::uint32_t>(a / memory::page_size);
      if (!rec->seen[pg]) {
        rec->seen[pg] = true;
        rec->pages.push_back(pg);
      }
    }
}

void sandbox::impl::end_recording() noexcept {
  if (!rec) return;
  working_set ws;
  ws.snapshot_id = rec->snapshot_id;
  if (rec->recorder.armed()) {
    auto pages = rec->recorder.stop();
    ws.complete = pages && !rec->recorder.overflowed();
    if (pages) ws.pages = std::move(*pages);
  } else {
    record_touched_pages();
    ws.pages = std::move(rec->pages);
  }
  rec.reset();
  recorded = std::move(ws);
}

result<void> sandbox::start_recording() {
  return impl_->start_recording();
}

result<working_set> sandbox::stop_recording() {
  impl_->end_recording();
  if (!impl_->recorded) return error(errc::not_ready, "nothing was recorded");
  working_set ws = std::move(*impl_->recorded);
  impl_->recorded.reset();
  return ws;
}

} // namespace kiln
