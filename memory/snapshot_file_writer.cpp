// write_snapshot_file: lays a snapshot image out as a .ksnap file, written through a temporary
// and a rename.
#include <kiln/memory/address.hpp>
#include <kiln/memory/detail/ksnap_io.hpp>
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/snapshot_file.hpp>
#include <kiln/support/crc32c.hpp>

#include <fcntl.h>
#include <sys/random.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <system_error>

namespace kiln::memory {
namespace {

using detail::chunk_count_for;
using detail::header_block;
using detail::section_header_size;
using detail::source;

error invalid(const char* what) {
  return error(std::make_error_code(std::errc::invalid_argument), what);
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

// ---- the steps of write_snapshot_file, in order ------------------------------------------------

/// The image's memory size, checked against `info`, the caps and the parent/base-layers pairing.
result<std::uint64_t> checked_memory_size(const snapshot_image& image,
                                          const snapshot_file_info& info, std::size_t base_layers) {
  const std::uint64_t memory_size = image.size();
  if (info.memory_size != 0 && info.memory_size != memory_size)
    return invalid("snapshot info's memory size differs from the image's");
  if (memory_size == 0 || !is_aligned(memory_size, page_size))
    return invalid("snapshot memory size is zero or not page-aligned");
  if (memory_size > ksnap::max_memory) return error(memory_errc::snapshot_too_large, "memory size");
  if (info.parent.has_value() != (base_layers != 0) || base_layers > image.layers().size())
    return invalid("a layered snapshot file needs both a parent and the layers it provides");
  return memory_size;
}

/// The PARENT section's payload (empty without a parent), its path checked first.
result<std::vector<std::byte>> parent_payload(const std::optional<snapshot_parent>& parent) {
  std::vector<std::byte> out;
  if (!parent) return out;
  const auto& p = parent->path;
  if (p.empty() || p.size() > ksnap::max_parent_path || p.find('\0') != std::string::npos)
    return invalid("snapshot parent path empty, too long or with a NUL byte");
  put_u32(out, parent->header_crc);
  put_u32(out, parent->meta_crc);
  put_u64(out, p.size());
  put(out, p.data(), p.size());
  return out;
}

/// The caller's opaque sections in tag order (the file's); none may use a tag this layer
/// reserves or repeat one, and with EXTENTS and CHUNKS they must fit max_sections.
result<std::vector<const snapshot_section*>>
sorted_sections(const std::vector<snapshot_section>& all) {
  std::vector<const snapshot_section*> sections;
  for (const auto& s : all)
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
  return sections;
}

/// What this file holds: where to read each byte of its data area, and its EXTENTS.
struct own_data {
  std::vector<source> sources;     // one per image extent written
  std::vector<byte_range> extents; // the same ranges, merged where they touch
};

/// Each image extent from its layer (those of the layers the parent provides left out), merged
/// where they touch.
result<own_data> own_data_of(const snapshot_image& image, std::size_t base_layers,
                             std::uint64_t memory_size) {
  own_data out;
  auto& sources = out.sources;
  auto& extents = out.extents;
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
  return out;
}

/// The meta area's size, checked against the cap before anything is built or read. Each term
/// is capped (extents, chunks, section count), so only the caller's payloads need a check.
/// `parent` is the PARENT payload of a layered file, null for a file without a parent.
result<std::uint64_t> meta_size_for(std::size_t extent_count, std::uint64_t memory_size,
                                    const std::vector<std::byte>* parent,
                                    std::span<const snapshot_section* const> sections) {
  std::uint64_t meta_size = section_header_size + 8 + 16 * extent_count + section_header_size +
                            align_up(4 * chunk_count_for(memory_size), 8) + sizeof(std::uint32_t);
  if (parent) meta_size += section_header_size + align_up(parent->size(), 8);
  for (const auto* s : sections) {
    if (s->payload.size() > ksnap::max_meta)
      return error(memory_errc::snapshot_too_large, "section size");
    meta_size += section_header_size + align_up(s->payload.size(), 8);
  }
  if (meta_size > ksnap::max_meta) return error(memory_errc::snapshot_too_large, "meta size");
  return meta_size;
}

/// The meta area, `meta_size` bytes: EXTENTS, CHUNKS, PARENT (when `parent` is not null), the
/// opaque sections in tag order, then the CRC32C of all of them.
std::vector<std::byte> build_meta(std::uint64_t meta_size, const std::vector<byte_range>& extents,
                                  const std::vector<std::uint32_t>& crcs,
                                  const std::vector<std::byte>* parent,
                                  std::span<const snapshot_section* const> sections) {
  std::vector<std::byte> meta, payload;
  meta.reserve(meta_size);
  put_u64(payload, extents.size());
  for (const auto& [lo, hi] : extents) {
    put_u64(payload, lo);
    put_u64(payload, hi);
  }
  put_section(meta, ksnap::tag::extents, payload);
  put_section(meta, ksnap::tag::chunks, std::as_bytes(std::span(crcs)));
  if (parent) put_section(meta, ksnap::tag::parent, *parent);
  for (const auto* s : sections)
    put_section(meta, s->tag, s->payload);
  put_u32(meta, crc32c(0, meta));
  return meta;
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

/// A header and the block it is written as, checksum included.
struct sealed_header {
  ksnap::header h;
  header_block block;
};

/// The header of a file of `memory_size` bytes of RAM and `meta_size` bytes of meta area, and
/// its block with the checksum; an all-zero `info.id` is replaced by a random one.
result<sealed_header> build_header(const snapshot_file_info& info, std::uint64_t memory_size,
                                   std::uint64_t meta_size, std::uint64_t chunk_count) {
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
  h.meta_size = meta_size;
  h.data_offset = align_up(ksnap::header_size + meta_size, page_size);
  h.file_size = h.data_offset + memory_size; // both capped: no wrap
  h.chunk_size = ksnap::chunk_size;
  h.chunk_count = chunk_count;
  h.id = info.id;
  if (info.parent) h.parent_id = info.parent->id;
  if (h.id == std::array<std::uint8_t, 16>{}) KILN_TRY(random_id(h.id));
  sealed_header out{h, {}};
  std::memcpy(out.block.data(), &out.h, sizeof out.h);
  out.h.header_crc = detail::header_crc(out.block);
  std::memcpy(out.block.data(), &out.h, sizeof out.h);
  return out;
}

// ---- persisting: a temporary, then a rename ----------------------------------------------------

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
    KILN_TRY(detail::read_exact(in, part, in_off, "pread snapshot layer"));
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

/// Writes the file as a temporary beside `path`, then renames it over `path`.
result<void> persist(const std::string& path, const sealed_header& header,
                     std::span<const std::byte> meta, std::span<const source> sources) {
  const ksnap::header& h = header.h;
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
  std::vector<std::byte> buf(detail::copy_buffer_for(sources));
  for (const auto& s : sources)
    KILN_TRY(
        copy_range(s.fd, s.base + s.lo, fd, h.data_offset + s.lo, s.hi - s.lo, kernel_copy, buf));
  // The header last: a temporary left by a crash never reads as a complete file.
  KILN_TRY(write_exact(fd, header.block, 0));
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
  // Every argument is checked, and the meta area's size against its cap, before any data is
  // read; nothing is written before the data has been read once for the chunk checksums.
  KILN_TRY_ASSIGN(const std::uint64_t memory_size, checked_memory_size(image, info, base_layers));
  KILN_TRY_ASSIGN(const auto parent, parent_payload(info.parent));
  const std::vector<std::byte>* layered = info.parent ? &parent : nullptr;
  KILN_TRY_ASSIGN(const auto sections, sorted_sections(info.sections));
  KILN_TRY_ASSIGN(const auto own, own_data_of(image, base_layers, memory_size));
  KILN_TRY_ASSIGN(const std::uint64_t meta_size,
                  meta_size_for(own.extents.size(), memory_size, layered, sections));
  KILN_TRY_ASSIGN(const auto crcs, detail::chunk_crcs(own.sources, memory_size));
  const auto meta = build_meta(meta_size, own.extents, crcs, layered, sections);
  KILN_TRY_ASSIGN(const auto header, build_header(info, memory_size, meta.size(), crcs.size()));
  return persist(path, header, meta, own.sources);
}

} // namespace kiln::memory
