// The x86-64 vCPU state a snapshot saves (general registers, FS/GS, IDT, CR2, x87/SSE), and the
// checks it passes on the way back.
#pragma once

#include <kiln/support/byte_codec.hpp>
#include <kiln/support/result.hpp>
#include <kiln/vcpu/registers.hpp>

#include <cstdint>

namespace kiln::vcpu::x86_64 {

/// A stopped vCPU's state, as a snapshot holds it.
struct cpu_state {
  registers regs;
  special_registers sregs;
  fpu_state fpu;

  /// Appends, in this order: the general registers (u64 each, in register_fields' order); FS and
  /// GS as {u64 base, u32 limit, u16 selector}; the IDT as {u64 base, u16 limit}; u64 CR2; the
  /// x87/SSE state as st0-7 (16 bytes each), u16 FCW, u16 FSW, u8 abridged FTW, u16 last opcode,
  /// u64 last IP, u64 last DP, u32 MXCSR, xmm0-15 (16 bytes each).
  void encode(byte_writer& w) const;
  /// Reads what encode() wrote. Special registers are not taken from the bytes: they are
  /// `built` (what kiln sets up for the guest), with only FS/GS base, IDT and CR2 from the bytes,
  /// so saved bytes cannot hand a backend descriptor state kiln did not build. Checks what a
  /// backend would refuse or a guest could abuse: RFLAGS bit 1 set and bits 22-63 clear, MXCSR
  /// bits 16-31 clear, the IDT inside [0, memory_size). Errors: the reader's, naming the field.
  static result<cpu_state> decode(byte_reader& r, const special_registers& built,
                                  std::uint64_t memory_size);
};

} // namespace kiln::vcpu::x86_64
