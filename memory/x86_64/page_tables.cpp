// Identity page tables: 2 MiB leaves where one region covers a whole 2 MiB chunk, else 4 KiB.
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/x86_64/page_table_bits.hpp>
#include <kiln/memory/x86_64/page_tables.hpp>

#include <algorithm>

namespace kiln::memory::x86_64 {
namespace {

using pte::entries_per_table;
using pte::gib;

std::uint64_t leaf_bits(const region& r, bool use_nx) {
  // Accessed and dirty are preset: the CPU would otherwise write them into tables that live in
  // a read-only region (and, on the emulated backend, into memory it may not write).
  std::uint64_t e = pte::present | pte::accessed | pte::dirty;
  if (has(r.prot, protection::write)) e |= pte::write;
  if (use_nx && !has(r.prot, protection::exec)) e |= pte::nx;
  return e;
}

} // namespace

result<page_table_image> build_identity_page_tables(const guest_memory& mem, guest_phys_addr base,
                                                    std::uint64_t max_bytes, bool use_nx) {
  if (!is_aligned(base.value, page_size)) return error(memory_errc::unaligned, "page table base");
  const std::uint64_t mem_size = mem.address_limit(); // RAM and the file room
  const std::uint64_t pd_count = align_up(mem_size, gib) / gib;
  if (pd_count > entries_per_table) return error(memory_errc::bad_size, "memory above 512 GiB");

  std::vector<const region*> visible;
  for (const auto& r : mem.regions())
    if (r.guest_visible && r.prot != protection::none) visible.push_back(&r);

  page_table_image img;
  img.root = base;
  // Tables in order: PML4, PDPT, PD[0..pd_count), then page tables as needed.
  const std::uint64_t fixed_tables = 2 + pd_count;
  img.entries.assign(fixed_tables * entries_per_table, 0);
  auto table_addr = [&](std::uint64_t index) { return base.value + index * page_size; };
  const std::uint64_t upper = pte::upper;
  img.entries[0] = table_addr(1) | upper; // PML4[0] -> PDPT
  for (std::uint64_t g = 0; g < pd_count; ++g)
    img.entries[entries_per_table + g] = table_addr(2 + g) | upper; // PDPT[g] -> PD g

  // Walk the visible regions chunk by chunk (regions are sorted and do not overlap).
  std::size_t first = 0;
  for (std::uint64_t chunk = 0; chunk < mem_size; chunk += large_page_size) {
    const std::uint64_t chunk_end = chunk + large_page_size;
    while (first < visible.size() && visible[first]->end().value <= chunk)
      ++first;
    if (first == visible.size()) break;
    if (visible[first]->start.value >= chunk_end) continue; // nothing in this chunk
    // An index, not a reference: adding a page table below reallocates the vector.
    const std::size_t pde = (2 + chunk / gib) * entries_per_table + (chunk % gib) / large_page_size;
    const region& r0 = *visible[first];
    if (r0.start.value <= chunk && r0.end().value >= chunk_end) {
      img.entries[pde] = chunk | leaf_bits(r0, use_nx) | pte::large;
      ++img.large_pages;
      continue;
    }
    // A page table for this chunk.
    const std::uint64_t pt_index = img.entries.size() / entries_per_table;
    if ((pt_index + 1) * page_size > max_bytes)
      return error(memory_errc::layout_too_small, "page tables exceed their reserved area");
    img.entries.resize(img.entries.size() + entries_per_table, 0);
    img.entries[pde] = table_addr(pt_index) | upper;
    for (std::size_t i = first; i < visible.size() && visible[i]->start.value < chunk_end; ++i) {
      const region& r = *visible[i];
      const std::uint64_t lo = std::max(r.start.value, chunk);
      const std::uint64_t hi = std::min(r.end().value, chunk_end);
      for (std::uint64_t p = lo; p < hi; p += page_size) {
        img.entries[pt_index * entries_per_table + (p - chunk) / page_size] =
            p | leaf_bits(r, use_nx);
        ++img.small_pages;
      }
    }
  }
  if (img.bytes() > max_bytes)
    return error(memory_errc::layout_too_small, "page tables exceed their reserved area");
  return img;
}

} // namespace kiln::memory::x86_64
