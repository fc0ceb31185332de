// load_check: checks a snapshot file's data against its chunk checksums with the bytes a load
// reads anyway, as the reads complete.
#pragma once

#include <kiln/memory/load_plan.hpp>
#include <kiln/memory/snapshot_image.hpp>
#include <kiln/support/result.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

namespace kiln::memory {

/// A .ksnap file stores one CRC32C per 2 MiB chunk of guest memory, over the chunk as that file
/// alone holds it (its extents' bytes, zeros elsewhere). A load (eager or prefetch) reads every
/// byte the image takes from its files; load_check takes those bytes as each read completes,
/// keeps one CRC per 4 KiB page, and once every page a file holds in a chunk has been read,
/// combines them (zeros where the file has none) and compares the chunk's checksum. A mismatch
/// marks the file's layer corrupt (snapshot_layer::mark_corrupt): every sandbox over it learns
/// it, and failure() names the file and the chunk.
///
/// A chunk is checked only once every page its file holds there has been read: pages of a
/// parent file that a child file covers are not read by a load, so such a chunk stays
/// unchecked (counted). Demand paging reads nothing itself and checks nothing.
///
/// Thread-safety: take() runs on one thread at a time (the one driving the reads); the
/// counters and failure() may be read from any thread.
class load_check {
public:
  /// For the reads of `plan` over `image` (the plan's extents still carrying the layers' own
  /// descriptors, before any are replaced).
  load_check(std::shared_ptr<const snapshot_image> image, const load_plan& plan);
  ~load_check();
  load_check(const load_check&) = delete;
  load_check& operator=(const load_check&) = delete;

  /// Takes the bytes read for plan extent `extent` at offset `pos` inside it.
  void take(std::size_t extent, std::uint64_t pos, std::span<const std::byte> bytes) noexcept;

  /// Chunks whose checksum matched so far.
  std::uint64_t chunks_checked() const noexcept { return checked_.load(std::memory_order_relaxed); }
  /// Chunks the files hold in all (checked, failed, or not yet or never read).
  std::uint64_t chunks_total() const noexcept { return total_; }
  /// The first chunk that failed, as memory_errc::snapshot_corrupt naming the file and chunk.
  std::optional<error> failure() const;

private:
  struct chunk;
  struct layer;
  void add_page(layer& l, std::uint64_t guest_page, std::span<const std::byte> bytes) noexcept;
  void finish(layer& l, std::uint64_t c) noexcept;

  std::shared_ptr<const snapshot_image> image_;
  std::vector<std::unique_ptr<layer>> layers_; // per image layer; null for a memfd layer
  std::vector<std::uint32_t> layer_of_extent_; // plan extent -> image layer
  std::vector<std::uint64_t> extent_offset_;   // plan extent -> its file offset
  std::uint64_t total_ = 0;
  std::atomic<std::uint64_t> checked_{0};
  mutable std::mutex failure_mutex_;
  std::optional<error> failure_; // guarded by failure_mutex_
};

} // namespace kiln::memory
