// Tests for memory/x86_64/system_tables.hpp: decodes the GDT descriptors and the TSS field by
// field.
#include <kiln/guest/abi.h>
#include <kiln/memory/layout.hpp>
#include <kiln/memory/x86_64/system_tables.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>

namespace kiln::memory::x86_64 {
namespace {

/// A code or data segment descriptor, decoded per the Intel SDM vol. 3, 3.4.5.
struct segment_descriptor {
  std::uint64_t base, limit;
  unsigned type, s, dpl, p, avl, l, db, g;

  static segment_descriptor decode(std::uint64_t d) {
    segment_descriptor s{};
    s.limit = (d & 0xffff) | (((d >> 48) & 0xf) << 16);
    s.base = ((d >> 16) & 0xffffff) | (((d >> 56) & 0xff) << 24);
    s.type = (d >> 40) & 0xf;
    s.s = (d >> 44) & 1;
    s.dpl = (d >> 45) & 3;
    s.p = (d >> 47) & 1;
    s.avl = (d >> 52) & 1;
    s.l = (d >> 53) & 1;
    s.db = (d >> 54) & 1;
    s.g = (d >> 55) & 1;
    return s;
  }
};

template <class T> T load(const system_tables& t, std::uint64_t offset) {
  T v;
  std::memcpy(&v, t.page.data() + offset, sizeof v);
  return v;
}

std::uint64_t gdt_entry(const system_tables& t, std::uint64_t selector) {
  return load<std::uint64_t>(t, fixed::gdt_offset + selector);
}

constexpr std::uint64_t ist1_top = 0xa0000;

TEST(SystemTables, PointsAtTheGdtAndTssInsideThePage) {
  const auto t = build_system_tables(fixed::system_tables, ist1_top);
  EXPECT_EQ(t.gdt_base, fixed::system_tables + fixed::gdt_offset);
  EXPECT_EQ(t.gdt_limit, 5 * 8 - 1) << "null, code64, data, and a 16-byte TSS descriptor";
  EXPECT_EQ(t.tss_base, fixed::system_tables + fixed::tss_offset);
  EXPECT_EQ(t.tss_limit, 104u - 1);
  EXPECT_LE(fixed::gdt_offset + t.gdt_limit + 1u, fixed::tss_offset);
}

TEST(SystemTables, NullDescriptorIsZero) {
  const auto t = build_system_tables(fixed::system_tables, ist1_top);
  EXPECT_EQ(gdt_entry(t, 0), 0u);
}

TEST(SystemTables, Code64IsAFlatLongModeRing0CodeSegment) {
  const auto t = build_system_tables(fixed::system_tables, ist1_top);
  const auto d = segment_descriptor::decode(gdt_entry(t, KILN_GDT_CODE64));
  EXPECT_EQ(d.type, 0xbu) << "execute/read, accessed preset";
  EXPECT_EQ(d.s, 1u);
  EXPECT_EQ(d.dpl, 0u);
  EXPECT_EQ(d.p, 1u);
  EXPECT_EQ(d.l, 1u) << "64-bit code";
  EXPECT_EQ(d.db, 0u) << "D must be 0 when L is 1";
  EXPECT_EQ(d.g, 1u);
  EXPECT_EQ(d.base, 0u);
  EXPECT_EQ(d.limit, 0xfffffu);
}

TEST(SystemTables, DataIsAFlatWritableRing0DataSegment) {
  const auto t = build_system_tables(fixed::system_tables, ist1_top);
  const auto d = segment_descriptor::decode(gdt_entry(t, KILN_GDT_DATA));
  EXPECT_EQ(d.type, 0x3u) << "read/write, accessed preset";
  EXPECT_EQ(d.s, 1u);
  EXPECT_EQ(d.dpl, 0u);
  EXPECT_EQ(d.p, 1u);
  EXPECT_EQ(d.l, 0u);
  EXPECT_EQ(d.db, 1u);
  EXPECT_EQ(d.g, 1u);
  EXPECT_EQ(d.base, 0u);
  EXPECT_EQ(d.limit, 0xfffffu);
}

// A 16-byte system descriptor (SDM vol. 3, 8.2.3): base 63:32 in the second quadword.
void expect_tss_descriptor(const system_tables& t, std::uint64_t expected_base) {
  const std::uint64_t lo = gdt_entry(t, KILN_GDT_TSS), hi = gdt_entry(t, KILN_GDT_TSS + 8);
  const auto d = segment_descriptor::decode(lo);
  EXPECT_EQ(d.type, 0xbu) << "busy 64-bit TSS";
  EXPECT_EQ(d.s, 0u) << "a system descriptor";
  EXPECT_EQ(d.dpl, 0u);
  EXPECT_EQ(d.p, 1u);
  EXPECT_EQ(d.g, 0u) << "limit in bytes";
  EXPECT_EQ(d.limit, 103u);
  EXPECT_EQ(d.base | ((hi & 0xffffffff) << 32), expected_base);
  EXPECT_EQ(hi >> 32, 0u) << "reserved bits of the upper half";
}

TEST(SystemTables, TssDescriptorPointsAtTheTss) {
  const auto t = build_system_tables(fixed::system_tables, ist1_top);
  expect_tss_descriptor(t, fixed::system_tables.value + fixed::tss_offset);
}

TEST(SystemTables, TssDescriptorSplitsAHighBaseAcrossBothHalves) {
  const guest_phys_addr page{0x0000'7fab'cdef'1000};
  const auto t = build_system_tables(page, ist1_top);
  expect_tss_descriptor(t, page.value + fixed::tss_offset);
}

TEST(SystemTables, TssHasIst1AndNoIoBitmap) {
  const std::uint64_t top = 0x0000'1234'5678'9ff0;
  const auto t = build_system_tables(fixed::system_tables, top);
  const std::uint64_t tss = fixed::tss_offset;
  // 64-bit TSS: reserved u32, rsp0..2 at 4, reserved at 28, ist1..7 at 36, iomap base at 102.
  EXPECT_EQ(load<std::uint64_t>(t, tss + 36), top) << "IST1";
  for (unsigned i = 2; i <= 7; ++i)
    EXPECT_EQ(load<std::uint64_t>(t, tss + 36 + 8 * (i - 1)), 0u) << "IST" << i;
  for (unsigned i = 0; i < 3; ++i)
    EXPECT_EQ(load<std::uint64_t>(t, tss + 4 + 8 * i), 0u) << "RSP" << i;
  EXPECT_EQ(load<std::uint16_t>(t, tss + 102), 104u) << "I/O map base at the limit: no bitmap";
}

TEST(SystemTables, WritesNothingOutsideTheGdtAndTss) {
  const auto t = build_system_tables(fixed::system_tables, ist1_top);
  for (std::size_t i = 0; i < t.page.size(); ++i) {
    const bool in_gdt = i >= fixed::gdt_offset && i < fixed::gdt_offset + t.gdt_limit + 1u;
    const bool in_tss = i >= fixed::tss_offset && i < fixed::tss_offset + t.tss_limit + 1u;
    if (!in_gdt && !in_tss) {
      ASSERT_EQ(t.page[i], std::byte{0}) << "byte " << i;
    }
  }
}

} // namespace
} // namespace kiln::memory::x86_64
