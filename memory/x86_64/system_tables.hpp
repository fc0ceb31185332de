// Builds the GDT and the 64-bit TSS (with the IST1 exception stack) for the system page.
#pragma once

#include <kiln/memory/address.hpp>

#include <array>
#include <cstddef>
#include <cstdint>

namespace kiln::memory::x86_64 {

struct system_tables {
  std::array<std::byte, page_size> page{}; // contents of the system page
  guest_phys_addr gdt_base;
  std::uint16_t gdt_limit;
  guest_phys_addr tss_base;
  std::uint32_t tss_limit;
};

/// GDT at page+gdt_offset: null, code64 (0x08), data (0x10), TSS (0x18, 16 bytes), with the
/// accessed bits preset (the page is read-only to the guest). TSS at page+tss_offset with
/// IST1 = `ist1_top` and no I/O bitmap.
system_tables build_system_tables(guest_phys_addr page, std::uint64_t ist1_top);

} // namespace kiln::memory::x86_64
