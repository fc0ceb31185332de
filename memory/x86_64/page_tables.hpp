// Builds x86-64 identity page tables for guest memory: 2 MiB pages where a region allows.
#pragma once

#include <kiln/memory/address.hpp>
#include <kiln/memory/guest_memory.hpp>
#include <kiln/support/result.hpp>

#include <cstdint>
#include <vector>

namespace kiln::memory::x86_64 {

struct page_table_image {
  std::vector<std::uint64_t> entries; // the tables, 512 entries a page, PML4 first
  guest_phys_addr root;               // address of the PML4 (CR3)
  std::uint64_t large_pages = 0;      // 2 MiB mappings
  std::uint64_t small_pages = 0;      // 4 KiB mappings
  std::uint64_t bytes() const { return entries.size() * 8; }
};

/// Builds tables (to be placed at `base`) that identity-map every guest-visible region with its
/// protection: writable only if the region is, NX on non-executable regions when `use_nx`
/// (the emulated backend has no NX: it enforces execute rights per region instead). Accessed
/// and dirty bits are preset so the CPU never writes to the tables. Gaps stay unmapped.
result<page_table_image> build_identity_page_tables(const guest_memory& mem, guest_phys_addr base,
                                                    std::uint64_t max_bytes, bool use_nx);

} // namespace kiln::memory::x86_64
