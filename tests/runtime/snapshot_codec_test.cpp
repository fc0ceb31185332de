// Tests for runtime/detail/snapshot_codec.hpp: a snapshot's runtime sections round-trip, and
// every field a damaged or hostile file could set is checked before anything is built.
#include <kiln/memory/memory_errc.hpp>
#include <kiln/runtime/detail/snapshot_codec.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>

namespace kiln::detail {
namespace {

using memory::guest_phys_addr;
namespace tag = section_tag;
namespace fixed = memory::fixed;
constexpr std::uint64_t mib = 1ull << 20;

/// A state as kiln builds it for a 16 MiB guest whose image is [1 MiB, 1 MiB + 8 KiB).
snapshot_state plausible() {
  snapshot_state s;
  s.memory_size = 16 * mib;
  s.file_room = 2 * mib;
  s.heap_size = 0;
  s.stack_size = 256 * 1024;
  s.guest_path = "/guests/x.elf";
  s.layout = *memory::plan_layout({s.memory_size, 0, s.stack_size}, guest_phys_addr{0x102000});
  using k = memory::region_kind;
  s.regions = {
      {"boot_info", k::boot_info, fixed::boot_info, fixed::boot_info_size, memory::prot_r, true},
      {"system_tables", k::system_tables, fixed::system_tables, fixed::system_tables_size,
       memory::prot_r, true},
      {"page_tables", k::page_tables, fixed::page_tables, fixed::page_tables_max, memory::prot_r,
       false},
      {"ist_stack", k::ist_stack, fixed::ist_stack, fixed::ist_stack_size, memory::prot_rw, true},
      {"io_in", k::io_in, fixed::io_in, fixed::io_buffer_size, memory::prot_rw, true},
      {"io_out", k::io_out, fixed::io_out, fixed::io_buffer_size, memory::prot_rw, true},
      {"image.text", k::image, fixed::image_base, 0x2000, memory::prot_rx, true},
      {"heap", k::heap, s.layout.heap_start, s.layout.heap_size, memory::prot_rw, true},
      {"stack", k::stack, s.layout.stack_bottom, s.stack_size, memory::prot_rw, true},
  };
  s.prot = memory::protection_map(64);
  for (const auto& r : s.regions) {
    if (r.kind == k::image || r.kind == k::heap || r.kind == k::stack) {
      EXPECT_TRUE(s.prot.add(r.start, r.size, r.prot));
    }
  }
  EXPECT_TRUE(s.prot.tighten(s.layout.heap_start, 4096, memory::prot_r));
  s.tables = {fixed::page_tables, 1, 5, fixed::page_tables_max / 4096, {}};
  s.regs.rip = 0x100123;
  s.regs.rsp = s.layout.stack_top.value - 64;
  s.regs.rflags = 0x202;
  s.sregs.fs.base = 0x300000;
  s.sregs.idt = {0x200000, 0xfff};
  s.sregs.cr2 = 0x1234;
  s.fpu.mxcsr = 0x1f80;
  s.fpu.xmm[3][7] = 0x5a;
  s.files.push_back({"data", {"/data/x", 1, 2, 5000, 77}, guest_phys_addr{16 * mib}, 8192});
  s.host_functions.push_back({"host_add", {KILN_TYPE_I64, KILN_TYPE_I64}, KILN_TYPE_I64});
  return s;
}

result<snapshot_state> round_trip(const std::vector<memory::snapshot_section>& sections,
                                  std::uint64_t memory_size = 16 * mib) {
  snapshot_state out;
  KILN_TRY(decode_sections(sections, memory_size, out));
  return out;
}

TEST(SnapshotCodec, RoundTripsEveryField) {
  const auto s = plausible();
  auto back = round_trip(encode_sections(s));
  ASSERT_TRUE(back) << back.err().message();
  EXPECT_EQ(back->file_room, s.file_room);
  EXPECT_EQ(back->guest_path, s.guest_path);
  EXPECT_EQ(back->layout.heap_start, s.layout.heap_start);
  ASSERT_EQ(back->regions.size(), s.regions.size());
  for (std::size_t i = 0; i < s.regions.size(); ++i) {
    EXPECT_EQ(back->regions[i].name, s.regions[i].name);
    EXPECT_EQ(back->regions[i].start, s.regions[i].start);
  }
  EXPECT_EQ(back->regs, s.regs);
  EXPECT_EQ(back->fpu, s.fpu);
  EXPECT_EQ(back->sregs.fs.base, s.sregs.fs.base);
  EXPECT_EQ(back->sregs.idt, s.sregs.idt);
  EXPECT_EQ(back->sregs.cr3, fixed::page_tables.value); // rebuilt, not read
  EXPECT_EQ(back->prot.list().size(), s.prot.list().size());
  EXPECT_EQ(back->prot.at(s.layout.heap_start), memory::prot_r);
  EXPECT_EQ(back->tables.used_tables, 5u);
  ASSERT_EQ(back->files.size(), 1u);
  EXPECT_EQ(back->files[0].identity.mtime_ns, 77);
  ASSERT_EQ(back->host_functions.size(), 1u);
  EXPECT_EQ(back->host_functions[0], s.host_functions[0]);
}

/// Applies `edit` to a copy of the plausible state, encodes it and expects decoding to fail.
template <class F> void expect_refused(F edit, const char* what) {
  auto s = plausible();
  edit(s);
  auto back = round_trip(encode_sections(s));
  ASSERT_FALSE(back) << what << " was accepted";
  EXPECT_EQ(back.code(), memory::memory_errc::snapshot_corrupt) << what;
}

TEST(SnapshotCodec, RefusesStateKilnWouldNeverBuild) {
  expect_refused([](auto& s) { s.regions[0].start = guest_phys_addr{0x3000}; }, "moved boot info");
  expect_refused([](auto& s) { s.regions[4].prot = memory::prot_rx; }, "executable I/O buffer");
  expect_refused([](auto& s) { s.regions[6].prot = memory::protection{7}; }, "W+X image");
  expect_refused([](auto& s) { s.regions[6].start = guest_phys_addr{0x1000}; },
                 "image outside its area");
  expect_refused([](auto& s) { s.regions[7].size += 4096; }, "heap not per the layout");
  expect_refused([](auto& s) { s.layout.heap_start = s.layout.heap_start + 0x200000; },
                 "layout not kiln's plan");
  expect_refused(
      [](auto& s) {
        s.prot = memory::protection_map(64);
        (void)s.prot.add(s.regions[6].start, s.regions[6].size, memory::prot_rw | memory::prot_rx);
      },
      "protection wider than the region");
  expect_refused(
      [](auto& s) {
        s.prot = memory::protection_map(64);
        (void)s.prot.add(fixed::boot_info, 4096, memory::prot_r);
      },
      "protection on memory the guest does not own");
  expect_refused([](auto& s) { s.fpu.mxcsr = 0x10000; }, "MXCSR reserved bits");
  expect_refused([](auto& s) { s.regs.rflags = 0; }, "RFLAGS bit 1 clear");
  expect_refused([](auto& s) { s.sregs.idt = {16 * mib - 16, 0xfff}; }, "IDT past memory");
  expect_refused([](auto& s) { s.tables.root = guest_phys_addr{0x20000}; }, "page-table root");
  expect_refused([](auto& s) { s.tables.used_tables = 1000; }, "page tables past their area");
  expect_refused([](auto& s) { s.tables.free = {0x10000}; }, "a fixed table on the free list");
  expect_refused([](auto& s) { s.files[0].addr = guest_phys_addr{0x100000}; },
                 "a file in RAM, not the file room");
  expect_refused([](auto& s) { s.files[0].mapped_size = 4096; }, "file size and mapping disagree");
  expect_refused([](auto& s) { s.files[0].addr = guest_phys_addr{18 * mib - 4096}; },
                 "file past the room");
  expect_refused([](auto& s) { s.host_functions[0].params.push_back(KILN_TYPE_VOID); },
                 "a VOID parameter");
  expect_refused([](auto& s) { s.host_functions[0].name = std::string(200, 'x'); },
                 "a host function name above the cap");
}

TEST(SnapshotCodec, AWorkingSetRoundTripsInOrderAndIsOptional) {
  auto s = plausible();
  EXPECT_TRUE(round_trip(encode_sections(s))->working_set.empty()) << "no section, no set";
  s.working_set = {300, 301, 302, 7, 8, 4095, 0, 1000};
  const auto sections = encode_sections(s);
  const auto ws = std::find_if(sections.begin(), sections.end(),
                               [](const auto& sec) { return sec.tag == tag::working_set; });
  ASSERT_NE(ws, sections.end());
  EXPECT_EQ(ws->payload.size(), 8u + 8 * 5) << "five runs";
  auto back = round_trip(sections);
  ASSERT_TRUE(back) << back.err().message();
  EXPECT_EQ(back->working_set, s.working_set);
}

TEST(SnapshotCodec, RefusesAWorkingSetOutsideMemoryOrRepeatingAPage) {
  expect_refused([](auto& s) { s.working_set = {4096}; }, "a page past 16 MiB");
  expect_refused([](auto& s) { s.working_set = {5, 9, 5}; }, "a page twice");
  auto s = plausible();
  s.working_set = {1, 2, 3};
  auto sections = encode_sections(s);
  auto& ws = sections.back();
  ASSERT_EQ(ws.tag, tag::working_set);
  auto edit = [&](std::size_t at, std::uint32_t v) {
    auto copy = sections;
    std::memcpy(copy.back().payload.data() + at, &v, 4);
    return round_trip(copy).code();
  };
  EXPECT_EQ(edit(12, 0), memory::memory_errc::snapshot_corrupt) << "a run of zero pages";
  EXPECT_EQ(edit(12, 0xffffffff), memory::memory_errc::snapshot_corrupt) << "a run past memory";
  EXPECT_EQ(edit(0, 0xffffffff), memory::memory_errc::snapshot_corrupt) << "a huge run count";
  ws.payload.push_back(std::byte{0});
  EXPECT_EQ(round_trip(sections).code(), memory::memory_errc::snapshot_corrupt) << "trailing";
}

TEST(SnapshotCodec, RefusesBrokenFraming) {
  const auto good = encode_sections(plausible());
  for (std::size_t i = 0; i < good.size(); ++i) {
    auto missing = good;
    missing.erase(missing.begin() + static_cast<std::ptrdiff_t>(i));
    EXPECT_EQ(round_trip(missing).code(), memory::memory_errc::snapshot_corrupt) << "section " << i;
    auto truncated = good;
    truncated[i].payload.pop_back();
    EXPECT_EQ(round_trip(truncated).code(), memory::memory_errc::snapshot_corrupt)
        << "section " << i;
    auto trailing = good;
    trailing[i].payload.push_back(std::byte{0});
    EXPECT_EQ(round_trip(trailing).code(), memory::memory_errc::snapshot_corrupt)
        << "section " << i;
  }
  // A count field of 2^32-1 must fail on the bytes, not allocate.
  auto huge = good;
  for (auto& sec : huge) {
    if (sec.tag == tag::regions) std::memset(sec.payload.data(), 0xff, 4);
  }
  EXPECT_EQ(round_trip(huge).code(), memory::memory_errc::snapshot_corrupt);
  // Another memory size than the layout was planned for.
  EXPECT_FALSE(round_trip(good, 32 * mib));
}

} // namespace
} // namespace kiln::detail
