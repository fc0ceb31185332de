// The special-register state that puts a fresh vCPU straight into 64-bit long mode.
#pragma once

#include <kiln/memory/x86_64/system_tables.hpp>
#include <kiln/vcpu/registers.hpp>

#include <cstdint>

namespace kiln::vcpu::x86_64 {

struct long_mode_params {
  std::uint64_t cr3; // PML4 address
  std::uint64_t gdt_base;
  std::uint16_t gdt_limit;
  std::uint64_t tss_base;
  std::uint32_t tss_limit;
  bool nx; // set EFER.NXE (KVM); the emulated backend has no NX
};

/// CR0 = PE|MP|ET|NE|WP|PG (EM clear: SSE works), CR4 = PAE|OSFXSR|OSXMMEXCPT,
/// EFER = LME|LMA (+NXE), CS = 64-bit code 0x08, data segments 0x10, TR = the 64-bit TSS 0x18.
special_registers long_mode_state(const long_mode_params& p);

/// The same, over page tables rooted at `cr3` and the GDT and TSS that `sys` describes: what a
/// fresh sandbox, a snapshot being loaded and a bare test guest all start from.
special_registers long_mode_state(memory::guest_phys_addr cr3,
                                  const memory::x86_64::system_tables& sys, bool nx);

} // namespace kiln::vcpu::x86_64
