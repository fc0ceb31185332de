// Loading a sandbox from a snapshot file (eager, demand, prefetch) and recording the working set
// that the prefetch reads first.
#include <kiln/memory/snapshot_loader.hpp>
#include <kiln/runtime/detail/prefetch_driver.hpp>
#include <kiln/runtime/detail/sandbox_impl.hpp>

#include <sys/resource.h>

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

  const bool eager = o.mode == load_mode::eager;
  loader = memory::snapshot_loader::prepare(
      s.image, space.ram(), eager ? std::span<const std::uint32_t>{} : std::span(s.working_set),
      /*track_ranges=*/cpu->kind() == vcpu::backend_kind::kvm, // see prefault_resident()
      o.check_data);
  if (const auto* check = loader->check()) ls.chunks_total = check->chunks_total();
  memory::prefetch_options po;
  po.chunk_bytes = o.chunk_bytes;
  po.queue_depth = o.queue_depth;
  po.force_thread = !o.use_io_uring;
  prefetch_started = std::chrono::steady_clock::now();
  if (eager) { // everything in before the guest may run, read on this thread
    KILN_TRY_ASSIGN(const auto st, loader->load_all(po));
    ls.io_uring = st.used_io_uring;
    ls.bytes_prefetched = st.bytes_read;
    if (const auto* check = loader->check()) ls.chunks_checked = check->chunks_checked();
    ls.to_working_set = ls.to_everything = since(load_started);
    ls.working_set_resident = ls.everything_resident = true;
    load_complete = true;
    to_prefault = loader->advance(st);
    loader.reset();
    prefault_resident();
    return {};
  }
  KILN_TRY_ASSIGN(auto pf, loader->start(po));
  KILN_TRY_ASSIGN(prefetcher, detail::prefetch_driver::drive(std::move(ex), std::move(pf)));
  load_news = 0;
  return {};
}

void sandbox::impl::cancel_loading() noexcept {
  if (!prefetcher) return;
  prefetcher->cancel();
  update_load_stats();
  prefetcher.reset();
  loader->stop();
  loader.reset();
  to_prefault.clear();  // they were the old image's; nothing says what is resident now
  load_complete = true; // nothing more will come in by itself
}

void sandbox::impl::update_load_stats() {
  if (!prefetcher || load_complete) return; // once complete, the figures are final
  load_news = prefetcher->news(); // before the stats: a later milestone is heard next time
  const auto st = prefetcher->stats();
  auto& ls = stats.load;
  ls.io_uring = st.used_io_uring;
  ls.bytes_prefetched = st.bytes_read;
  if (const auto* check = loader->check()) ls.chunks_checked = check->chunks_checked();
  auto resident = loader->advance(st);
  to_prefault.insert(to_prefault.end(), resident.begin(), resident.end());
  const auto& progress = loader->progress();
  const auto offset =
      std::chrono::duration_cast<std::chrono::nanoseconds>(prefetch_started - load_started);
  if (progress.working_set_resident && !ls.working_set_resident) {
    ls.working_set_resident = true;
    ls.to_working_set =
        offset + std::chrono::duration_cast<std::chrono::nanoseconds>(st.working_set_time);
  }
  if (progress.everything_resident && !ls.everything_resident) {
    ls.everything_resident = true;
    ls.to_everything = offset + std::chrono::duration_cast<std::chrono::nanoseconds>(st.total_time);
  }
  if (progress.ended) load_complete = true;
}

void sandbox::impl::prefault_resident() noexcept {
  // Resident pages only (the loader hands ranges back once read): pre-faulting others would
  // read them in here, synchronously.
  for (const auto& [lo, hi] : to_prefault) {
    if (!cpu->prefault(guest_phys_addr{lo}, hi - lo)) break; // the guest faults them itself
    stats.load.bytes_prefaulted += hi - lo;
  }
  to_prefault.clear();
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
  hear_load();
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
  const std::uint64_t pages = space.ram().size() / memory::page_size;
  // From here on only the guest makes pages resident: a prefetch would look like its touches.
  cancel_loading();
  recording r;
  r.snapshot_id = base->id;
  if (cpu->kind() == vcpu::backend_kind::emulated) {
    // Armed over the host protection of every RAM page now.
    KILN_TRY_ASSIGN(r.recorder, space.ram().record_touches(space.host_protections()));
  } else {
    // KVM touches guest RAM from the kernel, where a protection fault fails KVM_RUN with a bare
    // EFAULT (Linux 6.12 gives no address for it): instead, every page that still holds only
    // the image's bytes (or the zero page) is unmapped now, so that its next touch, a read as
    // much as a write, maps it again, and the pages mapped after each call are recorded. Pages
    // the sandbox wrote before recording began stay mapped and are not seen: record right
    // after create() or restore(), where those are few.
    KILN_TRY(space.ram().unmap_clean());
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
  auto ranges = space.ram().touched_ranges();
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
