// End to end: sandbox creation succeeds for good input and fails cleanly for bad input.
#include "backend_fixture.hpp"

#include <fstream>
#include <string>

#include <sys/stat.h>
#include <unistd.h>

namespace kiln::test {
namespace {

class create : public backend_test {};

TEST_F(create, reports_backend_and_time) {
  auto sb = make("calc");
  ASSERT_NE(sb, nullptr);
  EXPECT_EQ(sb->backend(), backend_under_test());
  EXPECT_GT(sb->stats().create_time.count(), 0);
  EXPECT_FALSE(sb->poisoned());
}

TEST_F(create, missing_file) {
  auto c = config_for("does_not_exist");
  auto sb = sandbox::create(c);
  ASSERT_FALSE(sb);
  EXPECT_EQ(sb.code(), std::errc::no_such_file_or_directory);
}

TEST_F(create, not_an_elf) {
  const std::string path = ::testing::TempDir() + "/kiln_not_elf";
  std::ofstream(path) << "#!/bin/sh\necho not a guest\n";
  auto c = config_for("calc");
  c.guest_path = path;
  auto sb = sandbox::create(c);
  ASSERT_FALSE(sb);
  EXPECT_EQ(sb.code(), memory::memory_errc::elf_bad_magic);
}

// A FIFO given as the guest used to block create() in open() until something wrote to it.
TEST_F(create, a_fifo_as_the_guest_is_refused_without_blocking) {
  const std::string path = ::testing::TempDir() + "/kiln_fifo_guest_" + std::to_string(::getpid());
  ::unlink(path.c_str());
  ASSERT_EQ(::mkfifo(path.c_str(), 0600), 0);
  auto c = config_for("calc");
  c.guest_path = path;
  auto sb = sandbox::create(c);
  ::unlink(path.c_str());
  ASSERT_FALSE(sb);
  EXPECT_NE(sb.err().message().find("not a regular file"), std::string::npos) << sb.err().message();
}

// The same for a file to map, at creation and later.
TEST_F(create, a_fifo_as_a_mapped_file_is_refused_without_blocking) {
  const std::string path = ::testing::TempDir() + "/kiln_fifo_map_" + std::to_string(::getpid());
  ::unlink(path.c_str());
  ASSERT_EQ(::mkfifo(path.c_str(), 0600), 0);
  auto c = config_for("calc");
  c.files.push_back({path, "fifo", 0});
  auto sb = sandbox::create(c);
  ASSERT_FALSE(sb);
  EXPECT_EQ(sb.code(), memory::memory_errc::file_not_regular);
  auto later = make("calc");
  ASSERT_NE(later, nullptr);
  EXPECT_EQ(later->map_file({path, "fifo", 0}).code(), memory::memory_errc::file_not_regular);
  ::unlink(path.c_str());
}

TEST_F(create, host_executable_is_refused) {
  auto c = config_for("calc");
  c.guest_path = "/bin/true"; // dynamic, PIE: not a kiln guest
  auto sb = sandbox::create(c);
  ASSERT_FALSE(sb);
  EXPECT_EQ(sb.code().category(),
            memory::make_error_code(memory::memory_errc::elf_not_static).category());
}

TEST_F(create, a_refused_host_function_fails_creation) {
  host_functions fns;
  fns.add("fine", [](std::int64_t x) { return x; });
  fns.add(std::string(200, 'x'), [] {});
  auto sb = sandbox::create(config_for("calc"), fns);
  ASSERT_FALSE(sb);
  EXPECT_EQ(sb.code(), errc::bad_arguments);
  EXPECT_NE(sb.err().message().find("refused at registration"), std::string::npos)
      << sb.err().message();
}

TEST_F(create, bad_sizes) {
  auto c = config_for("calc");
  c.memory_size = 1 << 20;
  EXPECT_FALSE(sandbox::create(c));
  c = config_for("calc");
  c.memory_size = (16 << 20) + 4096; // not a multiple of 2 MiB
  EXPECT_FALSE(sandbox::create(c));
  c = config_for("calc");
  c.stack_size = 100;
  EXPECT_FALSE(sandbox::create(c));
  c = config_for("calc");
  c.heap_size = 64ull << 20; // larger than memory
  EXPECT_FALSE(sandbox::create(c));
}

TEST_F(create, init_abort_is_an_error_at_creation) {
  auto sb = sandbox::create(config_for("init_abort"));
  ASSERT_FALSE(sb);
  EXPECT_EQ(sb.code(), errc::guest_aborted);
  EXPECT_NE(sb.err().message().find("during guest init"), std::string::npos);
}

TEST_F(create, many_sandboxes_side_by_side) {
  std::vector<std::unique_ptr<sandbox>> all;
  for (int i = 0; i < 20; ++i) {
    all.push_back(make("calc"));
    ASSERT_NE(all.back(), nullptr);
  }
  for (int i = 0; i < 20; ++i)
    EXPECT_EQ(std::get<std::int32_t>(*all[i]->call("add_i32", i, i)), 2 * i);
}

TEST_F(create, larger_memory) {
  auto c = config_for("calc");
  c.memory_size = 256ull << 20;
  c.stack_size = 1ull << 20;
  auto sb = sandbox::create(c);
  ASSERT_TRUE(sb) << sb.err().message();
  EXPECT_EQ(std::get<std::int32_t>(*(*sb)->call("add_i32", 1, 2)), 3);
}

} // namespace
} // namespace kiln::test
