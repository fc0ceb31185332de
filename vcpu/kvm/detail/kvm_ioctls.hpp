// KVM ioctl request numbers built from the kernel's argument sizes, checked at compile time.
#pragma once

#include <cstdint>

#include <linux/kvm.h>

namespace kiln::vcpu::kvm::detail {

/// The fixed part of the kernel's `struct kvm_cpuid2`: u32 nent, u32 padding, then the entries.
/// The uapi header cannot be used for the size: Linux 6.1's declares the flexible array with
/// `__DECLARE_FLEX_ARRAY`, whose empty struct has size 1 in C++, so `sizeof(struct kvm_cpuid2)`
/// is 12 in C++ (8 in C and in the kernel), and `_IOWR(..., struct kvm_cpuid2)` encodes 12: a
/// request number the kernel does not know (EINVAL).
struct kvm_cpuid2_header {
  std::uint32_t nent;
  std::uint32_t padding;
};

/// KVM_GET_SUPPORTED_CPUID and KVM_SET_CPUID2 with the kernel's size.
inline constexpr unsigned long get_supported_cpuid_request = _IOWR(KVMIO, 0x05, kvm_cpuid2_header);
inline constexpr unsigned long set_cpuid2_request = _IOW(KVMIO, 0x90, kvm_cpuid2_header);

/// KVM_PRE_FAULT_MEMORY (Linux 6.10), absent from Debian 12's headers: its argument, capability
/// and request.
struct pre_fault_memory {
  std::uint64_t gpa;
  std::uint64_t size;
  std::uint64_t flags;
  std::uint64_t padding[5];
};
inline constexpr int cap_pre_fault_memory = 236; // KVM_CAP_PRE_FAULT_MEMORY
inline constexpr unsigned long pre_fault_memory_request = _IOWR(KVMIO, 0xd5, pre_fault_memory);

// Every request kiln issues, against the numbers the kernel's own build produces (C, x86-64). A
// header whose structs grow or shrink in C++ fails the build here instead of failing at run time
// with EINVAL or ENOTTY.
static_assert(get_supported_cpuid_request == 0xc008ae05, "KVM_GET_SUPPORTED_CPUID");
static_assert(set_cpuid2_request == 0x4008ae90, "KVM_SET_CPUID2");
static_assert(pre_fault_memory_request == 0xc040aed5, "KVM_PRE_FAULT_MEMORY");
static_assert(KVM_GET_API_VERSION == 0xae00 && KVM_CREATE_VM == 0xae01 &&
                  KVM_CHECK_EXTENSION == 0xae03 && KVM_GET_VCPU_MMAP_SIZE == 0xae04 &&
                  KVM_CREATE_VCPU == 0xae41 && KVM_SET_TSS_ADDR == 0xae47 && KVM_RUN == 0xae80,
              "argument-less KVM requests");
static_assert(KVM_SET_USER_MEMORY_REGION == 0x4020ae46, "KVM_SET_USER_MEMORY_REGION");
static_assert(KVM_GET_REGS == 0x8090ae81 && KVM_SET_REGS == 0x4090ae82, "KVM_GET/SET_REGS");
static_assert(KVM_GET_SREGS == 0x8138ae83 && KVM_SET_SREGS == 0x4138ae84, "KVM_GET/SET_SREGS");
static_assert(KVM_GET_FPU == 0x81a0ae8c && KVM_SET_FPU == 0x41a0ae8d, "KVM_GET/SET_FPU");

} // namespace kiln::vcpu::kvm::detail
