// CRC32C (Castagnoli): SSE4.2 where the CPU has it, a table-driven fallback elsewhere.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace kiln {

/// The CRC32C of `data` continued from `crc`, the CRC32C of the bytes before it (0 for none),
/// with the usual pre- and post-inversion: crc32c(crc32c(0, a), b) == crc32c(0, a ++ b), and
/// crc32c(0, "123456789") == 0xE3069283. Uses the SSE4.2 crc32 instruction where the CPU has
/// it. Thread-safe (pure).
std::uint32_t crc32c(std::uint32_t crc, std::span<const std::byte> data) noexcept;

/// crc32c(crc, n zero bytes), in O(log n) time without touching memory (sparse files' holes).
std::uint32_t crc32c_zeros(std::uint32_t crc, std::uint64_t n) noexcept;

namespace detail {
/// The two implementations behind crc32c(), exposed so tests can compare them.
std::uint32_t crc32c_software(std::uint32_t crc, std::span<const std::byte> data) noexcept;
/// Requires crc32c_hardware_available().
std::uint32_t crc32c_hardware(std::uint32_t crc, std::span<const std::byte> data) noexcept;
bool crc32c_hardware_available() noexcept;
} // namespace detail

} // namespace kiln
