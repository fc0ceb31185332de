// End to end: .ksnap files: save and load round trip, sparse files, recorded host functions and
// mapped files checked at load, a damaged file refused before anything is built.
#include "backend_fixture.hpp"

#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/snapshot_file.hpp>
#include <kiln/runtime/detail/snapshot_codec.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>

namespace kiln::test {
namespace {

constexpr std::uint64_t page = 4096, mib = 1ull << 20;

using snapshot_file_e2e = file_backend_test;

/// The host functions `kiln snapshot` registered when the golden files were written.
host_functions cli_host_functions() {
  host_functions fns;
  fns.add("host_add", [](std::int64_t a, std::int64_t b) { return a + b; });
  fns.add("host_mul", [](std::int64_t a, std::int64_t b) { return a * b; });
  fns.add("host_print", [](std::string) {});
  return fns;
}

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

std::uint64_t allocated(const std::string& file) {
  struct stat st {};
  EXPECT_EQ(::stat(file.c_str(), &st), 0) << file;
  return static_cast<std::uint64_t>(st.st_blocks) * 512;
}

/// A 64 MiB memory_test sandbox with 8 MiB of its heap written, saved to `file`.
void save_base(const sandbox_config& c, const std::string& file, std::uint64_t& heap) {
  auto sb = sandbox::create(c);
  ASSERT_TRUE(sb) << sb.err().message();
  heap = as<std::uint64_t>((*sb)->call("heap_start"));
  ASSERT_TRUE((*sb)->call("touch", heap, 2048 * page, std::int64_t{6}));
  auto snap = (*sb)->take_snapshot();
  ASSERT_TRUE(snap);
  auto saved = snap->save(file);
  ASSERT_TRUE(saved) << saved.err().message();
}

TEST_F(snapshot_file_e2e, a_layered_save_writes_only_what_changed_and_loads_over_its_parent) {
  auto c = config_for("memory_test");
  c.memory_size = 64 * mib;
  std::uint64_t h = 0;
  const auto base_file = path("base.ksnap"), child_file = path("child.ksnap");
  ASSERT_NO_FATAL_FAILURE(save_base(c, base_file, h));
  auto base = snapshot::load(base_file);
  ASSERT_TRUE(base) << base.err().message();
  auto sb = sandbox::create(*base, {}, c);
  ASSERT_TRUE(sb) << sb.err().message();
  ASSERT_TRUE((*sb)->call("touch", h, 4 * page, std::int64_t{9}));
  EXPECT_EQ(as<std::int64_t>((*sb)->call("bump")), 1);
  auto snap = (*sb)->take_snapshot();
  ASSERT_TRUE(snap);
  ASSERT_TRUE(snap->save(child_file)) << snap->save(child_file).err().message();
  // The child holds the 4 pages, the counter's page, the stack... not the parent's 8 MiB.
  EXPECT_LT(allocated(child_file) * 20, allocated(base_file))
      << allocated(child_file) << " vs " << allocated(base_file);
  ASSERT_TRUE(snapshot::verify(child_file));

  auto loaded = snapshot::load(child_file);
  ASSERT_TRUE(loaded) << loaded.err().message();
  EXPECT_EQ(loaded->files(), (std::vector<std::string>{base_file, child_file}));
  EXPECT_NE(loaded->describe().find("layer 1"), std::string::npos) << loaded->describe();
  auto child = sandbox::create(*loaded, {}, c);
  ASSERT_TRUE(child) << child.err().message();
  EXPECT_EQ(as<std::uint64_t>((*child)->call("sum_pages", h, 4 * page)), 9u * 4);
  EXPECT_EQ(as<std::uint64_t>((*child)->call("sum_pages", h + 4 * page, 2044 * page)), 6u * 2044);
  EXPECT_EQ(as<std::uint64_t>((*child)->call("hash_range", h, 8 * mib)),
            as<std::uint64_t>((*sb)->call("hash_range", h, 8 * mib)))
      << "the same memory as the sandbox it was taken in";
  EXPECT_EQ(as<std::int64_t>((*child)->call("bump")), 2);
  ASSERT_TRUE((*child)->restore(*loaded));
  EXPECT_EQ(as<std::int64_t>((*child)->call("bump")), 2);

  // On request, a whole file instead.
  const auto whole = path("whole.ksnap");
  ASSERT_TRUE(snap->save(whole, {.layered = false}));
  auto w = snapshot::load(whole);
  ASSERT_TRUE(w) << w.err().message();
  EXPECT_EQ(w->files(), std::vector<std::string>{whole});
  EXPECT_GT(allocated(whole), 8 * mib);
}

TEST_F(snapshot_file_e2e, a_child_is_never_written_over_its_own_parent) {
  auto c = config_for("memory_test");
  c.memory_size = 64 * mib;
  std::uint64_t h = 0;
  const auto base_file = path("base.ksnap");
  ASSERT_NO_FATAL_FAILURE(save_base(c, base_file, h));
  auto base = snapshot::load(base_file);
  ASSERT_TRUE(base);
  auto sb = sandbox::create(*base, {}, c);
  ASSERT_TRUE(sb);
  ASSERT_TRUE((*sb)->call("touch", h, page, std::int64_t{3}));
  auto snap = (*sb)->take_snapshot();
  ASSERT_TRUE(snap);
  ASSERT_TRUE(snap->save(base_file)); // over the file it descends from: written whole
  auto again = snapshot::load(base_file);
  ASSERT_TRUE(again) << again.err().message();
  EXPECT_EQ(again->files(), std::vector<std::string>{base_file});
  auto sb2 = sandbox::create(*again, {}, c);
  ASSERT_TRUE(sb2);
  EXPECT_EQ(as<std::uint64_t>((*sb2)->call("sum_pages", h, 2048 * page)), 3u + 6u * 2047);
}

// kiln verify used to pass a file whose checksums all match but whose state a load refuses:
// it runs every check a load runs.
TEST_F(snapshot_file_e2e, verify_refuses_what_load_refuses_even_with_every_checksum_right) {
  auto sb = make("calc");
  ASSERT_NE(sb, nullptr);
  auto snap = sb->take_snapshot();
  ASSERT_TRUE(snap);
  const auto good = path("good.ksnap"), bad = path("bad.ksnap");
  ASSERT_TRUE(snap->save(good));
  ASSERT_TRUE(snapshot::verify(good));
  // The same file written again with the layout section cut short: every checksum is right.
  auto chain = memory::snapshot_chain::open(good);
  ASSERT_TRUE(chain) << chain.err().message();
  auto info = chain->top().info();
  bool cut = false;
  for (auto& section : info.sections)
    if (section.tag == detail::section_tag::layout) {
      section.payload.resize(section.payload.size() / 2);
      cut = true;
    }
  ASSERT_TRUE(cut);
  auto image = chain->image();
  ASSERT_TRUE(image) << image.err().message();
  ASSERT_TRUE(memory::write_snapshot_file(bad, **image, info));
  auto loaded = snapshot::load(bad);
  ASSERT_FALSE(loaded);
  auto verified = snapshot::verify(bad);
  ASSERT_FALSE(verified);
  EXPECT_EQ(verified.code(), loaded.code());
  EXPECT_EQ(verified.err().message(), loaded.err().message());
}

TEST_F(snapshot_file_e2e, a_child_whose_parent_is_gone_or_rewritten_is_refused_at_load) {
  auto c = config_for("memory_test");
  c.memory_size = 64 * mib;
  std::uint64_t h = 0;
  const auto base_file = path("base.ksnap"), child_file = path("child.ksnap");
  ASSERT_NO_FATAL_FAILURE(save_base(c, base_file, h));
  {
    auto base = snapshot::load(base_file);
    ASSERT_TRUE(base);
    auto sb = sandbox::create(*base, {}, c);
    ASSERT_TRUE(sb);
    auto snap = (*sb)->take_snapshot();
    ASSERT_TRUE(snap && snap->save(child_file));
  }
  ASSERT_TRUE(snapshot::load(child_file));
  // Rewritten (another save of the same guest: another id).
  ASSERT_NO_FATAL_FAILURE(save_base(c, base_file, h));
  auto r = snapshot::load(child_file);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), memory::memory_errc::snapshot_parent_mismatch) << r.err().message();
  EXPECT_FALSE(snapshot::verify(child_file));
  // Gone.
  std::filesystem::remove(base_file);
  r = snapshot::load(child_file);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), std::errc::no_such_file_or_directory) << r.err().message();
}

