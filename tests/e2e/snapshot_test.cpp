// End to end: in-memory snapshots: restore brings memory, registers, protections and files
// back, clears poison, costs what was dirtied; sandboxes start from a snapshot and share it.
#include "backend_fixture.hpp"

#include <kiln/runtime/detail/sandbox_impl.hpp>

#include <kiln/memory/memory_errc.hpp>

#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <vector>

namespace kiln::test {
namespace {

constexpr std::uint64_t page = 4096, mib = 1ull << 20;

class snapshot_e2e : public backend_test {
protected:
  std::unique_ptr<sandbox> make_sized(std::uint64_t memory) {
    auto c = config_for("memory_test");
    c.memory_size = memory;
    auto sb = sandbox::create(c);
    EXPECT_TRUE(sb) << (sb ? "" : sb.err().message());
    return sb ? std::move(*sb) : nullptr;
  }
  static std::uint64_t heap(sandbox& sb) { return as<std::uint64_t>(sb.call("heap_start")); }
  static std::uint64_t hash(sandbox& sb, std::uint64_t a, std::uint64_t size) {
    return as<std::uint64_t>(sb.call("hash_range", a, size));
  }
};

/// The vCPU's registers as the backend holds them now.
struct cpu_state {
  vcpu::registers regs;
  vcpu::special_registers sregs;
  vcpu::fpu_state fpu;
};
cpu_state read_cpu(sandbox& sb) {
  auto& cpu = *detail::sandbox_access::of(sb).cpu;
  cpu_state s;
  auto r = cpu.get_registers();
  auto sr = cpu.get_special_registers();
  auto f = cpu.get_fpu();
  EXPECT_TRUE(r && sr && f);
  if (r) s.regs = *r;
  if (sr) s.sregs = *sr;
  if (f) s.fpu = *f;
  return s;
}

// ADVERSARIAL case 18: after a restore the registers equal the captured ones, SSE included.
TEST_F(snapshot_e2e, restore_brings_every_register_back_to_the_captured_values) {
  auto sb = sandbox::create(config_for("calc"));
  ASSERT_TRUE(sb) << sb.err().message();
  EXPECT_EQ(as<double>((*sb)->call("add_f64", 0.25, 0.5)), 0.75);
  auto snap = (*sb)->take_snapshot();
  ASSERT_TRUE(snap) << snap.err().message();
  const cpu_state captured = read_cpu(**sb); // take_snapshot ran nothing after reading them
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(as<double>((*sb)->call("mul_f64", 1.5 + i, 2.25)), (1.5 + i) * 2.25);
    EXPECT_EQ(as<std::int32_t>((*sb)->call("add", 40, i)), 40 + i);
    const cpu_state dirty = read_cpu(**sb);
    EXPECT_NE(dirty.fpu, captured.fpu)
        << "the calls left other SSE state (else this proves nothing)";
    ASSERT_TRUE((*sb)->restore(*snap));
    const cpu_state back = read_cpu(**sb);
    EXPECT_EQ(back.regs, captured.regs);
    EXPECT_EQ(back.sregs, captured.sregs);
    EXPECT_EQ(back.fpu, captured.fpu);
  }
  // A sandbox created from the snapshot starts from the same registers.
  auto other = sandbox::create(*snap, {}, config_for("calc"));
  ASSERT_TRUE(other) << other.err().message();
  const cpu_state fresh = read_cpu(**other);
  EXPECT_EQ(fresh.regs, captured.regs);
  EXPECT_EQ(fresh.fpu, captured.fpu);
}

TEST_F(snapshot_e2e, restore_brings_memory_and_guest_state_back) {
  auto sb = make_sized(32 * mib);
  ASSERT_NE(sb, nullptr);
  const auto h = heap(*sb);
  ASSERT_TRUE(sb->call("touch", h + mib, 64 * page, std::int64_t{3}));
  EXPECT_EQ(as<std::int64_t>(sb->call("bump")), 1);
  auto snap = sb->take_snapshot();
  ASSERT_TRUE(snap) << snap.err().message();
  const auto before = hash(*sb, h, 8 * mib);
  EXPECT_EQ(as<std::int64_t>(sb->call("bump")), 2);
  ASSERT_TRUE(sb->call("touch", h + mib, 256 * page, std::int64_t{9}));
  EXPECT_NE(hash(*sb, h, 8 * mib), before);
  EXPECT_GT(as<std::uint64_t>(sb->call("out_buf_nonzero")), 0u);

  ASSERT_TRUE(sb->restore(*snap));
  EXPECT_EQ(as<std::uint64_t>(sb->call("out_buf_nonzero")), 0u); // I/O buffers came back zeroed
  ASSERT_TRUE(sb->restore(*snap));
  EXPECT_EQ(hash(*sb, h, 8 * mib), before);
  ASSERT_TRUE(sb->restore(*snap));
  EXPECT_EQ(as<std::int64_t>(sb->call("bump")), 2); // the counter was 1 at the snapshot
  EXPECT_EQ(as<std::uint64_t>(sb->call("sum_pages", h + mib, 64 * page)), 3u * 64);
  const auto st = sb->stats();
  EXPECT_EQ(st.snapshots, 1u);
  EXPECT_EQ(st.restores, 3u);
}

TEST_F(snapshot_e2e, restore_cost_follows_the_pages_dirtied_not_memory_size) {
  for (std::uint64_t memory : {16 * mib, 256 * mib}) {
    auto sb = make_sized(memory);
    ASSERT_NE(sb, nullptr);
    auto snap = sb->take_snapshot();
    ASSERT_TRUE(snap) << snap.err().message();
    const auto h = heap(*sb);
    ASSERT_TRUE(sb->call("touch", h, 100 * page, std::int64_t{1}));
    ASSERT_TRUE(sb->restore(*snap));
    const auto st = sb->stats();
    // The 100 written pages, plus the few the call itself dirtied (stack, data, I/O buffers).
    EXPECT_GE(st.last_restore_pages, 100u) << memory;
    EXPECT_LE(st.last_restore_pages, 140u) << memory;
    EXPECT_EQ(as<std::uint64_t>(sb->call("sum_pages", h, 100 * page)), 0u);
  }
}

TEST_F(snapshot_e2e, restore_clears_poison) {
  auto sb = make("memory_test");
  ASSERT_NE(sb, nullptr);
  auto snap = sb->take_snapshot();
  ASSERT_TRUE(snap);
  auto bad = sb->call("peek", std::uint64_t{0});
  ASSERT_FALSE(bad);
  ASSERT_TRUE(sb->poisoned());
  EXPECT_EQ(sb->call("bump").code(), errc::poisoned);
  ASSERT_TRUE(sb->restore(*snap)) << "restore of a poisoned sandbox";
  EXPECT_FALSE(sb->poisoned());
  EXPECT_EQ(as<std::int64_t>(sb->call("bump")), 1);
}

TEST_F(snapshot_e2e, protections_follow_the_snapshot) {
  auto sb = make("memory_test");
  ASSERT_NE(sb, nullptr);
  const auto h = heap(*sb);
  const std::uint64_t ro = h + 2 * mib, later = h + 3 * mib;
  ASSERT_EQ(as<std::int32_t>(sb->call("protect", ro, page, std::int32_t{KILN_PROT_READ})), 0);
  auto snap = sb->take_snapshot();
  ASSERT_TRUE(snap);
  ASSERT_EQ(as<std::int32_t>(sb->call("protect", later, page, std::int32_t{KILN_PROT_NONE})), 0);
  ASSERT_TRUE(sb->restore(*snap));
  // Tightened after the snapshot: writable again. Before it: still read-only.
  EXPECT_TRUE(sb->call("poke", later, std::int32_t{1}));
  EXPECT_EQ(as<std::int32_t>(sb->call("peek", later)), 1);
  auto w = sb->call("poke", ro, std::int32_t{1});
  EXPECT_EQ(w.code(), errc::memory_violation);
}

TEST_F(snapshot_e2e, mapped_files_follow_the_snapshot) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("kiln-snapshot-files-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto a = (dir / "a").string(), b = (dir / "b").string();
  std::ofstream(a, std::ios::binary).write("\x01\x02", 2);
  std::ofstream(b, std::ios::binary).write("\x05", 1);
  auto sb = make("memory_test");
  ASSERT_NE(sb, nullptr);
  ASSERT_TRUE(sb->map_file({a, "a", 0}));
  auto snap = sb->take_snapshot();
  ASSERT_TRUE(snap);
  ASSERT_TRUE(sb->unmap_file("a"));
  ASSERT_TRUE(sb->map_file({b, "b", 0}));
  ASSERT_TRUE(sb->restore(*snap));
  EXPECT_EQ(as<std::int32_t>(sb->call("file_count")), 1);
  EXPECT_EQ(as<std::uint64_t>(sb->call("file_sum", std::string("a"))), 3u);
  EXPECT_EQ(as<std::int64_t>(sb->call("file_size", std::string("b"))), -1);
  // A sandbox from the snapshot finds the file; a changed file is refused.
  auto child = sandbox::create(*snap, {}, config_for("memory_test"));
  ASSERT_TRUE(child) << child.err().message();
  EXPECT_EQ(as<std::uint64_t>((*child)->call("file_sum", std::string("a"))), 3u);
  std::ofstream(a, std::ios::binary | std::ios::app).write("\x03", 1);
  auto refused = sandbox::create(*snap, {}, config_for("memory_test"));
  EXPECT_FALSE(refused);
  std::filesystem::remove_all(dir);
}

TEST_F(snapshot_e2e, sandboxes_from_one_snapshot_share_its_pages) {
  auto parent = make_sized(64 * mib);
  ASSERT_NE(parent, nullptr);
  const auto h = heap(*parent);
  ASSERT_TRUE(parent->call("touch", h, 2048 * page, std::int64_t{4})); // 8 MiB of state
  EXPECT_EQ(as<std::int64_t>(parent->call("bump")), 1);
  auto snap = parent->take_snapshot();
  ASSERT_TRUE(snap);
  auto stored = snap->stored_bytes();
  ASSERT_TRUE(stored);
  EXPECT_GE(*stored, 8 * mib);
  EXPECT_LT(*stored, 12 * mib); // zero pages are holes
  std::vector<std::unique_ptr<sandbox>> children;
  for (int i = 0; i < 8; ++i) {
    auto c = sandbox::create(*snap, {}, config_for("memory_test"));
    ASSERT_TRUE(c) << c.err().message();
    EXPECT_EQ(as<std::int64_t>((*c)->call("bump")), 2);
    EXPECT_EQ(as<std::uint64_t>((*c)->call("sum_pages", h, 2048 * page)), 4u * 2048);
    // Reading the state shares the image's pages: a child holds only what it wrote.
    auto resident = (*c)->resident_bytes();
    ASSERT_TRUE(resident);
    EXPECT_LT(*resident, 1 * mib) << "child " << i;
    // Identity: restore to the snapshot is legal at once.
    ASSERT_TRUE((*c)->restore(*snap));
    EXPECT_EQ(as<std::int64_t>((*c)->call("bump")), 2);
    children.push_back(std::move(*c));
  }
}

TEST_F(snapshot_e2e, a_descendant_snapshot_stores_only_what_changed) {
  auto sb = make_sized(64 * mib);
  ASSERT_NE(sb, nullptr);
  const auto h = heap(*sb);
  ASSERT_TRUE(sb->call("touch", h, 2048 * page, std::int64_t{4})); // 8 MiB of state
  auto parent = sb->take_snapshot();
  ASSERT_TRUE(parent);
  const auto parent_bytes = parent->stored_bytes();
  ASSERT_TRUE(parent_bytes);
  EXPECT_GE(*parent_bytes, 8 * mib);
  ASSERT_TRUE(sb->call("touch", h + 100 * page, page, std::int64_t{7}));
  auto child = sb->take_snapshot();
  ASSERT_TRUE(child);
  const auto child_bytes = child->stored_bytes();
  ASSERT_TRUE(child_bytes);
  EXPECT_LT(*child_bytes, 256 * 1024u) << "a child holds the pages that differ, not a copy";
  const auto expect_sum = [&](sandbox& s, std::uint64_t sum) {
    EXPECT_EQ(as<std::uint64_t>(s.call("sum_pages", h, 2048 * page)), sum);
  };
  // Back and forth between generations, and a fresh sandbox from the child.
  ASSERT_TRUE(sb->restore(*parent));
  expect_sum(*sb, 4u * 2048);
  ASSERT_TRUE(sb->restore(*child));
  expect_sum(*sb, 4u * 2047 + 7);
  auto fresh = sandbox::create(*child, {}, config_for("memory_test"));
  ASSERT_TRUE(fresh) << fresh.err().message();
  expect_sum(**fresh, 4u * 2047 + 7);
  // A long chain is flattened past the depth cap and stays exact.
  for (int gen = 0; gen < 12; ++gen) {
    ASSERT_TRUE(sb->call("touch", h + static_cast<std::uint64_t>(gen) * page, page,
                         std::int64_t{100 + gen}));
    auto s = sb->take_snapshot();
    ASSERT_TRUE(s) << s.err().message();
    ASSERT_TRUE(sb->restore(*child));
    ASSERT_TRUE(sb->restore(*s));
  }
  std::uint64_t want = 4u * 2047 + 7;
  for (int gen = 0; gen < 12; ++gen)
    want += static_cast<std::uint64_t>(100 + gen) - 4;
  expect_sum(*sb, want);
}

TEST_F(snapshot_e2e, restore_to_another_sandboxes_snapshot_and_layout_checks) {
  auto a = make_sized(32 * mib);
  auto b = make_sized(32 * mib);
  auto small = make_sized(16 * mib);
  ASSERT_TRUE(a && b && small);
  EXPECT_EQ(as<std::int64_t>(a->call("bump")), 1);
  EXPECT_EQ(as<std::int64_t>(a->call("bump")), 2);
  auto snap = a->take_snapshot();
  ASSERT_TRUE(snap);
  ASSERT_TRUE(b->restore(*snap)); // same layout: remapped onto a's image
  EXPECT_EQ(as<std::int64_t>(b->call("bump")), 3);
  auto refused = small->restore(*snap);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.code(), memory::memory_errc::out_of_bounds);
  EXPECT_EQ(as<std::int64_t>(small->call("bump")), 1); // untouched
}

TEST_F(snapshot_e2e, snapshot_is_refused_mid_call_state_and_when_poisoned) {
  auto sb = make("memory_test");
  ASSERT_NE(sb, nullptr);
  ASSERT_FALSE(sb->call("peek", std::uint64_t{0}));
  auto snap = sb->take_snapshot();
  ASSERT_FALSE(snap);
  EXPECT_EQ(snap.code(), errc::poisoned);
}

} // namespace
} // namespace kiln::test
