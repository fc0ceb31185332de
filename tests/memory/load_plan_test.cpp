// Tests for memory/load_plan.hpp: the order in which a load reads a snapshot file's pages.
#include <kiln/memory/guest_memory.hpp>
#include <kiln/memory/load_plan.hpp>
#include <kiln/memory/snapshot_file.hpp>

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include <unistd.h>

namespace kiln::memory {
namespace {

namespace fs = std::filesystem;
constexpr std::uint64_t mib = 1ull << 20, ram = 32 * mib;
constexpr std::uint64_t region = 2 * mib / page_size; // pages in a 2 MiB region

/// A 32 MiB snapshot file whose every page holds data, opened as an image, and RAM mapping it.
class LoadPlan : public ::testing::Test {
protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "kiln-plan-XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    auto src = guest_memory::create(ram);
    ASSERT_TRUE(src);
    for (std::uint64_t a = 0; a < ram; a += page_size)
      src->host_address_for_mapping(guest_phys_addr{a})[0] = std::byte{1};
    auto img = snapshot_image::capture(*src, {}, {});
    ASSERT_TRUE(img);
    const auto path = (dir_ / "p.ksnap").string();
    ASSERT_TRUE(write_snapshot_file(path, **img, {}));
    auto chain = snapshot_chain::open(path);
    ASSERT_TRUE(chain) << chain.err().message();
    auto file_img = chain->image();
    ASSERT_TRUE(file_img);
    image_ = *file_img;
    auto m = guest_memory::create(ram);
    ASSERT_TRUE(m);
    mem_.emplace(std::move(*m));
    ASSERT_TRUE(mem_->back_with(image_));
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  load_plan plan(const std::vector<std::uint32_t>& ws) const {
    return plan_load(*image_, *mem_, ws);
  }
  static std::uint64_t bytes(const load_plan& p, std::size_t from, std::size_t to) {
    std::uint64_t n = 0;
    for (std::size_t i = from; i < to; ++i)
      n += p.extents[i].length;
    return n;
  }
  fs::path dir_;
  std::shared_ptr<const snapshot_image> image_;
  std::optional<guest_memory> mem_;
};

TEST_F(LoadPlan, AWorkingSetIsReadFirstByRegionInFirstTouchOrderThenTheRest) {
  // Region 5 is touched first (two pages, 3 apart: one read), then region 1 (two pages 40 apart:
  // two reads), then region 5 again.
  const std::uint32_t r5 = 5 * region, r1 = 1 * region;
  const auto p = plan({r5 + 10, r1 + 100, r5 + 7, r1 + 60});
  EXPECT_FALSE(p.one_pass);
  ASSERT_EQ(p.working_set_extents, 3u);
  ASSERT_EQ(p.guest.size(), p.extents.size());
  EXPECT_EQ(p.guest[0], (byte_range{(r5 + 7) * page_size, (r5 + 11) * page_size}));
  EXPECT_EQ(p.guest[1], (byte_range{(r1 + 60) * page_size, (r1 + 61) * page_size}));
  EXPECT_EQ(p.guest[2], (byte_range{(r1 + 100) * page_size, (r1 + 101) * page_size}));
  for (std::size_t i = 0; i < p.extents.size(); ++i) {
    EXPECT_EQ(p.extents[i].host, mem_->host_address_for_mapping(guest_phys_addr{p.guest[i].first}));
    EXPECT_EQ(p.extents[i].length, p.guest[i].second - p.guest[i].first);
    EXPECT_EQ(p.extents[i].offset - image_->layers()[0]->base(), p.guest[i].first);
  }
  // The rest reads the whole file in address order (working-set reads this small are read again
  // rather than cutting it up).
  EXPECT_EQ(bytes(p, p.working_set_extents, p.extents.size()), ram);
  for (std::size_t i = p.working_set_extents + 1; i < p.extents.size(); ++i)
    EXPECT_GE(p.guest[i].first, p.guest[i - 1].second);
}

TEST_F(LoadPlan, LargeWorkingSetReadsAreSkippedByTheRest) {
  std::vector<std::uint32_t> ws;
  for (std::uint32_t pg = 3 * region; pg < 3 * region + 128; ++pg) // 512 KiB
    ws.push_back(pg);
  const auto p = plan(ws);
  ASSERT_EQ(p.working_set_extents, 1u);
  EXPECT_EQ(p.extents[0].length, 512u * 1024);
  EXPECT_EQ(bytes(p, 0, p.extents.size()), ram) << "each page once";
}

TEST_F(LoadPlan, AWorkingSetOverMostOfTheFileLeadsWithItsFirstRegionsThenOnePass) {
  std::vector<std::uint32_t> ws; // every page of every region, regions from the top down
  for (std::uint64_t r = ram / page_size / region; r-- > 0;)
    for (std::uint32_t i = 0; i < region; ++i)
      ws.push_back(static_cast<std::uint32_t>(r * region + i));
  const auto p = plan(ws);
  EXPECT_TRUE(p.one_pass);
  EXPECT_EQ(p.working_set_extents, p.extents.size()) << "resident when the pass ends";
  ASSERT_GE(p.extents.size(), 2u);
  EXPECT_EQ(p.guest[0].first, (ram / page_size - region) * page_size)
      << "the first touched region leads";
  EXPECT_EQ(bytes(p, 0, p.extents.size()), ram);
}

TEST_F(LoadPlan, NoWorkingSetIsOnePassAndMemoryLayersAreNotRead) {
  const auto p = plan({});
  EXPECT_TRUE(p.one_pass);
  EXPECT_EQ(bytes(p, 0, p.extents.size()), ram);
  auto anon = guest_memory::create(ram);
  ASSERT_TRUE(anon);
  anon->host_address_for_mapping(guest_phys_addr{0})[0] = std::byte{1};
  auto in_memory = snapshot_image::capture(*anon, {}, {});
  ASSERT_TRUE(in_memory);
  EXPECT_TRUE(plan_load(**in_memory, *anon, std::vector<std::uint32_t>{0}).extents.empty());
}

} // namespace
} // namespace kiln::memory
