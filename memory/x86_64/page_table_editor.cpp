// page_table_editor: splits 2 MiB leaves on demand, folds uniform tables back, writes only changes.
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/x86_64/page_table_bits.hpp>
#include <kiln/memory/x86_64/page_table_editor.hpp>

#include <algorithm>
#include <array>

namespace kiln::memory::x86_64 {
namespace {

using pte::addr_mask;
using pte::entries_per_table;
using pte::gib;

bool is_table_pointer(std::uint64_t pde) {
  return (pde & pte::present) && !(pde & pte::large);
}

} // namespace

page_table_editor::page_table_editor(guest_memory& mem, const page_table_image& img,
                                     std::uint64_t max_bytes, bool use_nx)
    : mem_(mem), root_(img.root), used_tables_(img.entries.size() / entries_per_table),
      max_tables_(max_bytes / page_size), nx_(use_nx) {
  // The builder's order: PML4, PDPT, then one PD per GiB, then page tables.
  std::uint64_t pds = 0;
  for (std::uint64_t g = 0; g < entries_per_table; ++g)
    if (img.entries[entries_per_table + g] & pte::present) pds = g + 1;
  pd_count_ = pds;
}

page_table_editor::page_table_editor(guest_memory& mem, const state& s, bool use_nx)
    : mem_(mem), root_(s.root), pd_count_(s.pd_count), used_tables_(s.used_tables),
      max_tables_(s.max_tables), free_(s.free), nx_(use_nx) {}

std::uint64_t page_table_editor::leaf_bits(protection p) const {
  if (p == protection::none) return 0;
  std::uint64_t e = pte::present | pte::accessed | pte::dirty;
  if (has(p, protection::write)) e |= pte::write;
  if (nx_ && !has(p, protection::exec)) e |= pte::nx;
  return e;
}

result<std::uint64_t> page_table_editor::read_entry(std::uint64_t addr) const {
  return mem_.read_object<std::uint64_t>(guest_phys_addr{addr});
}

result<void> page_table_editor::write_entry(std::uint64_t addr, std::uint64_t value) {
  ++edits_;
  return mem_.write_object(guest_phys_addr{addr}, value);
}

result<std::uint64_t> page_table_editor::allocate_table() {
  std::uint64_t addr = 0;
  if (!free_.empty()) {
    addr = free_.back();
    free_.pop_back();
  } else {
    if (used_tables_ >= max_tables_)
      return error(memory_errc::too_many_ranges, "no free page-table page for a split");
    addr = root_.value + used_tables_ * page_size;
    ++used_tables_;
  }
  return addr;
}

result<std::uint64_t> page_table_editor::splits_needed(std::uint64_t start, std::uint64_t end,
                                                       std::optional<std::uint64_t> bits) const {
  std::uint64_t n = 0;
  auto partial = [&](std::uint64_t chunk) -> result<void> {
    const std::uint64_t pd = root_.value + (2 + chunk / gib) * page_size;
    KILN_TRY_ASSIGN(auto pde, read_entry(pd + ((chunk % gib) / large_page_size) * 8));
    if (is_table_pointer(pde)) return {};
    // As set() decides: a leaf or empty entry that already says `bits` is left alone.
    const std::uint64_t have = (pde & pte::present) ? (pde & ~(pte::large | addr_mask)) : 0;
    if (!bits || have != *bits) ++n;
    return {};
  };
  const std::uint64_t first = align_down(start, large_page_size);
  const std::uint64_t last = align_down(end - 1, large_page_size);
  if (start != first || (first == last && end != first + large_page_size)) KILN_TRY(partial(first));
  if (last != first && end != last + large_page_size) KILN_TRY(partial(last));
  return n;
}

std::uint64_t page_table_editor::limit() const noexcept {
  // The tables were built for the guest's address limit; their PDs reach the GiB above it, but
  // nothing exists between the limit and that GiB for a leaf to point at.
  return std::min(pd_count_ * gib, mem_.address_limit());
}

result<std::uint64_t> page_table_editor::tables_needed(guest_phys_addr start,
                                                       std::uint64_t size) const {
  std::uint64_t end = 0;
  if (size == 0 || __builtin_add_overflow(start.value, size, &end) || end > limit())
    return error(memory_errc::out_of_bounds, "page-table range above the mapped address room");
  return splits_needed(start.value, end);
}

result<std::uint64_t> page_table_editor::set(guest_phys_addr start_addr, std::uint64_t size,
                                             protection p) {
  const std::uint64_t start = start_addr.value;
  if (size == 0 || !is_aligned(start, page_size) || !is_aligned(size, page_size))
    return error(memory_errc::unaligned, "page-table range");
  std::uint64_t end = 0;
  if (__builtin_add_overflow(start, size, &end) || end > limit())
    return error(memory_errc::out_of_bounds, "page-table range above the mapped address room");
  // Only the first and last chunk can be partial: make sure their splits can be served before
  // writing anything, so a failure leaves the tables as they were.
  const std::uint64_t bits = leaf_bits(p);
  KILN_TRY_ASSIGN(auto need, splits_needed(start, end, bits));
  if (need > free_tables())
    return error(memory_errc::too_many_ranges, "no free page-table page for a split");

  const std::uint64_t before = edits_;
  for (std::uint64_t chunk = align_down(start, large_page_size); chunk < end;
       chunk += large_page_size) {
    const std::uint64_t chunk_end = chunk + large_page_size;
    const std::uint64_t pde_addr =
        root_.value + (2 + chunk / gib) * page_size + ((chunk % gib) / large_page_size) * 8;
    KILN_TRY_ASSIGN(auto pde, read_entry(pde_addr));
    const std::uint64_t lo = std::max(start, chunk), hi = std::min(end, chunk_end);

    if (lo == chunk && hi == chunk_end) { // the whole chunk: one 2 MiB leaf (or nothing)
      const std::uint64_t want = bits ? (chunk | bits | pte::large) : 0;
      if (is_table_pointer(pde)) free_.push_back(pde & addr_mask);
      if (pde != want) KILN_TRY(write_entry(pde_addr, want));
      continue;
    }

    // Part of the chunk: work on its page table, splitting a 2 MiB leaf (or an empty entry)
    // into one first.
    std::array<std::uint64_t, entries_per_table> pt{};
    std::uint64_t pt_addr = 0;
    if (is_table_pointer(pde)) {
      pt_addr = pde & addr_mask;
      KILN_TRY(mem_.read(guest_phys_addr{pt_addr}, std::as_writable_bytes(std::span(pt))));
    } else {
      // Nothing to do if the leaf (or the absence of one) already says `p` for the part.
      const bool present = (pde & pte::present) != 0;
      const std::uint64_t have = present ? (pde & ~(pte::large | addr_mask)) : 0;
      if (have == bits) continue;
      KILN_TRY_ASSIGN(pt_addr, allocate_table());
      for (std::uint64_t i = 0; i < entries_per_table; ++i)
        pt[i] = present ? ((chunk + i * page_size) | have) : 0;
      KILN_TRY(mem_.write(guest_phys_addr{pt_addr}, std::as_bytes(std::span(pt))));
      ++edits_; // the new table, written once
    }
    bool dirty = false;
    for (std::uint64_t a = lo; a < hi; a += page_size) {
      const std::uint64_t want = bits ? (a | bits) : 0;
      std::uint64_t& e = pt[(a - chunk) / page_size];
      if (e != want) {
        e = want;
        ++edits_;
        dirty = true;
      }
    }
    // Fold a table whose entries became uniform back into one entry.
    const std::uint64_t first_flags = pt[0] & ~addr_mask;
    bool uniform = true;
    for (std::uint64_t i = 0; i < entries_per_table && uniform; ++i)
      uniform =
          (pt[i] & ~addr_mask) == first_flags &&
          (!(pt[i] & pte::present) ? pt[i] == 0 : (pt[i] & addr_mask) == chunk + i * page_size);
    if (uniform) {
      const std::uint64_t want = (pt[0] & pte::present) ? (chunk | first_flags | pte::large) : 0;
      KILN_TRY(write_entry(pde_addr, want));
      free_.push_back(pt_addr);
      continue;
    }
    if (dirty) KILN_TRY(mem_.write(guest_phys_addr{pt_addr}, std::as_bytes(std::span(pt))));
    if (pde != (pt_addr | pte::upper)) KILN_TRY(write_entry(pde_addr, pt_addr | pte::upper));
  }
  return edits_ - before;
}

void page_table_editor::state::encode(byte_writer& w) const {
  w.put(root.value);
  w.put(pd_count);
  w.put(used_tables);
  w.put(max_tables);
  w.put(static_cast<std::uint32_t>(free.size()));
  for (std::uint64_t page : free)
    w.put(page);
}

result<page_table_editor::state> page_table_editor::state::decode(byte_reader& r,
                                                                  guest_phys_addr root,
                                                                  std::uint64_t max_bytes,
                                                                  std::uint64_t address_limit) {
  state s;
  KILN_TRY_ASSIGN(s.root.value, r.get<std::uint64_t>());
  KILN_TRY_ASSIGN(s.pd_count, r.get<std::uint64_t>());
  KILN_TRY_ASSIGN(s.used_tables, r.get<std::uint64_t>());
  KILN_TRY_ASSIGN(s.max_tables, r.get<std::uint64_t>());
  KILN_TRY_ASSIGN(const auto n, r.get<std::uint32_t>());
  const std::uint64_t max_tables = max_bytes / page_size;
  if (s.root != root) return r.bad("page-table root");
  if (s.max_tables != max_tables || s.used_tables > max_tables) return r.bad("page-table capacity");
  // Checked before the multiplication below: pd_count <= 512, so it cannot overflow.
  if (s.pd_count > entries_per_table || s.pd_count == 0 || s.pd_count * gib < address_limit)
    return r.bad("page-table PD count");
  if (n > s.used_tables) return r.bad("page-table free count");
  const std::uint64_t first_free = root.value + (2 + s.pd_count) * page_size;
  const std::uint64_t end = root.value + s.used_tables * page_size;
  for (std::uint32_t i = 0; i < n; ++i) {
    KILN_TRY_ASSIGN(const auto page, r.get<std::uint64_t>());
    if (page < first_free || page >= end || !is_aligned(page, page_size))
      return r.bad("free page-table page");
    s.free.push_back(page);
  }
  return s;
}

} // namespace kiln::memory::x86_64
