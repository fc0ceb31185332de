// crc32c: slicing-by-8 tables, the SSE4.2 crc32 instruction in three streams, GF(2) shifts.
#include <kiln/support/crc32c.hpp>

#include <array>
#include <bit>
#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace kiln {
namespace {

static_assert(std::endian::native == std::endian::little, "word loads assume little-endian");

constexpr std::uint32_t poly = 0x82F63B78; // Castagnoli, bit-reflected

using table_set = std::array<std::array<std::uint32_t, 256>, 8>;

/// t[k][b]: the register after byte b followed by k zero bytes (slicing-by-8).
constexpr table_set make_tables() {
  table_set t{};
  for (std::uint32_t b = 0; b < 256; ++b) {
    std::uint32_t c = b;
    for (int i = 0; i < 8; ++i)
      c = (c & 1) ? (c >> 1) ^ poly : c >> 1;
    t[0][b] = c;
  }
  for (std::size_t k = 1; k < 8; ++k)
    for (std::uint32_t b = 0; b < 256; ++b)
      t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xff];
  return t;
}
constexpr table_set tables = make_tables();

/// a(x) * b(x) mod P(x), both bit-reflected (bit 31 is x^0).
constexpr std::uint32_t multmodp(std::uint32_t a, std::uint32_t b) {
  std::uint32_t p = 0;
  for (std::uint32_t m = 1u << 31; m != 0; m >>= 1) {
    if (a & m) p ^= b;
    b = (b & 1) ? (b >> 1) ^ poly : b >> 1;
  }
  return p;
}

/// x^(2^k) mod P for k in [0, 68): enough for a shift by any 64-bit byte count (2^67 bits).
constexpr std::array<std::uint32_t, 68> make_x2n() {
  std::array<std::uint32_t, 68> t{};
  t[0] = 1u << 30; // x^1
  for (std::size_t k = 1; k < t.size(); ++k)
    t[k] = multmodp(t[k - 1], t[k - 1]);
  return t;
}
constexpr std::array<std::uint32_t, 68> x2n = make_x2n();

/// x^(8 * bytes) mod P: the multiplier that moves a register past `bytes` zero bytes.
constexpr std::uint32_t shift_bytes(std::uint64_t bytes) {
  std::uint32_t p = 1u << 31; // x^0
  for (std::size_t k = 3; bytes != 0; bytes >>= 1, ++k)
    if (bytes & 1) p = multmodp(x2n[k], p);
  return p;
}

std::uint64_t load64(const unsigned char* p) {
  std::uint64_t w;
  std::memcpy(&w, p, sizeof w);
  return w;
}

/// Advances the raw (not inverted) register `s` over [p, p+n).
std::uint32_t software_update(std::uint32_t s, const unsigned char* p, std::size_t n) {
  while (n != 0 && (reinterpret_cast<std::uintptr_t>(p) & 7) != 0) {
    s = tables[0][(s ^ *p++) & 0xff] ^ (s >> 8);
    --n;
  }
  for (; n >= 8; p += 8, n -= 8) {
    const std::uint64_t w = load64(p) ^ s;
    s = tables[7][w & 0xff] ^ tables[6][(w >> 8) & 0xff] ^ tables[5][(w >> 16) & 0xff] ^
        tables[4][(w >> 24) & 0xff] ^ tables[3][(w >> 32) & 0xff] ^ tables[2][(w >> 40) & 0xff] ^
        tables[1][(w >> 48) & 0xff] ^ tables[0][w >> 56];
  }
  while (n-- != 0)
    s = tables[0][(s ^ *p++) & 0xff] ^ (s >> 8);
  return s;
}

#if defined(__x86_64__)
// The crc32 instruction has a latency of 3 cycles and a throughput of 1, so three independent
// streams over adjacent blocks run about three times as fast as one; the streams' registers are
// then combined by shifting the earlier ones past the later blocks (CRC is linear over GF(2)).
constexpr std::size_t block = 8192;
constexpr std::uint32_t shift_one_block = shift_bytes(block);
constexpr std::uint32_t shift_two_blocks = shift_bytes(2 * block);

__attribute__((target("sse4.2"))) std::uint32_t
hardware_update(std::uint32_t s, const unsigned char* p, std::size_t n) {
  while (n != 0 && (reinterpret_cast<std::uintptr_t>(p) & 7) != 0) {
    s = _mm_crc32_u8(s, *p++);
    --n;
  }
  for (; n >= 3 * block; p += 3 * block, n -= 3 * block) {
    std::uint64_t a = s, b = 0, c = 0;
    for (std::size_t i = 0; i < block; i += 8) {
      a = _mm_crc32_u64(a, load64(p + i));
      b = _mm_crc32_u64(b, load64(p + block + i));
      c = _mm_crc32_u64(c, load64(p + 2 * block + i));
    }
    s = multmodp(shift_two_blocks, static_cast<std::uint32_t>(a)) ^
        multmodp(shift_one_block, static_cast<std::uint32_t>(b)) ^ static_cast<std::uint32_t>(c);
  }
  std::uint64_t w = s;
  for (; n >= 8; p += 8, n -= 8)
    w = _mm_crc32_u64(w, load64(p));
  s = static_cast<std::uint32_t>(w);
  while (n-- != 0)
    s = _mm_crc32_u8(s, *p++);
  return s;
}
#endif

const unsigned char* bytes_of(std::span<const std::byte> d) {
  return reinterpret_cast<const unsigned char*>(d.data());
}

} // namespace

namespace detail {

std::uint32_t crc32c_software(std::uint32_t crc, std::span<const std::byte> data) noexcept {
  return ~software_update(~crc, bytes_of(data), data.size());
}

std::uint32_t crc32c_hardware(std::uint32_t crc, std::span<const std::byte> data) noexcept {
#if defined(__x86_64__)
  return ~hardware_update(~crc, bytes_of(data), data.size());
#else
  return crc32c_software(crc, data);
#endif
}

bool crc32c_hardware_available() noexcept {
#if defined(__x86_64__)
  static const bool available = __builtin_cpu_supports("sse4.2");
  return available;
#else
  return false;
#endif
}

} // namespace detail

std::uint32_t crc32c(std::uint32_t crc, std::span<const std::byte> data) noexcept {
  return detail::crc32c_hardware_available() ? detail::crc32c_hardware(crc, data)
                                             : detail::crc32c_software(crc, data);
}

std::uint32_t crc32c_zeros(std::uint32_t crc, std::uint64_t n) noexcept {
  // The inverted register moves past n zero bytes by one multiplication with x^(8n).
  return ~multmodp(shift_bytes(n), ~crc);
}

} // namespace kiln
