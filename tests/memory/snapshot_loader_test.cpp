// Tests for memory/snapshot_loader.hpp: a load's reads, descriptors, read-around and the guest
// ranges handed back as they become resident.
#include <kiln/memory/guest_memory.hpp>
#include <kiln/memory/snapshot_file.hpp>
#include <kiln/memory/snapshot_loader.hpp>

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
constexpr std::uint32_t region = 2 * mib / page_size; // pages in a 2 MiB region

/// A 32 MiB snapshot file whose page i holds the byte i % 251 + 1 at its start, opened as an
/// image, and RAM mapping it.
class SnapshotLoader : public ::testing::Test {
protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "kiln-loader-XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    auto src = guest_memory::create(ram);
    ASSERT_TRUE(src);
    for (std::uint64_t a = 0; a < ram; a += page_size)
      src->host_address_for_mapping(guest_phys_addr{a})[0] = mark(a);
    auto img = snapshot_image::capture(*src, {}, {});
    ASSERT_TRUE(img);
    const auto path = (dir_ / "l.ksnap").string();
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
  static std::byte mark(std::uint64_t a) { return std::byte(a / page_size % 251 + 1); }
  static std::uint64_t total(const std::vector<byte_range>& r) {
    std::uint64_t n = 0;
    for (const auto& [lo, hi] : r)
      n += hi - lo;
    return n;
  }
  // Every page of RAM holds the file's bytes (read through the private mapping).
  void expect_ram_is_the_file() {
    for (std::uint64_t a = 0; a < ram; a += page_size)
      ASSERT_EQ(mem_->host_address_for_mapping(guest_phys_addr{a})[0], mark(a)) << a;
  }
  fs::path dir_;
  std::shared_ptr<const snapshot_image> image_;
  std::optional<guest_memory> mem_;
};

TEST_F(SnapshotLoader, AWorkingSetLoadReadsItThroughItsOwnDescriptorsWithReadAroundOff) {
  const std::vector<std::uint32_t> ws{5 * region + 10, 1 * region + 100};
  auto l = snapshot_loader::prepare(image_, *mem_, ws, /*track_ranges=*/true);
  ASSERT_FALSE(l->plan().one_pass);
  ASSERT_EQ(l->plan().working_set_extents, 2u);
  const int file_fd = image_->layers()[0]->fd();
  // The working set's reads go through a descriptor of the loader's own (read-ahead off), the
  // rest through the file's.
  EXPECT_NE(l->plan().extents[0].fd, file_fd);
  EXPECT_NE(l->plan().extents[1].fd, file_fd);
  EXPECT_EQ(l->plan().extents.back().fd, file_fd);

  const auto syscalls = mem_->host_syscalls();
  auto p = l->start({});
  ASSERT_TRUE(p) << p.err().message();
  EXPECT_EQ(mem_->host_syscalls(), syscalls + 1); // read-around off while the working set leads
  EXPECT_FALSE(l->progress().working_set_resident);
  (*p)->wait();
  const auto st = (*p)->stats();
  ASSERT_TRUE(st.done);
  const auto resident = l->advance(st);
  EXPECT_TRUE(l->progress().working_set_resident);
  EXPECT_TRUE(l->progress().everything_resident);
  EXPECT_TRUE(l->progress().ended);
  EXPECT_EQ(mem_->host_syscalls(), syscalls + 2); // and back on at the end
  // Every guest range the plan reads comes back once: the working set's, then the rest's.
  EXPECT_EQ(total(resident), total(l->plan().guest));
  EXPECT_EQ(resident.front(), l->plan().guest.front());
  EXPECT_TRUE(l->advance(st).empty());
  expect_ram_is_the_file();
}

TEST_F(SnapshotLoader, TheWorkingSetComesBackBeforeTheRest) {
  const std::vector<std::uint32_t> ws{3 * region + 1};
  auto l = snapshot_loader::prepare(image_, *mem_, ws, /*track_ranges=*/true);
  ASSERT_EQ(l->plan().working_set_extents, 1u);
  prefetch_stats st;
  st.working_set_done = true; // what a prefetch reports once the working set is in
  const auto first = l->advance(st);
  ASSERT_EQ(first.size(), 1u);
  EXPECT_EQ(first[0], l->plan().guest[0]);
  EXPECT_TRUE(l->progress().working_set_resident);
  EXPECT_FALSE(l->progress().everything_resident);
  EXPECT_FALSE(l->progress().ended);
  st.done = true;
  const auto rest = l->advance(st);
  EXPECT_EQ(total(rest), total(l->plan().guest) - total(first));
}

TEST_F(SnapshotLoader, AnEagerLoadIsOnePassOverTheFilesOwnDescriptor) {
  auto l = snapshot_loader::prepare(image_, *mem_, {}, /*track_ranges=*/false);
  EXPECT_TRUE(l->plan().one_pass);
  for (const auto& e : l->plan().extents)
    EXPECT_EQ(e.fd, image_->layers()[0]->fd());
  const auto syscalls = mem_->host_syscalls();
  auto st = l->load_all({});
  ASSERT_TRUE(st) << st.err().message();
  EXPECT_EQ(mem_->host_syscalls(), syscalls); // read-around untouched: one pass keeps it
  EXPECT_TRUE(l->advance(*st).empty());       // no ranges asked for
  EXPECT_TRUE(l->progress().everything_resident);
  expect_ram_is_the_file();
}

TEST_F(SnapshotLoader, AStoppedLoadHandsNothingBackAndRestoresReadAround) {
  const std::vector<std::uint32_t> ws{7 * region};
  auto l = snapshot_loader::prepare(image_, *mem_, ws, /*track_ranges=*/true);
  const auto syscalls = mem_->host_syscalls();
  auto p = l->start({});
  ASSERT_TRUE(p);
  (*p)->cancel();
  l->stop();
  EXPECT_TRUE(l->progress().ended);
  EXPECT_EQ(mem_->host_syscalls(), syscalls + 2);
  prefetch_stats st;
  st.working_set_done = st.done = true;
  EXPECT_TRUE(l->advance(st).empty());
  l.reset(); // read-around is not touched again
  EXPECT_EQ(mem_->host_syscalls(), syscalls + 2);
}

} // namespace
} // namespace kiln::memory
