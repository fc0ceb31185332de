// The KVM backend: one VM and one vCPU per sandbox over /dev/kvm; run() decodes each exit once.
#include <kiln/vcpu/kvm/kvm_vcpu.hpp>

#include <kiln/guest/abi.h>
#include <kiln/vcpu/kvm/detail/exit_decode.hpp>
#include <kiln/vcpu/kvm/detail/kick_signal.hpp>
#include <kiln/vcpu/kvm/detail/kick_state.hpp>
#include <kiln/vcpu/kvm/detail/kvm_handles.hpp>
#include <kiln/vcpu/kvm/detail/kvm_ioctls.hpp>
#include <kiln/vcpu/kvm/x86_64/kvm_state.hpp>
#include <kiln/vcpu/vcpu_errc.hpp>
#include <kiln/vcpu/x86_64/probe_guest.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include <linux/kvm.h>
#include <unistd.h>

namespace kiln::vcpu::kvm {

namespace {

using detail::ioctl_retry;
using detail::kvm_error;
using detail::pending_completion;

/// The process's view of KVM: /dev/kvm opened once and the CPUID a guest gets. Kept for the
/// process's life (one fd), so creating a sandbox costs neither an open() nor a
/// KVM_GET_SUPPORTED_CPUID. Never destroyed, so no static-destruction order can pull it from
/// under a sandbox that is torn down late.
struct kvm_host {
  detail::kvm_system system;
  std::vector<kvm_cpuid_entry2> guest_cpuid; // supported CPUID, narrowed for kiln guests
};

result<const kvm_host*> shared_host() {
  static std::atomic<const kvm_host*> cached{nullptr};
  static std::mutex init_mutex;
  if (const kvm_host* h = cached.load(std::memory_order_acquire)) return h;
  std::lock_guard lock(init_mutex);
  if (const kvm_host* h = cached.load(std::memory_order_relaxed)) return h;
  // A failure is not cached: /dev/kvm may become usable later (module loaded, ACL fixed).
  KILN_TRY_ASSIGN(auto system, detail::kvm_system::open());
  KILN_TRY_ASSIGN(auto cpuid, system.supported_cpuid());
  x86_64::restrict_guest_cpuid(cpuid);
  if (cpuid.size() > detail::cpuid_table::capacity)
    return error(vcpu_errc::create_failed, "KVM_GET_SUPPORTED_CPUID returned too many entries");
  const kvm_host* h = new kvm_host{std::move(system), std::move(cpuid)};
  cached.store(h, std::memory_order_release);
  return h;
}

/// One memslot as KVM holds it.
struct memslot {
  std::uint32_t flags = 0;
  std::uint64_t gpa = 0;
  std::uint64_t size = 0;
  std::uint64_t host = 0;
  bool operator==(const memslot&) const = default;
};

class kvm_backend final : public vcpu {
public:
  static result<std::unique_ptr<vcpu>> create();

  backend_kind kind() const noexcept override { return backend_kind::kvm; }
  // The host sets EFER.NXE and puts NX in the page tables.
  std::uint64_t abi_features() const noexcept override { return KILN_FEATURE_NX; }

  result<void> map_memory(const memory::guest_memory& mem) override;
  // Rights live in the guest page tables (NX included) and the host mapping's protection, which
  // KVM follows through its MMU notifier; the memslots stay as they are.
  result<void> protect(memory::guest_phys_addr, std::uint64_t, memory::protection) override {
    return ok();
  }

  result<registers> get_registers() override;
  result<void> set_registers(const registers& r) override;
  result<special_registers> get_special_registers() override;
  result<void> set_special_registers(const special_registers& s) override;
  result<fpu_state> get_fpu() override;
  result<void> set_fpu(const fpu_state& f) override;

  exit run() override;
  void kick() noexcept override;
  // Hardware has no translated code to drop.
  void invalidate_code(memory::guest_phys_addr, std::uint64_t) override {}
  bool prefault(memory::guest_phys_addr gpa, std::uint64_t size) noexcept override;

