// snapshot_file: opens a .ksnap file, validating its header and meta area, and checks its data.
#include <kiln/memory/address.hpp>
#include <kiln/memory/detail/ksnap_io.hpp>
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/snapshot_file.hpp>
#include <kiln/support/crc32c.hpp>

#include <fmt/format.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <system_error>

namespace kiln::memory {
namespace {

using detail::chunk_count_for;
using detail::get;
using detail::header_block;
using detail::read_exact;
using detail::section_header_size;

/// Every check of the header that needs only the header and the file's real size.
result<void> check_header(const ksnap::header& h, const header_block& block, std::uint64_t size) {
  using enum memory_errc;
  if (h.magic != ksnap::magic) return error(snapshot_bad_magic, "magic");
  // Version first: a newer format may checksum differently, and should say so, not "corrupt".
  if (h.format_major != ksnap::format_major || h.format_minor > ksnap::format_minor)
    return error(snapshot_unsupported,
                 fmt::format("format {}.{} (this reader: {}.{})", h.format_major, h.format_minor,
                             ksnap::format_major, ksnap::format_minor));
  if (h.arch != ksnap::arch_x86_64)
    return error(snapshot_unsupported, fmt::format("architecture {}", h.arch));
  if (h.page_size != page_size)
    return error(snapshot_unsupported, fmt::format("page size {}", h.page_size));
  if (const std::uint32_t crc = detail::header_crc(block); crc != h.header_crc)
    return error(snapshot_corrupt,
                 fmt::format("header checksum {:#x}, computed {:#x}", h.header_crc, crc));
  if (h.flags != 0) return error(snapshot_unsupported, fmt::format("flags {:#x}", h.flags));

  if (h.memory_size == 0) return error(snapshot_corrupt, "memory size 0");
  if (h.memory_size > ksnap::max_memory)
    return error(snapshot_too_large, fmt::format("memory size {:#x}", h.memory_size));
  if (!is_aligned(h.memory_size, page_size))
    return error(snapshot_corrupt,
                 fmt::format("memory size {:#x} not page-aligned", h.memory_size));
  if (h.file_size > size)
    return error(snapshot_truncated, fmt::format("{} bytes, header says {}", size, h.file_size));
  if (h.file_size < size)
    return error(snapshot_corrupt, fmt::format("{} bytes, header says {}", size, h.file_size));

  if (h.meta_offset != ksnap::header_size)
    return error(snapshot_corrupt, fmt::format("meta offset {:#x}", h.meta_offset));
  if (h.meta_size > ksnap::max_meta)
    return error(snapshot_too_large, fmt::format("meta size {:#x}", h.meta_size));
  if (h.meta_size < sizeof(std::uint32_t))
    return error(snapshot_corrupt, fmt::format("meta size {}", h.meta_size));
  // Both are capped above, so the sums cannot wrap; file_size came from fstat.
  if (!is_aligned(h.data_offset, page_size) || h.data_offset < h.meta_offset + h.meta_size)
    return error(snapshot_corrupt, fmt::format("data offset {:#x}", h.data_offset));
  std::uint64_t end = 0;
  if (__builtin_add_overflow(h.data_offset, h.memory_size, &end) || end != h.file_size)
    return error(snapshot_corrupt,
                 fmt::format("data offset {:#x} + memory size {:#x} != file size {:#x}",
                             h.data_offset, h.memory_size, h.file_size));
  if (h.chunk_size != ksnap::chunk_size || h.chunk_count != chunk_count_for(h.memory_size))
    return error(snapshot_corrupt,
                 fmt::format("chunk size {:#x}, count {}", h.chunk_size, h.chunk_count));
  return {};
}

result<std::vector<byte_range>> parse_extents(std::span<const std::byte> p,
                                              std::uint64_t memory_size) {
  using enum memory_errc;
  if (p.size() < 8) return error(snapshot_corrupt, "EXTENTS shorter than its count");
  const auto count = get<std::uint64_t>(p, 0);
  if (count > ksnap::max_extents)
    return error(snapshot_too_large, fmt::format("{} extents", count));
  if (p.size() != 8 + 16 * count)
    return error(snapshot_corrupt,
                 fmt::format("EXTENTS of {} bytes for {} extents", p.size(), count));
  std::vector<byte_range> out;
  out.reserve(count);
  std::uint64_t prev = 0;
  for (std::uint64_t i = 0; i < count; ++i) {
    const auto lo = get<std::uint64_t>(p, 8 + 16 * i), hi = get<std::uint64_t>(p, 16 + 16 * i);
    if (lo >= hi || lo < prev || hi > memory_size || !is_aligned(lo, page_size) ||
        !is_aligned(hi, page_size))
      return error(snapshot_corrupt,
                   fmt::format("extent {} [{:#x}, {:#x}) is empty, unsorted, overlapping, "
                               "unaligned or outside memory",
                               i, lo, hi));
    out.emplace_back(lo, hi);
    prev = hi;
  }
  return out;
}

result<snapshot_parent> parse_parent(std::span<const std::byte> p) {
  using enum memory_errc;
  if (p.size() < 16) return error(snapshot_corrupt, "PARENT shorter than its fixed part");
  snapshot_parent out;
  out.header_crc = get<std::uint32_t>(p, 0);
  out.meta_crc = get<std::uint32_t>(p, 4);
  const auto len = get<std::uint64_t>(p, 8);
  if (len == 0 || len > ksnap::max_parent_path || p.size() != 16 + len)
    return error(snapshot_corrupt, fmt::format("PARENT path of {} bytes in {}", len, p.size()));
  out.path.assign(reinterpret_cast<const char*>(p.data() + 16), len);
  if (out.path.find('\0') != std::string::npos)
    return error(snapshot_corrupt, "PARENT path has a NUL byte");
  return out;
}

/// `path` made absolute against the working directory, lexically (no symlink is resolved).
std::string absolute_path(const std::string& path) {
  std::error_code ec;
  auto p = std::filesystem::absolute(path, ec);
  return (ec ? std::filesystem::path(path) : p).lexically_normal().string();
}

// ---- the steps of snapshot_file::open, in order ------------------------------------------------

/// An open regular file and its size when opened.
struct regular_file {
  unique_fd fd;
  std::uint64_t size = 0;
};

/// `path` opened read-only: a symlink as its last component, or anything but a regular file at
/// least a header long, is refused.
result<regular_file> open_regular(const std::string& path) {
  using enum memory_errc;
  // O_NONBLOCK: a FIFO planted at the path must not block the open; it is refused below.
  regular_file f{
      unique_fd(::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | O_NOCTTY))};
  if (!f.fd) return errno_error("open snapshot file");
  struct stat st {};
  if (::fstat(f.fd.get(), &st) != 0) return errno_error("fstat snapshot file");
  if (!S_ISREG(st.st_mode)) return error(file_not_regular, "snapshot file");
  f.size = static_cast<std::uint64_t>(st.st_size);
  if (f.size < ksnap::header_size)
    return error(snapshot_truncated, fmt::format("{} bytes, shorter than the header", f.size));
  return f;
}

/// The header, read and checked against the file's `size` (check_header).
result<ksnap::header> read_header(int fd, std::uint64_t size) {
  header_block block{};
  KILN_TRY(read_exact(fd, block, 0, "snapshot header"));
  ksnap::header h;
  std::memcpy(&h, block.data(), sizeof h);
  KILN_TRY(check_header(h, block, size));
  return h;
}

/// The meta area as read: the sections, then their CRC32C.
struct meta_area {
  std::vector<std::byte> bytes;
  std::uint32_t crc = 0;
  std::span<const std::byte> sections() const {
    return std::span(bytes).first(bytes.size() - sizeof(std::uint32_t));
  }
};

/// The meta area of a file whose header passed check_header, its checksum checked.
result<meta_area> read_meta(int fd, const ksnap::header& h) {
  // Capped by max_meta and inside the file (checked by check_header): safe to allocate and read.
  meta_area meta{std::vector<std::byte>(h.meta_size)};
  KILN_TRY(read_exact(fd, meta.bytes, h.meta_offset, "snapshot meta area"));
  const auto area = meta.sections();
  meta.crc = get<std::uint32_t>(meta.bytes, area.size());
  if (const std::uint32_t crc = crc32c(0, area); crc != meta.crc)
    return error(memory_errc::snapshot_corrupt,
                 fmt::format("meta checksum {:#x}, computed {:#x}", meta.crc, crc));
  return meta;
}

/// One section of the meta area, its framing checked, and where the next one starts.
struct section_view {
  std::uint32_t tag = 0;
  std::span<const std::byte> payload;
  std::uint64_t next = 0;
};

/// The `count`th section (from 1), at `at` in `area`: its header inside the area, its tag above
/// `prev_tag` (in order, none repeated), its payload and zero padding inside the area.
result<section_view> frame_section(std::span<const std::byte> area, std::uint64_t at,
                                   std::uint64_t count, std::uint32_t prev_tag) {
  using enum memory_errc;
  const std::uint64_t end = area.size();
  if (end - at < section_header_size)
    return error(snapshot_corrupt, fmt::format("section header at {:#x} past the end", at));
  const auto tag = get<std::uint32_t>(area, at);
  const auto zero = get<std::uint32_t>(area, at + 4);
  const auto len = get<std::uint64_t>(area, at + 8);
  if (count > ksnap::max_sections) return error(snapshot_too_large, "section count");
  if (zero != 0 || tag <= prev_tag)
    return error(
        snapshot_corrupt,
        fmt::format("section {} (tag {}) repeated, out of order or malformed", count, tag));
  const std::uint64_t room = end - at - section_header_size;
  if (len > room || align_up(len, 8) > room) // len <= room <= max_meta: no wrap
    return error(snapshot_corrupt,
                 fmt::format("section tag {} of {} bytes past the end", tag, len));
  const auto payload = area.subspan(at + section_header_size, len);
  const auto padding = area.subspan(at + section_header_size + len, align_up(len, 8) - len);
  if (std::any_of(padding.begin(), padding.end(), [](std::byte b) { return b != std::byte{}; }))
    return error(snapshot_corrupt, fmt::format("section tag {} padding not zero", tag));
  return section_view{tag, payload, at + section_header_size + align_up(len, 8)};
}

/// What the meta area's sections say.
struct parsed_meta {
  std::optional<std::vector<byte_range>> extents;
  std::optional<std::vector<std::uint32_t>> chunk_crcs;
  std::optional<snapshot_parent> parent; // its id is the header's
  std::vector<snapshot_section> sections;
};

/// Decodes one framed section into `out`: this layer's own tags parsed and checked, any other
/// kept as bytes.
result<void> take_section(parsed_meta& out, const section_view& s, const ksnap::header& h) {
  if (s.tag == static_cast<std::uint32_t>(ksnap::tag::extents)) {
    KILN_TRY_ASSIGN(out.extents, parse_extents(s.payload, h.memory_size));
  } else if (s.tag == static_cast<std::uint32_t>(ksnap::tag::chunks)) {
    if (s.payload.size() != 4 * h.chunk_count)
      return error(memory_errc::snapshot_corrupt, fmt::format("CHUNKS of {} bytes for {} chunks",
                                                              s.payload.size(), h.chunk_count));
    out.chunk_crcs.emplace(h.chunk_count);
    std::memcpy(out.chunk_crcs->data(), s.payload.data(), s.payload.size());
  } else if (s.tag == static_cast<std::uint32_t>(ksnap::tag::parent)) {
    KILN_TRY_ASSIGN(out.parent, parse_parent(s.payload));
    out.parent->id = h.parent_id;
  } else {
    // Opaque here, tags unknown to this layer included: the runtime judges them.
    out.sections.push_back({static_cast<ksnap::tag>(s.tag),
                            std::vector<std::byte>(s.payload.begin(), s.payload.end())});
  }
  return {};
}

/// Every section of `area`, framed and decoded; EXTENTS and CHUNKS must be there, and PARENT
/// exactly when the header names a parent.
result<parsed_meta> parse_sections(std::span<const std::byte> area, const ksnap::header& h) {
  using enum memory_errc;
  parsed_meta out;
  std::uint64_t count = 0;
  std::uint32_t prev_tag = 0;
  for (std::uint64_t at = 0; at < area.size();) {
    KILN_TRY_ASSIGN(const auto s, frame_section(area, at, ++count, prev_tag));
    KILN_TRY(take_section(out, s, h));
    prev_tag = s.tag;
    at = s.next;
  }
  if (!out.extents || !out.chunk_crcs)
    return error(snapshot_corrupt, "EXTENTS or CHUNKS section missing");
  if (out.parent.has_value() != (h.parent_id != std::array<std::uint8_t, 16>{}))
    return error(snapshot_corrupt, "a parent id without a PARENT section, or the reverse");
  return out;
}

} // namespace

