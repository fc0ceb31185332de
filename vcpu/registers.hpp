// Backend-neutral x86-64 register state: general, special (segments, control) and FPU/SSE.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace kiln::vcpu {

struct registers {
  std::uint64_t rax = 0, rbx = 0, rcx = 0, rdx = 0, rsi = 0, rdi = 0, rsp = 0, rbp = 0;
  std::uint64_t r8 = 0, r9 = 0, r10 = 0, r11 = 0, r12 = 0, r13 = 0, r14 = 0, r15 = 0;
  std::uint64_t rip = 0, rflags = 0x2;
  bool operator==(const registers&) const = default;
};

/// The general registers in one fixed order, with their names: the order in which each backend
/// copies them, the snapshot codec stores them (and must keep), and the tests walk them. KVM's
/// `kvm_regs` lists the same eighteen in the same order.
struct register_field {
  std::string_view name;
  std::uint64_t registers::*field;
};
inline constexpr std::array<register_field, 18> register_fields{{
    {"rax", &registers::rax},
    {"rbx", &registers::rbx},
    {"rcx", &registers::rcx},
    {"rdx", &registers::rdx},
    {"rsi", &registers::rsi},
    {"rdi", &registers::rdi},
    {"rsp", &registers::rsp},
    {"rbp", &registers::rbp},
    {"r8", &registers::r8},
    {"r9", &registers::r9},
    {"r10", &registers::r10},
    {"r11", &registers::r11},
    {"r12", &registers::r12},
    {"r13", &registers::r13},
    {"r14", &registers::r14},
    {"r15", &registers::r15},
    {"rip", &registers::rip},
    {"rflags", &registers::rflags},
}};
inline constexpr std::size_t register_count = register_fields.size();

/// The registers as an array in register_fields' order, and back.
constexpr std::array<std::uint64_t, register_count> to_array(const registers& r) noexcept {
  std::array<std::uint64_t, register_count> a{};
  for (std::size_t i = 0; i < register_count; ++i)
    a[i] = r.*register_fields[i].field;
  return a;
}
constexpr registers from_array(const std::array<std::uint64_t, register_count>& a) noexcept {
  registers r;
  for (std::size_t i = 0; i < register_count; ++i)
    r.*register_fields[i].field = a[i];
  return r;
}

struct segment {
  std::uint64_t base = 0;
  std::uint32_t limit = 0;
  std::uint16_t selector = 0;
  std::uint8_t type = 0; // descriptor type field (4 bits)
  bool present = false;
  std::uint8_t dpl = 0;
  bool db = false; // default operand size (0 in 64-bit code)
  bool s = false;  // code/data (true) or system (false)
  bool l = false;  // 64-bit code
  bool g = false;  // limit in 4 KiB units
  bool avl = false;
  bool unusable = false;
  bool operator==(const segment&) const = default;
};

struct descriptor_table {
  std::uint64_t base = 0;
  std::uint16_t limit = 0;
  bool operator==(const descriptor_table&) const = default;
};

struct special_registers {
  segment cs, ds, es, fs, gs, ss, tr, ldt;
  descriptor_table gdt, idt;
  std::uint64_t cr0 = 0, cr2 = 0, cr3 = 0, cr4 = 0, cr8 = 0;
  std::uint64_t efer = 0;
  bool operator==(const special_registers&) const = default;
};

/// x87/SSE state in the layout of FXSAVE's fields (no AVX: guests are built with -mno-avx).
struct fpu_state {
  std::array<std::array<std::uint8_t, 16>, 8> st{}; // x87 registers, 80 bits used of each
  std::uint16_t fcw = 0x37f;
  std::uint16_t fsw = 0;
  std::uint8_t ftw = 0; // abridged tag word, as FXSAVE stores it
  std::uint16_t last_opcode = 0;
  std::uint64_t last_ip = 0;
  std::uint64_t last_dp = 0;
  std::uint32_t mxcsr = 0x1f80;
  std::array<std::array<std::uint8_t, 16>, 16> xmm{};
  bool operator==(const fpu_state&) const = default;
};

// Bits used to build long-mode state.
namespace x86 {
inline constexpr std::uint64_t cr0_pe = 1ull << 0, cr0_mp = 1ull << 1, cr0_em = 1ull << 2,
                               cr0_et = 1ull << 4, cr0_ne = 1ull << 5, cr0_wp = 1ull << 16,
                               cr0_pg = 1ull << 31;
inline constexpr std::uint64_t cr4_pae = 1ull << 5, cr4_osfxsr = 1ull << 9,
                               cr4_osxmmexcpt = 1ull << 10;
inline constexpr std::uint64_t efer_sce = 1ull << 0, efer_lme = 1ull << 8, efer_lma = 1ull << 10,
                               efer_nxe = 1ull << 11;
inline constexpr std::uint32_t msr_efer = 0xc0000080, msr_fs_base = 0xc0000100,
                               msr_gs_base = 0xc0000101;
} // namespace x86

} // namespace kiln::vcpu
