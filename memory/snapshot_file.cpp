// snapshot_file: writes .ksnap files through a temporary and a rename; validates them on open.
#include <kiln/memory/address.hpp>
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/snapshot_file.hpp>
#include <kiln/support/crc32c.hpp>

#include <fmt/format.h>

#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <system_error>

namespace kiln::memory {
namespace {

static_assert(std::endian::native == std::endian::little, "ksnap is little-endian, read in place");
static_assert(ksnap::header_size % page_size == 0);
static_assert(ksnap::max_memory % page_size == 0);

constexpr std::uint64_t section_header_size = 16; // u32 tag, u32 zero, u64 size
constexpr std::size_t copy_buffer_size = 1 << 20;

using header_block = std::array<std::byte, ksnap::header_size>;

error invalid(const char* what) {
  return error(std::make_error_code(std::errc::invalid_argument), what);
}

std::uint64_t chunk_count_for(std::uint64_t memory_size) {
  return memory_size / ksnap::chunk_size + (memory_size % ksnap::chunk_size != 0 ? 1 : 0);
}

/// Reads exactly out.size() bytes at `off`; the file ending first is snapshot_truncated.
result<void> read_exact(int fd, std::span<std::byte> out, std::uint64_t off, const char* what) {
  for (std::size_t done = 0; done < out.size();) {
    const ssize_t n =
        ::pread(fd, out.data() + done, out.size() - done, static_cast<off_t>(off + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno_error(what);
    if (n == 0) return error(memory_errc::snapshot_truncated, what);
    done += static_cast<std::size_t>(n);
  }
  return {};
}

result<void> write_exact(int fd, std::span<const std::byte> in, std::uint64_t off) {
  for (std::size_t done = 0; done < in.size();) {
    const ssize_t n =
        ::pwrite(fd, in.data() + done, in.size() - done, static_cast<off_t>(off + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno_error("pwrite snapshot file");
    if (n == 0) return error(std::make_error_code(std::errc::io_error), "pwrite snapshot file");
    done += static_cast<std::size_t>(n);
  }
  return {};
}

/// Where the bytes of guest range [lo, hi) are: `fd` at offset base + guest address.
struct source {
  std::uint64_t lo = 0, hi = 0;
  int fd = -1;
  std::uint64_t base = 0;
};

/// CRC32C of each chunk of [0, memory_size) as the guest sees it: `sources` (sorted, disjoint,
/// inside memory) read from their files, zero everywhere else (whatever a file holds there).
result<std::vector<std::uint32_t>> chunk_crcs(std::span<const source> sources,
                                              std::uint64_t memory_size) {
  std::vector<std::uint32_t> crcs(chunk_count_for(memory_size));
  std::vector<std::byte> buf(copy_buffer_size);
  std::size_t next = 0;
  for (std::uint64_t c = 0; c < crcs.size(); ++c) {
    const std::uint64_t clo = c * ksnap::chunk_size;
    const std::uint64_t chi = std::min(memory_size, clo + ksnap::chunk_size);
    std::uint32_t crc = 0;
    std::uint64_t at = clo; // guest bytes before this are in crc
    for (; next < sources.size() && sources[next].lo < chi; ++next) {
      const source& s = sources[next];
      const std::uint64_t lo = std::max(s.lo, clo), hi = std::min(s.hi, chi);
      crc = crc32c_zeros(crc, lo - at);
      for (std::uint64_t p = lo; p < hi;) {
        const auto part = std::span(buf).first(std::min<std::uint64_t>(buf.size(), hi - p));
        KILN_TRY(read_exact(s.fd, part, s.base + p, "pread snapshot data"));
        crc = crc32c(crc, part);
        p += part.size();
      }
      at = hi;
      if (s.hi > chi) break; // the rest of this source belongs to the next chunk
    }
    crcs[c] = crc32c_zeros(crc, chi - at);
  }
  return crcs;
}

/// The header block's CRC32C, computed with its header_crc field zero.
std::uint32_t header_crc(const header_block& block) {
  header_block copy = block;
  std::memset(copy.data() + offsetof(ksnap::header, header_crc), 0, sizeof(std::uint32_t));
  return crc32c(0, copy);
}

void put(std::vector<std::byte>& out, const void* p, std::size_t n) {
  const auto* b = static_cast<const std::byte*>(p);
  out.insert(out.end(), b, b + n);
}
void put_u32(std::vector<std::byte>& out, std::uint32_t v) {
  put(out, &v, sizeof v);
}
void put_u64(std::vector<std::byte>& out, std::uint64_t v) {
  put(out, &v, sizeof v);
}
void put_section(std::vector<std::byte>& out, ksnap::tag tag, std::span<const std::byte> payload) {
  put_u32(out, static_cast<std::uint32_t>(tag));
  put_u32(out, 0);
  put_u64(out, payload.size());
  put(out, payload.data(), payload.size());
  out.resize(align_up(out.size(), 8));
}

template <class T> T get(std::span<const std::byte> in, std::size_t off) {
  T v;
  std::memcpy(&v, in.data() + off, sizeof v);
  return v;
}

/// `path`'s directory and a mkostemp template beside it.
std::pair<std::string, std::string> temp_template(const std::string& path) {
  const auto slash = path.rfind('/');
  std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
  // A hidden name that says what it was for, short enough for NAME_MAX.
  return {dir, dir + "/." + base.substr(0, 200) + ".tmp-XXXXXX"};
}

/// Removes the temporary file unless the rename consumed it.
struct temp_file {
  std::string name;
  unique_fd fd;
  ~temp_file() {
    if (!name.empty()) ::unlink(name.c_str());
  }
};

/// Copies `len` bytes in the kernel where it can (copy_file_range), else through a buffer.
result<void> copy_range(int in, std::uint64_t in_off, int out, std::uint64_t out_off,
                        std::uint64_t len, bool& kernel_copy, std::vector<std::byte>& buf) {
  while (len != 0 && kernel_copy) {
    auto i = static_cast<loff_t>(in_off), o = static_cast<loff_t>(out_off);
    const ssize_t n = ::copy_file_range(in, &i, out, &o, len, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno != EXDEV && errno != EINVAL && errno != ENOSYS && errno != EOPNOTSUPP)
      return errno_error("copy_file_range snapshot data");
    if (n <= 0) { // across file systems, or unsupported: copy through user space below
      kernel_copy = false;
      break;
    }
    in_off += static_cast<std::uint64_t>(n);
    out_off += static_cast<std::uint64_t>(n);
    len -= static_cast<std::uint64_t>(n);
  }
  while (len != 0) {
    const auto part = std::span(buf).first(std::min<std::uint64_t>(buf.size(), len));
    KILN_TRY(read_exact(in, part, in_off, "pread snapshot layer"));
    KILN_TRY(write_exact(out, part, out_off));
    in_off += part.size();
    out_off += part.size();
    len -= part.size();
  }
  return {};
}

result<void> fsync_directory(const std::string& dir) {
  unique_fd d(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!d) return errno_error("open snapshot directory");
  if (::fsync(d.get()) != 0)
    return errno_error("fsync snapshot directory (the new file is in place)");
  return {};
}

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
  if (const std::uint32_t crc = header_crc(block); crc != h.header_crc)
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

/// Fills `id` from getrandom().
result<void> random_id(std::array<std::uint8_t, 16>& id) {
  for (std::size_t got = 0; got < id.size();) {
    const ssize_t n = ::getrandom(id.data() + got, id.size() - got, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno_error("getrandom snapshot id");
    got += static_cast<std::size_t>(n);
  }
  return {};
}

/// Writes the file as a temporary beside `path`, then renames it over `path`.
result<void> persist(const std::string& path, const ksnap::header& h, const header_block& block,
                     std::span<const std::byte> meta, std::span<const source> sources) {
  auto [dir, tmpl] = temp_template(path);
  temp_file tmp;
  const int raw = ::mkostemp(tmpl.data(), O_CLOEXEC);
  if (raw < 0) return errno_error("mkostemp snapshot file");
  tmp.name = tmpl;
  tmp.fd.reset(raw);
  const int fd = tmp.fd.get();
  // The full size first, so the data area is holes except where extents are copied in.
  if (::ftruncate(fd, static_cast<off_t>(h.file_size)) != 0)
    return errno_error("ftruncate snapshot file");
  KILN_TRY(write_exact(fd, meta, h.meta_offset));
  bool kernel_copy = true;
  std::vector<std::byte> buf(copy_buffer_size);
  for (const auto& s : sources)
    KILN_TRY(
        copy_range(s.fd, s.base + s.lo, fd, h.data_offset + s.lo, s.hi - s.lo, kernel_copy, buf));
  // The header last: a temporary left by a crash never reads as a complete file.
  KILN_TRY(write_exact(fd, block, 0));
  if (::fsync(fd) != 0) return errno_error("fsync snapshot file");
  tmp.fd.reset(); // fsync reported any write error; close cannot add one on a local file
  if (::rename(tmp.name.c_str(), path.c_str()) != 0) return errno_error("rename snapshot file");
  tmp.name.clear();
  // The rename is done: a failure here cannot be undone, only reported.
  return fsync_directory(dir);
}

} // namespace

result<void> write_snapshot_file(const std::string& path, const snapshot_image& image,
                                 const snapshot_file_info& info, std::size_t base_layers) {
  const std::uint64_t memory_size = image.size();
  if (info.memory_size != 0 && info.memory_size != memory_size)
    return invalid("snapshot info's memory size differs from the image's");
  if (memory_size == 0 || !is_aligned(memory_size, page_size))
    return invalid("snapshot memory size is zero or not page-aligned");
  if (memory_size > ksnap::max_memory) return error(memory_errc::snapshot_too_large, "memory size");
  if (info.parent.has_value() != (base_layers != 0) || base_layers > image.layers().size())
    return invalid("a layered snapshot file needs both a parent and the layers it provides");
  std::vector<std::byte> parent_payload;
  if (info.parent) {
    const auto& p = info.parent->path;
    if (p.empty() || p.size() > ksnap::max_parent_path || p.find('\0') != std::string::npos)
      return invalid("snapshot parent path empty, too long or with a NUL byte");
    put_u32(parent_payload, info.parent->header_crc);
    put_u32(parent_payload, info.parent->meta_crc);
    put_u64(parent_payload, p.size());
    put(parent_payload, p.data(), p.size());
  }

  std::vector<const snapshot_section*> sections;
  for (const auto& s : info.sections)
    sections.push_back(&s);
  std::sort(sections.begin(), sections.end(),
            [](const auto* a, const auto* b) { return a->tag < b->tag; });
  for (std::size_t i = 0; i < sections.size(); ++i)
    if (static_cast<std::uint32_t>(sections[i]->tag) <=
            static_cast<std::uint32_t>(ksnap::tag::parent) ||
        (i > 0 && sections[i]->tag == sections[i - 1]->tag))
      return invalid("snapshot section tag reserved or repeated");
  if (sections.size() + 2 > ksnap::max_sections)
    return error(memory_errc::snapshot_too_large, "section count");

  // What this file holds: each image extent from its layer (those of the layers the parent
  // provides left out), merged where they touch.
  std::vector<source> sources;
  std::vector<byte_range> extents;
  for (const auto& e : image.extents()) {
    if (e.layer < base_layers) continue;
    if (e.lo >= e.hi || e.hi > memory_size || !is_aligned(e.lo, page_size) ||
        !is_aligned(e.hi, page_size) || (!sources.empty() && e.lo < sources.back().hi))
      return invalid("snapshot image extent empty, unaligned, unsorted or outside memory");
    const auto& layer = *image.layers()[e.layer];
    sources.push_back({e.lo, e.hi, layer.fd(), layer.base()});
    if (!extents.empty() && extents.back().second == e.lo)
      extents.back().second = e.hi;
    else
      extents.emplace_back(e.lo, e.hi);
  }
  if (extents.size() > ksnap::max_extents)
    return error(memory_errc::snapshot_too_large, "extent count");
  // The meta area's size, checked against the cap before anything is built or read. Each term
  // is capped (extents, chunks, section count), so only the caller's payloads need a check.
  std::uint64_t meta_size = section_header_size + 8 + 16 * extents.size() + section_header_size +
                            align_up(4 * chunk_count_for(memory_size), 8) + sizeof(std::uint32_t);
  if (info.parent) meta_size += section_header_size + align_up(parent_payload.size(), 8);
  for (const auto* s : sections) {
    if (s->payload.size() > ksnap::max_meta)
      return error(memory_errc::snapshot_too_large, "section size");
    meta_size += section_header_size + align_up(s->payload.size(), 8);
  }
  if (meta_size > ksnap::max_meta) return error(memory_errc::snapshot_too_large, "meta size");
  KILN_TRY_ASSIGN(auto crcs, chunk_crcs(sources, memory_size));

  std::vector<std::byte> meta, payload;
  meta.reserve(meta_size);
  put_u64(payload, extents.size());
  for (const auto& [lo, hi] : extents) {
    put_u64(payload, lo);
    put_u64(payload, hi);
  }
  put_section(meta, ksnap::tag::extents, payload);
  put_section(meta, ksnap::tag::chunks, std::as_bytes(std::span(crcs)));
  if (info.parent) put_section(meta, ksnap::tag::parent, parent_payload);
  for (const auto* s : sections)
    put_section(meta, s->tag, s->payload);
  put_u32(meta, crc32c(0, meta));

  ksnap::header h{};
  h.magic = ksnap::magic;
  h.format_major = ksnap::format_major;
  h.format_minor = ksnap::format_minor;
  h.arch = ksnap::arch_x86_64;
  h.page_size = page_size;
  h.guest_abi_major = info.guest_abi_major;
  h.guest_abi_minor = info.guest_abi_minor;
  h.memory_size = memory_size;
  h.meta_offset = ksnap::header_size;
  h.meta_size = meta.size();
  h.data_offset = align_up(ksnap::header_size + meta.size(), page_size);
  h.file_size = h.data_offset + memory_size; // both capped: no wrap
  h.chunk_size = ksnap::chunk_size;
  h.chunk_count = crcs.size();
  h.id = info.id;
  if (info.parent) h.parent_id = info.parent->id;
  if (h.id == std::array<std::uint8_t, 16>{}) KILN_TRY(random_id(h.id));
  header_block block{};
  std::memcpy(block.data(), &h, sizeof h);
  h.header_crc = header_crc(block);
  std::memcpy(block.data(), &h, sizeof h);

  return persist(path, h, block, meta, sources);
}

result<snapshot_file> snapshot_file::open(const std::string& path) {
  using enum memory_errc;
  // O_NONBLOCK: a FIFO planted at the path must not block the open; it is refused below.
  const int raw = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (raw < 0) return errno_error("open snapshot file");
  snapshot_file f;
  f.fd_.reset(raw);
  f.path_ = absolute_path(path);
  struct stat st {};
  if (::fstat(raw, &st) != 0) return errno_error("fstat snapshot file");
  if (!S_ISREG(st.st_mode)) return error(file_not_regular, "snapshot file");
  const auto size = static_cast<std::uint64_t>(st.st_size);
  if (size < ksnap::header_size)
    return error(snapshot_truncated, fmt::format("{} bytes, shorter than the header", size));

  header_block block{};
  KILN_TRY(read_exact(raw, block, 0, "snapshot header"));
  ksnap::header h;
  std::memcpy(&h, block.data(), sizeof h);
  KILN_TRY(check_header(h, block, size));

  // Capped by max_meta and inside the file (checked above): safe to allocate and read.
  std::vector<std::byte> meta(h.meta_size);
  KILN_TRY(read_exact(raw, meta, h.meta_offset, "snapshot meta area"));
  const std::uint64_t end = meta.size() - sizeof(std::uint32_t);
  const auto area = std::span<const std::byte>(meta).first(end);
  if (const std::uint32_t crc = crc32c(0, area), want = get<std::uint32_t>(meta, end); crc != want)
    return error(snapshot_corrupt, fmt::format("meta checksum {:#x}, computed {:#x}", want, crc));
  f.header_crc_ = h.header_crc;
  f.meta_crc_ = get<std::uint32_t>(meta, end);

  bool have_extents = false, have_chunks = false;
  std::uint64_t count = 0;
  std::uint32_t prev_tag = 0;
  for (std::uint64_t at = 0; at < end;) {
    if (end - at < section_header_size)
      return error(snapshot_corrupt, fmt::format("section header at {:#x} past the end", at));
    const auto tag = get<std::uint32_t>(area, at);
    const auto zero = get<std::uint32_t>(area, at + 4);
    const auto len = get<std::uint64_t>(area, at + 8);
    if (++count > ksnap::max_sections) return error(snapshot_too_large, "section count");
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
    if (tag == static_cast<std::uint32_t>(ksnap::tag::extents)) {
      KILN_TRY_ASSIGN(f.extents_, parse_extents(payload, h.memory_size));
      have_extents = true;
    } else if (tag == static_cast<std::uint32_t>(ksnap::tag::chunks)) {
      if (len != 4 * h.chunk_count)
        return error(snapshot_corrupt,
                     fmt::format("CHUNKS of {} bytes for {} chunks", len, h.chunk_count));
      f.chunk_crcs_.resize(h.chunk_count);
      std::memcpy(f.chunk_crcs_.data(), payload.data(), len);
      have_chunks = true;
    } else if (tag == static_cast<std::uint32_t>(ksnap::tag::parent)) {
      KILN_TRY_ASSIGN(f.info_.parent, parse_parent(payload));
      f.info_.parent->id = h.parent_id;
    } else {
      // Opaque here, tags unknown to this layer included: the runtime judges them.
      f.info_.sections.push_back(
          {static_cast<ksnap::tag>(tag), std::vector<std::byte>(payload.begin(), payload.end())});
    }
    prev_tag = tag;
    at += section_header_size + align_up(len, 8);
  }
  if (!have_extents || !have_chunks)
    return error(snapshot_corrupt, "EXTENTS or CHUNKS section missing");
  if (f.info_.parent.has_value() != (h.parent_id != std::array<std::uint8_t, 16>{}))
    return error(snapshot_corrupt, "a parent id without a PARENT section, or the reverse");

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
  std::vector<source> sources;
  for (const auto& [lo, hi] : extents_)
    sources.push_back({lo, hi, fd_.get(), data_offset_});
  KILN_TRY_ASSIGN(auto crcs, chunk_crcs(sources, info_.memory_size));
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
  return file_layer_source{std::move(dup), data_offset_, extents_,
                           layer_file{path_, info_.id, header_crc_, meta_crc_}};
}

result<std::shared_ptr<const snapshot_image>> snapshot_file::image() const {
  KILN_TRY_ASSIGN(auto l, layer());
  std::vector<file_layer_source> one;
  one.push_back(std::move(l));
  return snapshot_image::from_files(std::move(one), info_.memory_size);
}

// ---- chains -------------------------------------------------------------------------------------

namespace {

/// A parent's path as stored in `child_path`'s PARENT section, made absolute.
std::string resolve_parent(const std::string& child_path, const std::string& stored) {
  const std::filesystem::path p(stored);
  if (p.is_absolute()) return p.lexically_normal().string();
  return (std::filesystem::path(child_path).parent_path() / p).lexically_normal().string();
}

} // namespace

result<snapshot_chain> snapshot_chain::open(const std::string& path) {
  using enum memory_errc;
  KILN_TRY_ASSIGN(auto top, snapshot_file::open(path));
  std::vector<snapshot_file> newest_first;
  newest_first.push_back(std::move(top));
  while (newest_first.back().info().parent) {
    const snapshot_file& child = newest_first.back();
    const snapshot_parent& want = *child.info().parent;
    if (newest_first.size() >= ksnap::max_chain)
      return error(snapshot_too_large, fmt::format("{}: a chain of more than {} files",
                                                   newest_first.front().path(), ksnap::max_chain));
    const std::string parent_path = resolve_parent(child.path(), want.path);
    auto parent = snapshot_file::open(parent_path);
    if (!parent)
      return error(parent.err().code, fmt::format("parent {} of {}: {}", parent_path, child.path(),
                                                  parent.err().message()));
    const auto& pi = parent->info();
    if (pi.id != want.id || parent->header_crc() != want.header_crc ||
        parent->meta_crc() != want.meta_crc)
      return error(snapshot_parent_mismatch,
                   fmt::format("{} is not the parent {} was written against (another id or "
                               "checksum: rewritten since?)",
                               parent_path, child.path()));
    if (pi.memory_size != child.info().memory_size ||
        pi.guest_abi_major != child.info().guest_abi_major)
      return error(snapshot_parent_mismatch,
                   fmt::format("parent {} has another memory size or guest ABI than {}",
                               parent_path, child.path()));
    newest_first.push_back(std::move(*parent));
  }
  snapshot_chain c;
  for (std::size_t i = newest_first.size(); i-- > 0;)
    c.files_.push_back(std::move(newest_first[i]));
  return c;
}

result<void> snapshot_chain::verify() const {
  for (const auto& f : files_)
    if (auto r = f.verify(); !r)
      return error(r.err().code, fmt::format("{}: {}", f.path(), r.err().message()));
  return {};
}

result<std::shared_ptr<const snapshot_image>> snapshot_chain::image() const {
  std::vector<file_layer_source> layers;
  for (const auto& f : files_) {
    KILN_TRY_ASSIGN(auto l, f.layer());
    layers.push_back(std::move(l));
  }
  return snapshot_image::from_files(std::move(layers), top().info().memory_size);
}

} // namespace kiln::memory
