// Decoding a KVM exit, once, into kiln's exit variant; KVM's exit reasons as a checked enum.
#pragma once

#include <kiln/vcpu/exit.hpp>

#include <cstddef>
#include <cstdint>

#include <linux/kvm.h>

namespace kiln::vcpu::kvm::detail {

/// `kvm_run::exit_reason`. Values up to KVM_EXIT_NOTIFY come from <linux/kvm.h>; the two after
/// it are spelled out because older headers (Linux 6.1, Debian 12) lack them.
enum class exit_reason : std::uint32_t {
  unknown = KVM_EXIT_UNKNOWN,
  exception = KVM_EXIT_EXCEPTION,
  io = KVM_EXIT_IO,
  hypercall = KVM_EXIT_HYPERCALL,
  debug = KVM_EXIT_DEBUG,
  hlt = KVM_EXIT_HLT,
  mmio = KVM_EXIT_MMIO,
  irq_window_open = KVM_EXIT_IRQ_WINDOW_OPEN,
  shutdown = KVM_EXIT_SHUTDOWN,
  fail_entry = KVM_EXIT_FAIL_ENTRY,
  intr = KVM_EXIT_INTR,
  set_tpr = KVM_EXIT_SET_TPR,
  tpr_access = KVM_EXIT_TPR_ACCESS,
  s390_sieic = KVM_EXIT_S390_SIEIC,
  s390_reset = KVM_EXIT_S390_RESET,
  dcr = KVM_EXIT_DCR,
  nmi = KVM_EXIT_NMI,
  internal_error = KVM_EXIT_INTERNAL_ERROR,
  osi = KVM_EXIT_OSI,
  papr_hcall = KVM_EXIT_PAPR_HCALL,
  s390_ucontrol = KVM_EXIT_S390_UCONTROL,
  watchdog = KVM_EXIT_WATCHDOG,
  s390_tsch = KVM_EXIT_S390_TSCH,
  epr = KVM_EXIT_EPR,
  system_event = KVM_EXIT_SYSTEM_EVENT,
  s390_stsi = KVM_EXIT_S390_STSI,
  ioapic_eoi = KVM_EXIT_IOAPIC_EOI,
  hyperv = KVM_EXIT_HYPERV,
  arm_nisv = KVM_EXIT_ARM_NISV,
  x86_rdmsr = KVM_EXIT_X86_RDMSR,
  x86_wrmsr = KVM_EXIT_X86_WRMSR,
  dirty_ring_full = KVM_EXIT_DIRTY_RING_FULL,
  ap_reset_hold = KVM_EXIT_AP_RESET_HOLD,
  x86_bus_lock = KVM_EXIT_X86_BUS_LOCK,
  xen = KVM_EXIT_XEN,
  riscv_sbi = KVM_EXIT_RISCV_SBI,
  riscv_csr = KVM_EXIT_RISCV_CSR,
  notify = KVM_EXIT_NOTIFY,
  loongarch_iocsr = 38, // KVM_EXIT_LOONGARCH_IOCSR, Linux 6.7
  memory_fault = 39,    // KVM_EXIT_MEMORY_FAULT, Linux 6.8: only with KVM_RUN failing EFAULT
};

/// "KVM_EXIT_IO", ...; "unknown" for a number newer than this list.
const char* exit_reason_name(std::uint32_t reason) noexcept;

/// "instruction emulation failed", ... for KVM_EXIT_INTERNAL_ERROR's suberror.
const char* internal_error_name(std::uint32_t suberror) noexcept;

/// What an exit leaves for the kernel to finish on the next KVM_RUN. KVM completes an I/O or
/// MMIO instruction (moves RIP past an `out`, loads the value of an `in`) only when userspace
/// re-enters KVM_RUN, so until then the registers show the instruction unfinished.
enum class pending_completion : std::uint8_t { none, io_out, io_in, mmio };

struct decoded_exit {
  exit value;
  pending_completion pending = pending_completion::none;
};

/// Decodes the exit that KVM_RUN (returning 0) left in `run`, whose mapping is `run_size` bytes.
/// Reads RIP (KVM_GET_REGS on `vcpu_fd`) only for the rare exits that report it (halt, shutdown,
/// errors), never for io_out or io_in.
decoded_exit decode_exit(const kvm_run& run, std::size_t run_size, int vcpu_fd);

/// The exit for KVM_RUN failing with `err` (not EINTR): backing_lost for EFAULT and EHWPOISON,
/// at the guest-physical address of a KVM_EXIT_MEMORY_FAULT when KVM left one (exit_reason must
/// have been reset before KVM_RUN); internal_error naming the errno otherwise.
exit decode_run_failure(const kvm_run& run, int err, int vcpu_fd);

/// The vCPU's RIP, or 0 if KVM_GET_REGS fails. Costs one ioctl.
std::uint64_t read_rip(int vcpu_fd) noexcept;

} // namespace kiln::vcpu::kvm::detail
