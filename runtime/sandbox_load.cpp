// Loading a sandbox from a snapshot file (eager, demand, prefetch) and recording the working set
// that the prefetch reads first.
#include <kiln/memory/prefetch.hpp>
#include <kiln/runtime/detail/prefetch_driver.hpp>
#include <kiln/runtime/detail/sandbox_impl.hpp>

#include <fmt/format.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <algorithm>

namespace kiln {

using memory::guest_phys_addr;

namespace {

/// The reads a load plans. First the working set's pages that a file provides, by 2 MiB region
/// in the order the guest first touched each region; within a region in address order, a page
/// at most `gap_pages` past the end of the read before it (same file) extending that read, gap
/// included. On a virtual disk a small read costs about what a larger one does (latency-bound),
/// so reading a region's pages as a few runs beats one request per page in exact first-touch
/// order (bench/lazy_load_bench, a scattered 24 MiB working set in 256 MiB: 6,000 single-page
/// reads took about 200 ms, as long as reading the whole file three times). Then every page the
/// files provide, in address order, less the working-set reads of 256 KiB or more: smaller ones
/// are read again (a copy from the page cache), since skipping every working-set page cut the
/// rest into 6,000 requests of 39 KiB. A working set whose regions make up more than half the
/// file is not read first (see below). Pages the image leaves zero, or holds in memory (a memfd layer), need no read. An
/// eager load skips the working-set phase: one pass in address order is the fastest way to
/// everything.
struct load_plan {
  std::vector<memory::prefetch_extent> extents;
  std::size_t working_set_extents = 0;
  bool one_pass = false; // no selective working-set phase (see below)
};

constexpr std::uint64_t gap_pages = 16;               // 64 KiB: the kernel's own fault-around
constexpr std::uint64_t region_pages = (2u << 20) / 4096; // 2 MiB
constexpr std::uint64_t skip_min = 256u << 10;            // working-set reads the rest skips
constexpr std::size_t lead_regions = 4;                   // see one_pass below

load_plan plan_load(const memory::snapshot_image& img, const memory::guest_memory& mem,
                    const std::vector<std::uint32_t>& working_set) {
  load_plan plan;
  auto& v = plan.extents;
  const std::uint64_t pages = img.size() / memory::page_size;
  // The working set's regions in first-touch order, each with its pages.
  std::vector<std::uint32_t> region_order;
  std::vector<std::vector<std::uint32_t>> by_region((pages + region_pages - 1) / region_pages);
  std::vector<bool> in_set(pages);
  for (std::uint32_t pg : working_set) {
    if (pg >= pages || in_set[pg]) continue; // checked when decoded; cheap to be sure
    in_set[pg] = true;
    auto& r = by_region[pg / region_pages];
    if (r.empty()) region_order.push_back(static_cast<std::uint32_t>(pg / region_pages));
    r.push_back(pg);
  }
  std::vector<std::size_t> region_end; // v.size() after each region
  for (std::uint32_t region : region_order) {
    auto& list = by_region[region];
    std::sort(list.begin(), list.end());
    const std::size_t first = v.size();
    for (std::uint32_t pg : list) {
      const std::uint64_t a = std::uint64_t{pg} * memory::page_size;
      const auto* layer = img.layer_at(a);
      if (!layer || !layer->file()) continue;
      const std::uint64_t off = layer->base() + a;
      if (v.size() > first && v.back().fd == layer->fd()) {
        auto& last = v.back();
        const std::uint64_t end = last.offset + last.length;
        if (off >= end && off - end <= gap_pages * memory::page_size) {
          bool same = true; // the gap comes from this file too (not a hole, not a layer above)
          for (std::uint64_t g = end - layer->base(); g < a && same; g += memory::page_size)
            same = img.layer_at(g) == layer;
          if (same) {
            last.length = off + memory::page_size - last.offset;
            continue;
          }
        }
      }
      v.push_back({layer->fd(), off, memory::page_size,
                   mem.host_address_for_mapping(guest_phys_addr{a})});
    }
    region_end.push_back(v.size());
  }
  // A working set spread over most of the file gains little from going first: its regions in
  // first-touch order are the whole file in random order, slower than one pass in address order
  // (lazy_load_bench, 24 MiB scattered over 256 MiB: everything resident after 110-117 ms in
  // one pass, 130-180 ms working set first). Then only its first `lead_regions` regions go
  // first (what the guest touches at once: its stack, data, the I/O buffers...), the one pass
  // follows, and the working set is resident when the pass ends.
  std::uint64_t ws_bytes = 0, file_bytes = 0;
  for (const auto& x : v)
    ws_bytes += x.length;
  for (const auto& e : img.extents())
    if (img.layers()[e.layer]->file()) file_bytes += e.hi - e.lo;
  const bool one_pass = ws_bytes * 2 > file_bytes;
  if (one_pass && region_end.size() > lead_regions) v.resize(region_end[lead_regions - 1]);
  plan.working_set_extents = v.size();
  // The rest: each file extent minus the working-set reads of at least `skip_min` (guest
  // ranges); smaller ones are read again rather than cutting the rest into small requests.
  std::vector<std::pair<std::uint64_t, std::uint64_t>> done;
  for (std::size_t i = 0; i < plan.working_set_extents; ++i)
    if (v[i].length >= skip_min) {
      const auto lo = static_cast<std::uint64_t>(v[i].host - mem.host_address_for_mapping(guest_phys_addr{0}));
      done.emplace_back(lo, lo + v[i].length);
    }
  std::sort(done.begin(), done.end());
  for (const auto& e : img.extents()) {
    const auto& layer = *img.layers()[e.layer];
    if (!layer.file()) continue;
    auto push = [&](std::uint64_t lo, std::uint64_t hi) {
      if (lo < hi)
        v.push_back({layer.fd(), layer.base() + lo, hi - lo,
                     mem.host_address_for_mapping(guest_phys_addr{lo})});
    };
    std::uint64_t at = e.lo;
    auto it = std::lower_bound(done.begin(), done.end(), std::pair{e.lo, std::uint64_t{0}});
    if (it != done.begin() && std::prev(it)->second > e.lo) --it;
    for (; it != done.end() && it->first < e.hi; ++it) {
      push(at, std::max(at, it->first));
      at = std::max(at, it->second);
    }
    push(at, e.hi);
  }
  if (one_pass) plan.working_set_extents = v.size();
  plan.one_pass = one_pass || working_set.empty();
  return plan;
}

std::chrono::nanoseconds since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t);
}

