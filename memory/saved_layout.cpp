// saved_layout: the layout and RAM regions of a snapshot, written as fixed-width fields and read
// back only if they are what kiln itself would have planned.
#include <kiln/memory/saved_layout.hpp>

#include <fmt/format.h>

#include <utility>

namespace kiln::memory {

void saved_layout::encode(byte_writer& w) const {
  w.put(file_room);
  w.put(heap_size);
  w.put(stack_size);
  w.put(plan.memory_size);
  w.put(plan.image_end.value);
  w.put(plan.heap_start.value);
  w.put(plan.heap_size);
  w.put(plan.stack_guard.value);
  w.put(plan.stack_bottom.value);
  w.put(plan.stack_top.value);
}

result<saved_layout> saved_layout::decode(byte_reader& r, std::uint64_t memory_size) {
  saved_layout s;
  KILN_TRY_ASSIGN(s.file_room, r.get<std::uint64_t>());
  KILN_TRY_ASSIGN(s.heap_size, r.get<std::uint64_t>());
  KILN_TRY_ASSIGN(s.stack_size, r.get<std::uint64_t>());
  std::uint64_t v[7];
  for (auto& x : v) {
    KILN_TRY_ASSIGN(x, r.get<std::uint64_t>());
  }
  // The plan must be the one kiln makes for these sizes and this image end.
  auto planned = plan_layout({memory_size, s.heap_size, s.stack_size}, guest_phys_addr{v[1]});
  if (!planned) return r.bad("layout does not plan: " + planned.err().message());
  const layout& l = *planned;
  if (v[0] != l.memory_size || v[2] != l.heap_start.value || v[3] != l.heap_size ||
      v[4] != l.stack_guard.value || v[5] != l.stack_bottom.value || v[6] != l.stack_top.value)
    return r.bad("layout differs from kiln's plan for its sizes");
  if (s.file_room > fixed::max_file_room || !is_aligned(s.file_room, large_page_size))
    return r.bad("file room");
  s.plan = l;
  return s;
}

void encode_regions(byte_writer& w, std::span<const region> regions) {
  w.put(static_cast<std::uint32_t>(regions.size()));
  for (const auto& r : regions) {
    w.put(r.start.value);
    w.put(r.size);
    w.put(static_cast<std::uint8_t>(r.kind));
    w.put(static_cast<std::uint8_t>(r.prot));
    w.put(static_cast<std::uint8_t>(r.guest_visible));
    w.str(r.name);
  }
}

namespace {

/// Whether `reg` is where kiln puts a region of its kind, with the rights kiln gives it.
bool where_kiln_puts_it(const region& reg, const saved_layout& l) {
  using k = region_kind;
  if (reg.kind == k::image) {
    std::uint64_t end = 0;
    return reg.guest_visible && reg.prot != protection::none && reg.start >= fixed::image_base &&
           !__builtin_add_overflow(reg.start.value, reg.size, &end) &&
           end <= l.plan.image_end.value &&
           !(has(reg.prot, protection::write) && has(reg.prot, protection::exec));
  }
  const auto e = kiln_region(reg.kind, l.plan, l.stack_size);
  if (!e) return false; // a file region: files are not RAM regions
  return reg.start == e->start && reg.size == e->size && reg.prot == e->prot &&
         reg.guest_visible == e->guest_visible;
}

} // namespace

result<std::vector<region>> decode_regions(byte_reader& r, const saved_layout& l) {
  KILN_TRY_ASSIGN(const auto n, r.get<std::uint32_t>());
  if (n > max_saved_regions) return r.bad("too many regions");
  std::vector<region> out;
  for (std::uint32_t i = 0; i < n; ++i) {
    region reg;
    KILN_TRY_ASSIGN(reg.start.value, r.get<std::uint64_t>());
    KILN_TRY_ASSIGN(reg.size, r.get<std::uint64_t>());
    KILN_TRY_ASSIGN(const auto kind, r.get<std::uint8_t>());
    KILN_TRY_ASSIGN(const auto prot, r.get<std::uint8_t>());
    KILN_TRY_ASSIGN(const auto visible, r.get<std::uint8_t>());
    KILN_TRY_ASSIGN(reg.name, r.str(max_saved_name));
    if (kind > static_cast<std::uint8_t>(region_kind::stack) || prot > 7 || visible > 1)
      return r.bad("region enum out of range");
    reg.kind = static_cast<region_kind>(kind);
    reg.prot = static_cast<protection>(prot);
    reg.guest_visible = visible != 0;
    if (!where_kiln_puts_it(reg, l))
      return r.bad(fmt::format("region '{}' is not where kiln puts it", reg.name));
    out.push_back(std::move(reg));
  }
  return out;
}

} // namespace kiln::memory
