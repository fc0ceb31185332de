// x86-64 specifics of the KVM backend: register conversions, the guest's CPUID, reserved GPAs.
#pragma once

#include <kiln/vcpu/registers.hpp>

#include <cstdint>
#include <span>

#include <linux/kvm.h>

namespace kiln::vcpu::kvm::x86_64 {

/// KVM_SET_TSS_ADDR: three pages that Intel hosts without "unrestricted guest" use to emulate
/// real mode. Far above any sandbox's memory, below the 4 GiB MMIO hole (kvmtool, Firecracker
/// and QEMU use the same address).
inline constexpr std::uint64_t tss_addr = 0xfffbd000;
/// KVM's default EPT identity-map page (one page below the TSS), used on the same hosts. kiln
/// leaves it at its default; KVM_SET_IDENTITY_MAP_ADDR would only move it.
inline constexpr std::uint64_t identity_map_addr = 0xfffbc000;
/// No memslot may overlap [reserved_gpa_start, reserved_gpa_end): those pages, and the rest up
/// to 4 GiB, stay KVM's. Guest RAM ends below them; the file room may lie above 4 GiB.
inline constexpr std::uint64_t reserved_gpa_start = identity_map_addr;
inline constexpr std::uint64_t reserved_gpa_end = 0x100000000;

registers from_kvm(const kvm_regs& r) noexcept;
kvm_regs to_kvm(const registers& r) noexcept;

special_registers from_kvm(const kvm_sregs& s) noexcept;
/// Writes `s` over the fields of `out` that kiln models; leaves apic_base as given and clears
/// interrupt_bitmap (a set bit there would inject an interrupt on KVM_SET_SREGS).
void to_kvm(const special_registers& s, kvm_sregs& out) noexcept;

fpu_state from_kvm(const kvm_fpu& f) noexcept;
kvm_fpu to_kvm(const fpu_state& f) noexcept;

/// Narrows KVM_GET_SUPPORTED_CPUID to what a kiln guest may see: no VMX or SVM (nested
/// virtualization hidden), no x2APIC or TSC-deadline timer (there is no in-kernel local APIC),
/// and no KVM paravirtual features (kvmclock and friends would make KVM write guest memory
/// behind the snapshot's back).
void restrict_guest_cpuid(std::span<kvm_cpuid_entry2> entries) noexcept;

} // namespace kiln::vcpu::kvm::x86_64
