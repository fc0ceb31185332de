// load_plan: the order in which a load reads a snapshot file's pages.
#include <kiln/memory/load_plan.hpp>

#include <algorithm>

namespace kiln::memory {
namespace {

constexpr std::uint64_t gap_pages = 16;                   // 64 KiB: the kernel's own fault-around
constexpr std::uint64_t region_pages = (2u << 20) / 4096; // 2 MiB
constexpr std::uint64_t skip_min = 256u << 10;            // working-set reads the rest skips
constexpr std::size_t lead_regions = 4;                   // see one_pass below

} // namespace

load_plan plan_load(const snapshot_image& img, const guest_memory& mem,
                    std::span<const std::uint32_t> working_set) {
  load_plan plan;
  auto& v = plan.extents;
  const std::uint64_t pages = img.size() / page_size;
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
      const std::uint64_t a = std::uint64_t{pg} * page_size;
      const auto* layer = img.layer_at(a);
      if (!layer || !layer->file()) continue;
      const std::uint64_t off = layer->base() + a;
      if (v.size() > first && v.back().fd == layer->fd()) {
        auto& last = v.back();
        const std::uint64_t end = last.offset + last.length;
        if (off >= end && off - end <= gap_pages * page_size) {
          bool same = true; // the gap comes from this file too (not a hole, not a layer above)
          for (std::uint64_t g = end - layer->base(); g < a && same; g += page_size)
            same = img.layer_at(g) == layer;
          if (same) {
            last.length = off + page_size - last.offset;
            continue;
          }
        }
      }
      v.push_back({layer->fd(), off, page_size, mem.host_address_for_mapping(guest_phys_addr{a})});
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
      const auto lo =
          static_cast<std::uint64_t>(v[i].host - mem.host_address_for_mapping(guest_phys_addr{0}));
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
  const std::byte* base = mem.host_address_for_mapping(guest_phys_addr{0});
  for (const auto& x : v) {
    const auto lo = static_cast<std::uint64_t>(x.host - base);
    plan.guest.emplace_back(lo, lo + x.length);
  }
  plan.one_pass = one_pass || working_set.empty();
  return plan;
}

} // namespace kiln::memory
