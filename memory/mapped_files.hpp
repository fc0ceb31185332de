// mapped_files: the host files mapped read-only into a guest's file room, by the names the
// guest's file table lists them under.
#pragma once

#include <kiln/guest/abi.h>
#include <kiln/memory/address.hpp>
#include <kiln/memory/file_fault_guard.hpp>
#include <kiln/memory/host_file.hpp>
#include <kiln/support/byte_codec.hpp>
#include <kiln/support/result.hpp>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace kiln::memory {

/// One host file mapped into the file room.
struct mapped_file {
  std::string name;              // the guest's name for it (in the file table)
  host_file file;                // open, with the identity it was checked against
  guest_phys_addr addr;          // where the guest sees it
  std::uint64_t mapped_size = 0; // page-rounded
  file_fault_watch watch;        // reports a page truncated away under the guest
};

/// A mapped file as a snapshot records it: re-opened by path at load and checked against the
/// identity it had.
struct saved_file {
  std::string name;
  file_identity identity;
  guest_phys_addr addr;
  std::uint64_t mapped_size = 0;
};

/// The files section of a snapshot: {name, path, device, inode, size, mtime, address, mapped
/// size} for each file.
void encode_saved_files(byte_writer& w, std::span<const saved_file> files);
/// Reads what encode_saved_files() wrote for a guest whose file room is [memory_size,
/// memory_size + file_room): each file named, non-empty, mapped whole and page-aligned inside
/// the room, and at most fixed::max_files of them.
result<std::vector<saved_file>> decode_saved_files(byte_reader& r, std::uint64_t memory_size,
                                                   std::uint64_t file_room);

/// The files one guest has mapped, in the order they were mapped: who is where, the rules that
/// keep their names and ranges apart, and the table the guest reads. It does not map anything
/// itself (guest_memory::map_file does, and the backend must be told); it is the bookkeeping
/// the mapping is checked against.
///
/// Thread-safety: none; the sandbox's thread.
class mapped_files {
public:
  using list = std::vector<std::unique_ptr<mapped_file>>;

  /// The name a file at `path` goes by: `name`, or the path's last component when `name` is
  /// empty. Errors: file_name_invalid (empty, KILN_FILE_NAME_MAX bytes or more, a NUL, already
  /// mapped), too_many_ranges (layout's fixed::max_files are mapped).
  result<std::string> name_for(std::string_view path, std::string name) const;
  /// Where in the file room [room_lo, room_hi) a file of `size` (page-rounded) bytes goes: at
  /// `at` when it is not 0, checked, else the first fit at a 2 MiB boundary, so that most of the
  /// file gets 2 MiB page-table leaves. `path` is for messages. Errors: unaligned, out_of_bounds
  /// (outside the room), overlapping_region (another file), file_too_large (no room).
  result<guest_phys_addr> place(std::uint64_t at, std::uint64_t size, std::uint64_t room_lo,
                                std::uint64_t room_hi, std::string_view path) const;

  void add(std::unique_ptr<mapped_file> f) { files_.push_back(std::move(f)); }
  /// Takes the file named `name` out of the set; null when none is.
  std::unique_ptr<mapped_file> take(std::string_view name);
  /// The file named `name`, or null.
  const mapped_file* find(std::string_view name) const noexcept;
  /// The file whose mapped range holds guest address `a`, or null.
  const mapped_file* containing(guest_phys_addr a) const noexcept;
  /// The guest's file table: one entry per file, in mapping order.
  std::vector<kiln_file_entry> table() const;

  std::size_t size() const noexcept { return files_.size(); }
  bool empty() const noexcept { return files_.empty(); }
  list::const_iterator begin() const noexcept { return files_.begin(); }
  list::const_iterator end() const noexcept { return files_.end(); }
  const mapped_file& back() const noexcept { return *files_.back(); }
  const mapped_file& operator[](std::size_t i) const noexcept { return *files_[i]; }

private:
  list files_;
};

} // namespace kiln::memory
