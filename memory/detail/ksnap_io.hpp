// What the .ksnap writer and reader share: section framing, exact reads and the checksums.
#pragma once

#include <kiln/memory/snapshot_file.hpp>
#include <kiln/support/result.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

namespace kiln::memory::detail {

inline constexpr std::uint64_t section_header_size = 16; // u32 tag, u32 zero, u64 size
inline constexpr std::size_t copy_buffer_size = 1 << 20;

/// The header as it lies in the file: struct ksnap::header, then zeros to ksnap::header_size.
using header_block = std::array<std::byte, ksnap::header_size>;

inline std::uint64_t chunk_count_for(std::uint64_t memory_size) {
  return memory_size / ksnap::chunk_size + (memory_size % ksnap::chunk_size != 0 ? 1 : 0);
}

/// A little-endian T at `off` of `in` (the caller checked that it fits).
template <class T> T get(std::span<const std::byte> in, std::size_t off) {
  T v;
  std::memcpy(&v, in.data() + off, sizeof v);
  return v;
}

/// Reads exactly out.size() bytes at `off`; the file ending first is snapshot_truncated.
result<void> read_exact(int fd, std::span<std::byte> out, std::uint64_t off, const char* what);

/// Where the bytes of guest range [lo, hi) are: `fd` at offset base + guest address.
struct source {
  std::uint64_t lo = 0, hi = 0;
  int fd = -1;
  std::uint64_t base = 0;
};

/// The size of a buffer that copies `sources` piece by piece: copy_buffer_size, or the largest
/// source when all are smaller (a small file need not allocate and zero a whole MiB per read).
inline std::size_t copy_buffer_for(std::span<const source> sources) {
  std::uint64_t largest = 0;
  for (const source& s : sources)
    largest = std::max(largest, s.hi - s.lo);
  return static_cast<std::size_t>(std::min<std::uint64_t>(largest, copy_buffer_size));
}

/// CRC32C of each chunk of [0, memory_size) as the guest sees it: `sources` (sorted, disjoint,
/// inside memory) read from their files, zero everywhere else (whatever a file holds there).
result<std::vector<std::uint32_t>> chunk_crcs(std::span<const source> sources,
                                              std::uint64_t memory_size);

/// The header block's CRC32C, computed with its header_crc field zero.
std::uint32_t header_crc(const header_block& block);

} // namespace kiln::memory::detail
