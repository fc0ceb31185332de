// Decoding KVM exits into kiln's exit variant, and the names of exit reasons for messages.
#include <kiln/vcpu/kvm/detail/exit_decode.hpp>

#include <kiln/vcpu/kvm/detail/unique_fd.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <iterator>
#include <string>
#include <system_error>

namespace kiln::vcpu::kvm::detail {

namespace {

// Indexed by value; the values are dense from 0.
constexpr const char* exit_names[] = {
    "KVM_EXIT_UNKNOWN",
    "KVM_EXIT_EXCEPTION",
    "KVM_EXIT_IO",
    "KVM_EXIT_HYPERCALL",
    "KVM_EXIT_DEBUG",
    "KVM_EXIT_HLT",
    "KVM_EXIT_MMIO",
    "KVM_EXIT_IRQ_WINDOW_OPEN",
    "KVM_EXIT_SHUTDOWN",
    "KVM_EXIT_FAIL_ENTRY",
    "KVM_EXIT_INTR",
    "KVM_EXIT_SET_TPR",
    "KVM_EXIT_TPR_ACCESS",
    "KVM_EXIT_S390_SIEIC",
    "KVM_EXIT_S390_RESET",
    "KVM_EXIT_DCR",
    "KVM_EXIT_NMI",
    "KVM_EXIT_INTERNAL_ERROR",
    "KVM_EXIT_OSI",
    "KVM_EXIT_PAPR_HCALL",
    "KVM_EXIT_S390_UCONTROL",
    "KVM_EXIT_WATCHDOG",
    "KVM_EXIT_S390_TSCH",
    "KVM_EXIT_EPR",
    "KVM_EXIT_SYSTEM_EVENT",
    "KVM_EXIT_S390_STSI",
    "KVM_EXIT_IOAPIC_EOI",
    "KVM_EXIT_HYPERV",
    "KVM_EXIT_ARM_NISV",
    "KVM_EXIT_X86_RDMSR",
    "KVM_EXIT_X86_WRMSR",
    "KVM_EXIT_DIRTY_RING_FULL",
    "KVM_EXIT_AP_RESET_HOLD",
    "KVM_EXIT_X86_BUS_LOCK",
    "KVM_EXIT_XEN",
    "KVM_EXIT_RISCV_SBI",
    "KVM_EXIT_RISCV_CSR",
    "KVM_EXIT_NOTIFY",
    "KVM_EXIT_LOONGARCH_IOCSR",
    "KVM_EXIT_MEMORY_FAULT",
};
static_assert(std::size(exit_names) == static_cast<std::uint32_t>(exit_reason::memory_fault) + 1);
static_assert(KVM_EXIT_NOTIFY == 37 && KVM_EXIT_INTERNAL_ERROR == 17 && KVM_EXIT_IO == 2);

} // namespace

const char* exit_reason_name(std::uint32_t reason) noexcept {
  return reason < std::size(exit_names) ? exit_names[reason] : "unknown";
}

const char* internal_error_name(std::uint32_t suberror) noexcept {
  switch (suberror) {
  case KVM_INTERNAL_ERROR_EMULATION:
    return "instruction emulation failed";
  case KVM_INTERNAL_ERROR_SIMUL_EX:
    return "exception while delivering an exception";
  case KVM_INTERNAL_ERROR_DELIVERY_EV:
    return "event delivery failed";
  case KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON:
    return "unexpected hardware exit reason";
  default:
    return "unknown";
  }
}

namespace {

/// KVM_EXIT_MEMORY_FAULT's payload (Linux 6.8+, absent from older headers): the exit union
/// holds {flags, gpa, size} when KVM_RUN fails with EFAULT or EHWPOISON and says so.
struct memory_fault_payload {
  std::uint64_t flags;
  std::uint64_t gpa;
  std::uint64_t size;
};

decoded_exit decode_io(const kvm_run& run, std::size_t run_size, int vcpu_fd) {
  const auto& io = run.io;
  if (io.direction == KVM_EXIT_IO_IN)
    return {exits::io_in{io.port, io.size}, pending_completion::io_in};
  constexpr auto out = pending_completion::io_out;
  if (io.direction != KVM_EXIT_IO_OUT)
    return {exits::internal_error{
                fmt::format("KVM_EXIT_IO with direction {} on port {:#x}", io.direction, io.port),
                read_rip(vcpu_fd)},
            out};
  if (io.count != 1)
    return {exits::internal_error{fmt::format("string output (rep outs) to port {:#x}: {} x {} "
                                              "bytes",
                                              io.port, io.count, io.size),
                                  read_rip(vcpu_fd)},
            out};
  if (io.size != 1 && io.size != 2 && io.size != 4)
    return {exits::internal_error{
                fmt::format("KVM_EXIT_IO of {} bytes on port {:#x}", io.size, io.port),
                read_rip(vcpu_fd)},
            out};
  std::uint64_t end = 0;
  if (__builtin_add_overflow(io.data_offset, std::uint64_t{io.size}, &end) || end > run_size)
    return {exits::internal_error{
                fmt::format("KVM_EXIT_IO data offset {:#x} outside the run area", io.data_offset),
                read_rip(vcpu_fd)},
            out};
  std::uint32_t value = 0; // x86 is little-endian: the low `size` bytes
  // SAFETY: [data_offset, data_offset + size) lies inside the run mapping (checked above).
  std::memcpy(&value, reinterpret_cast<const std::byte*>(&run) + io.data_offset, io.size);
  return {exits::io_out{io.port, io.size, value}, out};
}

exit decode_internal_error(const kvm_run& run, int vcpu_fd) {
  const auto& in = run.internal;
  std::string what = fmt::format("KVM_EXIT_INTERNAL_ERROR: {} (suberror {})",
                                 internal_error_name(in.suberror), in.suberror);
  const std::uint32_t n = std::min<std::uint32_t>(in.ndata, std::size(in.data));
  for (std::uint32_t i = 0; i < n; ++i)
    what += fmt::format("{}{:#x}", i == 0 ? ", data " : " ", in.data[i]);
  return exits::internal_error{std::move(what), read_rip(vcpu_fd)};
}

} // namespace

std::uint64_t read_rip(int vcpu_fd) noexcept {
  kvm_regs r{};
  return ioctl_retry(vcpu_fd, KVM_GET_REGS, &r) == -1 ? 0 : r.rip;
}

decoded_exit decode_exit(const kvm_run& run, std::size_t run_size, int vcpu_fd) {
  const std::uint32_t reason = run.exit_reason;
  switch (static_cast<exit_reason>(reason)) {
  case exit_reason::io:
    return decode_io(run, run_size, vcpu_fd);
  case exit_reason::hlt:
    return {exits::halt{read_rip(vcpu_fd)}};
  case exit_reason::mmio:
    return {exits::mmio{run.mmio.phys_addr, static_cast<std::uint8_t>(run.mmio.len),
                        run.mmio.is_write != 0},
            pending_completion::mmio};
  case exit_reason::shutdown:
    return {exits::shutdown{read_rip(vcpu_fd)}};
  case exit_reason::fail_entry:
    return {exits::fail_entry{run.fail_entry.hardware_entry_failure_reason}};
  case exit_reason::internal_error:
    return {decode_internal_error(run, vcpu_fd)};
  case exit_reason::unknown:
    return {exits::internal_error{
        fmt::format("KVM_EXIT_UNKNOWN (hardware exit reason {:#x})", run.hw.hardware_exit_reason),
        read_rip(vcpu_fd)}};
  case exit_reason::system_event:
    return {exits::internal_error{
        fmt::format("KVM_EXIT_SYSTEM_EVENT (type {})", run.system_event.type), read_rip(vcpu_fd)}};
  // KVM produces these only for features kiln never enables (guest debugging, user-space MSRs,
  // dirty rings, Hyper-V/Xen emulation, notify VM exits...), for other architectures, or, for
  // KVM_EXIT_INTR and KVM_EXIT_MEMORY_FAULT, together with a failed KVM_RUN (decode_run_failure).
  case exit_reason::exception:
  case exit_reason::hypercall:
  case exit_reason::debug:
  case exit_reason::irq_window_open:
  case exit_reason::intr:
  case exit_reason::set_tpr:
  case exit_reason::tpr_access:
  case exit_reason::s390_sieic:
  case exit_reason::s390_reset:
  case exit_reason::dcr:
  case exit_reason::nmi:
  case exit_reason::osi:
  case exit_reason::papr_hcall:
  case exit_reason::s390_ucontrol:
  case exit_reason::watchdog:
  case exit_reason::s390_tsch:
  case exit_reason::epr:
  case exit_reason::s390_stsi:
  case exit_reason::ioapic_eoi:
  case exit_reason::hyperv:
  case exit_reason::arm_nisv:
  case exit_reason::x86_rdmsr:
  case exit_reason::x86_wrmsr:
  case exit_reason::dirty_ring_full:
  case exit_reason::ap_reset_hold:
  case exit_reason::x86_bus_lock:
  case exit_reason::xen:
  case exit_reason::riscv_sbi:
  case exit_reason::riscv_csr:
  case exit_reason::notify:
  case exit_reason::loongarch_iocsr:
  case exit_reason::memory_fault:
    break;
  }
  // The listed reasons above, and any number newer than this list.
  return {exits::internal_error{
      fmt::format("KVM exit reason {} ({})", reason, exit_reason_name(reason)), read_rip(vcpu_fd)}};
}

exit decode_run_failure(const kvm_run& run, int err, int vcpu_fd) {
  if (err == EFAULT || err == EHWPOISON) {
    if (run.exit_reason == static_cast<std::uint32_t>(exit_reason::memory_fault)) {
      memory_fault_payload mf{};
      // SAFETY: the exit union (whose first member is `hw`) is 256 bytes; KVM wrote this
      // payload there for this KVM_RUN (the caller reset exit_reason before it).
      std::memcpy(&mf, &run.hw, sizeof mf);
      return exits::backing_lost{mf.gpa, true, err == EHWPOISON, read_rip(vcpu_fd)};
    }
    // Linux 6.12 still fails a plain host-side fault (a truncated file, a PROT_NONE page) with a
    // bare EFAULT: the caller must find out which backing went away.
    return exits::backing_lost{0, false, err == EHWPOISON, read_rip(vcpu_fd)};
  }
  return exits::internal_error{fmt::format("KVM_RUN: {}", std::generic_category().message(err)),
                               read_rip(vcpu_fd)};
}

} // namespace kiln::vcpu::kvm::detail