  vcpu_stats stats() const noexcept override {
    vcpu_stats s = stats_;
    s.kicks = kick_.requests();
    return s;
  }

private:
  kvm_backend(detail::kvm_vm vm, detail::kvm_vcpu_fd vcpu, bool readonly_mem,
              std::uint32_t max_memslots, std::uint64_t apic_base)
      : vm_(std::move(vm)), vcpu_(std::move(vcpu)), run_(vcpu_.run()), readonly_mem_(readonly_mem),
        max_memslots_(max_memslots), apic_base_(apic_base),
        kick_(&run_->immediate_exit, detail::kick_signal()) {}

  exit run_until_exit();

  /// Lets KVM finish the instruction of the last exit without running guest code (KVM_RUN with
  /// immediate_exit set), so that the state read or written next is consistent. With
  /// `only_io_out`, finishes just an `out` (so RIP is past it, as on the emulated backend) and
  /// leaves a faulting `in` or MMIO access unfinished, its RIP pointing at it for diagnostics.
  result<void> complete_pending(bool only_io_out);
  result<void> set_slot(std::uint32_t slot, const std::optional<memslot>& s);

  detail::kvm_vm vm_;
  detail::kvm_vcpu_fd vcpu_; // declared after vm_: closed first
  kvm_run* const run_;
  const bool readonly_mem_;
  const std::uint32_t max_memslots_;
  const std::uint64_t apic_base_; // KVM's own value after reset, written back by set_sregs

  std::vector<std::optional<memslot>> slots_; // index = slot id; exactly what KVM holds
  pending_completion pending_ = pending_completion::none;
  vcpu_stats stats_;

