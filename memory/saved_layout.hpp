// A guest's memory plan as a snapshot saves it: the sizes it was built with, the layout planned
// from them and its RAM regions, each checked on the way back against what kiln would plan.
#pragma once

#include <kiln/memory/guest_memory.hpp>
#include <kiln/memory/layout.hpp>
#include <kiln/support/byte_codec.hpp>
#include <kiln/support/result.hpp>

#include <cstdint>
#include <span>
#include <vector>

namespace kiln::memory {

/// The sizes a guest's memory was planned with, and the plan.
struct saved_layout {
  std::uint64_t file_room = 0;  // guest-physical room above RAM for mapped files
  std::uint64_t heap_size = 0;  // as configured: 0 means all that is left
  std::uint64_t stack_size = 0; // as configured
  layout plan;

  /// Appends file room, heap size, stack size (u64 each), then the plan's memory size, image
  /// end, heap start, heap size, stack guard, stack bottom and stack top (u64 each).
  void encode(byte_writer& w) const;
  /// Reads what encode() wrote for a guest of `memory_size` bytes of RAM: the plan must be the
  /// one plan_layout() makes for these sizes and image end, and the file room 2 MiB-aligned and
  /// at most fixed::max_file_room. Errors: the reader's, naming the field.
  static result<saved_layout> decode(byte_reader& r, std::uint64_t memory_size);
};

/// The most RAM regions a snapshot may list, and the longest region name.
inline constexpr std::uint64_t max_saved_regions = 64;
inline constexpr std::uint64_t max_saved_name = 4096;

/// Appends `regions` (RAM only): a u32 count, then per region {u64 start, u64 size, u8 kind,
/// u8 protection, u8 guest-visible, string name}.
void encode_regions(byte_writer& w, std::span<const region> regions);
/// Reads what encode_regions() wrote, each region checked against `l`: kiln's fixed regions
/// where kiln puts them with their rights, heap and stack where the plan puts them, image
/// segments visible, inside the image area and never writable and executable at once. Overlaps
/// are left to guest_memory::add_region(), which refuses them. Errors: the reader's.
result<std::vector<region>> decode_regions(byte_reader& r, const saved_layout& l);

} // namespace kiln::memory
