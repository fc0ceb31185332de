// Tests for memory/load_check.hpp: a load checks each chunk of a snapshot file as its reads
// complete, through the real prefetch (io_uring and the worker thread), and a flipped byte is
// caught, named and marked on the file's layer.
#include <kiln/memory/guest_memory.hpp>
#include <kiln/memory/load_check.hpp>
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/snapshot_file.hpp>
#include <kiln/memory/snapshot_loader.hpp>

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

namespace kiln::memory {
namespace {

namespace fs = std::filesystem;
constexpr std::uint64_t mib = 1ull << 20, ram = 16 * mib;

/// A 16 MiB snapshot file holding data in chunks 0, 1, 3 and 7 (the rest are holes), some of
/// them only partly, written and opened anew for each load.
class LoadCheck : public ::testing::Test {
protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "kiln-check-XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    path_ = (dir_ / "c.ksnap").string();
    auto src = guest_memory::create(ram);
    ASSERT_TRUE(src);
    auto fill = [&](std::uint64_t lo, std::uint64_t hi) {
      for (std::uint64_t a = lo; a < hi; a += page_size)
        for (std::uint64_t b = 0; b < page_size; b += 512)
          src->host_address_for_mapping(guest_phys_addr{a})[b] = std::byte((a + b) / 512 % 255 + 1);
    };
    fill(0, 3 * mib);                                        // chunks 0 and half of 1
    fill(6 * mib + 8 * page_size, 6 * mib + 40 * page_size); // a run inside chunk 3
    fill(15 * mib, 16 * mib);                                // the second half of chunk 7
    auto img = snapshot_image::capture(*src, {}, {});
    ASSERT_TRUE(img);
    ASSERT_TRUE(write_snapshot_file(path_, **img, {}));
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  /// Opens the file, maps RAM from it and loads everything (or the working set first), with
  /// the check; returns the load's result.
  result<prefetch_stats> load(bool thread, std::vector<std::uint32_t> ws = {}) {
    auto chain = snapshot_chain::open(path_);
    if (!chain) return chain.err();
    KILN_TRY_ASSIGN(image_, chain->image());
    auto m = guest_memory::create(ram);
    if (!m) return m.err();
    mem_.emplace(std::move(*m));
    KILN_TRY(mem_->back_with(image_));
    loader_ = snapshot_loader::prepare(image_, *mem_, ws, /*track_ranges=*/false);
    prefetch_options o;
    o.force_thread = thread;
    o.chunk_bytes = 64 << 10;
    if (ws.empty()) return loader_->load_all(o);
    KILN_TRY_ASSIGN(auto p, loader_->start(o));
    p->wait();
    return p->stats();
  }
  /// Flips one byte of the stored data at guest address `a`.
  void flip(std::uint64_t a) {
    auto chain = snapshot_chain::open(path_);
    ASSERT_TRUE(chain);
    auto img = chain->image();
    ASSERT_TRUE(img);
    const std::uint64_t at = (*img)->layers()[0]->base() + a;
    const int fd = ::open(path_.c_str(), O_RDWR | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    unsigned char b = 0;
    ASSERT_EQ(::pread(fd, &b, 1, static_cast<off_t>(at)), 1);
    b ^= 0x40;
    ASSERT_EQ(::pwrite(fd, &b, 1, static_cast<off_t>(at)), 1);
    ::close(fd);
  }

  fs::path dir_;
  std::string path_;
  std::shared_ptr<const snapshot_image> image_;
  std::optional<guest_memory> mem_;
  std::unique_ptr<snapshot_loader> loader_;
};

TEST_F(LoadCheck, EveryChunkTheFileHoldsIsCheckedOnBothReadPaths) {
  for (bool thread : {false, true}) {
    auto st = load(thread);
    ASSERT_TRUE(st) << st.err().message();
    const load_check* check = loader_->check();
    ASSERT_NE(check, nullptr);
    EXPECT_EQ(check->chunks_total(), 4u); // chunks 0, 1, 3 and 7
    EXPECT_EQ(check->chunks_checked(), 4u) << (thread ? "thread" : "io_uring");
    EXPECT_FALSE(check->failure());
    EXPECT_FALSE(image_->corruption());
  }
}

TEST_F(LoadCheck, AWorkingSetFirstAndThenTheRestChecksEachChunkOnce) {
  // Pages of chunks 3 and 0 first: the later pass reads some of them again.
  auto st = load(false, {6 * mib / page_size + 9, 3, 4, 200});
  ASSERT_TRUE(st) << st.err().message();
  EXPECT_EQ(loader_->check()->chunks_checked(), 4u);
  EXPECT_FALSE(loader_->check()->failure());
}

TEST_F(LoadCheck, AFlippedByteFailsItsChunkAndMarksTheLayer) {
  flip(6 * mib + 20 * page_size + 100); // in chunk 3
  for (bool thread : {false, true}) {
    auto st = load(thread);
    ASSERT_FALSE(st) << (thread ? "thread" : "io_uring");
    EXPECT_EQ(st.code(), memory_errc::snapshot_corrupt);
    EXPECT_NE(st.err().message().find("chunk 3 "), std::string::npos) << st.err().message();
    EXPECT_NE(st.err().message().find(path_), std::string::npos) << st.err().message();
    EXPECT_EQ(loader_->check()->chunks_checked(), 3u);
    auto why = image_->corruption();
    ASSERT_TRUE(why);
    EXPECT_NE(why->find("chunk 3 "), std::string::npos);
  }
}

TEST_F(LoadCheck, WithoutTheCheckNothingIsChecked) {
  flip(100);
  auto chain = snapshot_chain::open(path_);
  ASSERT_TRUE(chain);
  auto img = chain->image();
  ASSERT_TRUE(img);
  auto m = guest_memory::create(ram);
  ASSERT_TRUE(m);
  ASSERT_TRUE(m->back_with(*img));
  auto l = snapshot_loader::prepare(*img, *m, {}, false, /*check_data=*/false);
  EXPECT_EQ(l->check(), nullptr);
  EXPECT_TRUE(l->load_all({}));
  EXPECT_FALSE((*img)->corruption());
}

} // namespace
} // namespace kiln::memory
