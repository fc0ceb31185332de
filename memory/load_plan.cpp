// load_plan: the order in which a load reads a snapshot file's pages.
#include <kiln/memory/load_plan.hpp>

#include <algorithm>
#include <iterator>
#include <span>
#include <utility>
#include <vector>

namespace kiln::memory {
namespace {

constexpr std::uint64_t gap_pages = 16;                   // 64 KiB: the kernel's own fault-around
constexpr std::uint64_t region_pages = (2u << 20) / 4096; // 2 MiB
constexpr std::uint64_t skip_min = 256u << 10;            // working-set reads the rest skips
constexpr std::size_t lead_regions = 4;                   // see one_pass below

/// The working set's pages grouped by 2 MiB region.
struct ws_regions {
  std::vector<std::uint32_t> order;              // region numbers, in first-touch order
  std::vector<std::vector<std::uint32_t>> pages; // each region's pages, by region number
};

/// `working_set` (guest page numbers in first-touch order) grouped by region, each page once.
ws_regions group_by_region(std::span<const std::uint32_t> working_set, std::uint64_t pages) {
  ws_regions out;
  out.pages.resize((pages + region_pages - 1) / region_pages);
  std::vector<bool> in_set(pages);
  for (std::uint32_t pg : working_set) {
    if (pg >= pages || in_set[pg]) continue; // checked when decoded; cheap to be sure
    in_set[pg] = true;
    auto& r = out.pages[pg / region_pages];
    if (r.empty()) out.order.push_back(static_cast<std::uint32_t>(pg / region_pages));
    r.push_back(pg);
  }
  return out;
}

/// Whether every page of guest [lo, hi) comes from `layer` (not a hole, not a layer above).
bool all_from(const snapshot_image& img, const snapshot_layer* layer, std::uint64_t lo,
              std::uint64_t hi) {
  bool same = true;
  for (std::uint64_t g = lo; g < hi && same; g += page_size)
    same = img.layer_at(g) == layer;
  return same;
}

/// Appends to `v` the reads of one region's working-set pages (`list`, sorted here), in address
/// order; a page at most `gap_pages` past the end of the region's read before it, in the same
/// file, extends that read, gap included.
void plan_region(std::vector<prefetch_extent>& v, const snapshot_image& img,
                 const guest_memory& mem, std::vector<std::uint32_t>& list) {
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
      // The gap must come from this file too (not a hole, not a layer above).
      if (off >= end && off - end <= gap_pages * page_size &&
          all_from(img, layer, end - layer->base(), a)) {
        last.length = off + page_size - last.offset;
        continue;
      }
    }
    v.push_back({layer->fd(), off, page_size, mem.host_address_for_mapping(guest_phys_addr{a})});
  }
}

/// Whether the working set's reads `ws` cover more than half of what the files provide, so
/// that one pass in address order reads it sooner (see plan_load).
bool one_pass_better(std::span<const prefetch_extent> ws, const snapshot_image& img) {
  std::uint64_t ws_bytes = 0, file_bytes = 0;
  for (const auto& x : ws)
    ws_bytes += x.length;
  for (const auto& e : img.extents())
    if (img.layers()[e.layer]->file()) file_bytes += e.hi - e.lo;
  return ws_bytes * 2 > file_bytes;
}

/// The guest ranges of the working-set reads `ws` of at least `skip_min`, sorted: the rest
/// leaves them out; smaller ones are read again rather than cutting the rest into small
/// requests.
std::vector<byte_range> ranges_to_skip(std::span<const prefetch_extent> ws,
                                       const guest_memory& mem) {
  std::vector<byte_range> done;
  for (const auto& x : ws)
    if (x.length >= skip_min) {
      const auto lo =
          static_cast<std::uint64_t>(x.host - mem.host_address_for_mapping(guest_phys_addr{0}));
      done.emplace_back(lo, lo + x.length);
    }
  std::sort(done.begin(), done.end());
  return done;
}

/// Appends to `v` a read of each file extent of `img`, in address order, less the guest ranges
/// `skip` (sorted).
void plan_rest(std::vector<prefetch_extent>& v, const snapshot_image& img, const guest_memory& mem,
               const std::vector<byte_range>& skip) {
  for (const auto& e : img.extents()) {
    const auto& layer = *img.layers()[e.layer];
    if (!layer.file()) continue;
    auto push = [&](std::uint64_t lo, std::uint64_t hi) {
      if (lo < hi)
        v.push_back({layer.fd(), layer.base() + lo, hi - lo,
                     mem.host_address_for_mapping(guest_phys_addr{lo})});
    };
    std::uint64_t at = e.lo;
    auto it = std::lower_bound(skip.begin(), skip.end(), std::pair{e.lo, std::uint64_t{0}});
    if (it != skip.begin() && std::prev(it)->second > e.lo) --it;
    for (; it != skip.end() && it->first < e.hi; ++it) {
      push(at, std::max(at, it->first));
      at = std::max(at, it->second);
    }
    push(at, e.hi);
  }
}

} // namespace

load_plan plan_load(const snapshot_image& img, const guest_memory& mem,
                    std::span<const std::uint32_t> working_set) {
  load_plan plan;
  auto& v = plan.extents;
  // The working set's regions in first-touch order, each with its pages.
  auto regions = group_by_region(working_set, img.size() / page_size);
  std::vector<std::size_t> region_end; // v.size() after each region
  for (std::uint32_t region : regions.order) {
    plan_region(v, img, mem, regions.pages[region]);
    region_end.push_back(v.size());
  }
  // A working set spread over most of the file gains little from going first: its regions in
  // first-touch order are the whole file in random order, slower than one pass in address order
  // (lazy_load_bench, 24 MiB scattered over 256 MiB: everything resident after 110-117 ms in
  // one pass, 130-180 ms working set first). Then only its first `lead_regions` regions go
  // first (what the guest touches at once: its stack, data, the I/O buffers...), the one pass
  // follows, and the working set is resident when the pass ends.
  const bool one_pass = one_pass_better(v, img);
  if (one_pass && region_end.size() > lead_regions) v.resize(region_end[lead_regions - 1]);
  plan.working_set_extents = v.size();
  // The rest: each file extent minus the working-set reads of at least `skip_min` (guest
  // ranges).
  const auto skip = ranges_to_skip(std::span(v).first(plan.working_set_extents), mem);
  plan_rest(v, img, mem, skip);
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
