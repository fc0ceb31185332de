// RAII owner of one host mmap, optionally fenced by PROT_NONE guard pages on both sides.
#pragma once

#include <kiln/support/result.hpp>

#include <cstddef>
#include <cstdint>

namespace kiln::memory {

/// Move-only owner of an anonymous host mapping. The usable bytes [data(), data()+size()) are
/// read-write; with guards, one PROT_NONE page sits directly below and above them so a host-side
/// overrun faults instead of corrupting a neighbour.
class host_mapping {
public:
  host_mapping() = default;
  ~host_mapping();
  host_mapping(host_mapping&& o) noexcept;
  host_mapping& operator=(host_mapping&& o) noexcept;
  host_mapping(const host_mapping&) = delete;
  host_mapping& operator=(const host_mapping&) = delete;

  /// Maps `size` bytes (a multiple of the page size) of zeroed, private, read-write memory,
  /// advised MADV_NOHUGEPAGE (see the .cpp for why).
  /// `extra` more bytes (page multiple) are reserved inaccessible right after them (between
  /// them and the upper guard), for the owner to map things into later with MAP_FIXED.
  static result<host_mapping> anonymous(std::uint64_t size, bool guards = true,
                                        std::uint64_t extra = 0);

  std::byte* data() const noexcept { return data_; }
  std::uint64_t size() const noexcept { return size_; }
  /// Bytes reserved after size() (inaccessible unless the owner mapped something there).
  std::uint64_t extra() const noexcept { return extra_; }
  explicit operator bool() const noexcept { return data_ != nullptr; }

private:
  void reset() noexcept;

  void* base_ = nullptr; // start of the whole reservation, guards included
  std::uint64_t reserved_ = 0;
  std::byte* data_ = nullptr;
  std::uint64_t size_ = 0;
  std::uint64_t extra_ = 0;
};

} // namespace kiln::memory
