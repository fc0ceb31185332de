// Move-only owners of one file descriptor and one mmap'ed range, and a thin EINTR-retrying ioctl.
#pragma once

#include <cerrno>
#include <cstddef>
#include <type_traits>
#include <utility>

#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

namespace kiln::vcpu::kvm::detail {

/// Owns one file descriptor; closes it on destruction. Move-only.
class unique_fd {
public:
  unique_fd() noexcept = default;
  explicit unique_fd(int fd) noexcept : fd_(fd) {}
  ~unique_fd() { reset(); }
  unique_fd(unique_fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  unique_fd& operator=(unique_fd&& o) noexcept {
    if (this != &o) reset(std::exchange(o.fd_, -1));
    return *this;
  }
  unique_fd(const unique_fd&) = delete;
  unique_fd& operator=(const unique_fd&) = delete;

  int get() const noexcept { return fd_; }
  explicit operator bool() const noexcept { return fd_ >= 0; }

  /// Closes the current descriptor (if any) and takes `fd`. close() is not retried on EINTR:
  /// on Linux the descriptor is released even then, and a retry could close a reused number.
  void reset(int fd = -1) noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

private:
  int fd_ = -1;
};

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
