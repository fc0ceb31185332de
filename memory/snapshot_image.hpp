// The memory of a sandbox at one point: guest RAM in a memfd, zero pages left as holes.
#pragma once

#include <kiln/support/result.hpp>
#include <kiln/support/unique_fd.hpp>

#include <cstdint>
#include <memory>
#include <span>
#include <utility>
#include <vector>

namespace kiln::memory {

class guest_memory;

/// A half-open byte range [first, second) of guest-physical addresses.
using byte_range = std::pair<std::uint64_t, std::uint64_t>;

/// Guest RAM at a snapshot, byte for byte, in an anonymous memory file (memfd). Sandboxes map
/// it MAP_PRIVATE as their RAM, so all of them share its unmodified pages through the page
/// cache, and dropping a sandbox's private (written) pages brings back the snapshot's bytes.
/// Zero pages are holes: the file's allocated size tracks the non-zero pages. Immutable once
/// captured (only kiln holds the descriptor, and its size is sealed).
///
/// Thread-safety: immutable after capture; share it through shared_ptr<const snapshot_image>.
class snapshot_image {
public:
  /// Captures `mem`'s RAM. Pages in `zeroed` (the I/O buffers) and `unreadable` (pages the guest
  /// made inaccessible, PROT_NONE in the host) are stored as zeros. When `mem` is itself backed
  /// by an image, that image's data is copied in the kernel and only the pages the guest
  /// dirtied since are read from guest memory; otherwise only the pages present in host memory
  /// are read (the rest are zero). Cost: proportional to stored data, not to memory size.
  static result<std::shared_ptr<const snapshot_image>> capture(
      const guest_memory& mem, std::span<const byte_range> zeroed,
      std::span<const byte_range> unreadable);

  int fd() const noexcept { return fd_.get(); }
  std::uint64_t size() const noexcept { return size_; }
  /// Bytes the file really holds (its allocated blocks).
  result<std::uint64_t> allocated_bytes() const;
  /// Bytes of data the image was captured with, not counting holes (its SEEK_DATA extents at
  /// capture). Later, a guest touching a hole through its mapping makes the kernel allocate a
  /// (zero) page cache page there, shared by all sandboxes of this image; that is not counted.
  std::uint64_t data_bytes() const noexcept { return data_bytes_; }

private:
  snapshot_image(unique_fd fd, std::uint64_t size) : fd_(std::move(fd)), size_(size) {}
  /// Sum of the file's SEEK_DATA extents now.
  result<std::uint64_t> scan_data_bytes() const;
  unique_fd fd_;
  std::uint64_t size_ = 0;
  std::uint64_t data_bytes_ = 0;
};

} // namespace kiln::memory
