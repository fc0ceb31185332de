// Tests for memory/working_set.hpp: the first-touch order round-trips as runs, and a run outside
// memory, a page listed twice or a count that disagrees with the bytes is snapshot_corrupt.
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/working_set.hpp>

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace kiln::memory {
namespace {

constexpr std::uint64_t memory_size = 16ull << 20; // 4096 pages
const std::error_code corrupt = make_error_code(memory_errc::snapshot_corrupt);

std::vector<std::byte> encode(const std::vector<std::uint32_t>& pages) {
  byte_writer w;
  encode_working_set(w, pages);
  return w.take();
}

result<std::vector<std::uint32_t>> decode(const std::vector<std::byte>& bytes) {
  byte_reader r(bytes, corrupt, "working_set section");
  KILN_TRY_ASSIGN(auto pages, decode_working_set(r, memory_size));
  KILN_TRY(r.done());
  return pages;
}

void expect_named(const std::vector<std::byte>& bytes, const std::string& what) {
  auto back = decode(bytes);
  ASSERT_FALSE(back) << what << " was accepted";
  EXPECT_EQ(back.code(), memory_errc::snapshot_corrupt);
  EXPECT_NE(back.err().message().find("working_set section: " + what), std::string::npos)
      << back.err().message();
}

TEST(WorkingSet, RoundTripsInFirstTouchOrderAsRuns) {
  const std::vector<std::uint32_t> pages = {300, 301, 302, 7, 8, 4095, 0, 1000};
  const auto bytes = encode(pages);
  EXPECT_EQ(bytes.size(), 8u + 8 * 5) << "five runs";
  auto back = decode(bytes);
  ASSERT_TRUE(back) << back.err().message();
  EXPECT_EQ(*back, pages);
  EXPECT_EQ(encode(*back), bytes);
  EXPECT_TRUE(decode(encode({}))->empty());
}

TEST(WorkingSet, RefusesRunsOutsideMemoryOrRepeatingAPage) {
  expect_named(encode({4096}), "run 0 of 1 pages at page 4096 outside memory");
  expect_named(encode({5, 9, 5}), "page 5 listed twice");
  auto bytes = encode({1, 2, 3});
  auto edit = [&](std::size_t at, std::uint32_t v) {
    auto copy = bytes;
    std::memcpy(copy.data() + at, &v, 4);
    return copy;
  };
  expect_named(edit(12, 0), "run 0 of 0 pages");
  expect_named(edit(12, 0xffffffff), "run 0 of 4294967295 pages");
  expect_named(edit(0, 0xffffffff), "run count");
  expect_named(edit(0, 2), "run count");
  bytes.push_back(std::byte{0});
  expect_named(bytes, "run count");
  expect_named({std::byte{1}}, "truncated");
}

} // namespace
} // namespace kiln::memory
