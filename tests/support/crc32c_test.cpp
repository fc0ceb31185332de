// Tests for support/crc32c.hpp: known vectors, incremental use, zero runs, and the hardware and
// software paths agreeing on random data of many lengths and alignments.
#include <kiln/support/crc32c.hpp>

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <random>
#include <span>
#include <string_view>
#include <vector>

namespace kiln {
namespace {

std::span<const std::byte> bytes(std::string_view s) {
  return std::as_bytes(std::span<const char>(s.data(), s.size()));
}

std::vector<std::byte> random_bytes(std::size_t n, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::vector<std::byte> v(n);
  for (auto& b : v)
    b = std::byte(static_cast<std::uint8_t>(gen()));
  return v;
}

TEST(Crc32c, KnownVectors) {
  EXPECT_EQ(crc32c(0, bytes("123456789")), 0xE3069283u);
  EXPECT_EQ(crc32c(0, {}), 0u);
  // RFC 3720 (iSCSI) B.4: 32 bytes of zeros, of 0xff, ascending and descending.
  std::vector<std::byte> v(32);
  EXPECT_EQ(crc32c(0, v), 0x8A9136AAu);
  for (auto& b : v)
    b = std::byte{0xff};
  EXPECT_EQ(crc32c(0, v), 0x62A8AB43u);
  for (std::size_t i = 0; i < 32; ++i)
    v[i] = std::byte(static_cast<std::uint8_t>(i));
  EXPECT_EQ(crc32c(0, v), 0x46DD794Eu);
  for (std::size_t i = 0; i < 32; ++i)
    v[i] = std::byte(static_cast<std::uint8_t>(31 - i));
  EXPECT_EQ(crc32c(0, v), 0x113FDB5Cu);
}

TEST(Crc32c, BothPathsGiveTheKnownVector) {
  EXPECT_EQ(detail::crc32c_software(0, bytes("123456789")), 0xE3069283u);
  if (!detail::crc32c_hardware_available()) GTEST_SKIP() << "this CPU has no SSE4.2";
  EXPECT_EQ(detail::crc32c_hardware(0, bytes("123456789")), 0xE3069283u);
}

TEST(Crc32c, HardwareAndSoftwareAgreeOnEveryLengthAndAlignment) {
  if (!detail::crc32c_hardware_available()) GTEST_SKIP() << "this CPU has no SSE4.2";
  // Past 3 * 8 KiB the hardware path runs three streams and combines them: cover both sides
  // of each multiple of that block and a couple of megabytes.
  const auto data = random_bytes((3 << 20) + 64, 1);
  std::vector<std::size_t> lengths;
  for (std::size_t n = 0; n <= 300; ++n)
    lengths.push_back(n);
  for (std::size_t k : {1, 2, 3, 4, 7, 64}) {
    const std::size_t b = 3 * 8192 * k;
    for (std::size_t d : {b - 9, b - 1, b, b + 1, b + 7, b + 8, b + 4095})
      lengths.push_back(d);
  }
  lengths.push_back(2 << 20);
  lengths.push_back(3 << 20);
  for (std::size_t off = 0; off < 16; ++off)
    for (std::size_t n : lengths) {
      const auto s = std::span<const std::byte>(data).subspan(off, n);
      ASSERT_EQ(detail::crc32c_hardware(0x12345678, s), detail::crc32c_software(0x12345678, s))
          << "offset " << off << " length " << n;
      ASSERT_EQ(detail::crc32c_hardware(0, s), detail::crc32c_software(0, s))
          << "offset " << off << " length " << n;
    }
}

TEST(Crc32c, IsIncremental) {
  const auto data = random_bytes(100000, 2);
  const std::uint32_t whole = crc32c(0, data);
  for (std::size_t cut : {0, 1, 7, 8, 4096, 50001, 100000}) {
    const auto s = std::span<const std::byte>(data);
    EXPECT_EQ(crc32c(crc32c(0, s.first(cut)), s.subspan(cut)), whole) << "cut at " << cut;
    EXPECT_EQ(detail::crc32c_software(detail::crc32c_software(0, s.first(cut)), s.subspan(cut)),
              whole)
        << "cut at " << cut;
  }
}

TEST(Crc32c, ZerosMatchesFeedingZeroBytes) {
  const std::vector<std::byte> zeros(3 << 20);
  for (std::uint32_t crc : {0u, 1u, 0xE3069283u, 0xffffffffu})
    for (std::size_t n : {0, 1, 2, 3, 8, 255, 4096, 12345, 2 << 20, 3 << 20}) {
      const auto s = std::span<const std::byte>(zeros).first(n);
      EXPECT_EQ(crc32c_zeros(crc, n), detail::crc32c_software(crc, s))
          << "crc " << crc << " length " << n;
    }
}

TEST(Crc32c, ZerosComposeForHugeLengths) {
  // 2^40 zero bytes cannot be fed, but runs must compose: a run of a + b is a run of a then b.
  const std::uint64_t a = 1ull << 40, b = (1ull << 36) + 12345;
  EXPECT_EQ(crc32c_zeros(crc32c_zeros(7, a), b), crc32c_zeros(7, a + b));
  EXPECT_EQ(crc32c_zeros(7, ~0ull), crc32c_zeros(crc32c_zeros(7, ~0ull - 100), 100));
}

TEST(Crc32c, DetectsEverySingleBitFlip) {
  auto data = random_bytes(4096, 3);
  const std::uint32_t good = crc32c(0, data);
  for (std::size_t bit = 0; bit < data.size() * 8; ++bit) {
    data[bit / 8] ^= std::byte(1u << (bit % 8));
    ASSERT_NE(crc32c(0, data), good) << "bit " << bit;
    data[bit / 8] ^= std::byte(1u << (bit % 8));
  }
}

} // namespace
} // namespace kiln
