// guest_memory: region table and bounds-checked copies in and out of guest memory.
#include <kiln/memory/guest_memory.hpp>
#include <kiln/memory/layout.hpp>

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
  }
  return "?";
}

result<guest_memory> guest_memory::create(std::uint64_t size) {
  if (size < fixed::min_memory || size > fixed::max_memory || !is_aligned(size, page_size))
    return error(memory_errc::bad_size, "guest memory size must be page-aligned, 4 MiB..64 GiB");
  KILN_TRY_ASSIGN(auto m, host_mapping::anonymous(size, /*guards=*/true));
  return guest_memory(std::move(m));
}

result<void> guest_memory::add_region(region r) {
  if (r.size == 0) return error(memory_errc::bad_size, "empty region " + r.name);
  if (!is_aligned(r.start.value, page_size) || !is_aligned(r.size, page_size))
    return error(memory_errc::unaligned, "region " + r.name);
  std::uint64_t end = 0;
  if (__builtin_add_overflow(r.start.value, r.size, &end) || end > size())
    return error(memory_errc::out_of_bounds, "region " + r.name + " outside guest memory");
  auto pos = std::lower_bound(regions_.begin(), regions_.end(), r.start,
                              [](const region& a, guest_phys_addr s) { return a.start < s; });
  if (pos != regions_.end() && pos->start.value < end)
    return error(memory_errc::overlapping_region, r.name + " overlaps " + pos->name);
  if (pos != regions_.begin() && std::prev(pos)->end() > r.start)
    return error(memory_errc::overlapping_region, r.name + " overlaps " + std::prev(pos)->name);
  regions_.insert(pos, std::move(r));
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