int host_prot(memory::protection p) {
  int out = PROT_NONE;
  if (memory::has(p, memory::protection::read)) out |= PROT_READ;
  if (memory::has(p, memory::protection::write)) out |= PROT_WRITE;
  return out;
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

  load_plan plan =
      plan_load(*s.image, mem, o.mode == load_mode::eager ? std::vector<std::uint32_t>{} : s.working_set);
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
    unique_fd own(::open(fmt::format("/proc/self/fd/{}", layer->fd()).c_str(), O_RDONLY | O_CLOEXEC));
    struct stat a {}, b {};
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
    const auto base = mem.host_address_for_mapping(guest_phys_addr{0});
    for (std::size_t i = 0; i < plan.extents.size(); ++i) {
      const auto lo = static_cast<std::uint64_t>(plan.extents[i].host - base);
      (i < plan.working_set_extents ? prefault_ws : prefault_all)
          .emplace_back(lo, lo + plan.extents[i].length);
    }
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
  if (!prefetcher) return;
  const auto st = prefetcher->stats();
  auto& ls = stats.load;
  ls.io_uring = st.used_io_uring;
  ls.bytes_prefetched = st.bytes_read;
  const auto offset = std::chrono::duration_cast<std::chrono::nanoseconds>(prefetch_started -
                                                                            load_started);
  if (st.working_set_done && !ls.working_set_resident) {
    ls.working_set_resident = true;
    ls.to_working_set = offset + std::chrono::duration_cast<std::chrono::nanoseconds>(st.working_set_time);
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
  if (load_complete && stats.load.mode != load_mode::demand) return;
  if (!stats.load.from_file) return;
  struct rusage ru {};
  ::getrusage(RUSAGE_THREAD, &ru);
  faults = static_cast<std::uint64_t>(ru.ru_minflt + ru.ru_majflt);
  major = static_cast<std::uint64_t>(ru.ru_majflt);
}

void sandbox::impl::after_run(std::uint64_t faults, std::uint64_t major, bool call_ended) noexcept {
  auto& ls = stats.load;
  if (ls.from_file && (!load_complete || ls.mode == load_mode::demand)) {
    struct rusage ru {};
    ::getrusage(RUSAGE_THREAD, &ru);
    ls.faults += static_cast<std::uint64_t>(ru.ru_minflt + ru.ru_majflt) - faults;
    ls.major_faults += static_cast<std::uint64_t>(ru.ru_majflt) - major;
    if (prefetcher) update_load_stats();
  }
  if (!call_ended) return;
  if (awaiting_first_result) {
    awaiting_first_result = false;
    ls.to_first_result = since(load_started);
  }
  if (rec && cpu->kind() == vcpu::backend_kind::kvm) record_resident_pages();
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
    std::vector<int> prot_of(pages, PROT_READ | PROT_WRITE);
    for (const auto& c : prot.list())
      if (const auto* reg = mem.find(c.start))
        std::fill_n(prot_of.begin() + static_cast<std::ptrdiff_t>(c.start.value / memory::page_size),
                    c.size / memory::page_size, host_prot(detail::host_level(*reg, c.to)));
    KILN_TRY_ASSIGN(r.recorder, memory::touch_recorder::start(
                                    mem.host_address_for_mapping(guest_phys_addr{0}), prot_of));
  } else {
    // KVM touches guest RAM from the kernel, where protection faults would fail KVM_RUN: the
    // pages that become resident are recorded, call by call. Those resident now (the host wrote
    // them while creating the sandbox, or an earlier call touched them) are not: they say
    // nothing about this call. So record in a sandbox just created, with load_mode::demand.
    r.seen.assign(pages, false);
    rec.emplace(std::move(r));
    record_resident_pages();
    rec->pages.clear();
    recorded.reset();
    return {};
  }
  rec.emplace(std::move(r));
  recorded.reset();
  return {};
}

void sandbox::impl::record_resident_pages() {
  auto ranges = mem.resident_ranges();
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
    record_resident_pages();
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