TEST_F(snapshot_file_e2e, generations_of_files_layer_up_to_the_cap_then_start_whole_again) {
  auto c = config_for("memory_test");
  c.memory_size = 16 * mib;
  auto sb = sandbox::create(c);
  ASSERT_TRUE(sb) << sb.err().message();
  auto first = (*sb)->take_snapshot();
  ASSERT_TRUE(first && first->save(path("g0.ksnap")));
  std::vector<std::size_t> depths;
  for (int g = 1; g <= 12; ++g) {
    auto loaded = snapshot::load(path("g" + std::to_string(g - 1) + ".ksnap"));
    ASSERT_TRUE(loaded) << g << ": " << loaded.err().message();
    depths.push_back(loaded->files().size());
    auto s = sandbox::create(*loaded, {}, c);
    ASSERT_TRUE(s) << s.err().message();
    EXPECT_EQ(as<std::int64_t>((*s)->call("bump")), g) << "every generation sees the last";
    auto snap = (*s)->take_snapshot();
    ASSERT_TRUE(snap) << g << ": " << snap.err().message();
    auto saved = snap->save(path("g" + std::to_string(g) + ".ksnap"));
    ASSERT_TRUE(saved) << g << ": " << saved.err().message();
  }
  // A chain of 8 files maps as 8 layers; a snapshot over it is flattened, so written whole.
  EXPECT_EQ(depths, (std::vector<std::size_t>{1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4}));
}

