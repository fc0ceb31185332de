// Strong address types: a guest-physical address and an offset inside a region are not ints.
#pragma once

#include <compare>
#include <cstdint>

namespace kiln::memory {

inline constexpr std::uint64_t page_size = 4096;
inline constexpr std::uint64_t large_page_size = 2ull << 20;

constexpr std::uint64_t align_down(std::uint64_t v, std::uint64_t a) {
  return v & ~(a - 1);
}
constexpr std::uint64_t align_up(std::uint64_t v, std::uint64_t a) {
  return (v + a - 1) & ~(a - 1);
}
constexpr bool is_aligned(std::uint64_t v, std::uint64_t a) {
  return (v & (a - 1)) == 0;
}

/// A guest-physical address. Guest memory is identity-mapped, so it is also the guest-virtual
/// address of the same byte.
struct guest_phys_addr {
  std::uint64_t value = 0;

  constexpr guest_phys_addr() = default;
  constexpr explicit guest_phys_addr(std::uint64_t v) : value(v) {}
  // NOLINTNEXTLINE(modernize-use-nullptr): clang-tidy 14 misreads a defaulted <=>
  constexpr auto operator<=>(const guest_phys_addr&) const = default;
  constexpr guest_phys_addr operator+(std::uint64_t d) const { return guest_phys_addr{value + d}; }
};

/// An offset from the start of one region.
struct region_offset {
  std::uint64_t value = 0;

  constexpr region_offset() = default;
  constexpr explicit region_offset(std::uint64_t v) : value(v) {}
  // NOLINTNEXTLINE(modernize-use-nullptr): clang-tidy 14 misreads a defaulted <=>
  constexpr auto operator<=>(const region_offset&) const = default;
};

/// Access rights of a region, as a bit set.
enum class protection : std::uint8_t { none = 0, read = 1, write = 2, exec = 4 };

constexpr protection operator|(protection a, protection b) {
  return static_cast<protection>(static_cast<std::uint8_t>(a) | static_cast<std::uint8_t>(b));
}
constexpr bool has(protection set, protection bit) {
  return (static_cast<std::uint8_t>(set) & static_cast<std::uint8_t>(bit)) != 0;
}
/// True if `a` grants no right that `b` does not (a tightening of b, or b itself).
constexpr bool is_subset(protection a, protection b) {
  return (static_cast<std::uint8_t>(a) & ~static_cast<std::uint8_t>(b)) == 0;
}
inline constexpr protection prot_r = protection::read;
inline constexpr protection prot_rw = protection::read | protection::write;
inline constexpr protection prot_rx = protection::read | protection::exec;

} // namespace kiln::memory
