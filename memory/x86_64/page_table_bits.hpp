// x86-64 page-table entry bits and geometry, shared by the table builder and the live editor.
#pragma once

#include <cstdint>

namespace kiln::memory::x86_64::pte {

inline constexpr std::uint64_t present = 1ull << 0, write = 1ull << 1, accessed = 1ull << 5,
                               dirty = 1ull << 6, large = 1ull << 7, nx = 1ull << 63;
inline constexpr std::uint64_t entries_per_table = 512;
inline constexpr std::uint64_t gib = 1ull << 30;
inline constexpr std::uint64_t addr_mask = 0x000f'ffff'ffff'f000ull;
/// Bits of every non-leaf entry kiln writes: present, writable, accessed (rights are decided
/// at the leaves).
inline constexpr std::uint64_t upper = present | write | accessed;

} // namespace kiln::memory::x86_64::pte
