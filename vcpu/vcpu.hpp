// The hypervisor seam: a vCPU (and its VM or engine) that maps guest memory and runs until an exit.
#pragma once

#include <kiln/memory/guest_memory.hpp>
#include <kiln/memory/guest_view.hpp>
#include <kiln/support/result.hpp>
#include <kiln/vcpu/exit.hpp>
#include <kiln/vcpu/registers.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace kiln::vcpu {

enum class backend_kind { kvm, emulated };

/// What the caller asks for: a specific backend, or `automatic` (KVM when /dev/kvm is usable,
/// else emulated; the environment variable KILN_BACKEND=kvm|emulated overrides automatic).
enum class backend_choice { automatic, kvm, emulated };

const char* to_string(backend_kind k) noexcept;
result<backend_choice> parse_backend_choice(std::string_view name);

struct backend_status {
  backend_kind kind;
  bool usable = false;
  std::string reason; // why not usable, or a short description when usable
};

/// Probes one backend, once per process (the answer is kept): KVM opens /dev/kvm, checks its API
/// and runs a few instructions of a kiln guest (vcpu/x86_64/probe_guest.hpp), since a /dev/kvm
/// can open and still be unable to run one; the emulated backend creates and drops an engine.
backend_status probe(backend_kind kind);

/// Resolves `automatic` (honouring KILN_BACKEND) to a concrete, usable backend.
result<backend_kind> resolve(backend_choice choice);

/// Counters a backend keeps about its own work.
struct vcpu_stats {
  std::uint64_t runs = 0;      // run() calls
  std::uint64_t exits = 0;     // exits returned
  std::uint64_t kicks = 0;     // kick() calls
  std::uint64_t map_calls = 0; // memory mapping calls issued to the hypervisor or engine
  std::uint64_t code_invalidations = 0;
};

/// One vCPU with its own VM (KVM) or engine (Unicorn). Owned by exactly one sandbox.
///
/// Thread-safety: everything but kick() must be called from one thread at a time, and run()
/// should always be called from the same thread (KVM penalises migration). kick() may be called
/// from any thread at any time, including a signal-safe context's neighbour thread.
class vcpu : public memory::guest_view {
public:
  virtual ~vcpu() = default;
  vcpu(const vcpu&) = delete;
  vcpu& operator=(const vcpu&) = delete;

  virtual backend_kind kind() const noexcept = 0;

  /// ABI feature bits this backend gives the guest (KILN_FEATURE_NX, KILN_FEATURE_EMULATED).
  virtual std::uint64_t abi_features() const noexcept = 0;

  /// Makes every region of `mem` accessible to the guest with the region's protection (regions
  /// whose protection is `none` stay unmapped). `mem` must outlive the vCPU. Called again after
  /// regions were added or removed, it issues calls only for the regions that changed.
  result<void> map_memory(const memory::guest_memory& mem) override = 0;

  /// Narrows the guest's rights on [gpa, gpa+size) (page-aligned, inside mapped regions) to `p`
  /// in the backend's own enforcement. The emulated engine keeps per-range permissions and
  /// must never believe a page writable that the host mapped read-only (it would write it and
  /// crash the host), so it is told here. KVM enforces rights through the guest page tables and
  /// the host mapping's protection and issues nothing.
  result<void> protect(memory::guest_phys_addr gpa, std::uint64_t size,
                       memory::protection p) override = 0;

  virtual result<registers> get_registers() = 0;
  virtual result<void> set_registers(const registers& r) = 0;
  virtual result<special_registers> get_special_registers() = 0;
  virtual result<void> set_special_registers(const special_registers& s) = 0;
  virtual result<fpu_state> get_fpu() = 0;
  virtual result<void> set_fpu(const fpu_state& f) = 0;

  /// Runs the guest until it exits; decodes the exit once. Resuming after an io_out exit
  /// continues after the `out` instruction.
  virtual exit run() = 0;

  /// Makes the current run() return exits::cancelled promptly, or the next one if none is
  /// running. Thread-safe.
  virtual void kick() noexcept = 0;

  /// Tells the backend that the host rewrote guest memory in [gpa, gpa+size) (restore, loader),
  /// so translated code over it must be dropped. A no-op on hardware backends.
  virtual void invalidate_code(memory::guest_phys_addr gpa, std::uint64_t size) = 0;

  /// Maps [gpa, gpa+size) (page-aligned, inside mapped RAM) in the hardware's second-level page
  /// tables ahead of the guest's first touches, so those touches take no exit. Only for pages
  /// already resident on the host (others would be read in here, synchronously), and only
  /// between runs (it takes the lock KVM_RUN holds). Best effort: false where the backend or
  /// kernel has no such thing (the emulated engine; KVM before Linux 6.10's
  /// KVM_PRE_FAULT_MEMORY) or the kernel refused; the guest then faults the pages itself.
  virtual bool prefault(memory::guest_phys_addr gpa, std::uint64_t size) noexcept {
    (void)gpa;
    (void)size;
    return false;
  }

  virtual vcpu_stats stats() const noexcept = 0;

protected:
  vcpu() = default;
};

/// Creates a vCPU of a concrete backend. KVM is refused (backend_unavailable, with the probe's
/// reason) where probe() found it unusable.
result<std::unique_ptr<vcpu>> create(backend_kind kind);

} // namespace kiln::vcpu
