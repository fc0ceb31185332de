// End to end: .ksnap files: save and load round trip, sparse files, recorded host functions and
// mapped files checked at load, a damaged file refused before anything is built.
#include "backend_fixture.hpp"

#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/snapshot_file.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>

namespace kiln::test {
namespace {

constexpr std::uint64_t page = 4096, mib = 1ull << 20;


class snapshot_file_e2e : public backend_test {
protected:
  void SetUp() override {
    backend_test::SetUp();
    dir_ = std::filesystem::temp_directory_path() /
           ("kiln-ksnap-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  std::filesystem::path dir_;
};

TEST_F(snapshot_file_e2e, save_load_round_trip_keeps_state_and_identity) {
  auto c = config_for("memory_test");
  c.memory_size = 64 * mib;
  auto sb = sandbox::create(c);
  ASSERT_TRUE(sb) << sb.err().message();
  const auto h = as<std::uint64_t>((*sb)->call("heap_start"));
  ASSERT_TRUE((*sb)->call("touch", h, 512 * page, std::int64_t{6}));
  EXPECT_EQ(as<std::int64_t>((*sb)->call("bump")), 1);
  auto snap = (*sb)->take_snapshot();
  ASSERT_TRUE(snap);
  const auto file = path("state.ksnap");
  ASSERT_TRUE(snap->save(file)) << snap->save(file).err().message();
  // Sparse: 64 MiB of memory, about 2 MiB of data.
  struct stat st {};
  ASSERT_EQ(::stat(file.c_str(), &st), 0);
  EXPECT_GE(static_cast<std::uint64_t>(st.st_size), 64 * mib);
  EXPECT_LT(static_cast<std::uint64_t>(st.st_blocks) * 512, 8 * mib);
  ASSERT_TRUE(snapshot::verify(file));

  auto loaded = snapshot::load(file);
  ASSERT_TRUE(loaded) << loaded.err().message();
  auto child = sandbox::create(*loaded, {}, c);
  ASSERT_TRUE(child) << child.err().message();
  EXPECT_EQ(as<std::int64_t>((*child)->call("bump")), 2);
  EXPECT_EQ(as<std::uint64_t>((*child)->call("sum_pages", h, 512 * page)), 6u * 512);
  // Its first restore is legal: it descends from the loaded snapshot.
  ASSERT_TRUE((*child)->restore(*loaded));
  EXPECT_EQ(as<std::int64_t>((*child)->call("bump")), 2);
  EXPECT_NE(loaded->describe().find("memory: 64 MiB"), std::string::npos) << loaded->describe();
}

TEST_F(snapshot_file_e2e, a_snapshot_file_truncated_under_a_sandbox_fails_only_that_sandbox) {
  auto c = config_for("memory_test");
  c.memory_size = 32 * mib;
  auto sb = sandbox::create(c);
  ASSERT_TRUE(sb) << sb.err().message();
  const auto h = as<std::uint64_t>((*sb)->call("heap_start"));
  ASSERT_TRUE((*sb)->call("touch", h, 256 * page, std::int64_t{5}));
  auto snap = (*sb)->take_snapshot();
  ASSERT_TRUE(snap);
  const auto file = path("shrinks.ksnap");
  ASSERT_TRUE(snap->save(file));
  auto loaded = snapshot::load(file);
  ASSERT_TRUE(loaded) << loaded.err().message();
  auto victim = sandbox::create(*loaded, {}, c);
  ASSERT_TRUE(victim) << victim.err().message();
  ASSERT_EQ(::truncate(file.c_str(), 8192), 0); // the data area is gone
  auto r = (*victim)->call("sum_pages", h, 256 * page);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), errc::memory_violation) << r.err().message();
  EXPECT_NE(r.err().message().find("snapshot file"), std::string::npos) << r.err().message();
  EXPECT_TRUE((*victim)->poisoned());
  // The host and the sandbox the snapshot came from carry on.
  EXPECT_EQ(as<std::uint64_t>((*sb)->call("sum_pages", h, 256 * page)), 5u * 256);
}

// tests/golden/calc-v1.0.ksnap was written by format 1.0 (`kiln snapshot build/guests/calc.elf
// --memory 4M -o ...`, emulated backend). Every later kiln must still load it: if this fails,
// the format changed without a version bump, or a reader for 1.0 was dropped.
TEST_F(snapshot_file_e2e, the_golden_format_1_0_file_still_loads_and_runs) {
  // Tripwire: changing the format version means adding a golden file for the new version and
  // keeping this one loading (or refusing it deliberately, with snapshot_unsupported).
  EXPECT_EQ(memory::ksnap::format_major, 1u) << "new .ksnap major: add a golden file for it";
  EXPECT_EQ(memory::ksnap::format_minor, 0u) << "new .ksnap minor: add a golden file for it";
  const std::string golden = std::string(KILN_GOLDEN_DIR) + "/calc-v1.0.ksnap";
  ASSERT_TRUE(snapshot::verify(golden)) << snapshot::verify(golden).err().message();
  auto loaded = snapshot::load(golden);
  ASSERT_TRUE(loaded) << loaded.err().message();
  EXPECT_EQ(loaded->memory_size(), 4 * mib);
  host_functions fns; // the ones `kiln snapshot` registered
  fns.add("host_add", [](std::int64_t a, std::int64_t b) { return a + b; });
  fns.add("host_mul", [](std::int64_t a, std::int64_t b) { return a * b; });
  fns.add("host_print", [](std::string) {});
  auto sb = sandbox::create(*loaded, fns, config_for("calc"));
  ASSERT_TRUE(sb) << sb.err().message();
  EXPECT_EQ(as<std::int32_t>((*sb)->call("add", 40, 2)), 42);
  EXPECT_EQ(as<std::int64_t>((*sb)->call("call_host", std::string("host_mul"), std::int64_t{6},
                                         std::int64_t{7})),
            42);
}

TEST_F(snapshot_file_e2e, host_functions_are_checked_when_the_sandbox_is_created) {
  auto c = config_for("calc");
  host_functions fns;
  fns.add("host_add", [](std::int64_t a, std::int64_t b) { return a + b; });
  auto sb = sandbox::create(c, fns);
  ASSERT_TRUE(sb) << sb.err().message();
  auto snap = (*sb)->take_snapshot();
  ASSERT_TRUE(snap);
  const auto file = path("calc.ksnap");
  ASSERT_TRUE(snap->save(file));
  auto loaded = snapshot::load(file);
  ASSERT_TRUE(loaded) << loaded.err().message();
  EXPECT_EQ(sandbox::create(*loaded, {}, c).code(), errc::function_not_found);
  host_functions other;
  other.add("host_add", [](std::int32_t a) { return a; });
  EXPECT_EQ(sandbox::create(*loaded, other, c).code(), errc::bad_arguments);
  auto ok = sandbox::create(*loaded, fns, c);
  ASSERT_TRUE(ok) << ok.err().message();
  EXPECT_EQ(as<std::int64_t>((*ok)->call("call_host", std::string("host_add"), std::int64_t{40},
                                         std::int64_t{2})),
            42);
}

TEST_F(snapshot_file_e2e, mapped_files_are_referenced_and_checked) {
  const auto data = path("data.bin");
  std::ofstream(data, std::ios::binary).write("\x01\x02\x03\x04", 4);
  auto c = config_for("memory_test");
  c.files.push_back({data, "data", 0});
  auto sb = sandbox::create(c);
  ASSERT_TRUE(sb) << sb.err().message();
  auto snap = (*sb)->take_snapshot();
  ASSERT_TRUE(snap);
  const auto file = path("files.ksnap");
  ASSERT_TRUE(snap->save(file));
  auto loaded = snapshot::load(file);
  ASSERT_TRUE(loaded) << loaded.err().message();
  auto child = sandbox::create(*loaded, {}, config_for("memory_test"));
  ASSERT_TRUE(child) << child.err().message();
  EXPECT_EQ(as<std::uint64_t>((*child)->call("file_sum", std::string("data"))), 10u);
  std::ofstream(data, std::ios::binary | std::ios::app).write("\x05", 1); // the file changes
  EXPECT_FALSE(sandbox::create(*loaded, {}, config_for("memory_test")));
}

TEST_F(snapshot_file_e2e, a_damaged_file_is_refused_before_anything_is_built) {
  auto sb = make("memory_test");
  ASSERT_NE(sb, nullptr);
  auto snap = sb->take_snapshot();
  ASSERT_TRUE(snap);
  const auto file = path("good.ksnap");
  ASSERT_TRUE(snap->save(file));
  const auto size = std::filesystem::file_size(file);
  // Truncated by one byte, emptied, a flipped meta byte, a symlink.
  const auto cut = path("cut.ksnap");
  std::filesystem::copy_file(file, cut);
  std::filesystem::resize_file(cut, size - 1);
  EXPECT_EQ(snapshot::load(cut).code(), memory::memory_errc::snapshot_truncated);
  const auto empty = path("empty.ksnap");
  std::ofstream(empty).close();
  EXPECT_FALSE(snapshot::load(empty));
  const auto flipped = path("flipped.ksnap");
  std::filesystem::copy_file(file, flipped);
  {
    std::fstream f(flipped, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(4096 + 40);
    char b = 0;
    f.read(&b, 1);
    b = static_cast<char>(b ^ 0x10);
    f.seekp(4096 + 40);
    f.write(&b, 1);
  }
  EXPECT_EQ(snapshot::load(flipped).code(), memory::memory_errc::snapshot_corrupt);
  const auto link = path("link.ksnap");
  std::filesystem::create_symlink(file, link);
  EXPECT_EQ(snapshot::load(link).code(), std::make_error_code(std::errc::too_many_symbolic_link_levels));
  EXPECT_TRUE(snapshot::load(file)); // the original is fine
}

} // namespace
} // namespace kiln::test
