// Tests for memory/host_file.hpp: which host files may be mapped, and what names one version.
#include <kiln/memory/host_file.hpp>
#include <kiln/memory/memory_errc.hpp>

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <system_error>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace kiln::memory {
namespace {

namespace fs = std::filesystem;

// A fresh directory under the system temp directory, removed with everything in it.
class HostFile : public ::testing::Test {
protected:
  void SetUp() override {
    std::random_device rd;
    dir_ = fs::temp_directory_path() /
           ("kiln_host_file_test." + std::to_string(::getpid()) + "." + std::to_string(rd()));
    ASSERT_TRUE(fs::create_directory(dir_));
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string write_file(const std::string& name, const std::string& bytes) {
    const auto p = dir_ / name;
    std::ofstream(p, std::ios::binary) << bytes;
    return p.string();
  }
  fs::path dir_;
};

TEST_F(HostFile, OpensARegularFileAndNamesItsVersion) {
  const std::string path = write_file("data.bin", std::string(5000, 'k'));
  auto f = host_file::open(path);
  ASSERT_TRUE(f) << f.err().message();
  EXPECT_GE(f->fd(), 0);
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  const auto& id = f->identity();
  EXPECT_EQ(id.path, path);
  EXPECT_EQ(id.size, 5000u);
  EXPECT_EQ(id.inode, static_cast<std::uint64_t>(st.st_ino));
  EXPECT_EQ(id.device, static_cast<std::uint64_t>(st.st_dev));
  EXPECT_EQ(id.mtime_ns,
            static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec);
  // The descriptor reads the file.
  char c = 0;
  EXPECT_EQ(::pread(f->fd(), &c, 1, 4999), 1);
  EXPECT_EQ(c, 'k');
  auto size = f->current_size();
  ASSERT_TRUE(size);
  EXPECT_EQ(*size, 5000u);
}

TEST_F(HostFile, TwoFilesHaveDifferentInodes) {
  auto a = host_file::open(write_file("a", "a"));
  auto b = host_file::open(write_file("b", "b"));
  ASSERT_TRUE(a && b);
  EXPECT_NE(a->identity().inode, b->identity().inode);
  EXPECT_NE(a->fd(), b->fd());
}

TEST_F(HostFile, AMissingFileGivesTheOpenErrno) {
  auto f = host_file::open((dir_ / "missing").string());
  ASSERT_FALSE(f);
  EXPECT_EQ(f.code(), std::make_error_code(std::errc::no_such_file_or_directory));
  EXPECT_NE(f.err().message().find("missing"), std::string::npos) << f.err().message();
}

TEST_F(HostFile, RefusesDirectoriesAndDevices) {
  EXPECT_EQ(host_file::open(dir_.string()).code(), memory_errc::file_not_regular);
  EXPECT_EQ(host_file::open("/dev/null").code(), memory_errc::file_not_regular);
}

// A FIFO with no writer used to block open() for ever; it is refused at once.
TEST_F(HostFile, RefusesAFifoWithoutWaitingForAWriter) {
  const auto fifo = (dir_ / "fifo").string();
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_EQ(host_file::open(fifo).code(), memory_errc::file_not_regular);
}

TEST_F(HostFile, RefusesAnEmptyFile) {
  EXPECT_EQ(host_file::open(write_file("empty", "")).code(), memory_errc::file_empty);
}

TEST_F(HostFile, CurrentSizeSeesATruncate) {
  const std::string path = write_file("shrinks", std::string(3 * 4096, 'x'));
  auto f = host_file::open(path);
  ASSERT_TRUE(f);
  ASSERT_EQ(::truncate(path.c_str(), 4096), 0);
  auto size = f->current_size();
  ASSERT_TRUE(size);
  EXPECT_EQ(*size, 4096u);
  EXPECT_EQ(f->identity().size, 3u * 4096) << "the identity keeps the size at open";
  ASSERT_EQ(::truncate(path.c_str(), 10 * 4096), 0);
  size = f->current_size();
  ASSERT_TRUE(size);
  EXPECT_EQ(*size, 10u * 4096);
}

TEST_F(HostFile, MovesOwnershipOfTheDescriptor) {
  auto f = host_file::open(write_file("m", "moved"));
  ASSERT_TRUE(f);
  const int fd = f->fd();
  host_file moved = std::move(f).value();
  EXPECT_EQ(moved.fd(), fd);
  EXPECT_EQ(moved.identity().size, 5u);
  auto size = moved.current_size();
  ASSERT_TRUE(size);
  EXPECT_EQ(*size, 5u);
}

TEST_F(HostFile, ClosesItsDescriptor) {
  int fd = -1;
  {
    auto f = host_file::open(write_file("c", "closed"));
    ASSERT_TRUE(f);
    fd = f->fd();
    EXPECT_NE(::fcntl(fd, F_GETFD), -1);
  }
  EXPECT_EQ(::fcntl(fd, F_GETFD), -1);
  EXPECT_EQ(errno, EBADF);
}

} // namespace
} // namespace kiln::memory
