// The kiln CLI as a user runs it: results on stdout, errors and usage on stderr, exit codes.
#include <kiln/memory/snapshot_file.hpp>

#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <fcntl.h>
#include <string>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>

namespace {

struct outcome {
  int status;
  std::string out;
};

outcome run(const std::string& args) {
  const std::string cmd = std::string(KILN_CLI_PATH) + " " + args + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  outcome o{-1, {}};
  if (!p) return o;
  std::array<char, 4096> buf{};
  while (std::size_t n = std::fread(buf.data(), 1, buf.size(), p))
    o.out.append(buf.data(), n);
  const int st = ::pclose(p);
  o.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return o;
}

const std::string calc = std::string(KILN_GUEST_DIR) + "/calc.elf";
const std::string emu = " --backend emulated";

TEST(cli, backends_lists_both) {
  auto o = run("backends");
  EXPECT_EQ(o.status, 0);
  EXPECT_NE(o.out.find("kvm"), std::string::npos);
  EXPECT_NE(o.out.find("emulated"), std::string::npos);
}

TEST(cli, run_prints_results) {
  EXPECT_EQ(run("run " + calc + " add_i32 2 3" + emu).out, "5\n");
  EXPECT_EQ(run("run " + calc + " add 2 3" + emu).out, "5\n");
  EXPECT_EQ(run("run " + calc + " mul 6 7" + emu).out, "42\n");
  EXPECT_EQ(run("run " + calc + " mul_i64 123456789:i64 1000:i64" + emu).out, "123456789000\n");
  EXPECT_EQ(run("run " + calc + " add_f64 0.5 2.25" + emu).out, "2.75\n");
  EXPECT_EQ(run("run " + calc + " concat str:kiln str:-sandbox" + emu).out, "kiln-sandbox\n");
  EXPECT_EQ(run("run " + calc + " echo hex:00ff10" + emu).out, "0x00ff10\n");
  EXPECT_EQ(run("run " + calc + " negate false" + emu).out, "true\n");
  EXPECT_EQ(run("run " + calc + " call_host str:host_add 40:i64 2:i64" + emu).out, "42\n");
}

TEST(cli, stats_are_printed) {
  auto o = run("run " + calc + " add_i32 2 3 --stats" + emu);
  EXPECT_EQ(o.status, 0);
  EXPECT_NE(o.out.find("create:"), std::string::npos);
  EXPECT_NE(o.out.find("exits:"), std::string::npos);
}

TEST(cli, stats_show_redundant_protection_requests_cost_no_syscalls) {
  const std::string guest = std::string(KILN_GUEST_DIR) + "/memory_test.elf";
  auto o = run("run " + guest + " protect_twice 64 --stats" + emu);
  EXPECT_EQ(o.status, 0) << o.out;
  EXPECT_EQ(o.out.rfind("0\n", 0), 0u) << o.out; // KILN_MEMORY_OK
  // One real change (one mprotect), then 64 requests that cost nothing.
  EXPECT_NE(o.out.find("memory after create: 1 host syscalls"), std::string::npos) << o.out;
  EXPECT_NE(o.out.find("protect requests: 65 (64 changed nothing"), std::string::npos) << o.out;
}

TEST(cli, map_file_makes_a_host_file_visible_by_name) {
  const std::string guest = std::string(KILN_GUEST_DIR) + "/memory_test.elf";
  char path[] = "/tmp/kiln-cli-map-XXXXXX";
  const int fd = ::mkstemp(path);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::write(fd, "\x01\x02\x03", 3), 3);
  ::close(fd);
  auto o = run("run " + guest + " file_sum str:data --map-file " + path + "=data" + emu);
  EXPECT_EQ(o.status, 0) << o.out;
  EXPECT_EQ(o.out, "6\n");
  auto stats =
      run("run " + guest + " file_size str:data --map-file " + path + "=data --stats" + emu);
  EXPECT_NE(stats.out.find("file 'data': 3 bytes at guest 0x"), std::string::npos) << stats.out;
  auto missing = run("run " + guest + " file_size str:data --map-file /nonexistent/x" + emu);
  EXPECT_EQ(missing.status, 1);
  EXPECT_NE(missing.out.find("No such file or directory"), std::string::npos) << missing.out;
  ::unlink(path);
}

