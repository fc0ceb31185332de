// Tests for memory/file_fault_guard.hpp: a SIGBUS on a truncated, watched mapping is survived.
#include <kiln/memory/address.hpp>
#include <kiln/memory/file_fault_guard.hpp>
#include <kiln/memory/memory_errc.hpp>

#include "../test_env.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <csignal>
#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <system_error>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

namespace kiln::memory {
namespace {

namespace fs = std::filesystem;
constexpr std::uint64_t pg = page_size;

void count_call(void* context) noexcept {
  static_cast<std::atomic<int>*>(context)->fetch_add(1);
}

// A 3-page file (page i filled with 'a' + i), mapped MAP_SHARED read-only, in a fresh directory.
class FileFaultGuard : public ::testing::Test {
protected:
  void SetUp() override {
    std::random_device rd;
    dir_ = fs::temp_directory_path() /
           ("kiln_file_fault_test." + std::to_string(::getpid()) + "." + std::to_string(rd()));
    ASSERT_TRUE(fs::create_directory(dir_));
    fd_ = ::open((dir_ / "file").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    ASSERT_GE(fd_, 0);
    for (int i = 0; i < 3; ++i) {
      const std::vector<char> page(pg, static_cast<char>('a' + i));
      ASSERT_EQ(::write(fd_, page.data(), page.size()), static_cast<ssize_t>(pg));
    }
    void* p = ::mmap(nullptr, 3 * pg, PROT_READ, MAP_SHARED, fd_, 0);
    ASSERT_NE(p, MAP_FAILED);
    base_ = static_cast<std::byte*>(p);
    state_.notify = count_call;
    state_.context = &calls_;
  }
  void TearDown() override {
    if (base_) ::munmap(base_, 3 * pg);
    if (fd_ >= 0) ::close(fd_);
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  /// One byte read through a volatile pointer, so the access really happens.
  unsigned char read_byte(std::uint64_t offset) const {
    // SAFETY: offset < 3 pages of the mapping this fixture owns; a lost page raises SIGBUS,
    // which is what these tests are about.
    return reinterpret_cast<const volatile unsigned char*>(base_)[offset];
  }
  std::uintptr_t host(std::uint64_t offset) const {
    return reinterpret_cast<std::uintptr_t>(base_ + offset);
  }

  fs::path dir_;
  int fd_ = -1;
  std::byte* base_ = nullptr;
  file_fault_state state_;
  std::atomic<int> calls_{0};
};

TEST_F(FileFaultGuard, ALostPageReadsZeroAndIsRecorded) {
  auto watch = file_fault_watch::create(base_, 3 * pg, &state_);
  ASSERT_TRUE(watch) << watch.err().message();
  EXPECT_EQ(read_byte(2 * pg + 10), 'c') << "intact before the truncate";
  ASSERT_EQ(::ftruncate(fd_, pg), 0);

  EXPECT_EQ(read_byte(2 * pg + 10), 0);
  EXPECT_EQ(state_.first_lost.load(), host(2 * pg));
  EXPECT_EQ(calls_.load(), 1);
  EXPECT_EQ(read_byte(5), 'a') << "the page the file still has reads its data";

  // The patched page stays readable without another fault.
  EXPECT_EQ(read_byte(2 * pg + 4095), 0);
  EXPECT_EQ(calls_.load(), 1);
  // Another lost page faults once more; the first address stays recorded.
  EXPECT_EQ(read_byte(pg + 1), 0);
  EXPECT_EQ(calls_.load(), 2);
  EXPECT_EQ(state_.first_lost.load(), host(2 * pg));
}

TEST_F(FileFaultGuard, WorksWithoutANotifyHook) {
  state_.notify = nullptr;
  auto watch = file_fault_watch::create(base_, 3 * pg, &state_);
  ASSERT_TRUE(watch);
  ASSERT_EQ(::ftruncate(fd_, pg), 0);
  EXPECT_EQ(read_byte(pg), 0);
  EXPECT_EQ(state_.first_lost.load(), host(pg));
  EXPECT_EQ(calls_.load(), 0);
}

TEST_F(FileFaultGuard, AMovedWatchKeepsWatching) {
  file_fault_watch kept;
  {
    auto watch = file_fault_watch::create(base_, 3 * pg, &state_);
    ASSERT_TRUE(watch);
    file_fault_watch moved(std::move(watch).value());
    kept = std::move(moved);
  } // the moved-from watches are destroyed here; they must not unregister the range
  ASSERT_EQ(::ftruncate(fd_, pg), 0);
  EXPECT_EQ(read_byte(2 * pg), 0);
  EXPECT_EQ(calls_.load(), 1);
}

TEST_F(FileFaultGuard, WatchesAreCapped) {
  std::vector<file_fault_watch> watches;
  result<file_fault_watch> w = memory_errc::out_of_bounds;
  for (int i = 0; i <= 4096; ++i) {
    w = file_fault_watch::create(base_, 3 * pg, &state_);
    if (!w) break;
    watches.push_back(std::move(w).value());
  }
  EXPECT_EQ(w.code(), memory_errc::too_many_ranges);
  EXPECT_GT(watches.size(), 0u);
  EXPECT_LE(watches.size(), 4096u);
  watches.pop_back();
  EXPECT_TRUE(file_fault_watch::create(base_, 3 * pg, &state_)) << "a freed slot is reused";
}

using FileFaultGuardDeathTest = FileFaultGuard;

TEST_F(FileFaultGuardDeathTest, ASigbusAfterTheWatchIsGoneIsNotHandled) {
  {
    auto watch = file_fault_watch::create(base_, 3 * pg, &state_); // installs the handler
    ASSERT_TRUE(watch);
  }
  ASSERT_EQ(::ftruncate(fd_, pg), 0);
  EXPECT_EXIT(read_byte(2 * pg), test::killed_by(SIGBUS), "");
  EXPECT_EQ(state_.first_lost.load(), 0u);
  EXPECT_EQ(calls_.load(), 0);
}

TEST_F(FileFaultGuardDeathTest, ASigbusOutsideTheWatchedRangeIsNotHandled) {
  // Only the first page is watched; the lost third page is someone else's problem.
  auto watch = file_fault_watch::create(base_, pg, &state_);
  ASSERT_TRUE(watch);
  ASSERT_EQ(::ftruncate(fd_, pg), 0);
  EXPECT_EXIT(read_byte(2 * pg), test::killed_by(SIGBUS), "");
  EXPECT_EQ(state_.first_lost.load(), 0u);
}

} // namespace
} // namespace kiln::memory
