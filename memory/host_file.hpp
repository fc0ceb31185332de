// A host file opened to be mapped read-only into guests: its descriptor, identity and size.
#pragma once

#include <kiln/support/result.hpp>
#include <kiln/support/unique_fd.hpp>

#include <cstdint>
#include <string>

namespace kiln::memory {

/// What names one version of a host file: where it was opened, which inode, how big and when
/// it was last changed. Snapshots refer to mapped files by this instead of copying their pages.
struct file_identity {
  std::string path;
  std::uint64_t device = 0;
  std::uint64_t inode = 0;
  std::uint64_t size = 0;
  std::int64_t mtime_ns = 0;
};

/// An open, regular, non-empty host file. Move-only; the descriptor is closed on destruction.
class host_file {
public:
  /// Opens `path` read-only. Errors: the open's errno (a missing file gives
  /// std::errc::no_such_file_or_directory), file_not_regular (directory, device, pipe...),
  /// file_empty.
  static result<host_file> open(const std::string& path);

  int fd() const noexcept { return fd_.get(); }
  const file_identity& identity() const noexcept { return id_; }
  /// The file's size now (fstat), to detect that it shrank after it was mapped.
  result<std::uint64_t> current_size() const;

private:
  host_file(unique_fd fd, file_identity id) : fd_(std::move(fd)), id_(std::move(id)) {}
  unique_fd fd_;
  file_identity id_;
};

} // namespace kiln::memory