result<snapshot_file> snapshot_file::open(const std::string& path) {
  KILN_TRY_ASSIGN(auto file, open_regular(path));
  KILN_TRY_ASSIGN(const auto h, read_header(file.fd.get(), file.size));
  KILN_TRY_ASSIGN(const auto meta, read_meta(file.fd.get(), h));
  KILN_TRY_ASSIGN(auto parsed, parse_sections(meta.sections(), h));

  snapshot_file f;
  f.fd_ = std::move(file.fd);
  f.path_ = absolute_path(path);
  f.header_crc_ = h.header_crc;
  f.meta_crc_ = meta.crc;
  f.extents_ = std::move(*parsed.extents);
  f.chunk_crcs_ = std::move(*parsed.chunk_crcs);
  f.info_.parent = std::move(parsed.parent);
  f.info_.sections = std::move(parsed.sections);
  f.info_.memory_size = h.memory_size;
  f.info_.guest_abi_major = h.guest_abi_major;
  f.info_.guest_abi_minor = h.guest_abi_minor;
  f.info_.id = h.id;
  f.data_offset_ = h.data_offset;
  f.file_size_ = h.file_size;
  return f;
}

result<std::uint64_t> snapshot_file::allocated_bytes() const {
  struct stat st {};
  if (::fstat(fd_.get(), &st) != 0) return errno_error("fstat snapshot file");
  return static_cast<std::uint64_t>(st.st_blocks) * 512;
}

