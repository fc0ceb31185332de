// ksnap_io: exact reads and the chunk and header checksums of .ksnap files.
#include <kiln/memory/address.hpp>
#include <kiln/memory/detail/ksnap_io.hpp>
#include <kiln/memory/memory_errc.hpp>
#include <kiln/support/crc32c.hpp>

#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstddef>

namespace kiln::memory::detail {

static_assert(std::endian::native == std::endian::little, "ksnap is little-endian, read in place");
static_assert(ksnap::header_size % page_size == 0);
static_assert(ksnap::max_memory % page_size == 0);

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

result<std::vector<std::uint32_t>> chunk_crcs(std::span<const source> sources,
                                              std::uint64_t memory_size) {
  std::vector<std::uint32_t> crcs(chunk_count_for(memory_size));
  std::vector<std::byte> buf(copy_buffer_for(sources));
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

std::uint32_t header_crc(const header_block& block) {
  header_block copy = block;
  std::memset(copy.data() + offsetof(ksnap::header, header_crc), 0, sizeof(std::uint32_t));
  return crc32c(0, copy);
}

} // namespace kiln::memory::detail
