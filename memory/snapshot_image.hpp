// The memory of a sandbox at one point: layers of guest RAM in memfds, zero pages left as holes.
#pragma once

#include <kiln/support/result.hpp>
#include <kiln/support/unique_fd.hpp>

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace kiln::memory {

class guest_memory;

/// A half-open byte range [first, second) of guest-physical addresses.
using byte_range = std::pair<std::uint64_t, std::uint64_t>;

/// The .ksnap file a layer was mapped from: what a layered file names as its parent.
struct layer_file {
  std::string path; // absolute (lexically: symlinks in directories are not resolved)
  std::array<std::uint8_t, 16> id{};
  std::uint32_t header_crc = 0, meta_crc = 0;
  /// What a load checks the file's data against (memory/load_check.hpp): the CRC32C of each
  /// 2 MiB chunk of guest memory as this file alone holds it, and the guest ranges it holds.
  std::vector<std::uint32_t> chunk_crcs;
  std::vector<byte_range> extents;
};

/// One layer of a snapshot image: an anonymous memory file (memfd) of the RAM's size holding
/// some pages at their guest-physical offsets, holes elsewhere, or the data area of a .ksnap
/// file. Immutable once captured (only kiln holds the descriptor; a memfd's size is sealed).
class snapshot_layer {
public:
  int fd() const noexcept { return fd_.get(); }
  /// The .ksnap file this layer is mapped from; empty for a memfd.
  const std::optional<layer_file>& file() const noexcept { return file_; }
  /// File offset of guest-physical address 0 (0 for a memfd; the data offset for a .ksnap).
  std::uint64_t base() const noexcept { return base_; }
  /// Bytes of data the layer was captured with (its SEEK_DATA extents then).
  std::uint64_t data_bytes() const noexcept { return data_bytes_; }

  /// Records that the layer's data failed its checksum (a load read it): every image over the
  /// layer, and so every sandbox running on one, learns it. The first reason is kept.
  /// Thread-safe (the one mutable part of a layer).
  void mark_corrupt(std::string why) const;
  bool known_corrupt() const noexcept { return corrupt_.load(std::memory_order_acquire); }
  /// Why the data is known to be corrupt, if it is. Thread-safe.
  std::optional<std::string> corruption() const;

private:
  friend class snapshot_image;
  explicit snapshot_layer(unique_fd fd, std::uint64_t base = 0) : fd_(std::move(fd)), base_(base) {}
  unique_fd fd_;
  std::uint64_t base_ = 0;
  std::uint64_t data_bytes_ = 0;
  std::optional<layer_file> file_;
  mutable std::atomic<bool> corrupt_{false};
  mutable std::mutex why_mutex_;
  mutable std::string why_; // guarded by why_mutex_; set once, before corrupt_
};

/// A layer to build an image from: a .ksnap file's data area.
struct file_layer_source {
  unique_fd fd;
  std::uint64_t base = 0;          // file offset of guest-physical address 0
  std::vector<byte_range> extents; // what the layer provides (sorted, disjoint, validated)
  layer_file file;
};

/// Which layer provides the bytes of [lo, hi) (an index into snapshot_image::layers()).
struct image_extent {
  std::uint64_t lo = 0, hi = 0;
  std::uint32_t layer = 0;
  bool operator==(const image_extent&) const = default;
};

/// Guest RAM at a snapshot: a stack of layers, each a memfd. The first snapshot of a sandbox is
/// one layer holding its non-zero pages; a snapshot of a sandbox that descends from another
/// adds one layer holding only the pages that differ from its parent and shares the parent's
/// layers (so a child costs what its guest changed, not a copy of everything). `extents()`
/// says which layer provides each part; pages no layer provides are zero. Past a depth or
/// fragmentation cap the layers are flattened into one.
///
/// Sandboxes map it copy-on-write as their RAM (guest_memory::back_with): anonymous zero memory
/// with each extent mapped MAP_PRIVATE from its layer on top, so every sandbox shares the
/// layers' unmodified pages and dropping a sandbox's written pages brings the image back.
///
/// Thread-safety: immutable after capture; share it through shared_ptr<const snapshot_image>.
class snapshot_image {
public:
  /// Layers above this many are flattened into one at the next capture.
  static constexpr std::size_t max_depth = 8;
  /// More extents than this (each is one host mapping per sandbox) are flattened too.
  static constexpr std::size_t max_extents = 1024;

  /// Captures `mem`'s RAM. Pages in `zeroed` (the I/O buffers) and `unreadable` (pages the guest
  /// made inaccessible, PROT_NONE in the host) are stored as zeros. When `mem` is backed by an
  /// image, only the pages the guest dirtied since are read, into a new layer above the
  /// parent's; otherwise only the pages present in host memory are read (the rest are zero).
  static result<std::shared_ptr<const snapshot_image>>
  capture(const guest_memory& mem, std::span<const byte_range> zeroed,
          std::span<const byte_range> unreadable);

  /// An image with one layer per .ksnap file of a chain, oldest first: each file's data is its
  /// fd at file offset `base` + guest-physical address, and provides its `extents` (sorted,
  /// disjoint, page-aligned, within `size`; the caller validated them) over the files below.
  static std::shared_ptr<const snapshot_image> from_files(std::vector<file_layer_source> files,
                                                          std::uint64_t size);
  /// The number of bottom layers mapped from .ksnap files (a loaded chain; 0 after flattening):
  /// the top one of them is the file a layered save names as its parent.
  std::size_t file_layers() const noexcept;

  std::uint64_t size() const noexcept { return size_; }
  const std::vector<std::shared_ptr<const snapshot_layer>>& layers() const noexcept {
    return layers_;
  }
  const std::vector<image_extent>& extents() const noexcept { return extents_; }
  /// Bytes this snapshot added (its top layer's data); its parents' layers are shared.
  std::uint64_t data_bytes() const noexcept { return layers_.back()->data_bytes(); }
  /// Bytes of all its layers' data.
  std::uint64_t total_data_bytes() const noexcept;
  /// The extent holding guest-physical `a`, or nullptr where the image is zero.
  const image_extent* extent_at(std::uint64_t a) const noexcept;
  /// A layer mapped from a .ksnap file that is now shorter than its data area (truncated after
  /// it was opened): the first such layer, its file's size now and where its data ends.
  struct shrunk_file {
    const snapshot_layer* layer = nullptr;
    std::uint64_t size_now = 0, data_end = 0;
  };
  /// The first file layer whose file shrank (an fstat per file layer), if any; a layer whose
  /// file cannot be stat'ed counts as shrunk to 0.
  std::optional<shrunk_file> first_shrunk_file() const noexcept;
  /// Why a layer of the image is known to be corrupt (snapshot_layer::mark_corrupt), if one
  /// is: one atomic load per layer when none is.
  std::optional<std::string> corruption() const;
  /// The layer providing guest-physical `a`, or nullptr where the image is zero.
  const snapshot_layer* layer_at(std::uint64_t a) const noexcept {
    const image_extent* e = extent_at(a);
    return e ? layers_[e->layer].get() : nullptr;
  }

private:
  snapshot_image() = default;
  std::uint64_t size_ = 0;
  std::vector<std::shared_ptr<const snapshot_layer>> layers_; // oldest first
  std::vector<image_extent> extents_;                         // sorted, disjoint, merged
};

} // namespace kiln::memory