// A .ksnap is backend-neutral: one taken on KVM runs on the emulated backend and the other way
// round (the NX bits and EFER follow the backend that loads it). Both directions in one test, so
// that the run where both backends exist (KVM's, in the VM or on a KVM host) covers both.
TEST_F(snapshot_file_e2e, a_snapshot_taken_on_one_backend_runs_on_the_other) {
  for (auto k : {vcpu::backend_kind::kvm, vcpu::backend_kind::emulated})
    if (const auto st = vcpu::probe(k); !st.usable)
      GTEST_SKIP() << "needs both backends; " << vcpu::to_string(k)
                   << " is unusable: " << st.reason;
  const auto choice = [](vcpu::backend_kind k) {
    return k == vcpu::backend_kind::kvm ? vcpu::backend_choice::kvm
                                        : vcpu::backend_choice::emulated;
  };
  for (auto [from, to] : {std::pair{vcpu::backend_kind::kvm, vcpu::backend_kind::emulated},
                          std::pair{vcpu::backend_kind::emulated, vcpu::backend_kind::kvm}}) {
    SCOPED_TRACE(std::string(vcpu::to_string(from)) + " -> " + vcpu::to_string(to));
    auto c = config_for("memory_test");
    c.memory_size = 32 * mib;
    c.backend = choice(from);
    auto sb = sandbox::create(c);
    ASSERT_TRUE(sb) << sb.err().message();
    const auto h = as<std::uint64_t>((*sb)->call("heap_start"));
    ASSERT_TRUE((*sb)->call("touch", h, 64 * page, std::int64_t{3}));
    EXPECT_EQ(as<std::int64_t>((*sb)->call("bump")), 1);
    auto snap = (*sb)->take_snapshot();
    ASSERT_TRUE(snap);
    const auto file = path(std::string("from-") + vcpu::to_string(from) + ".ksnap");
    ASSERT_TRUE(snap->save(file)) << snap->save(file).err().message();

    auto loaded = snapshot::load(file);
    ASSERT_TRUE(loaded) << loaded.err().message();
    c.backend = choice(to);
    auto other = sandbox::create(*loaded, {}, c);
    ASSERT_TRUE(other) << other.err().message();
    EXPECT_EQ((*other)->backend(), to);
    EXPECT_EQ(as<std::int64_t>((*other)->call("bump")), 2) << "the counter came along";
    EXPECT_EQ(as<std::uint64_t>((*other)->call("sum_pages", h, 64 * page)), 3u * 64);
    // Faults are still named, and a restore on the new backend brings the file's state back.
    ASSERT_TRUE((*other)->call("touch", h, 64 * page, std::int64_t{9}));
    ASSERT_TRUE((*other)->restore(*loaded));
    EXPECT_EQ(as<std::uint64_t>((*other)->call("sum_pages", h, 64 * page)), 3u * 64);
    EXPECT_EQ(as<std::int64_t>((*other)->call("bump")), 2);
  }
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
  EXPECT_EQ(memory::ksnap::format_minor, 1u) << "new .ksnap minor: add a golden file for it";
  const std::string golden = std::string(KILN_GOLDEN_DIR) + "/calc-v1.0.ksnap";
  ASSERT_TRUE(snapshot::verify(golden)) << snapshot::verify(golden).err().message();
  auto loaded = snapshot::load(golden);
  ASSERT_TRUE(loaded) << loaded.err().message();
  EXPECT_EQ(loaded->memory_size(), 4 * mib);
  const host_functions fns = cli_host_functions();
  auto sb = sandbox::create(*loaded, fns, config_for("calc"));
  ASSERT_TRUE(sb) << sb.err().message();
  EXPECT_EQ(as<std::int32_t>((*sb)->call("add", 40, 2)), 42);
  EXPECT_EQ(as<std::int64_t>((*sb)->call("call_host", std::string("host_mul"), std::int64_t{6},
                                         std::int64_t{7})),
            42);
}

