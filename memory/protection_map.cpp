// protection_map: interval bookkeeping of page protection; tighten() returns only real changes.
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/protection_map.hpp>

#include <algorithm>
#include <iterator>

namespace kiln::memory {
namespace {

result<std::uint64_t> checked_end(guest_phys_addr start, std::uint64_t size) {
  if (size == 0 || !is_aligned(start.value, page_size) || !is_aligned(size, page_size))
    return error(memory_errc::unaligned, "protection range must be page-aligned and non-empty");
  std::uint64_t end = 0;
  if (__builtin_add_overflow(start.value, size, &end))
    return error(memory_errc::out_of_bounds, "protection range wraps");
  return end;
}

} // namespace

bool protection_map::covered(std::uint64_t start, std::uint64_t end) const {
  auto it = ranges_.upper_bound(start);
  if (it == ranges_.begin()) return false;
  --it;
  std::uint64_t at = start;
  while (at < end) {
    if (it == ranges_.end() || it->first > at || it->second.end <= at) return false;
    at = it->second.end;
    ++it;
  }
  return true;
}

void protection_map::split_at(map_t& m, std::uint64_t at) {
  auto it = m.upper_bound(at);
  if (it == m.begin()) return;
  --it;
  if (it->first < at && it->second.end > at) {
    m.emplace(at, range{it->second.end, it->second.prot});
    it->second.end = at;
  }
}

void protection_map::assign(map_t& m, std::uint64_t start, std::uint64_t end, protection p) {
  // Split the ranges that straddle either end, so [start, end) is made of whole ranges.
  split_at(m, start);
  split_at(m, end);
  m.erase(m.lower_bound(start), m.lower_bound(end));
  auto it = m.emplace(start, range{end, p}).first;
  // Merge with equal neighbours that touch.
  if (auto next = std::next(it); next != m.end() && next->first == end && next->second.prot == p) {
    it->second.end = next->second.end;
    m.erase(next);
  }
  if (it != m.begin()) {
    auto prev = std::prev(it);
    if (prev->second.end == start && prev->second.prot == p) {
      prev->second.end = it->second.end;
      m.erase(it);
    }
  }
}

result<void> protection_map::add(guest_phys_addr start, std::uint64_t size, protection p) {
  KILN_TRY_ASSIGN(auto end, checked_end(start, size));
  auto it = ranges_.lower_bound(start.value);
  if (it != ranges_.end() && it->first < end)
    return error(memory_errc::overlapping_region, "protection range overlaps a recorded one");
  if (it != ranges_.begin() && std::prev(it)->second.end > start.value)
    return error(memory_errc::overlapping_region, "protection range overlaps a recorded one");
  if (ranges_.size() + 1 > max_ranges_)
    return error(memory_errc::too_many_ranges, "protection range cap reached");
  assign(ranges_, start.value, end, p);
  return {};
}

result<void> protection_map::remove(guest_phys_addr start, std::uint64_t size) {
  KILN_TRY_ASSIGN(auto end, checked_end(start, size));
  if (!covered(start.value, end))
    return error(memory_errc::out_of_bounds, "removing pages with no recorded protection");
  // Split at both ends (no merging), then erase the whole ranges in between.
  split_at(ranges_, start.value);
  split_at(ranges_, end);
  ranges_.erase(ranges_.lower_bound(start.value), ranges_.lower_bound(end));
  return {};
}

result<std::vector<protection_change>> protection_map::tighten(guest_phys_addr start,
                                                               std::uint64_t size, protection p) {
  KILN_TRY_ASSIGN(auto changes, plan(start, size, p));
  if (!changes.empty()) assign(ranges_, start.value, start.value + size, p);
  return changes;
}

result<std::vector<protection_change>>
protection_map::plan(guest_phys_addr start, std::uint64_t size, protection p) const {
  KILN_TRY_ASSIGN(auto end, checked_end(start, size));
  if (!covered(start.value, end))
    return error(memory_errc::out_of_bounds, "pages with no recorded protection");

  std::vector<protection_change> changes;
  auto it = std::prev(ranges_.upper_bound(start.value));
  for (std::uint64_t at = start.value; at < end; ++it) {
    const std::uint64_t piece_end = std::min(end, it->second.end);
    const protection from = it->second.prot;
    if (!is_subset(p, from))
      return error(memory_errc::protection_widened, "the change would widen a page's access");
    if (from != p) {
      if (!changes.empty() && changes.back().start.value + changes.back().size == at &&
          changes.back().from == from)
        changes.back().size += piece_end - at;
      else
        changes.push_back({guest_phys_addr{at}, piece_end - at, from, p});
    }
    at = piece_end;
  }
  if (changes.empty()) return changes; // nothing to record: the redundant request is free

  // Check the cap on a copy only when the range count could pass it (it grows by at most 2).
  if (ranges_.size() + 2 > max_ranges_) {
    map_t trial = ranges_;
    assign(trial, start.value, end, p);
    if (trial.size() > max_ranges_)
      return error(memory_errc::too_many_ranges, "protection range cap reached");
  }
  return changes;
}

bool protection_map::all(guest_phys_addr start, std::uint64_t size, protection p) const {
  std::uint64_t end = 0;
  if (size == 0 || __builtin_add_overflow(start.value, size, &end)) return false;
  if (!covered(start.value, end)) return false;
  for (auto it = std::prev(ranges_.upper_bound(start.value));
       it != ranges_.end() && it->first < end; ++it)
    if (it->second.prot != p) return false;
  return true;
}

std::vector<protection_change> protection_map::list() const {
  std::vector<protection_change> out;
  out.reserve(ranges_.size());
  for (const auto& [start, r] : ranges_)
    out.push_back({guest_phys_addr{start}, r.end - start, r.prot, r.prot});
  return out;
}

protection protection_map::at(guest_phys_addr a) const {
  auto it = ranges_.upper_bound(a.value);
  if (it == ranges_.begin()) return protection::none;
  --it;
  return a.value < it->second.end ? it->second.prot : protection::none;
}

void protection_map::encode(byte_writer& w) const {
  w.put(static_cast<std::uint64_t>(max_ranges_));
  w.put(static_cast<std::uint32_t>(ranges_.size()));
  for (const auto& [start, r] : ranges_) {
    w.put(start);
    w.put(r.end - start);
    w.put(static_cast<std::uint8_t>(r.prot));
  }
}

namespace {

/// Whether every page of [start, end) lies in a guest-owned region of `regions` whose rights
/// include `p`.
bool within_owned(std::span<const region> regions, std::uint64_t start, std::uint64_t end,
                  protection p) {
  for (std::uint64_t at = start; at < end;) {
    const region* owner = nullptr;
    for (const auto& reg : regions)
      if (reg.contains(guest_phys_addr{at})) owner = &reg;
    if (!owner || !guest_owned(owner->kind) || !is_subset(p, owner->prot)) return false;
    at = std::min(end, owner->end().value);
  }
  return true;
}

} // namespace

result<protection_map> protection_map::decode(byte_reader& r, std::span<const region> regions) {
  KILN_TRY_ASSIGN(const auto cap, r.get<std::uint64_t>());
  KILN_TRY_ASSIGN(const auto n, r.get<std::uint32_t>());
  if (cap > max_saved_ranges || n > cap) return r.bad("too many protection ranges");
  protection_map m(static_cast<std::size_t>(cap));
  for (std::uint32_t i = 0; i < n; ++i) {
    KILN_TRY_ASSIGN(const auto start, r.get<std::uint64_t>());
    KILN_TRY_ASSIGN(const auto size, r.get<std::uint64_t>());
    KILN_TRY_ASSIGN(const auto bits, r.get<std::uint8_t>());
    const auto p = static_cast<protection>(bits);
    std::uint64_t end = 0;
    if (bits > 7 || __builtin_add_overflow(start, size, &end)) return r.bad("protection range");
    if (!within_owned(regions, start, end, p))
      return r.bad("protection range outside the guest's memory or wider than its region");
    if (auto a = m.add(guest_phys_addr{start}, size, p); !a)
      return r.bad("protection range: " + a.err().message());
  }
  return m;
}

} // namespace kiln::memory
