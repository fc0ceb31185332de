// Field-by-field conversions between kiln's register types and KVM's, and the guest CPUID filter.
#include <kiln/vcpu/kvm/x86_64/kvm_state.hpp>

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstring>

namespace kiln::vcpu::kvm::x86_64 {

namespace {

segment from_kvm(const kvm_segment& k) noexcept {
  segment s;
  s.base = k.base;
  s.limit = k.limit;
  s.selector = k.selector;
  s.type = k.type;
  s.present = k.present != 0;
  s.dpl = k.dpl;
  s.db = k.db != 0;
  s.s = k.s != 0;
  s.l = k.l != 0;
  s.g = k.g != 0;
  s.avl = k.avl != 0;
  s.unusable = k.unusable != 0;
  return s;
}

kvm_segment to_kvm(const segment& s) noexcept {
  kvm_segment k{};
  k.base = s.base;
  k.limit = s.limit;
  k.selector = s.selector;
  k.type = static_cast<std::uint8_t>(s.type & 0xf);
  k.present = s.present;
  k.dpl = static_cast<std::uint8_t>(s.dpl & 0x3);
  k.db = s.db;
  k.s = s.s;
  k.l = s.l;
  k.g = s.g;
  k.avl = s.avl;
  k.unusable = s.unusable;
  return k;
}

descriptor_table from_kvm(const kvm_dtable& d) noexcept {
  return {d.base, d.limit};
}

kvm_dtable to_kvm(const descriptor_table& d) noexcept {
  kvm_dtable k{};
  k.base = d.base;
  k.limit = d.limit;
  return k;
}

// CPUID bits (Intel SDM vol. 2A, CPUID; AMD APM vol. 3, appendix E).
constexpr std::uint32_t leaf1_ecx_vmx = 1u << 5;
constexpr std::uint32_t leaf1_ecx_x2apic = 1u << 21;
constexpr std::uint32_t leaf1_ecx_tsc_deadline = 1u << 24;
constexpr std::uint32_t ext1_ecx_svm = 1u << 2;
constexpr std::uint32_t kvm_cpuid_features_leaf = 0x40000001; // KVM_CPUID_FEATURES

} // namespace

// kvm_regs is the eighteen general registers in register_fields' order (checked here), so the
// conversion is a copy of the array.
static_assert(sizeof(kvm_regs) == register_count * sizeof(std::uint64_t));
static_assert(offsetof(kvm_regs, rax) == 0 && offsetof(kvm_regs, rbp) == 7 * 8 &&
              offsetof(kvm_regs, r8) == 8 * 8 && offsetof(kvm_regs, r15) == 15 * 8 &&
              offsetof(kvm_regs, rip) == 16 * 8 && offsetof(kvm_regs, rflags) == 17 * 8);

registers from_kvm(const kvm_regs& r) noexcept {
  return from_array(std::bit_cast<std::array<std::uint64_t, register_count>>(r));
}

kvm_regs to_kvm(const registers& r) noexcept {
  return std::bit_cast<kvm_regs>(to_array(r));
}

special_registers from_kvm(const kvm_sregs& s) noexcept {
  special_registers o;
  o.cs = from_kvm(s.cs);
  o.ds = from_kvm(s.ds);
  o.es = from_kvm(s.es);
  o.fs = from_kvm(s.fs);
  o.gs = from_kvm(s.gs);
  o.ss = from_kvm(s.ss);
  o.tr = from_kvm(s.tr);
  o.ldt = from_kvm(s.ldt);
  o.gdt = from_kvm(s.gdt);
  o.idt = from_kvm(s.idt);
  o.cr0 = s.cr0;
  o.cr2 = s.cr2;
  o.cr3 = s.cr3;
  o.cr4 = s.cr4;
  o.cr8 = s.cr8;
  o.efer = s.efer;
  return o;
}

void to_kvm(const special_registers& s, kvm_sregs& out) noexcept {
  out.cs = to_kvm(s.cs);
  out.ds = to_kvm(s.ds);
  out.es = to_kvm(s.es);
  out.fs = to_kvm(s.fs);
  out.gs = to_kvm(s.gs);
  out.ss = to_kvm(s.ss);
  out.tr = to_kvm(s.tr);
  out.ldt = to_kvm(s.ldt);
  out.gdt = to_kvm(s.gdt);
  out.idt = to_kvm(s.idt);
  out.cr0 = s.cr0;
  out.cr2 = s.cr2;
  out.cr3 = s.cr3;
  out.cr4 = s.cr4;
  out.cr8 = s.cr8;
  out.efer = s.efer;
  std::fill(std::begin(out.interrupt_bitmap), std::end(out.interrupt_bitmap), 0);
}

fpu_state from_kvm(const kvm_fpu& f) noexcept {
  fpu_state o;
  for (std::size_t i = 0; i < o.st.size(); ++i)
    std::memcpy(o.st[i].data(), f.fpr[i], o.st[i].size());
  o.fcw = f.fcw;
  o.fsw = f.fsw;
  o.ftw = f.ftwx;
  o.last_opcode = f.last_opcode;
  o.last_ip = f.last_ip;
  o.last_dp = f.last_dp;
  o.mxcsr = f.mxcsr;
  for (std::size_t i = 0; i < o.xmm.size(); ++i)
    std::memcpy(o.xmm[i].data(), f.xmm[i], o.xmm[i].size());
  return o;
}

kvm_fpu to_kvm(const fpu_state& f) noexcept {
  kvm_fpu o{};
  static_assert(sizeof(o.fpr) == sizeof(f.st) && sizeof(o.xmm) == sizeof(f.xmm));
  for (std::size_t i = 0; i < f.st.size(); ++i)
    std::memcpy(o.fpr[i], f.st[i].data(), f.st[i].size());
  o.fcw = f.fcw;
  o.fsw = f.fsw;
  o.ftwx = f.ftw;
  o.last_opcode = f.last_opcode;
  o.last_ip = f.last_ip;
  o.last_dp = f.last_dp;
  o.mxcsr = f.mxcsr;
  for (std::size_t i = 0; i < f.xmm.size(); ++i)
    std::memcpy(o.xmm[i], f.xmm[i].data(), f.xmm[i].size());
  return o;
}

void restrict_guest_cpuid(std::span<kvm_cpuid_entry2> entries) noexcept {
  for (auto& e : entries) {
    switch (e.function) {
    case 0x1:
      e.ecx &= ~(leaf1_ecx_vmx | leaf1_ecx_x2apic | leaf1_ecx_tsc_deadline);
      break;
    case 0x80000001:
      e.ecx &= ~ext1_ecx_svm;
      break;
    case kvm_cpuid_features_leaf:
      // The hypervisor signature leaf (0x40000000) stays, so the guest still sees "KVMKVMKVM";
      // it is just offered no paravirtual feature.
      e.eax = 0;
      e.edx = 0;
      break;
    default:
      break;
    }
  }
}

} // namespace kiln::vcpu::kvm::x86_64
