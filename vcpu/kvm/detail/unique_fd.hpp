// Move-only owner of one mmap'ed range (and kiln::unique_fd), and a thin EINTR-retrying ioctl.
#pragma once

#include <kiln/support/unique_fd.hpp>

#include <cerrno>
#include <cstddef>
#include <type_traits>
#include <utility>

#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

namespace kiln::vcpu::kvm::detail {

using kiln::unique_fd;

/// Owns one mmap'ed range; munmaps it on destruction. Move-only.
class unique_mapping {
public:
  unique_mapping() noexcept = default;
  unique_mapping(void* addr, std::size_t size) noexcept : addr_(addr), size_(size) {}
  ~unique_mapping() { reset(); }
  unique_mapping(unique_mapping&& o) noexcept
      : addr_(std::exchange(o.addr_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  unique_mapping& operator=(unique_mapping&& o) noexcept {
    if (this != &o) {
      reset();
      addr_ = std::exchange(o.addr_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  unique_mapping(const unique_mapping&) = delete;
  unique_mapping& operator=(const unique_mapping&) = delete;

  void* get() const noexcept { return addr_; }
  std::size_t size() const noexcept { return size_; }
  explicit operator bool() const noexcept { return addr_ != nullptr; }

  void reset() noexcept {
    if (addr_ != nullptr) ::munmap(addr_, size_);
    addr_ = nullptr;
    size_ = 0;
  }

private:
  void* addr_ = nullptr;
  std::size_t size_ = 0;
};

/// ioctl(2), retried while it fails with EINTR; returns its result with errno intact. Never use it
/// for kiln's KVM_RUN, whose EINTR means "kicked" and is the caller's to interpret.
/// An integer argument is passed as the `unsigned long` the kernel reads: an `int` through the
/// variadic call would leave the register's upper half unspecified (KVM_CREATE_VM's type must
/// be exactly 0).
template <class Arg> int ioctl_retry(int fd, unsigned long request, Arg arg) noexcept {
  static_assert(std::is_pointer_v<Arg> || std::is_integral_v<Arg>);
  int r;
  do {
    if constexpr (std::is_integral_v<Arg>)
      r = ::ioctl(fd, request, static_cast<unsigned long>(arg));
    else
      r = ::ioctl(fd, request, arg);
  } while (r == -1 && errno == EINTR);
  return r;
}

} // namespace kiln::vcpu::kvm::detail
