// The .ksnap snapshot file: layout, caps, crash-safe writing and validating reading.
#pragma once

#include <kiln/memory/snapshot_image.hpp>
#include <kiln/support/result.hpp>
#include <kiln/support/unique_fd.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace kiln::memory {

/// The .ksnap format, version 1.0. Little-endian throughout; every offset and size is checked
/// against the file's size and the caps below before anything is allocated or mapped.
///
///   offset 0          +---------------------------------------------------------------+
///                     | header, 4096 bytes (struct ksnap::header, zero-padded)        |
///                     |   magic "KILNSNAP", format major/minor, arch, guest ABI,      |
///                     |   page size, memory size, file size, meta and data offsets,   |
///                     |   chunk size and count, id, parent id, header checksum        |
///   meta_offset       +---------------------------------------------------------------+
///   (4096)            | sections, each: u32 tag, u32 zero, u64 size, payload,         |
///                     | zero padding to 8 bytes; tags in increasing order, each at    |
///                     | most once; EXTENTS and CHUNKS are required                    |
///                     |   EXTENTS: u64 count, then {u64 lo, u64 hi}: the guest ranges |
///                     |            the data area holds (sorted, disjoint, in memory)  |
///                     |   CHUNKS:  u32 CRC32C per 2 MiB chunk of guest memory         |
///                     |            [0, memory_size) as this file alone holds it: the  |
///                     |            EXTENTS' bytes, zero elsewhere (whatever the file  |
///                     |            holds there)                                       |
///                     |   PARENT:  (1.1, layered files only) u32 parent header CRC,  |
///                     |            u32 parent meta CRC, u64 length, path: the file    |
///                     |            this one lies over (relative paths are from this   |
///                     |            file's directory); header.parent_id is its id      |
///                     |   others:  opaque to this layer (the state of the layers      |
///                     |            above it, with their own tags), kept as bytes      |
///                     | u32 CRC32C of all section bytes                               |
///   data_offset       +---------------------------------------------------------------+
///   (page-aligned)    | guest RAM: guest-physical byte g at data_offset + g, for g    |
///                     | in [0, memory_size). Outside EXTENTS: holes (zero, no         |
///                     | blocks), so the file's allocated size tracks the non-zero     |
///                     | pages. Mapped MAP_PRIVATE directly as a snapshot layer.       |
///   file_size         +---------------------------------------------------------------+
///
/// Versioning: a reader accepts its own major version and any minor version up to its own;
/// a newer major or minor is refused (snapshot_unsupported) rather than half-read. The version
/// fields are checked before the header checksum, so a newer format is reported as such.
/// 1.0: the first format. 1.1: adds PARENT (layered files), and the runtime adds an opaque
/// section (the working set); a 1.0 reader would ignore PARENT and see only a child's own pages,
/// hence the minor bump.
///
/// A chain (a file, its parent, the parent's parent...) is at most max_chain files deep; each
/// parent must carry the id, header CRC and meta CRC its child recorded, and the same memory
/// size, else snapshot_parent_mismatch.
namespace ksnap {
inline constexpr std::array<char, 8> magic = {'K', 'I', 'L', 'N', 'S', 'N', 'A', 'P'};
inline constexpr std::uint32_t format_major = 1, format_minor = 1;
inline constexpr std::uint32_t arch_x86_64 = 1;
inline constexpr std::uint64_t header_size = 4096;
inline constexpr std::uint64_t chunk_size = 2ull << 20;
// Caps, checked before allocating.
inline constexpr std::uint64_t max_memory = 64ull << 30;
inline constexpr std::uint64_t max_meta = 16ull << 20;
inline constexpr std::uint64_t max_sections = 64;
inline constexpr std::uint64_t max_extents = 1u << 20;
inline constexpr std::size_t max_chain = snapshot_image::max_depth;
inline constexpr std::uint64_t max_parent_path = 4096;

/// A section's tag. This layer's own are named here; it reserves every tag up to `parent`, and
/// any other value is an opaque section's, named by the code that writes and reads it.
enum class tag : std::uint32_t {
  extents = 1,
  chunks = 2,
  parent = 3,
};

/// The fixed header (the rest of its 4096 bytes are zero).
struct header {
  std::array<char, 8> magic;
  std::uint32_t format_major;
  std::uint32_t format_minor;
  std::uint32_t arch;
  std::uint32_t page_size;
  std::uint32_t guest_abi_major;
  std::uint32_t guest_abi_minor;
  std::uint64_t memory_size;
  std::uint64_t file_size;
  std::uint64_t meta_offset;
  std::uint64_t meta_size; // sections and their CRC
  std::uint64_t data_offset;
  std::uint64_t chunk_size;
  std::uint64_t chunk_count;
  std::array<std::uint8_t, 16> id;
  std::array<std::uint8_t, 16> parent_id; // all zero: no parent
  std::uint32_t flags;                    // reserved, zero
  std::uint32_t header_crc;               // CRC32C of the 4096 header bytes with this zero
};
static_assert(sizeof(header) == 128, "ksnap header layout");
} // namespace ksnap

/// One opaque section, as the runtime hands it to the writer and gets it back from the reader.
struct snapshot_section {
  ksnap::tag tag;
  std::vector<std::byte> payload;
};

/// The file a layered snapshot file lies over, as its PARENT section and header name it.
struct snapshot_parent {
  std::string path; // as stored: relative to the child's directory, or absolute
  std::array<std::uint8_t, 16> id{};
  std::uint32_t header_crc = 0, meta_crc = 0;
};

