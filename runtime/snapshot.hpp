// kiln::snapshot: a sandbox's state at a quiescent point, to restore or to start sandboxes from.
#pragma once

#include <kiln/support/result.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace kiln {

namespace detail {
struct snapshot_state;
struct sandbox_access;
} // namespace detail

struct working_set;

/// Which host files a snapshot file may map into its guests. A .ksnap records each mapped file by
/// path and identity, never its bytes, so a file from elsewhere could name any file this process
/// can read. snapshot::load() resolves each recorded path (symlinks and `..` included) and
/// refuses the file (memory_errc::file_not_allowed) unless the resolved path lies under one of
/// `directories` or `allow` accepts it. Sandboxes then open the resolved path, which must still
/// match the recorded identity. The default allows nothing: a snapshot that maps no files loads
/// as before.
struct mapped_file_policy {
  std::vector<std::string> directories; // resolved too; a file must lie below one
  /// Asked for each file not under `directories`: its name in the guest and resolved path.
  std::function<bool(std::string_view name, const std::string& resolved_path)> allow;
  /// Every recorded path as recorded, unresolved (the files need not exist until a sandbox
  /// maps them): for snapshot files your own service wrote.
  bool any_recorded = false;
  static mapped_file_policy any() { return {{}, {}, true}; }
};

struct save_options {
  /// Write only what differs from the .ksnap file the snapshot descends from (it was loaded from
  /// that file, or taken in a sandbox created from or restored to a snapshot loaded from it),
  /// and name that file as the parent: by path (relative when both lie in one directory, so
  /// the pair can move together), id and checksums. A whole file is written instead when the
  /// snapshot descends from no file, when its layers were flattened (past
  /// memory::snapshot_image::max_depth layers, the cap on a file chain as well), when the
  /// parent's path no longer names the file it was loaded from, or when `path` is that file or
  /// one of its ancestors (a child must not replace its own parent).
  bool layered = true;
};

/// A sandbox's memory, vCPU state (general, special and FPU/SSE registers), layout, page-table
/// and protection bookkeeping and mapped-file references, captured between calls. Immutable and
/// cheap to copy (copies share it). Its memory is an image that sandboxes map copy-on-write:
/// every sandbox restored to it or created from it shares the image's unmodified pages, and a
/// restore drops only the pages the guest dirtied since. Mapped files are referred to (path and
/// identity), never copied.
///
/// Thread-safety: immutable; any thread may use a snapshot concurrently.
class snapshot {
public:
  snapshot() = default;
  explicit operator bool() const noexcept { return state_ != nullptr; }

  /// Unique in this process; a sandbox created from or restored to a snapshot descends from it.
  std::uint64_t id() const noexcept;
  /// Guest RAM size.
  std::uint64_t memory_size() const noexcept;
  /// Bytes of RAM data this snapshot holds itself (zero pages are holes and cost nothing; a
  /// snapshot of a sandbox descending from another holds only the pages that differ).
  result<std::uint64_t> stored_bytes() const;
  /// The .ksnap files its memory is mapped from, oldest first (empty for a snapshot that was
  /// never saved and loaded, or whose layers were flattened).
  std::vector<std::string> files() const;

  /// Saves the snapshot to a .ksnap file (memory/snapshot_file.hpp), crash-safely: a temporary
  /// file, fsync, rename over `path`, directory fsync; on failure an existing file is untouched.
  /// Mapped files are recorded by path and identity, not copied; the host functions the guest
  /// was built against by name and signature. By default a snapshot descending from a file is
  /// saved as a small layered file over it (see save_options).
  result<void> save(const std::string& path, const save_options& options = {}) const;
  /// Loads a .ksnap file and the parents a layered file names (memory::snapshot_chain): every
  /// file is validated (header, sections, parent ids and checksums; layout and registers from
  /// the file itself) before anything is mapped, then each file's data is mapped copy-on-write
  /// as one layer. Sandboxes created from the result may restore to it at once. Errors: the
  /// memory::memory_errc snapshot_* codes, file_not_allowed (a mapped file `files` does not
  /// allow), the open's errno (ELOOP for a symlink, ENOENT for a missing parent or mapped file).
  static result<snapshot> load(const std::string& path, const mapped_file_policy& files = {});
  /// A human-readable description: sizes, layout, regions, protections, files, host functions,
  /// working set.
  std::string describe() const;

  /// This snapshot with `ws` as its working set, which save() stores and loads prefetch first.
  /// Errors: bad_arguments (recorded in a sandbox that did not start from this snapshot, or a
  /// page outside its memory), not_ready (empty snapshot).
  result<snapshot> with_working_set(const working_set& ws) const;
  /// Pages of its working set (0: none recorded).
  std::size_t working_set_pages() const noexcept;

  /// Checks every data chunk's checksum of the .ksnap file at `path` and of the parents it
  /// names (reads all of them), and every check load() makes of the state the file holds: a
  /// file that verifies loads.
  static result<void> verify(const std::string& path);

private:
  friend class sandbox;
  friend struct detail::sandbox_access;
  explicit snapshot(std::shared_ptr<const detail::snapshot_state> s) : state_(std::move(s)) {}
  std::shared_ptr<const detail::snapshot_state> state_;
};

} // namespace kiln
