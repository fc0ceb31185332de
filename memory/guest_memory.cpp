// guest_memory: region table and bounds-checked copies in and out of guest memory.
#include <kiln/memory/guest_memory.hpp>
#include <kiln/memory/layout.hpp>

#include <kiln/memory/detail/pagemap_scan.hpp>
#include <kiln/support/unique_fd.hpp>

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

namespace kiln::memory {

const char* to_string(region_kind k) noexcept {
  switch (k) {
  case region_kind::boot_info:
    return "boot_info";
  case region_kind::system_tables:
    return "system_tables";
  case region_kind::page_tables:
    return "page_tables";
  case region_kind::ist_stack:
    return "ist_stack";
  case region_kind::io_in:
    return "io_in";
  case region_kind::io_out:
    return "io_out";
  case region_kind::image:
    return "image";
  case region_kind::heap:
    return "heap";
  case region_kind::stack:
    return "stack";
  case region_kind::file:
    return "file";
  }
  return "?";
}

std::optional<region> kiln_region(region_kind k, const layout& l, std::uint64_t stack_size) {
  using k_ = region_kind;
  auto at = [k](guest_phys_addr start, std::uint64_t size, protection prot, bool visible) {
    return region{to_string(k), k, start, size, prot, visible};
  };
  switch (k) {
  case k_::boot_info:
    return at(fixed::boot_info, fixed::boot_info_size, prot_r, true);
  case k_::system_tables:
    return at(fixed::system_tables, fixed::system_tables_size, prot_r, true);
  case k_::page_tables:
    return at(fixed::page_tables, fixed::page_tables_max, prot_r, false);
  case k_::ist_stack:
    return at(fixed::ist_stack, fixed::ist_stack_size, prot_rw, true);
  case k_::io_in:
    return at(fixed::io_in, fixed::io_buffer_size, prot_rw, true);
  case k_::io_out:
    return at(fixed::io_out, fixed::io_buffer_size, prot_rw, true);
  case k_::heap:
    return at(l.heap_start, l.heap_size, prot_rw, true);
  case k_::stack:
    return at(l.stack_bottom, stack_size, prot_rw, true);
  case k_::image:
  case k_::file:
    return std::nullopt;
  }
  return std::nullopt;
}

result<guest_memory> guest_memory::create(std::uint64_t size, std::uint64_t file_room) {
  if (size < fixed::min_memory || size > fixed::max_memory || !is_aligned(size, page_size))
    return error(memory_errc::bad_size, "guest memory size must be page-aligned, 4 MiB..64 GiB");
  if (file_room > fixed::max_file_room || !is_aligned(file_room, large_page_size))
    return error(memory_errc::bad_size, "file room must be a multiple of 2 MiB, at most 64 GiB");
  KILN_TRY_ASSIGN(auto m, host_mapping::anonymous(size, /*guards=*/true, file_room));
  return guest_memory(std::move(m));
}

result<void> guest_memory::add_region(region r) {
  if (r.size == 0) return error(memory_errc::bad_size, "empty region " + r.name);
  if (!is_aligned(r.start.value, page_size) || !is_aligned(r.size, page_size))
    return error(memory_errc::unaligned, "region " + r.name);
  std::uint64_t end = 0;
  if (__builtin_add_overflow(r.start.value, r.size, &end) || end > address_limit())
    return error(memory_errc::out_of_bounds, "region " + r.name + " outside guest memory");
  const bool in_room = r.start.value >= size();
  if ((r.kind == region_kind::file) != in_room || (!in_room && end > size()))
    return error(
        memory_errc::out_of_bounds,
        "region " + r.name +
            (r.kind == region_kind::file ? " outside the file room" : " outside guest RAM"));
  auto pos = std::lower_bound(regions_.begin(), regions_.end(), r.start,
                              [](const region& a, guest_phys_addr s) { return a.start < s; });
  if (pos != regions_.end() && pos->start.value < end)
    return error(memory_errc::overlapping_region, r.name + " overlaps " + pos->name);
  if (pos != regions_.begin() && std::prev(pos)->end() > r.start)
    return error(memory_errc::overlapping_region, r.name + " overlaps " + std::prev(pos)->name);
  regions_.insert(pos, std::move(r));
  return {};
}

result<void> guest_memory::remove_region(guest_phys_addr start) {
  auto pos = std::find_if(regions_.begin(), regions_.end(),
                          [&](const region& r) { return r.start == start; });
  if (pos == regions_.end()) return error(memory_errc::out_of_bounds, "no region starts there");
  if (pos->kind != region_kind::file)
    return error(memory_errc::out_of_bounds, "only file regions can be removed");
  regions_.erase(pos);
  return {};
}

result<std::byte*> guest_memory::host_range(guest_phys_addr a, std::uint64_t len, bool room) const {
  if (len == 0 || !is_aligned(a.value, page_size) || !is_aligned(len, page_size))
    return error(memory_errc::unaligned, "host range");
  std::uint64_t end = 0;
  const std::uint64_t lo = room ? size() : 0, hi = room ? address_limit() : size();
  if (__builtin_add_overflow(a.value, len, &end) || a.value < lo || end > hi)
    return error(memory_errc::out_of_bounds,
                 room ? "range outside the file room" : "range outside guest RAM");
  return mapping_.data() + a.value;
}

namespace {
/// The host mapping's bits for `p` (write implies read; exec is the guest's business).
int host_bits(protection p) {
  int prot = PROT_NONE;
  if (has(p, protection::read)) prot |= PROT_READ;
  if (has(p, protection::write)) prot |= PROT_READ | PROT_WRITE;
  return prot;
}
} // namespace

result<void> guest_memory::host_protect(guest_phys_addr a, std::uint64_t len, protection p) {
  KILN_TRY_ASSIGN(auto* host, host_range(a, len, false));
  const int prot = host_bits(p);
  ++host_syscalls_;
  // SAFETY: [host, host+len) lies inside RAM of this mapping (checked above).
  if (::mprotect(host, len, prot) != 0) return errno_error("mprotect guest memory");
  return {};
}

result<void> guest_memory::discard(guest_phys_addr a, std::uint64_t len) {
  KILN_TRY_ASSIGN(auto* host, host_range(a, len, false));
  ++host_syscalls_;
  // SAFETY: as in host_protect(); private anonymous pages read as zero after MADV_DONTNEED.
  if (::madvise(host, len, MADV_DONTNEED) != 0)
    return errno_error("madvise(DONTNEED) guest memory");
  return {};
}

result<void> guest_memory::map_file(guest_phys_addr a, std::uint64_t len, int fd) {
  KILN_TRY_ASSIGN(auto* host, host_range(a, len, true));
  ++host_syscalls_;
  // SAFETY: MAP_FIXED replaces only [host, host+len), which lies in this mapping's file room
  // (checked above), never memory anything else owns.
  void* p = ::mmap(host, len, PROT_READ, MAP_SHARED | MAP_FIXED, fd, 0);
  if (p == MAP_FAILED) return errno_error("mmap host file into guest memory");
  return {};
}

result<void> guest_memory::unmap_file(guest_phys_addr a, std::uint64_t len) {
  KILN_TRY_ASSIGN(auto* host, host_range(a, len, true));
  ++host_syscalls_;
  // SAFETY: as in map_file(); the range goes back to an inaccessible reservation.
  void* p =
      ::mmap(host, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
  if (p == MAP_FAILED) return errno_error("mmap over an unmapped file");
  return {};
}

result<std::uint64_t> guest_memory::resident_bytes(guest_phys_addr a, std::uint64_t len) const {
  const bool room = a.value >= size();
  KILN_TRY_ASSIGN(auto* host, host_range(a, len, room));
  const auto lo = reinterpret_cast<std::uintptr_t>(host);
  // RAM mapped from an image: only the private copies are this guest's own; the image's pages
  // it reads are shared page cache.
  const auto filter =
      !room && image_ ? detail::page_filter::private_ : detail::page_filter::resident;
  KILN_TRY_ASSIGN(auto ranges, detail::scan_pages(lo, lo + len, filter));
  std::uint64_t bytes = 0;
  for (const auto& [b, e] : ranges)
    bytes += e - b;
  return bytes;
}

result<void> guest_memory::back_with(std::shared_ptr<const snapshot_image> img) {
  if (!img || img->size() != size())
    return error(memory_errc::bad_size, "snapshot image size differs from guest RAM");
  // Zero memory underneath (where no layer has data), then each extent from its layer.
  ++host_syscalls_;
  // SAFETY: MAP_FIXED replaces exactly the RAM part of this reservation.
  void* p = ::mmap(mapping_.data(), size(), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
  if (p == MAP_FAILED) return errno_error("mmap guest RAM under a snapshot image");
  (void)::madvise(mapping_.data(), size(), MADV_NOHUGEPAGE); // as host_mapping does
  for (const auto& e : img->extents()) {
    ++host_syscalls_;
    // SAFETY: [lo, hi) lies in RAM (extents are within the image, whose size is RAM's).
    const auto& layer = *img->layers()[e.layer];
    p = ::mmap(mapping_.data() + e.lo, e.hi - e.lo, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED,
               layer.fd(), static_cast<off_t>(layer.base() + e.lo));
    if (p == MAP_FAILED) return errno_error("mmap snapshot layer as guest RAM");
  }
  image_ = std::move(img);
  return {};
}

namespace {
result<std::vector<byte_range>> scan_ram(const std::byte* base, std::uint64_t size,
                                         detail::page_filter filter) {
  const auto lo = reinterpret_cast<std::uintptr_t>(base);
  KILN_TRY_ASSIGN(auto ranges, detail::scan_pages(lo, lo + size, filter));
  std::vector<byte_range> out;
  out.reserve(ranges.size());
  for (const auto& [b, e] : ranges)
    out.emplace_back(b - lo, e - lo);
  return out;
}
} // namespace

result<std::vector<byte_range>> guest_memory::dirty_ranges() const {
  return scan_ram(mapping_.data(), size(),
                  image_ ? detail::page_filter::private_ : detail::page_filter::resident);
}

result<touch_recorder> guest_memory::record_touches(std::span<const protection> page_prot) const {
  if (page_prot.size() != size() / page_size)
    return error(std::make_error_code(std::errc::invalid_argument), "one protection per RAM page");
  std::vector<int> bits(page_prot.size());
  std::transform(page_prot.begin(), page_prot.end(), bits.begin(), host_bits);
  return touch_recorder::start(mapping_.data(), bits);
}

result<void> guest_memory::set_read_around(bool on) {
  ++host_syscalls_;
  // SAFETY: advice only, over RAM this object owns; contents and protections are unchanged.
  if (::madvise(mapping_.data(), size(), on ? MADV_NORMAL : MADV_RANDOM) != 0)
    return errno_error("madvise(NORMAL/RANDOM) guest memory");
  return {};
}

result<std::vector<byte_range>> guest_memory::resident_ranges() const {
  return scan_ram(mapping_.data(), size(), detail::page_filter::resident);
}

result<std::vector<byte_range>> guest_memory::touched_ranges() const {
  return scan_ram(mapping_.data(), size(), detail::page_filter::touched);
}

result<void> guest_memory::unmap_clean() {
  KILN_TRY_ASSIGN(auto clean, scan_ram(mapping_.data(), size(), detail::page_filter::clean));
  for (const auto& [lo, hi] : clean) {
    ++host_syscalls_;
    // SAFETY: [lo, hi) is RAM of this mapping whose pages are an image's or the zero page (the
    // scan just said so, and the guest is not running): dropping them loses nothing, and the next
    // access maps the same bytes again.
    if (::madvise(mapping_.data() + lo, hi - lo, MADV_DONTNEED) != 0)
      return errno_error("madvise(DONTNEED) of clean guest pages");
  }
  return {};
}

result<void> guest_memory::revert(guest_phys_addr a, std::uint64_t len, bool copy) {
  if (!image_) return error(memory_errc::out_of_bounds, "guest RAM has no snapshot image");
  KILN_TRY_ASSIGN(auto* host, host_range(a, len, false));
  ++host_syscalls_;
  if (!copy) {
    // SAFETY: MADV_DONTNEED drops the private copies: the next access maps the layer's page
    // again (MAP_PRIVATE file extents) or a zero page (the anonymous memory underneath).
    if (::madvise(host, len, MADV_DONTNEED) != 0) return errno_error("madvise(DONTNEED) revert");
    return {};
  }
  // SAFETY: [host, host+len) is RAM of this mapping and host-writable (the caller's contract).
  // One read per run of pages from the same layer; zeros where no layer has data.
  for (std::uint64_t at = a.value, end = a.value + len; at < end;) {
    std::byte* dst = host + (at - a.value);
    const image_extent* e = image_->extent_at(at);
    std::uint64_t run_end = end;
    if (!e) {
      const auto& ex = image_->extents();
      auto next = std::upper_bound(ex.begin(), ex.end(), at,
                                   [](std::uint64_t v, const image_extent& x) { return v < x.lo; });
      if (next != ex.end()) run_end = std::min(run_end, next->lo);
      std::memset(dst, 0, run_end - at);
      at = run_end;
      continue;
    }
    run_end = std::min(run_end, e->hi);
    const auto& layer = *image_->layers()[e->layer];
    for (std::uint64_t done = 0; done < run_end - at;) {
      const ssize_t n = ::pread(layer.fd(), dst + done, run_end - at - done,
                                static_cast<off_t>(layer.base() + at + done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0)
        return n < 0 ? errno_error("pread snapshot layer")
                     : error(memory_errc::out_of_bounds, "snapshot layer ends early");
      done += static_cast<std::uint64_t>(n);
    }
    at = run_end;
  }
  return {};
}

const region* guest_memory::find(guest_phys_addr a) const noexcept {
  auto pos = std::upper_bound(regions_.begin(), regions_.end(), a,
                              [](guest_phys_addr s, const region& r) { return s < r.start; });
  if (pos == regions_.begin()) return nullptr;
  --pos;
  return pos->contains(a) ? &*pos : nullptr;
}

const region* guest_memory::find(region_kind k) const noexcept {
  for (const auto& r : regions_)
    if (r.kind == k) return &r;
  return nullptr;
}

result<const region*> guest_memory::check_range(guest_phys_addr a, std::uint64_t len) const {
  const region* r = find(a);
  if (!r) return error(memory_errc::out_of_bounds, "no region at address");
  std::uint64_t end = 0;
  if (__builtin_add_overflow(a.value, len, &end) || end > r->end().value)
    return error(memory_errc::out_of_bounds, "range crosses the end of region " + r->name);
  return r;
}

result<void> guest_memory::read(guest_phys_addr a, std::span<std::byte> out) const {
  KILN_TRY(check_range(a, out.size()));
  // SAFETY: [a, a+len) was checked to lie in one region, inside the host mapping.
  if (!out.empty()) std::memcpy(out.data(), mapping_.data() + a.value, out.size());
  return {};
}

result<void> guest_memory::write(guest_phys_addr a, std::span<const std::byte> in) {
  KILN_TRY(check_range(a, in.size()));
  // SAFETY: as in read().
  if (!in.empty()) std::memcpy(mapping_.data() + a.value, in.data(), in.size());
  return {};
}

result<void> guest_memory::zero(guest_phys_addr a, std::uint64_t len) {
  KILN_TRY(check_range(a, len));
  // SAFETY: as in read().
  if (len) std::memset(mapping_.data() + a.value, 0, len);
  return {};
}

} // namespace kiln::memory
