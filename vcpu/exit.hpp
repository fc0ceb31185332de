// The decoded reasons a vCPU's run() returns, as one std::variant shared by every backend.
#pragma once

#include <cstdint>
#include <string>
#include <variant>

namespace kiln::vcpu {

enum class access_kind : std::uint8_t { read, write, execute };

namespace exits {
/// `out` to a port: the hypercall path.
struct io_out {
  std::uint16_t port;
  std::uint8_t size; // 1, 2 or 4 bytes
  std::uint32_t value;
};
/// `in` from a port. kiln defines none, so this is always a protocol violation.
struct io_in {
  std::uint16_t port;
  std::uint8_t size;
};
/// `hlt` with interrupts off: the guest cannot continue.
struct halt {
  std::uint64_t rip;
};
/// An access to guest-physical memory with no backing (KVM: a GPA outside every memslot or a
/// write to a read-only slot).
struct mmio {
  std::uint64_t gpa;
  std::uint8_t size;
  bool write;
};
/// A CPU exception caught by the backend itself (the emulated backend sees every exception; on
/// KVM the guest's IDT reports them with a hypercall instead).
struct exception {
  std::uint8_t vector;
  std::uint32_t error_code;
  std::uint64_t rip;
  std::uint64_t cr2;
};
/// An access the backend refused because of region permissions or a hole in guest memory
/// (emulated: Unicorn's *_PROT / *_UNMAPPED errors).
struct memory_fault {
  std::uint64_t address;
  access_kind access;
  bool unmapped; // true: no memory there at all; false: the region forbids this access
  std::uint64_t rip;
};
/// Guest memory whose host backing failed while the guest touched it (KVM_RUN failing with EFAULT
/// or EHWPOISON): a mapped file or snapshot file truncated under the guest, a host mapping
/// removed, or host memory poisoned. KVM says which guest-physical address only for some of these
/// (KVM_EXIT_MEMORY_FAULT, Linux 6.8+); `gpa_known` is false otherwise.
struct backing_lost {
  std::uint64_t gpa;
  bool gpa_known;
  bool hw_poison; // EHWPOISON: the host page is poisoned, not just unmapped
  std::uint64_t rip;
};
/// Triple fault (KVM_EXIT_SHUTDOWN): the guest reset itself.
struct shutdown {
  std::uint64_t rip;
};
/// The CPU refused to enter the guest (KVM_EXIT_FAIL_ENTRY; invalid guest state).
struct fail_entry {
  std::uint64_t reason;
};
/// run() returned because kick() was called.
struct cancelled {};
/// Anything else: the backend names it.
struct internal_error {
  std::string what;
  std::uint64_t rip;
};
} // namespace exits

using exit = std::variant<exits::io_out, exits::io_in, exits::halt, exits::mmio, exits::exception,
                          exits::memory_fault, exits::backing_lost, exits::shutdown,
                          exits::fail_entry, exits::cancelled, exits::internal_error>;

/// A short human name for an exit's kind ("io_out", "exception", ...).
const char* exit_name(const exit& e) noexcept;

} // namespace kiln::vcpu
