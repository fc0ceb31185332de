// Parses a static x86-64 ELF guest and copies its loadable segments into guest memory.
#pragma once

#include <kiln/memory/address.hpp>
#include <kiln/memory/guest_memory.hpp>
#include <kiln/support/result.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace kiln::memory {

struct elf_segment {
  guest_phys_addr start; // page-aligned start of the region that holds the segment
  std::uint64_t size;    // page-aligned size of that region
  guest_phys_addr vaddr; // exact p_vaddr
  std::uint64_t file_offset;
  std::uint64_t file_size;
  std::uint64_t mem_size;
  protection prot;
};

/// A validated image: every segment lies in [image_base, image_limit), none overlaps another,
/// none is writable and executable, and the entry point is inside an executable segment.
struct elf_image {
  std::vector<std::byte> file;
  std::vector<elf_segment> segments; // sorted by address
  guest_phys_addr entry;
  guest_phys_addr end; // page-aligned end of the highest segment
};

inline constexpr std::uint64_t elf_max_file_size = 256ull << 20;
inline constexpr std::uint64_t elf_max_segments = 32;

/// Validates `file` (copied into the result) as a guest image for [image_base, image_limit).
result<elf_image> parse_elf(std::span<const std::byte> file, guest_phys_addr image_base,
                            guest_phys_addr image_limit);

/// Reads a file (refusing one above elf_max_file_size) and parses it.
result<elf_image> read_elf_file(const std::string& path, guest_phys_addr image_base,
                                guest_phys_addr image_limit);

/// Adds one region per segment ("image.0", ...) and copies file bytes; the rest stays zero.
result<void> load_elf(const elf_image& image, guest_memory& mem);

} // namespace kiln::memory
