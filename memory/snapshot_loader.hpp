// snapshot_loader: the memory side of loading a sandbox's RAM from a snapshot file while the
// guest runs: the reading order, the descriptors the reads go through, the guest's read-around,
// and which guest ranges have become resident.
#pragma once

#include <kiln/memory/guest_memory.hpp>
#include <kiln/memory/load_check.hpp>
#include <kiln/memory/load_plan.hpp>
#include <kiln/memory/prefetch.hpp>
#include <kiln/memory/snapshot_image.hpp>
#include <kiln/support/result.hpp>
#include <kiln/support/unique_fd.hpp>

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

namespace kiln::memory {

/// How far a load has come.
struct load_progress {
  bool working_set_resident = false;
  bool everything_resident = false;
  bool ended = false; // done, failed or cancelled: nothing more comes in by itself
};

/// Puts an image's file-backed pages into a sandbox's RAM (`mem`, mapped from the image) in the
/// order load_plan gives: the working set first, then everything. It owns what the reads need
/// and the policies around them:
///
/// - a selective working-set phase reads through descriptors of its own with the kernel's
///   read-ahead off: a 256 KiB read then reads 256 KiB, where the file's shared description would
///   read up to the device's read-ahead window past it, spending the disk on pages the working
///   set does not need yet (lazy_load_bench, clustered working set, disk throttled to 200 MiB/s:
///   working set resident after 570 ms for 24 MiB, 371 ms without). A pass in address order keeps
///   read-ahead, which pipelines it (without: 182 ms for 256 MiB where it takes 51 ms);
/// - while that phase leads, a guest fault reads only its page (`mem`'s read-around off): the
///   prefetch knows what the guest needs, and the kernel's read-around would spend the disk on
///   pages around it (same bench: working set resident after 371 ms with read-around, 168 ms
///   without; demand paging 1,159 ms). A plan in one pass keeps read-around: there the guest's
///   faults read what the pass would. Read-around comes back once the load has ended;
/// - it keeps the image (and so its files) open for as long as reads may be in flight.
///
/// The caller drives the reads: it runs the prefetch start() returns (or load_all() on its own
/// thread) and tells advance() the prefetch's stats when the prefetch says something changed.
/// Not thread-safe: one owner (the sandbox, on its thread); the prefetch is driven elsewhere.
class snapshot_loader {
public:
  /// Plans the load of `image`, mapped as `mem`'s RAM; `working_set` is guest page numbers in
  /// first-touch order, empty for one pass in address order (an eager load). With `track_ranges`,
  /// advance() hands back the guest ranges as they become resident (for a backend that can map
  /// them ahead of the guest's faults). `mem` must outlive the loader. Reads nothing yet.
  /// With `check_data`, every chunk the reads complete is checked against the file's
  /// checksums as it comes in (load_check; check() reports).
  static std::unique_ptr<snapshot_loader> prepare(std::shared_ptr<const snapshot_image> image,
                                                  guest_memory& mem,
                                                  std::span<const std::uint32_t> working_set,
                                                  bool track_ranges, bool check_data = true);
  ~snapshot_loader();
  snapshot_loader(const snapshot_loader&) = delete;
  snapshot_loader& operator=(const snapshot_loader&) = delete;

  /// Starts the background reads (the caller drives the prefetch it gets), with read-around off
  /// while a selective working-set phase leads. Errors: memory::prefetch::start's, and
  /// set_read_around's.
  result<std::unique_ptr<prefetch>> start(const prefetch_options& options);
  /// Reads everything now, on this thread (an eager load); the caller tells advance() the stats.
  /// Errors: the prefetch's failure; snapshot_corrupt for a chunk whose checksum failed.
  result<prefetch_stats> load_all(const prefetch_options& options);

  /// Takes in the prefetch's latest stats: updates progress(), turns read-around back on once
  /// the load has ended, and returns the guest ranges that have become resident since the last
  /// call (with `track_ranges`; each range is returned once).
  std::vector<byte_range> advance(const prefetch_stats& stats);
  /// Says the load will not go on (the prefetch was cancelled): read-around comes back, and no
  /// range is handed back any more.
  void stop() noexcept;

  const load_progress& progress() const noexcept { return progress_; }
  /// The data check, when prepare() was asked for one.
  const load_check* check() const noexcept { return check_.get(); }
  const load_plan& plan() const noexcept { return plan_; }

private:
  snapshot_loader(std::shared_ptr<const snapshot_image> image, guest_memory& mem);
  void open_own_descriptors();
  prefetch_options options_for(const prefetch_options& options) const;
  void restore_read_around() noexcept;

  std::shared_ptr<const snapshot_image> image_; // keeps its files open
  guest_memory& mem_;
  load_plan plan_;
  std::unique_ptr<load_check> check_; // outlives the reads that feed it (as the image does)
  std::vector<unique_fd> own_fds_;    // the working-set reads' own descriptors (read-ahead off)
  std::vector<byte_range> pending_ws_, pending_rest_; // guest ranges not yet handed back
  bool read_around_off_ = false;
  load_progress progress_;
};

} // namespace kiln::memory