TEST(cli, a_snapshot_file_maps_host_files_only_where_allowed) {
  const std::string guest = std::string(KILN_GUEST_DIR) + "/memory_test.elf";
  char dir[] = "/tmp/kiln-cli-mapped-XXXXXX";
  ASSERT_NE(::mkdtemp(dir), nullptr);
  const std::string data = std::string(dir) + "/data.bin";
  const int fd = ::open(data.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::write(fd, "\x01\x02\x03", 3), 3);
  ::close(fd);
  const std::string file = std::string(dir) + "/mt.ksnap";
  auto made = run("snapshot " + guest + " -o " + file + " --map-file " + data + "=data" + emu);
  ASSERT_EQ(made.status, 0) << made.out;
  auto refused = run("run --snapshot " + file + " file_sum str:data" + emu);
  EXPECT_EQ(refused.status, 1);
  EXPECT_NE(refused.out.find("did not allow"), std::string::npos) << refused.out;
  auto elsewhere = run("run --snapshot " + file + " file_sum str:data --allow-mapped /usr" + emu);
  EXPECT_EQ(elsewhere.status, 1) << elsewhere.out;
  EXPECT_EQ(run("run --snapshot " + file + " file_sum str:data --allow-mapped " + dir + emu).out,
            "6\n");
  EXPECT_EQ(run("run --snapshot " + file + " --trust-mapped-files file_sum str:data" + emu).out,
            "6\n");
  EXPECT_EQ(run("inspect " + file).status, 0); // describing maps nothing
  std::filesystem::remove_all(dir);
}