// tests/golden/calc-v1.1.ksnap and calc-v1.1-child.ksnap were written by format 1.1 (`kiln
// snapshot build/guests/calc.elf --memory 4M -o calc-v1.1.ksnap`, then `kiln run --snapshot
// calc-v1.1.ksnap --save calc-v1.1-child.ksnap call_host str:host_mul 6:i64 7:i64`, emulated
// backend): a layered file naming its parent by a relative path, id and checksums.
TEST_F(snapshot_file_e2e, the_golden_format_1_1_layered_pair_still_loads_and_runs) {
  const std::string golden = std::string(KILN_GOLDEN_DIR) + "/calc-v1.1-child.ksnap";
  ASSERT_TRUE(snapshot::verify(golden)) << snapshot::verify(golden).err().message();
  auto loaded = snapshot::load(golden);
  ASSERT_TRUE(loaded) << loaded.err().message();
  ASSERT_EQ(loaded->files().size(), 2u);
  EXPECT_EQ(std::filesystem::path(loaded->files()[0]).filename(), "calc-v1.1.ksnap");
  auto sb = sandbox::create(*loaded, cli_host_functions(), config_for("calc"));
  ASSERT_TRUE(sb) << sb.err().message();
  EXPECT_EQ(as<std::int32_t>((*sb)->call("add", 40, 2)), 42);
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
  auto loaded = snapshot::load(file, mapped_file_policy{{dir()}, {}});
  ASSERT_TRUE(loaded) << loaded.err().message();
  auto child = sandbox::create(*loaded, {}, config_for("memory_test"));
  ASSERT_TRUE(child) << child.err().message();
  EXPECT_EQ(as<std::uint64_t>((*child)->call("file_sum", std::string("data"))), 10u);
  std::ofstream(data, std::ios::binary | std::ios::app).write("\x05", 1); // the file changes
  EXPECT_FALSE(sandbox::create(*loaded, {}, config_for("memory_test")));
}

// Before, a .ksnap could name any host file the process could read, and loading it mapped that
// file into the guest. Now the caller says which files a snapshot file may map: by default
// none, else those under given directories (after symlinks are resolved) or those a callback
// accepts.
TEST_F(snapshot_file_e2e, a_snapshot_file_maps_only_host_files_the_caller_allows) {
  const auto data = path("data.bin");
  std::ofstream(data, std::ios::binary).write("\x01\x02\x03\x04", 4);
  // The file is mapped through a symlinked directory that leads out of `elsewhere`.
  const auto elsewhere = path("elsewhere");
  std::filesystem::create_directory(elsewhere);
  std::filesystem::create_directory_symlink(dir(), elsewhere + "/link");
  auto c = config_for("memory_test");
  c.files.push_back({elsewhere + "/link/data.bin", "data", 0});
  auto sb = sandbox::create(c);
  ASSERT_TRUE(sb) << sb.err().message();
  auto snap = (*sb)->take_snapshot();
  ASSERT_TRUE(snap);
  const auto file = path("files.ksnap");
  ASSERT_TRUE(snap->save(file));

  auto refused = snapshot::load(file); // the default allows no mapped file
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.code(), memory::memory_errc::file_not_allowed);
  EXPECT_NE(refused.err().detail.find("'data'"), std::string::npos) << refused.err().message();
  // The recorded path lies under `elsewhere`, the file it leads to does not.
  EXPECT_EQ(snapshot::load(file, {{elsewhere}, {}}).code(), memory::memory_errc::file_not_allowed);

  std::vector<std::string> asked;
  auto by_callback = snapshot::load(file, {{}, [&](std::string_view name, const std::string& p) {
                                             asked.push_back(std::string(name) + "=" + p);
                                             return true;
                                           }});
  ASSERT_TRUE(by_callback) << by_callback.err().message();
  ASSERT_EQ(asked.size(), 1u);
  EXPECT_EQ(asked[0], "data=" + std::filesystem::canonical(data).string());
  auto child = sandbox::create(*by_callback, {}, config_for("memory_test"));
  ASSERT_TRUE(child) << child.err().message();
  EXPECT_EQ(as<std::uint64_t>((*child)->call("file_sum", std::string("data"))), 10u);
  EXPECT_TRUE(snapshot::load(file, mapped_file_policy::any()));
  EXPECT_TRUE(snapshot::load(file, {{dir()}, {}}));
  // A snapshot that maps nothing needs no policy.
  auto plain = make("memory_test");
  ASSERT_NE(plain, nullptr);
  auto nothing = plain->take_snapshot();
  ASSERT_TRUE(nothing);
  ASSERT_TRUE(nothing->save(path("plain.ksnap")));
  EXPECT_TRUE(snapshot::load(path("plain.ksnap")));
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
  EXPECT_EQ(snapshot::load(link).code(),
            std::make_error_code(std::errc::too_many_symbolic_link_levels));
  EXPECT_TRUE(snapshot::load(file)); // the original is fine
}

} // namespace
} // namespace kiln::test
