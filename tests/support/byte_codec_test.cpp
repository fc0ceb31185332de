// Tests for support/byte_codec.hpp: values and strings round-trip at fixed widths, and every
// short, over-long or trailing input is an error of the reader's code naming what it reads.
#include <kiln/support/byte_codec.hpp>

#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace kiln {
namespace {

const std::error_code malformed = std::make_error_code(std::errc::bad_message);

TEST(ByteCodec, ValuesAndStringsRoundTripAtFixedWidths) {
  byte_writer w;
  w.put(std::uint8_t{0x11});
  w.put(std::uint16_t{0x2233});
  w.put(std::uint32_t{0x44556677});
  w.put(std::uint64_t{0x8899aabbccddeeff});
  w.put(std::int64_t{-5});
  w.put(std::array<std::uint8_t, 3>{1, 2, 3});
  w.str("kiln");
  w.str("");
  EXPECT_EQ(w.size(), 1u + 2 + 4 + 8 + 8 + 3 + 4 + 4 + 4);
  const auto bytes = w.take();
  EXPECT_EQ(w.size(), 0u) << "take() empties the writer";
  // Little-endian, no padding: the u16 follows the u8 at once, low byte first.
  EXPECT_EQ(bytes[1], std::byte{0x33});
  EXPECT_EQ(bytes[2], std::byte{0x22});

  byte_reader r(bytes, malformed, "test");
  EXPECT_EQ(*r.get<std::uint8_t>(), 0x11);
  EXPECT_EQ(*r.get<std::uint16_t>(), 0x2233);
  EXPECT_EQ(*r.get<std::uint32_t>(), 0x44556677u);
  EXPECT_EQ(*r.get<std::uint64_t>(), 0x8899aabbccddeeffu);
  EXPECT_EQ(*r.get<std::int64_t>(), -5);
  EXPECT_EQ((*r.get<std::array<std::uint8_t, 3>>()), (std::array<std::uint8_t, 3>{1, 2, 3}));
  EXPECT_EQ(*r.str(16), "kiln");
  EXPECT_EQ(*r.str(16), "");
  EXPECT_EQ(r.remaining(), 0u);
  EXPECT_TRUE(r.done());
}

TEST(ByteCodec, AShortReadIsTruncatedAndNamesTheBytes) {
  const std::vector<std::byte> three(3);
  byte_reader r(three, malformed, "layout section");
  auto v = r.get<std::uint32_t>();
  ASSERT_FALSE(v);
  EXPECT_EQ(v.code(), malformed);
  EXPECT_EQ(v.err().detail, "layout section: truncated");
  EXPECT_EQ(r.remaining(), 3u) << "a failed read consumes nothing";
  EXPECT_TRUE(r.get<std::uint16_t>());
}

TEST(ByteCodec, AStringAboveItsCapOrPastTheEndIsRefused) {
  byte_writer w;
  w.str("twelve bytes");
  const auto bytes = w.take();
  byte_reader capped(bytes, malformed, "files section");
  auto s = capped.str(11);
  ASSERT_FALSE(s);
  EXPECT_EQ(s.code(), malformed);
  EXPECT_NE(s.err().detail.find("above the cap"), std::string::npos) << s.err().detail;

  // A length of 2^32-1 over a few bytes fails on the bytes, before allocating.
  byte_writer huge;
  huge.put(std::uint32_t{0xffffffff});
  huge.put(std::uint32_t{0});
  const auto hb = huge.take();
  byte_reader r(hb, malformed, "files section");
  EXPECT_EQ(r.str(~std::uint64_t{0}).code(), malformed);
  auto cut = bytes;
  cut.pop_back();
  byte_reader short_string(cut, malformed, "files section");
  EXPECT_EQ(short_string.str(64).err().detail, "files section: truncated");
}

TEST(ByteCodec, TrailingBytesAreRefused) {
  const std::vector<std::byte> five(5);
  byte_reader r(five, malformed, "vcpu section");
  ASSERT_TRUE(r.get<std::uint32_t>());
  auto d = r.done();
  ASSERT_FALSE(d);
  EXPECT_EQ(d.err().detail, "vcpu section: trailing bytes");
  ASSERT_TRUE(r.get<std::uint8_t>());
  EXPECT_TRUE(r.done());
}

TEST(ByteCodec, BadCarriesTheOwnersCodeAndWhy) {
  byte_reader r({}, malformed, "regions section");
  const error e = r.bad("region 'heap' is not where kiln puts it");
  EXPECT_EQ(e.code, malformed);
  EXPECT_EQ(e.detail, "regions section: region 'heap' is not where kiln puts it");
}

} // namespace
} // namespace kiln