  detail::kick_state kick_; // the race analysis is in kick_state.hpp
  bool prefault_checked_ = false, prefault_unsupported_ = false;
};

bool kvm_backend::prefault(memory::guest_phys_addr gpa, std::uint64_t size) noexcept {
  if (prefault_unsupported_) return false;
  if (!prefault_checked_) {
    prefault_checked_ = true;
    if (ioctl_retry(vm_.fd(), KVM_CHECK_EXTENSION, detail::cap_pre_fault_memory) <= 0) {
      prefault_unsupported_ = true;
      return false;
    }
  }
  detail::pre_fault_memory r{};
  r.gpa = gpa.value;
  r.size = size;
  // The kernel advances gpa and shrinks size as it goes; EINTR and EAGAIN leave the rest to do.
  while (r.size != 0) {
    // SAFETY: r has kvm_pre_fault_memory's layout; the vCPU is not running (run() is not).
    if (::ioctl(vcpu_.fd(), detail::pre_fault_memory_request, &r) == 0) continue;
    if (errno == EINTR || errno == EAGAIN) continue;
    if (errno == ENOTTY || errno == EINVAL || errno == EOPNOTSUPP) prefault_unsupported_ = true;
    return false;
  }
  return true;
}

result<std::unique_ptr<vcpu>> kvm_backend::create() {
  KILN_TRY(detail::install_kick_handler());
  KILN_TRY_ASSIGN(const kvm_host* host, shared_host());
  const detail::kvm_system& sys = host->system;
  KILN_TRY_ASSIGN(auto vm, sys.create_vm());

  // Needed on Intel hosts without unrestricted guest; done before any vCPU exists, as kvmtool
  // and Firecracker do. A no-op elsewhere.
  if (ioctl_retry(vm.fd(), KVM_SET_TSS_ADDR, static_cast<unsigned long>(x86_64::tss_addr)) == -1)
    return kvm_error(vcpu_errc::create_failed, "KVM_SET_TSS_ADDR", errno);

  KILN_TRY_ASSIGN(auto vcpu_fd, vm.create_vcpu(0));

  {
    auto table = std::make_unique<detail::cpuid_table>();
    table->nent = static_cast<std::uint32_t>(host->guest_cpuid.size());
    std::copy(host->guest_cpuid.begin(), host->guest_cpuid.end(), table->entries);
    // SAFETY: cpuid_table has kvm_cpuid2's layout with room for `nent` entries.
    if (ioctl_retry(vcpu_fd.fd(), detail::set_cpuid2_request, table.get()) == -1)
      return kvm_error(vcpu_errc::create_failed, "KVM_SET_CPUID2", errno);
  }

  // After KVM_SET_CPUID2, which decides what the reset APIC base may be.
  kvm_sregs sregs{};
  if (ioctl_retry(vcpu_fd.fd(), KVM_GET_SREGS, &sregs) == -1)
    return kvm_error(vcpu_errc::create_failed, "KVM_GET_SREGS", errno);

  return std::unique_ptr<vcpu>(new kvm_backend(std::move(vm), std::move(vcpu_fd),
                                               sys.has_readonly_mem(), sys.max_memslots(),
                                               sregs.apic_base));
}

// ---- memory ----------------------------------------------------------------------------------

result<void> kvm_backend::set_slot(std::uint32_t slot, const std::optional<memslot>& s) {
  kvm_userspace_memory_region region{};
  region.slot = slot;
  if (s) {
    region.flags = s->flags;
    region.guest_phys_addr = s->gpa;
    region.memory_size = s->size; // 0 would delete the slot
    region.userspace_addr = s->host;
  }
  ++stats_.map_calls;
  if (ioctl_retry(vm_.fd(), KVM_SET_USER_MEMORY_REGION, &region) == -1) {
    const int err = errno; // before fmt allocates
    return kvm_error(
        vcpu_errc::map_failed,
        s ? fmt::format("KVM_SET_USER_MEMORY_REGION slot {} [{:#x}, +{:#x})", slot, s->gpa, s->size)
          : fmt::format("KVM_SET_USER_MEMORY_REGION deleting slot {}", slot),
        err);
  }
  return ok();
}

result<void> kvm_backend::map_memory(const memory::guest_memory& mem) {
  std::vector<memslot> want;
  for (const memory::region& r : mem.regions()) {
    if (r.prot == memory::protection::none || r.size == 0) continue;
    const std::uint64_t start = r.start.value;
    std::uint64_t end = 0;
    // RAM regions lie in [0, size()), mapped files in the file room above it (address_limit()).
    if (!memory::is_aligned(start, memory::page_size) ||
        !memory::is_aligned(r.size, memory::page_size) ||
        __builtin_add_overflow(start, r.size, &end) || end > mem.address_limit())
      return error(vcpu_errc::map_failed,
                   fmt::format("region {} [{:#x}, +{:#x}) is not page-aligned inside guest memory "
                               "(which ends at {:#x})",
                               r.name, start, r.size, mem.address_limit()));
    if (start < x86_64::reserved_gpa_end && end > x86_64::reserved_gpa_start)
      return error(vcpu_errc::map_failed,
                   fmt::format("region {} [{:#x}, {:#x}) overlaps [{:#x}, {:#x}), where KVM keeps "
                               "its TSS and identity-map pages",
                               r.name, start, end, x86_64::reserved_gpa_start,
                               x86_64::reserved_gpa_end));
    // A read-only memslot for what the guest sees read-only (code, read-only data, boot info,
    // mapped files), so not even the CPU's own writes get through. Not for regions the guest
    // cannot see (the page tables): the CPU's page walker writes accessed and dirty bits there,
    // and on AMD every guest page-table access is a write at the nested level. The guest's own
    // page tables keep the guest out of them. Without KVM_CAP_READONLY_MEM a read-only region
    // is mapped writable: its pages are still read-only in the guest's page tables and in the
    // host mapping.
    const bool read_only =
        readonly_mem_ && r.guest_visible && !memory::has(r.prot, memory::protection::write);
    // SAFETY: [start, end) lies inside the guest memory mapping (checked above); KVM records the
    // host address, and map_memory's contract keeps `mem` alive as long as this vCPU.
    const auto host = reinterpret_cast<std::uintptr_t>(mem.host_address_for_mapping(r.start));
    want.push_back(memslot{read_only ? std::uint32_t{KVM_MEM_READONLY} : 0u, start, r.size, host});
  }
  if (want.size() > max_memslots_)
    return error(vcpu_errc::map_failed,
                 fmt::format("{} regions, but KVM allows {} memslots", want.size(), max_memslots_));

  // KVM cannot change a live slot's size, host address or read-only flag, and refuses a slot
  // that overlaps another; so first delete every slot that changes, then create the new ones.
  // An identical slot costs nothing, so mapping the same memory again issues no ioctl.
  for (std::uint32_t i = 0; i < slots_.size(); ++i) {
    if (slots_[i] && (i >= want.size() || *slots_[i] != want[i])) {
      KILN_TRY(set_slot(i, std::nullopt));
      slots_[i].reset();
    }
  }
  if (slots_.size() < want.size()) slots_.resize(want.size());
  for (std::uint32_t i = 0; i < want.size(); ++i) {
    if (!slots_[i]) {
      KILN_TRY(set_slot(i, want[i]));
      slots_[i] = want[i];
    }
  }
  while (!slots_.empty() && !slots_.back())
    slots_.pop_back();
  return ok();
}

// ---- registers -------------------------------------------------------------------------------

result<void> kvm_backend::complete_pending(bool only_io_out) {
  if (pending_ == pending_completion::none ||
      (only_io_out && pending_ != pending_completion::io_out))
    return ok();

  // Give an unfinished `in` or MMIO read zeros rather than stale bytes.
  if (pending_ == pending_completion::io_in) {
    const kvm_run& run = *run_;
    std::uint64_t bytes = 0, end = 0;
    if (!__builtin_mul_overflow(std::uint64_t{run.io.size}, std::uint64_t{run.io.count}, &bytes) &&
        !__builtin_add_overflow(run.io.data_offset, bytes, &end) && end <= vcpu_.run_size())
      // SAFETY: [data_offset, end) lies inside the run mapping (checked just above).
      std::memset(reinterpret_cast<std::byte*>(run_) + run.io.data_offset, 0, bytes);
  } else if (pending_ == pending_completion::mmio && !run_->mmio.is_write) {
    std::memset(run_->mmio.data, 0, sizeof run_->mmio.data);
  }

  kick_.force_immediate_exit();
  pending_ = pending_completion::none;
  // One pass normally; an instruction whose completion needs a second access (an MMIO access
  // split over two pages, a string I/O instruction) exits again. A guest's `rep outs` with a
  // huge count could go on for long; give up after a few rounds.
  constexpr int max_rounds = 64;
  int err = 0;
  bool done = false;
  for (int i = 0; i < max_rounds && !done; ++i) {
    if (::ioctl(vcpu_.fd(), KVM_RUN, 0ul) == 0)
      continue; // another exit of the same instruction: complete it too
    err = errno;
    done = true;
  }
  kick_.restore_immediate_exit();
  if (!done)
    return error(vcpu_errc::register_access,
                 "the guest's last I/O instruction did not complete within 64 exits");
  if (err != EINTR)
    return kvm_error(vcpu_errc::register_access, "KVM_RUN completing the last I/O", err);
  return ok();
}

result<registers> kvm_backend::get_registers() {
  KILN_TRY(complete_pending(true));
  kvm_regs r{};
  if (ioctl_retry(vcpu_.fd(), KVM_GET_REGS, &r) == -1)
    return kvm_error(vcpu_errc::register_access, "KVM_GET_REGS", errno);
  return x86_64::from_kvm(r);
}

result<void> kvm_backend::set_registers(const registers& regs) {
  KILN_TRY(complete_pending(false));
  kvm_regs r = x86_64::to_kvm(regs);
  if (ioctl_retry(vcpu_.fd(), KVM_SET_REGS, &r) == -1)
    return kvm_error(vcpu_errc::register_access, "KVM_SET_REGS", errno);
  return ok();
}

result<special_registers> kvm_backend::get_special_registers() {
  KILN_TRY(complete_pending(true));
  kvm_sregs s{};
  if (ioctl_retry(vcpu_.fd(), KVM_GET_SREGS, &s) == -1)
    return kvm_error(vcpu_errc::register_access, "KVM_GET_SREGS", errno);
  return x86_64::from_kvm(s);
}

result<void> kvm_backend::set_special_registers(const special_registers& sregs) {
  KILN_TRY(complete_pending(false));
  kvm_sregs s{};
  s.apic_base = apic_base_;
  x86_64::to_kvm(sregs, s);
  if (ioctl_retry(vcpu_.fd(), KVM_SET_SREGS, &s) == -1)
    return kvm_error(vcpu_errc::register_access, "KVM_SET_SREGS", errno);
  return ok();
}

result<fpu_state> kvm_backend::get_fpu() {
  KILN_TRY(complete_pending(true));
  kvm_fpu f{};
  if (ioctl_retry(vcpu_.fd(), KVM_GET_FPU, &f) == -1)
    return kvm_error(vcpu_errc::register_access, "KVM_GET_FPU", errno);
  return x86_64::from_kvm(f);
}

result<void> kvm_backend::set_fpu(const fpu_state& fpu) {
  KILN_TRY(complete_pending(false));
  kvm_fpu f = x86_64::to_kvm(fpu);
  if (ioctl_retry(vcpu_.fd(), KVM_SET_FPU, &f) == -1)
    return kvm_error(vcpu_errc::register_access, "KVM_SET_FPU", errno);
  return ok();
}

// ---- run and kick ----------------------------------------------------------------------------

exit kvm_backend::run() {
  ++stats_.runs;
  detail::unblock_kick_signal_on_this_thread();
  kick_.enter_run();
  exit e = run_until_exit();
  kick_.leave_run();
  ++stats_.exits;
  return e;
}

// The steps R2..R4 of kick_state.hpp.
exit kvm_backend::run_until_exit() {
  for (;;) {
    if (kick_.pending()) { // R2
      kick_.consume();
      return exits::cancelled{};
    }
    // Lets an EFAULT below tell a fresh KVM_EXIT_MEMORY_FAULT from a stale reason.
    run_->exit_reason = KVM_EXIT_UNKNOWN;
    pending_ = pending_completion::none; // KVM_RUN finishes it before anything else
    // R3. Not ioctl_retry: EINTR is the kick.
    if (::ioctl(vcpu_.fd(), KVM_RUN, 0ul) == 0) {
      auto [e, pending] = detail::decode_exit(*run_, vcpu_.run_size(), vcpu_.fd());
      pending_ = pending;
      return std::move(e);
    }
    const int err = errno;
    if (err != EINTR) return detail::decode_run_failure(*run_, err, vcpu_.fd());
    if (kick_.pending()) { // R4
      kick_.consume();
      return exits::cancelled{};
    }
    // Another signal, or immediate_exit left at 1 by a kick already consumed.
    kick_.clear_stale_immediate_exit();
  }
}

void kvm_backend::kick() noexcept {
  kick_.kick();
}

} // namespace

backend_status probe() {
  backend_status status{backend_kind::kvm, false, {}};
  auto sys = detail::kvm_system::open();
  if (!sys) {
    status.reason = sys.err().detail;
    return status;
  }
  if (auto vm = sys->create_vm(); !vm) {
    status.reason = vm.err().detail;
    return status;
  }
  // A KVM that opens and creates VMs may still be unable to run a kiln guest (see
  // run_probe_guest): run one, once per process, before calling KVM usable.
  auto cpu = kvm_backend::create();
  if (!cpu) {
    status.reason = cpu.err().message();
    return status;
  }
  if (auto ran = kiln::vcpu::x86_64::run_probe_guest(std::move(*cpu)); !ran) {
    status.reason = "/dev/kvm opens, but " + ran.err().detail;
    if (::access("/sys/module/kvm_pvm", F_OK) == 0)
      status.reason +=
          " (this host's KVM is PVM, module kvm_pvm: it runs a guest's ring 0 "
          "in KVM's instruction emulator, which lacks SSE instructions every kiln guest "
          "uses)";
    return status;
  }
  status.usable = true;
  status.reason = fmt::format("/dev/kvm, KVM API {}, {} memslots, read-only memslots: {}",
                              detail::kvm_api_version, sys->max_memslots(),
                              sys->has_readonly_mem() ? "yes" : "no");
  return status;
}

result<std::unique_ptr<vcpu>> create() {
  return kvm_backend::create();
}

} // namespace kiln::vcpu::kvm
