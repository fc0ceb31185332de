// Tests for memory/saved_layout.hpp: a layout and its regions round-trip, and only what kiln
// itself would plan decodes; every damaged field is snapshot_corrupt, named.
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/saved_layout.hpp>

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace kiln::memory {
namespace {

constexpr std::uint64_t mib = 1ull << 20;
const std::error_code corrupt = make_error_code(memory_errc::snapshot_corrupt);

saved_layout plausible_layout() {
  saved_layout l;
  l.file_room = 2 * mib;
  l.heap_size = 0;
  l.stack_size = 256 * 1024;
  l.plan = *plan_layout({16 * mib, 0, l.stack_size}, guest_phys_addr{0x102000});
  return l;
}

std::vector<region> plausible_regions(const saved_layout& l) {
  using k = region_kind;
  return {
      {"boot_info", k::boot_info, fixed::boot_info, fixed::boot_info_size, prot_r, true},
      {"system_tables", k::system_tables, fixed::system_tables, fixed::system_tables_size, prot_r,
       true},
      {"page_tables", k::page_tables, fixed::page_tables, fixed::page_tables_max, prot_r, false},
      {"ist_stack", k::ist_stack, fixed::ist_stack, fixed::ist_stack_size, prot_rw, true},
      {"io_in", k::io_in, fixed::io_in, fixed::io_buffer_size, prot_rw, true},
      {"io_out", k::io_out, fixed::io_out, fixed::io_buffer_size, prot_rw, true},
      {"image.text", k::image, fixed::image_base, 0x1000, prot_rx, true},
      {"image.data", k::image, fixed::image_base + 0x1000, 0x1000, prot_rw, true},
      {"heap", k::heap, l.plan.heap_start, l.plan.heap_size, prot_rw, true},
      {"stack", k::stack, l.plan.stack_bottom, l.stack_size, prot_rw, true},
  };
}

std::vector<std::byte> encode(const saved_layout& l) {
  byte_writer w;
  l.encode(w);
  return w.take();
}

std::vector<std::byte> encode(const std::vector<region>& regions) {
  byte_writer w;
  encode_regions(w, regions);
  return w.take();
}

result<saved_layout> decode_layout(const std::vector<std::byte>& bytes,
                                   std::uint64_t memory_size = 16 * mib) {
  byte_reader r(bytes, corrupt, "layout section");
  KILN_TRY_ASSIGN(auto l, saved_layout::decode(r, memory_size));
  KILN_TRY(r.done());
  return l;
}

result<std::vector<region>> decode_regions(const std::vector<std::byte>& bytes) {
  byte_reader r(bytes, corrupt, "regions section");
  KILN_TRY_ASSIGN(auto regions, decode_regions(r, plausible_layout()));
  KILN_TRY(r.done());
  return regions;
}

template <class T> void expect_named(const result<T>& r, const std::string& what) {
  ASSERT_FALSE(r) << what << " was accepted";
  EXPECT_EQ(r.code(), memory_errc::snapshot_corrupt);
  EXPECT_NE(r.err().message().find(what), std::string::npos) << r.err().message();
}

TEST(SavedLayout, RoundTripsSizesAndPlan) {
  const auto l = plausible_layout();
  const auto bytes = encode(l);
  EXPECT_EQ(bytes.size(), 10 * 8u);
  auto back = decode_layout(bytes);
  ASSERT_TRUE(back) << back.err().message();
  EXPECT_EQ(back->file_room, l.file_room);
  EXPECT_EQ(back->heap_size, l.heap_size);
  EXPECT_EQ(back->stack_size, l.stack_size);
  EXPECT_EQ(back->plan.heap_start, l.plan.heap_start);
  EXPECT_EQ(back->plan.stack_top, l.plan.stack_top);
  EXPECT_EQ(encode(*back), bytes);
}

TEST(SavedLayout, RefusesAPlanKilnWouldNotMake) {
  auto l = plausible_layout();
  l.plan.heap_start = l.plan.heap_start + 2 * mib;
  expect_named(decode_layout(encode(l)), "layout section: layout differs from kiln's plan");
  l = plausible_layout();
  l.stack_size = 1234;
  expect_named(decode_layout(encode(l)), "layout section: layout does not plan");
  l = plausible_layout();
  l.file_room = 3 * mib;
  expect_named(decode_layout(encode(l)), "layout section: file room");
  l.file_room = fixed::max_file_room + 2 * mib;
  expect_named(decode_layout(encode(l)), "layout section: file room");
  expect_named(decode_layout(encode(plausible_layout()), 32 * mib), "layout section: layout");
  const auto good = encode(plausible_layout());
  for (std::size_t cut = 0; cut < good.size(); ++cut)
    expect_named(decode_layout({good.begin(), good.begin() + static_cast<std::ptrdiff_t>(cut)}),
                 "layout section: truncated");
  auto trailing = good;
  trailing.push_back(std::byte{0});
  expect_named(decode_layout(trailing), "layout section: trailing bytes");
}

TEST(SavedRegions, RoundTripEveryField) {
  const auto regions = plausible_regions(plausible_layout());
  const auto bytes = encode(regions);
  auto back = decode_regions(bytes);
  ASSERT_TRUE(back) << back.err().message();
  ASSERT_EQ(back->size(), regions.size());
  for (std::size_t i = 0; i < regions.size(); ++i) {
    EXPECT_EQ((*back)[i].name, regions[i].name);
    EXPECT_EQ((*back)[i].kind, regions[i].kind);
    EXPECT_EQ((*back)[i].start, regions[i].start);
    EXPECT_EQ((*back)[i].size, regions[i].size);
    EXPECT_EQ((*back)[i].prot, regions[i].prot);
    EXPECT_EQ((*back)[i].guest_visible, regions[i].guest_visible);
  }
  EXPECT_EQ(encode(*back), bytes);
}

TEST(SavedRegions, RefusesRegionsWhereKilnDoesNotPutThem) {
  const auto good = plausible_regions(plausible_layout());
  auto edit = [&](auto f) {
    auto regions = good;
    f(regions);
    return decode_regions(encode(regions));
  };
  expect_named(edit([](auto& r) { r[0].start = guest_phys_addr{0x3000}; }),
               "region 'boot_info' is not where kiln puts it");
  expect_named(edit([](auto& r) { r[2].guest_visible = true; }),
               "region 'page_tables' is not where kiln puts it");
  expect_named(edit([](auto& r) { r[4].prot = prot_rx; }), "region 'io_in' is not where");
  expect_named(edit([](auto& r) { r[6].prot = protection{7}; }), "region 'image.text' is not");
  expect_named(edit([](auto& r) { r[6].prot = protection::none; }), "region 'image.text' is not");
  expect_named(edit([](auto& r) { r[6].start = guest_phys_addr{0x1000}; }), "'image.text'");
  expect_named(edit([](auto& r) { r[7].size = 0x2000; }), "region 'image.data' is not");
  expect_named(edit([](auto& r) { r[7].size = ~std::uint64_t{0}; }), "region 'image.data' is");
  expect_named(edit([](auto& r) { r[8].size += 4096; }), "region 'heap' is not where");
  expect_named(edit([](auto& r) { r[9].start = r[9].start + 4096; }), "region 'stack' is not");
  expect_named(edit([](auto& r) { r[9].kind = region_kind::file; }), "region enum out of range");
  expect_named(edit([](auto& r) { r[9].prot = protection{8}; }), "region enum out of range");
}

TEST(SavedRegions, RefusesDamagedBytes) {
  const auto good = encode(plausible_regions(plausible_layout()));
  for (std::size_t cut = 0; cut < good.size(); cut += 7)
    expect_named(decode_regions({good.begin(), good.begin() + static_cast<std::ptrdiff_t>(cut)}),
                 "regions section: truncated");
  auto huge = good;
  huge[0] = huge[1] = huge[2] = huge[3] = std::byte{0xff};
  expect_named(decode_regions(huge), "regions section: too many regions");
  auto trailing = good;
  trailing.push_back(std::byte{0});
  expect_named(decode_regions(trailing), "regions section: trailing bytes");
}

} // namespace
} // namespace kiln::memory
