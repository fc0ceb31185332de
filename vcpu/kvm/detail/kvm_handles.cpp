// The KVM handle owners: opening /dev/kvm, creating a VM and a vCPU, each checked once.
#include <kiln/vcpu/kvm/detail/kvm_handles.hpp>

#include <kiln/vcpu/kvm/detail/kvm_ioctls.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <memory>
#include <system_error>

#include <fcntl.h>

namespace kiln::vcpu::kvm::detail {

error kvm_error(vcpu_errc code, std::string_view what, int err) {
  return error(code, fmt::format("{}: {}", what, std::generic_category().message(err)));
}

namespace {

struct required_cap {
  int cap;
  const char* name;
};

// What kiln cannot run without: memslots from user memory, a race-free kick, the Intel real-mode
// TSS pages moved out of the way, and the extended CPUID ioctls.
constexpr required_cap required_caps[] = {
    {KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY"},
    {KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT"},
    {KVM_CAP_SET_TSS_ADDR, "KVM_CAP_SET_TSS_ADDR"},
    {KVM_CAP_EXT_CPUID, "KVM_CAP_EXT_CPUID"},
};

// KVM guaranteed 32 user memslots before KVM_CAP_NR_MEMSLOTS existed.
constexpr std::uint32_t fallback_memslots = 32;

} // namespace

result<kvm_system> kvm_system::open() {
  int raw;
  do {
    raw = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  } while (raw == -1 && errno == EINTR);
  if (raw == -1) return kvm_error(vcpu_errc::backend_unavailable, "/dev/kvm", errno);
  kvm_system sys{unique_fd(raw)};

  const int version = ioctl_retry(sys.fd(), KVM_GET_API_VERSION, 0);
  if (version == -1) return kvm_error(vcpu_errc::kvm_api_mismatch, "KVM_GET_API_VERSION", errno);
  if (version != kvm_api_version)
    return error(
        vcpu_errc::kvm_api_mismatch,
        fmt::format("/dev/kvm speaks KVM API {}, kiln needs {}", version, kvm_api_version));

  for (const auto& rc : required_caps)
    if (sys.check_extension(rc.cap) <= 0)
      return error(vcpu_errc::kvm_api_mismatch, fmt::format("KVM lacks {}", rc.name));

  sys.readonly_mem_ = sys.check_extension(KVM_CAP_READONLY_MEM) > 0;
  const int slots = sys.check_extension(KVM_CAP_NR_MEMSLOTS);
  sys.max_memslots_ = slots > 0 ? static_cast<std::uint32_t>(slots) : fallback_memslots;

  const int mmap_size = ioctl_retry(sys.fd(), KVM_GET_VCPU_MMAP_SIZE, 0);
  if (mmap_size == -1)
    return kvm_error(vcpu_errc::kvm_api_mismatch, "KVM_GET_VCPU_MMAP_SIZE", errno);
  if (static_cast<std::size_t>(mmap_size) < sizeof(kvm_run))
    return error(
        vcpu_errc::kvm_api_mismatch,
        fmt::format("KVM_GET_VCPU_MMAP_SIZE returned {}, less than struct kvm_run", mmap_size));
  sys.vcpu_mmap_size_ = static_cast<std::size_t>(mmap_size);
  return sys;
}

int kvm_system::check_extension(int cap) const noexcept {
  const int r = ioctl_retry(fd(), KVM_CHECK_EXTENSION, cap);
  return r > 0 ? r : 0;
}

result<std::vector<kvm_cpuid_entry2>> kvm_system::supported_cpuid() const {
  // 10 KiB: on the heap rather than on a worker's stack.
  auto table = std::make_unique<cpuid_table>();
  table->nent = cpuid_table::capacity;
  // SAFETY: cpuid_table has kvm_cpuid2's layout (static_assert in the header) with `capacity`
  // entries behind it; the kernel writes at most `nent` of them and updates `nent`.
  if (ioctl_retry(fd(), get_supported_cpuid_request, table.get()) == -1)
    return kvm_error(vcpu_errc::create_failed, "KVM_GET_SUPPORTED_CPUID", errno);
  const std::uint32_t n = std::min(table->nent, cpuid_table::capacity);
  return std::vector<kvm_cpuid_entry2>(table->entries, table->entries + n);
}

result<kvm_vm> kvm_system::create_vm() const {
  // ioctl_retry covers EINTR: KVM_CREATE_VM fails with it when a signal interrupts
  // mmu_notifier_register() (Firecracker #5046).
  const int vm = ioctl_retry(fd(), KVM_CREATE_VM, 0);
  if (vm == -1) return kvm_error(vcpu_errc::create_failed, "KVM_CREATE_VM", errno);
  return kvm_vm(unique_fd(vm), vcpu_mmap_size_);
}

result<kvm_vcpu_fd> kvm_vm::create_vcpu(unsigned id) const {
  const int raw = ioctl_retry(fd(), KVM_CREATE_VCPU, static_cast<unsigned long>(id));
  if (raw == -1) return kvm_error(vcpu_errc::create_failed, "KVM_CREATE_VCPU", errno);
  unique_fd vcpu_fd(raw);
  void* run =
      ::mmap(nullptr, vcpu_mmap_size_, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd.get(), 0);
  if (run == MAP_FAILED)
    return kvm_error(vcpu_errc::create_failed, "mmap of the vCPU run area", errno);
  return kvm_vcpu_fd(std::move(vcpu_fd), unique_mapping(run, vcpu_mmap_size_));
}

} // namespace kiln::vcpu::kvm::detail
