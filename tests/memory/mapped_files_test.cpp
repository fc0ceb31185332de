// Tests for memory/mapped_files.hpp: names, placement in the file room, lookup and the table.
#include <kiln/memory/layout.hpp>
#include <kiln/memory/mapped_files.hpp>
#include <kiln/memory/memory_errc.hpp>

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

namespace kiln::memory {
namespace {

namespace fs = std::filesystem;
constexpr std::uint64_t mib = 1ull << 20;
constexpr std::uint64_t room_lo = 16 * mib, room_hi = 64 * mib;

/// A file of `bytes` bytes in a fresh temporary directory.
class MappedFiles : public ::testing::Test {
protected:
  void SetUp() override {
    std::string t = (fs::temp_directory_path() / "kiln-mapped-XXXXXX").string();
    ASSERT_NE(::mkdtemp(t.data()), nullptr);
    dir_ = t;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  /// Adds a file named `name` of `size` bytes at `at` (no mapping: bookkeeping only).
  void add(const std::string& name, std::uint64_t at, std::uint64_t size) {
    const auto path = (dir_ / name).string();
    std::ofstream(path) << std::string(size, 'x');
    auto f = host_file::open(path);
    ASSERT_TRUE(f) << f.err().message();
    set.add(std::make_unique<mapped_file>(
        mapped_file{name, std::move(*f), guest_phys_addr{at}, align_up(size, page_size), {}}));
  }
  fs::path dir_;
  mapped_files set;
};

TEST_F(MappedFiles, ANameIsGivenOrThePathsLastComponentAndUnique) {
  EXPECT_EQ(*set.name_for("/data/models/weights.bin", ""), "weights.bin");
  EXPECT_EQ(*set.name_for("weights.bin", ""), "weights.bin");
  EXPECT_EQ(*set.name_for("/data/x", "model"), "model");
  EXPECT_EQ(set.name_for("/data/", "").code(), memory_errc::file_name_invalid);
  EXPECT_EQ(set.name_for("/x", std::string(KILN_FILE_NAME_MAX, 'n')).code(),
            memory_errc::file_name_invalid);
  EXPECT_EQ(set.name_for("/x", std::string("a\0b", 3)).code(), memory_errc::file_name_invalid);
  add("a", room_lo, 100);
  const auto again = set.name_for("/elsewhere/a", "");
  EXPECT_EQ(again.code(), memory_errc::file_name_invalid);
  EXPECT_NE(again.err().message().find("already mapped"), std::string::npos);
}

TEST_F(MappedFiles, AtMostMaxFiles) {
  for (std::uint64_t i = 0; i < fixed::max_files; ++i)
    add("f" + std::to_string(i), room_lo + i * page_size, 1);
  EXPECT_EQ(set.name_for("/x/new", "").code(), memory_errc::too_many_ranges);
}

TEST_F(MappedFiles, PlacementIsFirstFitAt2MiBOrWhereAskedChecked) {
  auto first = set.place(0, 3 * mib, room_lo, room_hi, "p");
  ASSERT_TRUE(first);
  EXPECT_EQ(first->value, room_lo);
  add("a", room_lo, 3 * mib); // [16, 19) MiB: the next fit is at 20 MiB
  EXPECT_EQ(set.place(0, page_size, room_lo, room_hi, "p")->value, 20 * mib);
  // Where asked: inside the room, page-aligned, clear of other files.
  EXPECT_EQ(set.place(40 * mib, mib, room_lo, room_hi, "p")->value, 40 * mib);
  EXPECT_EQ(set.place(40 * mib + 1, mib, room_lo, room_hi, "p").code(), memory_errc::unaligned);
  EXPECT_EQ(set.place(8 * mib, mib, room_lo, room_hi, "p").code(), memory_errc::out_of_bounds);
  EXPECT_EQ(set.place(room_hi - page_size, 2 * page_size, room_lo, room_hi, "p").code(),
            memory_errc::out_of_bounds);
  EXPECT_EQ(
      set.place(~std::uint64_t{0} & ~(page_size - 1), 2 * page_size, room_lo, room_hi, "p").code(),
      memory_errc::out_of_bounds); // the end would wrap
  EXPECT_EQ(set.place(18 * mib, mib, room_lo, room_hi, "p").code(),
            memory_errc::overlapping_region);
  EXPECT_EQ(set.place(0, 48 * mib, room_lo, room_hi, "p").code(), memory_errc::file_too_large);
}

TEST_F(MappedFiles, LookupTakeAndTheGuestsTable) {
  add("one", room_lo, 5000); // two pages
  add("two", 20 * mib, 10);
  EXPECT_EQ(set.containing(guest_phys_addr{room_lo + 8191})->name, "one");
  EXPECT_EQ(set.containing(guest_phys_addr{room_lo + 8192}), nullptr);
  EXPECT_EQ(set.containing(guest_phys_addr{20 * mib})->name, "two");
  EXPECT_EQ(set.containing(guest_phys_addr{0}), nullptr);
  const auto t = set.table();
  ASSERT_EQ(t.size(), 2u);
  EXPECT_STREQ(t[0].name, "one");
  EXPECT_EQ(t[0].addr, room_lo);
  EXPECT_EQ(t[0].size, 5000u); // the file's size, not the mapped one
  EXPECT_STREQ(t[1].name, "two");
  auto taken = set.take("one");
  ASSERT_TRUE(taken);
  EXPECT_EQ(taken->name, "one");
  EXPECT_EQ(set.take("one"), nullptr);
  EXPECT_EQ(set.find("one"), nullptr);
  EXPECT_EQ(set.size(), 1u);
  EXPECT_EQ(set.table()[0].addr, 20 * mib);
}

} // namespace
} // namespace kiln::memory
