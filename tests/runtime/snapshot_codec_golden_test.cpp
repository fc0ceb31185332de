// Pins the bytes of the runtime's .ksnap sections: a fixed state encodes to the same bytes, section
// by section, and the golden files' sections decode and encode back to the bytes they hold. A
// failure here means the format changed: that takes a version bump and a golden file, not an edit
// of the expected values.
#include <kiln/memory/snapshot_file.hpp>
#include <kiln/runtime/detail/snapshot_codec.hpp>
#include <kiln/support/crc32c.hpp>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cctype>
#include <cstdint>
#include <string>
#include <vector>

namespace kiln::detail {
namespace {

using memory::guest_phys_addr;
namespace fixed = memory::fixed;
constexpr std::uint64_t mib = 1ull << 20;

/// A state with a distinct, non-default value in every field the sections store.
snapshot_state fixed_state() {
  snapshot_state s;
  s.memory_size = 32 * mib;
  s.file_room = 4 * mib;
  s.heap_size = 8 * mib;
  s.stack_size = 128 * 1024;
  s.taken_on = vcpu::backend_kind::kvm;
  s.nx = true;
  s.guest_path = "/guests/golden.elf";
  s.layout =
      *memory::plan_layout({s.memory_size, s.heap_size, s.stack_size}, guest_phys_addr{0x104000});
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
      {"image.rodata", k::image, fixed::image_base + 0x2000, 0x1000, memory::prot_r, true},
      {"image.data", k::image, fixed::image_base + 0x3000, 0x1000, memory::prot_rw, true},
      {"heap", k::heap, s.layout.heap_start, s.layout.heap_size, memory::prot_rw, true},
      {"stack", k::stack, s.layout.stack_bottom, s.stack_size, memory::prot_rw, true},
  };
  s.prot = memory::protection_map(300);
  for (const auto& r : s.regions) {
    if (r.kind == k::image || r.kind == k::heap || r.kind == k::stack) {
      EXPECT_TRUE(s.prot.add(r.start, r.size, r.prot));
    }
  }
  EXPECT_TRUE(s.prot.tighten(s.layout.heap_start + 0x3000, 0x2000, memory::prot_r));
  EXPECT_TRUE(s.prot.tighten(s.layout.heap_start + 0x9000, 0x1000, memory::protection::none));
  s.tables = {fixed::page_tables, 1, 9, fixed::page_tables_max / 4096, {0x17000, 0x15000}};
  std::uint64_t v = 0x1111;
  for (const auto& f : vcpu::register_fields) {
    s.regs.*f.field = v;
    v += 0x1010101;
  }
  s.regs.rflags = 0x246;
  s.sregs.fs = {0x7000'0000'1000, 0xfffff, 0x10};
  s.sregs.gs = {0x7000'0000'2000, 0xffff, 0x18};
  s.sregs.idt = {0x200000, 0xfff};
  s.sregs.cr2 = 0xdead000;
  for (std::size_t i = 0; i < s.fpu.st.size(); ++i)
    s.fpu.st[i][i] = static_cast<std::uint8_t>(0x80 + i);
  s.fpu.fcw = 0x27f;
  s.fpu.fsw = 0x3800;
  s.fpu.ftw = 0x81;
  s.fpu.last_opcode = 0x5d9;
  s.fpu.last_ip = 0x100456;
  s.fpu.last_dp = 0x300789;
  s.fpu.mxcsr = 0x1fa0;
  for (std::size_t i = 0; i < s.fpu.xmm.size(); ++i)
    s.fpu.xmm[i][15 - i] = static_cast<std::uint8_t>(0xc0 + i);
  s.files.push_back({"data", {"/data/x", 1, 2, 5000, 77}, guest_phys_addr{32 * mib}, 8192});
  s.files.push_back(
      {"model", {"/data/model.bin", 3, 4, 4096, -5}, guest_phys_addr{32 * mib + 8192}, 4096});
  s.host_functions.push_back({"host_add", {KILN_TYPE_I64, KILN_TYPE_I64}, KILN_TYPE_I64});
  s.host_functions.push_back({"host_print", {KILN_TYPE_STRING}, KILN_TYPE_VOID});
  s.host_functions.push_back({"host_now", {}, KILN_TYPE_U64});
  s.working_set = {300, 301, 302, 7, 8, 8191, 0, 1000};
  return s;
}

std::string hex(const std::vector<std::byte>& bytes) {
  std::string out;
  for (std::byte b : bytes)
    out += fmt::format("{:02x}", static_cast<unsigned>(b));
  return out;
}

/// `payload` of section `tag` without what decoding does not keep: the vCPU section records FS's
/// and GS's limit and selector, but a load rebuilds them from kiln's GDT (only the bases come
/// back), so those 12 bytes are zeroed before comparing.
std::string comparable(memory::ksnap::tag tag, std::vector<std::byte> payload) {
  if (tag == section_tag::vcpu) {
    constexpr std::size_t fs_at = vcpu::register_count * 8, segment_size = 8 + 4 + 2;
    for (std::size_t seg = 0; seg < 2; ++seg)
      for (std::size_t i = 8; i < segment_size; ++i)
        if (fs_at + seg * segment_size + i < payload.size())
          payload[fs_at + seg * segment_size + i] = std::byte{0};
  }
  return hex(payload);
}

struct pinned {
  std::uint32_t tag;
  std::size_t size;
  std::uint32_t crc;
};

TEST(SnapshotCodecGolden, AFixedStateEncodesToThePinnedBytes) {
  // Tag, size and CRC32C of each section of fixed_state(), as the format defines them.
  const pinned expected[] = {
      {16, 104, 0xe8460543}, {17, 351, 0x671c2baa}, {18, 601, 0x6b8515ce}, {19, 165, 0xd2a970a5},
      {20, 52, 0x354b086d},  {21, 147, 0x07b6983c}, {22, 51, 0xee8a50a0},  {23, 48, 0x622854e2},
  };
  const auto sections = encode_sections(fixed_state());
  ASSERT_EQ(sections.size(), std::size(expected));
  for (std::size_t i = 0; i < sections.size(); ++i) {
    const auto& sec = sections[i];
    const auto tag = static_cast<std::uint32_t>(sec.tag);
    const auto crc = crc32c(0, sec.payload);
    EXPECT_EQ(tag, expected[i].tag) << "section " << i;
    EXPECT_EQ(sec.payload.size(), expected[i].size) << "section " << tag;
    EXPECT_EQ(crc, expected[i].crc) << "section " << tag;
    if (sec.payload.size() != expected[i].size || crc != expected[i].crc)
      ADD_FAILURE() << fmt::format("section {}: {{{}, {}, {:#x}}} bytes {}", tag, tag,
                                   sec.payload.size(), crc, hex(sec.payload));
  }
}

TEST(SnapshotCodecGolden, TheFixedStateDecodesAndEncodesBackToTheSameBytes) {
  const auto sections = encode_sections(fixed_state());
  snapshot_state back;
  auto decoded = decode_sections(sections, 32 * mib, back);
  ASSERT_TRUE(decoded) << decoded.err().message();
  const auto again = encode_sections(back);
  ASSERT_EQ(again.size(), sections.size());
  for (std::size_t i = 0; i < sections.size(); ++i) {
    EXPECT_EQ(again[i].tag, sections[i].tag);
    EXPECT_EQ(comparable(again[i].tag, again[i].payload),
              comparable(sections[i].tag, sections[i].payload))
        << "section " << static_cast<unsigned>(sections[i].tag);
  }
}

class SnapshotCodecGoldenFile : public testing::TestWithParam<const char*> {};

// The golden files' runtime sections (whatever kiln wrote then) decode, and encode back to the
// very bytes the files hold (but for what a load rebuilds: see comparable()).
TEST_P(SnapshotCodecGoldenFile, SectionsDecodeAndEncodeBackToTheFilesBytes) {
  const std::string path = std::string(KILN_GOLDEN_DIR) + "/" + GetParam();
  auto file = memory::snapshot_file::open(path);
  ASSERT_TRUE(file) << path << ": " << file.err().message();
  const auto& info = file->info();
  snapshot_state s;
  auto decoded = decode_sections(info.sections, info.memory_size, s);
  ASSERT_TRUE(decoded) << path << ": " << decoded.err().message();
  const auto again = encode_sections(s);
  ASSERT_EQ(again.size(), info.sections.size()) << path;
  for (std::size_t i = 0; i < again.size(); ++i) {
    EXPECT_EQ(again[i].tag, info.sections[i].tag) << path;
    EXPECT_EQ(comparable(again[i].tag, again[i].payload),
              comparable(info.sections[i].tag, info.sections[i].payload))
        << path << " section " << static_cast<unsigned>(again[i].tag);
  }
}

INSTANTIATE_TEST_SUITE_P(Golden, SnapshotCodecGoldenFile,
                         testing::Values("calc-v1.0.ksnap", "calc-v1.1.ksnap",
                                         "calc-v1.1-child.ksnap"),
                         [](const auto& info) {
                           std::string name = info.param;
                           for (char& c : name)
                             if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
                           return name;
                         });

} // namespace
} // namespace kiln::detail