/// What describes a snapshot file besides its data.
struct snapshot_file_info {
  std::uint64_t memory_size = 0;
  std::uint32_t guest_abi_major = 0, guest_abi_minor = 0;
  std::array<std::uint8_t, 16> id{};
  std::optional<snapshot_parent> parent;  // a layered file's parent (its id is the header's)
  std::vector<snapshot_section> sections; // opaque ones only (not EXTENTS, CHUNKS, PARENT)
};

/// Writes `image` and `info` to `path` crash-safely: a temporary file in the same directory,
/// written, fsync'ed, renamed over `path`, then the directory fsync'ed. On any failure (ENOSPC
/// included) the temporary file is removed and an existing `path` is untouched. The data area
/// is written sparse (only the image's extents). `info.memory_size` is the image's size (0 means
/// "the image's"); an all-zero `info.id` is replaced by a random one. If the final directory
/// fsync fails the new file is already in place (the error says it may not survive a crash).
/// Leaves nothing behind on error, except after a crash or SIGKILL mid-write: a hidden
/// ".<name>.tmp-XXXXXX" beside `path`, never a partial file at `path`. Errors: errno of the
/// failing call; EINVAL for a section tag that is EXTENTS, CHUNKS or repeated, or a memory size
/// that differs from the image's; snapshot_too_large past a cap.
///
/// With `info.parent` set the file is layered: only the extents of the image's layers from
/// `base_layers` up are written (the parent file provides the layers below, which the caller
/// checked: image.layers()[base_layers - 1] is mapped from that parent). EINVAL for a parent
/// without base layers or the reverse, or a parent path that is empty, has a NUL or is too long.
result<void> write_snapshot_file(const std::string& path, const snapshot_image& image,
                                 const snapshot_file_info& info, std::size_t base_layers = 0);

/// A validated, open snapshot file. open() reads and checks the header (magic, format version,
/// arch, page size, sizes against the file's size and the caps, checksum) and the meta area
/// (section framing, order, sizes, checksum; extents sorted, disjoint, inside memory and
/// page-aligned) before returning; nothing is mapped or allocated past the caps before that.
class snapshot_file {
public:
  /// Opens `path` with O_NOFOLLOW (a symlink as its last component is refused). Errors: the
  /// open's errno (ELOOP for a symlink), file_not_regular (a directory, FIFO, device...),
  /// snapshot_truncated, snapshot_bad_magic, snapshot_unsupported (format version, arch, page
  /// size, flags), snapshot_corrupt (checksum or structure), snapshot_too_large (a cap).
  /// Sections with tags unknown to this layer are kept in info().sections for the runtime.
  static result<snapshot_file> open(const std::string& path);

  const snapshot_file_info& info() const noexcept { return info_; }
  /// The header's and the meta area's CRC32C: with the id, what a child records of its parent.
  std::uint32_t header_crc() const noexcept { return header_crc_; }
  std::uint32_t meta_crc() const noexcept { return meta_crc_; }
  const std::vector<byte_range>& extents() const noexcept { return extents_; }
  std::uint64_t data_offset() const noexcept { return data_offset_; }
  std::uint64_t file_size() const noexcept { return file_size_; }
  /// Bytes the file really occupies on disk (allocated blocks).
  result<std::uint64_t> allocated_bytes() const;
  int fd() const noexcept { return fd_.get(); }

  /// Checks every chunk's CRC32C over the data area (reads the extents' data; the rest is zero
  /// to a guest and is not read). Errors: snapshot_corrupt naming the first bad chunk,
  /// snapshot_truncated if the file shrank since open().
  result<void> verify() const;
  /// The file's data as a layer source (its own descriptor, a dup) for snapshot_image::
  /// from_files. Re-checks the file's size first: a file that shrank since open() is refused
  /// (snapshot_truncated).
  result<file_layer_source> layer() const;
  /// This file's own data as a one-layer image (for a layered file, only the pages it holds
  /// itself: snapshot_chain gives the whole view). Errors as layer().
  result<std::shared_ptr<const snapshot_image>> image() const;
  /// The path it was opened with, made absolute (lexically).
  const std::string& path() const noexcept { return path_; }

private:
  snapshot_file() = default;
  unique_fd fd_;
  snapshot_file_info info_;
  std::vector<byte_range> extents_;
  std::vector<std::uint32_t> chunk_crcs_;
  std::uint64_t data_offset_ = 0;
  std::uint64_t file_size_ = 0;
  std::uint32_t header_crc_ = 0, meta_crc_ = 0;
  std::string path_;
};

/// A .ksnap file and the parents it names, each opened and validated as snapshot_file::open
/// does, oldest first. A parent's relative path is resolved from its child's directory; each
/// parent is checked against what its child recorded (id, header CRC, meta CRC) and must have
/// the child's memory size and guest ABI major. Errors: those of snapshot_file::open (for a
/// parent, the message names it), snapshot_parent_mismatch, snapshot_too_large for a chain
/// deeper than ksnap::max_chain (which also ends any cycle).
class snapshot_chain {
public:
  static result<snapshot_chain> open(const std::string& path);

  /// Oldest first; back() is the file opened.
  const std::vector<snapshot_file>& files() const noexcept { return files_; }
  const snapshot_file& top() const noexcept { return files_.back(); }

  /// Every chunk checksum of every file (snapshot_file::verify, the first failure named).
  result<void> verify() const;
  /// One layer per file, oldest at the bottom, each mapped from its file (each file's size is
  /// checked again first). The layers remember their files, so a snapshot taken later can be
  /// saved as a child of the top one.
  result<std::shared_ptr<const snapshot_image>> image() const;

private:
  std::vector<snapshot_file> files_;
};

} // namespace kiln::memory
