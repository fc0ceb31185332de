// Owning types for the three KVM handles: the system (/dev/kvm), a VM, and a vCPU with its run
// area.
#pragma once

#include <kiln/support/result.hpp>
#include <kiln/vcpu/kvm/detail/unique_fd.hpp>
#include <kiln/vcpu/vcpu_errc.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include <linux/kvm.h>

namespace kiln::vcpu::kvm::detail {

/// The only KVM API version there has ever been in mainline; KVM_GET_API_VERSION must say so.
inline constexpr int kvm_api_version = 12;

/// An error of the vcpu layer whose detail names the failed call and errno: "WHAT: strerror".
error kvm_error(vcpu_errc code, std::string_view what, int err);

/// KVM_GET_SUPPORTED_CPUID / KVM_SET_CPUID2 argument: `struct kvm_cpuid2` with room for the
/// kernel's maximum number of entries (KVM_MAX_CPUID_ENTRIES is 256 since Linux 5.x). Spelled
/// out because `kvm_cpuid2` ends in a flexible array, which C++ cannot embed in a struct; the
/// request numbers that go with it are in kvm_ioctls.hpp, for the same reason.
struct cpuid_table {
  static constexpr std::uint32_t capacity = 256;
  std::uint32_t nent = 0;
  std::uint32_t padding = 0;
  kvm_cpuid_entry2 entries[capacity]{};
};
// The kernel's layout of struct kvm_cpuid2: u32 nent, u32 padding, then 40-byte entries.
static_assert(offsetof(cpuid_table, entries) == 8 && sizeof(kvm_cpuid_entry2) == 40,
              "cpuid_table must have the kernel's struct kvm_cpuid2 layout");

class kvm_vm;
class kvm_vcpu_fd;

/// /dev/kvm, opened read-write and close-on-exec, with its API version (12) and the capabilities
/// kiln needs checked. Move-only. Thread-safety: const members may be called from any thread.
class kvm_system {
public:
  /// Opens /dev/kvm and checks KVM_GET_API_VERSION == 12, KVM_CAP_USER_MEMORY,
  /// KVM_CAP_IMMEDIATE_EXIT, KVM_CAP_SET_TSS_ADDR and KVM_CAP_EXT_CPUID.
  /// Errors: backend_unavailable ("/dev/kvm: No such file or directory"), kvm_api_mismatch.
  static result<kvm_system> open();

  int fd() const noexcept { return fd_.get(); }
  /// KVM_CHECK_EXTENSION: > 0 when supported (some capabilities return a count); 0 otherwise.
  int check_extension(int cap) const noexcept;
  bool has_readonly_mem() const noexcept { return readonly_mem_; }
  std::uint32_t max_memslots() const noexcept { return max_memslots_; }
  std::size_t vcpu_mmap_size() const noexcept { return vcpu_mmap_size_; }

  /// KVM_GET_SUPPORTED_CPUID: every CPUID leaf KVM can present to a guest on this host.
  result<std::vector<kvm_cpuid_entry2>> supported_cpuid() const;

  /// KVM_CREATE_VM (type 0), retried on EINTR (the kernel can return it while registering the
  /// MMU notifier). Errors: create_failed.
  result<kvm_vm> create_vm() const;

private:
  explicit kvm_system(unique_fd fd) : fd_(std::move(fd)) {}

  unique_fd fd_;
  bool readonly_mem_ = false;
  std::uint32_t max_memslots_ = 0;
  std::size_t vcpu_mmap_size_ = 0;
};

/// One VM fd. Move-only; closing it (after its vCPUs) destroys the VM.
class kvm_vm {
public:
  int fd() const noexcept { return fd_.get(); }

  /// KVM_CREATE_VCPU with `id`, then maps its `struct kvm_run` area. Errors: create_failed.
  result<kvm_vcpu_fd> create_vcpu(unsigned id) const;

private:
  friend class kvm_system;
  kvm_vm(unique_fd fd, std::size_t vcpu_mmap_size)
      : fd_(std::move(fd)), vcpu_mmap_size_(vcpu_mmap_size) {}

  unique_fd fd_;
  std::size_t vcpu_mmap_size_ = 0;
};

/// One vCPU fd and its shared `struct kvm_run` mapping. Move-only.
class kvm_vcpu_fd {
public:
  int fd() const noexcept { return fd_.get(); }
  /// The run area shared with the kernel: exit information after KVM_RUN, `immediate_exit`
  /// before it. Valid while this object lives.
  kvm_run* run() const noexcept { return static_cast<kvm_run*>(run_.get()); }
  /// Bytes of the run mapping (the run struct, then the PIO data page and more).
  std::size_t run_size() const noexcept { return run_.size(); }

private:
  friend class kvm_vm;
  kvm_vcpu_fd(unique_fd fd, unique_mapping run) : fd_(std::move(fd)), run_(std::move(run)) {}

  unique_fd fd_;
  unique_mapping run_; // declared after fd_, so it is unmapped first
};

} // namespace kiln::vcpu::kvm::detail