result<void> snapshot_file::verify() const {
  std::vector<detail::source> sources;
  for (const auto& [lo, hi] : extents_)
    sources.push_back({lo, hi, fd_.get(), data_offset_});
  KILN_TRY_ASSIGN(auto crcs, detail::chunk_crcs(sources, info_.memory_size));
  for (std::size_t c = 0; c < crcs.size(); ++c)
    if (crcs[c] != chunk_crcs_[c])
      return error(memory_errc::snapshot_corrupt,
                   fmt::format("chunk {} (guest [{:#x}, {:#x})): checksum {:#x}, computed {:#x}", c,
                               c * ksnap::chunk_size,
                               std::min(info_.memory_size, (c + 1) * ksnap::chunk_size),
                               chunk_crcs_[c], crcs[c]));
  return {};
}

result<file_layer_source> snapshot_file::layer() const {
  struct stat st {};
  if (::fstat(fd_.get(), &st) != 0) return errno_error("fstat snapshot file");
  // Mapping past the end would fault (SIGBUS) on the guest's first touch: refuse now.
  if (static_cast<std::uint64_t>(st.st_size) < file_size_)
    return error(memory_errc::snapshot_truncated,
                 fmt::format("{}: {} bytes, {} when opened", path_, st.st_size, file_size_));
  unique_fd dup(::fcntl(fd_.get(), F_DUPFD_CLOEXEC, 0));
  if (!dup) return errno_error("dup snapshot file");
  return file_layer_source{
      std::move(dup), data_offset_, extents_,
      layer_file{path_, info_.id, header_crc_, meta_crc_, chunk_crcs_, extents_}};
}

result<std::shared_ptr<const snapshot_image>> snapshot_file::image() const {
  KILN_TRY_ASSIGN(auto l, layer());
  std::vector<file_layer_source> one;
  one.push_back(std::move(l));
  return snapshot_image::from_files(std::move(one), info_.memory_size);
}

} // namespace kiln::memory
