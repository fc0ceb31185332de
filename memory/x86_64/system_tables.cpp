// The system page: a flat 64-bit GDT and a TSS whose IST1 is the exception stack.
#include <kiln/guest/abi.h>
#include <kiln/memory/layout.hpp>
#include <kiln/memory/x86_64/system_tables.hpp>

#include <cstring>

namespace kiln::memory::x86_64 {
namespace {

// Code/data descriptor: base 0, limit 0xfffff, G=1; `access` includes the accessed bit so the
// CPU never writes the (read-only) GDT when it loads a selector.
constexpr std::uint64_t descriptor(std::uint8_t access, std::uint8_t flags) {
  return 0xffffull | (std::uint64_t{access} << 40) | (0xfull << 48) | (std::uint64_t{flags} << 52);
}

struct [[gnu::packed]] tss64 {
  std::uint32_t reserved0;
  std::uint64_t rsp[3];
  std::uint64_t reserved1;
  std::uint64_t ist[7];
  std::uint64_t reserved2;
  std::uint16_t reserved3;
  std::uint16_t iomap_base;
};
static_assert(sizeof(tss64) == 104);

} // namespace

system_tables build_system_tables(guest_phys_addr page, std::uint64_t ist1_top) {
  system_tables t;
  t.gdt_base = page + fixed::gdt_offset;
  t.tss_base = page + fixed::tss_offset;
  t.tss_limit = sizeof(tss64) - 1;

  // Access bytes: P=1, DPL 0, S=1; code: type execute/read + accessed (0x9b), L=1 (flags 0xa);
  // data: type read/write + accessed (0x93), flags G (0x8) with D/B=1 (0xc).
  std::uint64_t gdt[5] = {};
  gdt[KILN_GDT_CODE64 / 8] = descriptor(0x9b, 0xa);
  gdt[KILN_GDT_DATA / 8] = descriptor(0x93, 0xc);
  // 64-bit TSS descriptor (16 bytes): type 0xb (busy: KVM loads TR from sregs, the CPU never
  // runs LTR, and a busy type is what a loaded TR holds), P=1.
  const std::uint64_t b = t.tss_base.value;
  gdt[KILN_GDT_TSS / 8] = (t.tss_limit & 0xffffull) | ((b & 0xffffffull) << 16) | (0x8bull << 40) |
                          ((b >> 24 & 0xffull) << 56);
  gdt[KILN_GDT_TSS / 8 + 1] = b >> 32;
  t.gdt_limit = sizeof gdt - 1;
  std::memcpy(t.page.data() + fixed::gdt_offset, gdt, sizeof gdt);

  tss64 tss{};
  tss.ist[0] = ist1_top;
  tss.iomap_base = sizeof(tss64); // no I/O permission bitmap
  std::memcpy(t.page.data() + fixed::tss_offset, &tss, sizeof tss);
  return t;
}

} // namespace kiln::memory::x86_64