TEST(cli, snapshot_inspect_verify_and_run_from_a_file) {
  char dir[] = "/tmp/kiln-cli-snap-XXXXXX";
  ASSERT_NE(::mkdtemp(dir), nullptr);
  const std::string file = std::string(dir) + "/calc.ksnap";
  auto made = run("snapshot " + calc + " -o " + file + emu);
  EXPECT_EQ(made.status, 0) << made.out;
  auto described = run("inspect " + file);
  EXPECT_EQ(described.status, 0) << described.out;
  EXPECT_NE(described.out.find("memory: 16 MiB"), std::string::npos) << described.out;
  EXPECT_NE(described.out.find("host function host_add"), std::string::npos) << described.out;
  auto verified = run("verify " + file);
  EXPECT_EQ(verified.status, 0) << verified.out;
  EXPECT_EQ(run("run --snapshot " + file + " add 2 3" + emu).out, "5\n");
  EXPECT_EQ(run("run --snapshot " + file + " call_host str:host_add 40:i64 2:i64" + emu).out,
            "42\n");
  auto missing = run("run --snapshot " + std::string(dir) + "/nope.ksnap add 2 3" + emu);
  EXPECT_EQ(missing.status, 1);

  // One stored byte flipped (in the guest's code): verify and an eager load refuse the file.
  const std::string bad = std::string(dir) + "/bad.ksnap";
  std::filesystem::copy_file(file, bad);
  {
    auto chain = kiln::memory::snapshot_chain::open(bad);
    ASSERT_TRUE(chain);
    auto img = chain->image();
    ASSERT_TRUE(img);
    const auto at = static_cast<off_t>((*img)->layers()[0]->base() + (1 << 20) + 16);
    const int fd = ::open(bad.c_str(), O_RDWR | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    unsigned char b = 0;
    ASSERT_EQ(::pread(fd, &b, 1, at), 1);
    b ^= 0x80;
    ASSERT_EQ(::pwrite(fd, &b, 1, at), 1);
    ::close(fd);
  }
  EXPECT_NE(run("verify " + bad).status, 0);
  auto refused = run("run --snapshot " + bad + " --load eager add 2 3" + emu);
  EXPECT_NE(refused.status, 0) << refused.out;
  EXPECT_NE(refused.out.find("checksum"), std::string::npos) << refused.out;
  std::filesystem::remove(bad);

  // A layered child: saved after a call, listed with its parent, loadable on its own path.
  const std::string child = std::string(dir) + "/child.ksnap";
  auto saved = run("run --snapshot " + file + " --save " + child + " mul 6 7" + emu);
  EXPECT_EQ(saved.status, 0) << saved.out;
  EXPECT_NE(saved.out.find("over " + file), std::string::npos) << saved.out;
  auto layers = run("inspect " + child);
  EXPECT_NE(layers.out.find("layer 0: "), std::string::npos) << layers.out;
  EXPECT_NE(layers.out.find("layer 1: "), std::string::npos) << layers.out;
  EXPECT_EQ(run("verify " + child).status, 0);
  EXPECT_EQ(run("run --snapshot " + child + " add 2 3" + emu).out, "5\n");
  std::filesystem::remove(file);
  auto orphan = run("run --snapshot " + child + " add 2 3" + emu);
  EXPECT_EQ(orphan.status, 1);
  EXPECT_NE(orphan.out.find("parent"), std::string::npos) << orphan.out;
  std::filesystem::remove_all(dir);
}

TEST(cli, a_recorded_working_set_is_stored_and_each_load_mode_reports_its_figures) {
  char dir[] = "/tmp/kiln-cli-ws-XXXXXX";
  ASSERT_NE(::mkdtemp(dir), nullptr);
  const std::string guest = std::string(KILN_GUEST_DIR) + "/memory_test.elf";
  const std::string file = std::string(dir) + "/mt.ksnap";
  auto heap = run("run " + guest + " heap_start --memory 32M" + emu);
  ASSERT_EQ(heap.status, 0) << heap.out;
  const std::string h = heap.out.substr(0, heap.out.find('\n'));
  auto made = run("snapshot " + guest + " --memory 32M -o " + file + " --record sum_pages " + h +
                  ":u64 1048576:u64" + emu);
  ASSERT_EQ(made.status, 0) << made.out;
  EXPECT_NE(made.out.find("working set: "), std::string::npos) << made.out;
  EXPECT_NE(run("inspect " + file).out.find("working set: 2"), std::string::npos)
      << "256 heap pages and a few of stack and data";
  for (const char* mode : {"prefetch", "demand", "eager"}) {
    auto r = run("run --snapshot " + file + " --load " + mode + " --stats bump" + emu);
    EXPECT_EQ(r.status, 0) << r.out;
    EXPECT_NE(r.out.find(std::string("load: ") + mode), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("first result after"), std::string::npos) << r.out;
  }
  auto bad = run("run --snapshot " + file + " --load lazy bump" + emu);
  EXPECT_EQ(bad.status, 2) << bad.out;
  std::filesystem::remove_all(dir);
}

TEST(cli, bad_input_gets_a_message_not_a_crash) {
  auto bad_arg = run("run " + calc + " add_i32 2 zzz" + emu);
  EXPECT_EQ(bad_arg.status, 2);
  EXPECT_NE(bad_arg.out.find("bad argument"), std::string::npos);
  auto bad_backend = run("run " + calc + " add_i32 2 3 --backend vmware");
  EXPECT_EQ(bad_backend.status, 2);
  auto no_file = run("run /nonexistent.elf add_i32 2 3");
  EXPECT_NE(no_file.status, 0);
  auto no_args = run("");
  EXPECT_NE(no_args.status, 0);
  auto unknown_fn = run("run " + calc + " nope" + emu);
  EXPECT_EQ(unknown_fn.status, 1);
  EXPECT_NE(unknown_fn.out.find("not found"), std::string::npos);
  auto bad_mem = run("run " + calc + " add_i32 1 2 --memory lots" + emu);
  EXPECT_EQ(bad_mem.status, 2);
}

} // namespace
