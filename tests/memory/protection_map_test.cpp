// Tests for memory/protection_map.hpp: interval bookkeeping that reports only real changes.
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/protection_map.hpp>

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace kiln::memory {
namespace {

constexpr std::uint64_t pg = page_size;

guest_phys_addr at_page(std::uint64_t n) {
  return guest_phys_addr{n * pg};
}

// One expected change, in pages.
struct change {
  std::uint64_t start_page, pages;
  protection from, to;
};

void expect_changes(const std::vector<protection_change>& got, std::vector<change> want) {
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < want.size(); ++i) {
    SCOPED_TRACE(i);
    EXPECT_EQ(got[i].start, at_page(want[i].start_page));
    EXPECT_EQ(got[i].size, want[i].pages * pg);
    EXPECT_EQ(got[i].from, want[i].from);
    EXPECT_EQ(got[i].to, want[i].to);
  }
}

// The protection of pages [0, n), as at() reports it.
std::vector<protection> snapshot(const protection_map& m, std::uint64_t n) {
  std::vector<protection> out;
  for (std::uint64_t i = 0; i < n; ++i)
    out.push_back(m.at(at_page(i)));
  return out;
}

TEST(ProtectionMap, AddsAndRemovesRanges) {
  protection_map m;
  EXPECT_EQ(m.ranges(), 0u);
  ASSERT_TRUE(m.add(at_page(16), 4 * pg, prot_rx));
  ASSERT_TRUE(m.add(at_page(32), 8 * pg, prot_rw));
  EXPECT_EQ(m.ranges(), 2u);
  EXPECT_EQ(m.at(at_page(15)), protection::none);
  EXPECT_EQ(m.at(at_page(16)), prot_rx);
  EXPECT_EQ(m.at(guest_phys_addr{20 * pg - 1}), prot_rx);
  EXPECT_EQ(m.at(at_page(20)), protection::none) << "end is exclusive";
  EXPECT_EQ(m.at(at_page(39)), prot_rw);

  ASSERT_TRUE(m.remove(at_page(16), 4 * pg));
  EXPECT_EQ(m.ranges(), 1u);
  EXPECT_EQ(m.at(at_page(16)), protection::none);
  // Removing part of a range leaves the rest.
  ASSERT_TRUE(m.remove(at_page(34), 2 * pg));
  EXPECT_EQ(m.ranges(), 2u);
  EXPECT_EQ(m.at(at_page(33)), prot_rw);
  EXPECT_EQ(m.at(at_page(34)), protection::none);
  EXPECT_EQ(m.at(at_page(36)), prot_rw);
  // A range can be added again where one was removed.
  EXPECT_TRUE(m.add(at_page(16), 4 * pg, prot_r));
  EXPECT_EQ(m.at(at_page(17)), prot_r);
}

TEST(ProtectionMap, RemoveNeedsEveryPageRecorded) {
  protection_map m;
  ASSERT_TRUE(m.add(at_page(0), 4 * pg, prot_rw));
  ASSERT_TRUE(m.add(at_page(8), 4 * pg, prot_rw));
  EXPECT_EQ(m.remove(at_page(2), 4 * pg).code(), memory_errc::out_of_bounds) << "into a gap";
  EXPECT_EQ(m.remove(at_page(0), 12 * pg).code(), memory_errc::out_of_bounds) << "over a gap";
  EXPECT_EQ(m.remove(at_page(12), pg).code(), memory_errc::out_of_bounds) << "past the end";
  EXPECT_EQ(m.remove(at_page(100), pg).code(), memory_errc::out_of_bounds) << "nothing there";
  EXPECT_EQ(m.ranges(), 2u);
  EXPECT_TRUE(m.all(at_page(0), 4 * pg, prot_rw));
  EXPECT_TRUE(m.all(at_page(8), 4 * pg, prot_rw));
}

TEST(ProtectionMap, RefusesOverlappingAdds) {
  protection_map m;
  ASSERT_TRUE(m.add(at_page(10), 4 * pg, prot_rw));
  const std::pair<std::uint64_t, std::uint64_t> overlapping[] = {
      {10, 4}, // identical
      {9, 2},  // into its first page
      {13, 2}, // out of its last page
      {11, 1}, // inside
      {0, 20}, // encloses
  };
  for (auto [start, pages] : overlapping) {
    EXPECT_EQ(m.add(at_page(start), pages * pg, prot_r).code(), memory_errc::overlapping_region)
        << start << "+" << pages;
  }
  EXPECT_EQ(m.ranges(), 1u);
  EXPECT_TRUE(m.all(at_page(10), 4 * pg, prot_rw));
  EXPECT_EQ(m.at(at_page(9)), protection::none);
  EXPECT_EQ(m.at(at_page(14)), protection::none);
}

TEST(ProtectionMap, MergesAdjacentAddsOfEqualProtection) {
  protection_map m;
  ASSERT_TRUE(m.add(at_page(0), pg, prot_rw));
  ASSERT_TRUE(m.add(at_page(1), pg, prot_rw));
  EXPECT_EQ(m.ranges(), 1u);
  ASSERT_TRUE(m.add(at_page(2), pg, prot_rx));
  EXPECT_EQ(m.ranges(), 2u) << "different protection: not merged";
  ASSERT_TRUE(m.add(at_page(4), pg, prot_rx));
  EXPECT_EQ(m.ranges(), 3u) << "not touching: not merged";
  ASSERT_TRUE(m.add(at_page(3), pg, prot_rx));
  EXPECT_EQ(m.ranges(), 2u) << "fills the hole: both neighbours merge";
  EXPECT_TRUE(m.all(at_page(2), 3 * pg, prot_rx));
}

TEST(ProtectionMap, TighteningASubRangeSplitsIntoThree) {
  protection_map m;
  ASSERT_TRUE(m.add(at_page(0), 16 * pg, prot_rw));
  auto c = m.tighten(at_page(4), 2 * pg, prot_r);
  ASSERT_TRUE(c) << c.err().message();
  expect_changes(*c, {{4, 2, prot_rw, prot_r}});
  EXPECT_EQ(m.ranges(), 3u);
  EXPECT_EQ(m.at(at_page(3)), prot_rw);
  EXPECT_EQ(m.at(at_page(4)), prot_r);
  EXPECT_EQ(m.at(at_page(5)), prot_r);
  EXPECT_EQ(m.at(at_page(6)), prot_rw);

  // The same request again changes nothing.
  auto again = m.tighten(at_page(4), 2 * pg, prot_r);
  ASSERT_TRUE(again);
  EXPECT_TRUE(again->empty());
  EXPECT_EQ(m.ranges(), 3u);
}

TEST(ProtectionMap, TighteningPageByPageOverAnAlreadyTightRangeIsEmptyEveryTime) {
  protection_map m;
  ASSERT_TRUE(m.add(at_page(0), 64 * pg, prot_rw));
  auto c = m.tighten(at_page(0), 64 * pg, prot_r);
  ASSERT_TRUE(c);
  expect_changes(*c, {{0, 64, prot_rw, prot_r}});
  EXPECT_EQ(m.ranges(), 1u);
  for (std::uint64_t p = 0; p < 64; ++p) {
    auto again = m.tighten(at_page(p), pg, prot_r);
    ASSERT_TRUE(again) << p;
    EXPECT_TRUE(again->empty()) << "page " << p;
  }
  EXPECT_EQ(m.ranges(), 1u);
  EXPECT_TRUE(m.all(at_page(0), 64 * pg, prot_r));
}

TEST(ProtectionMap, ReportsOnlyThePiecesThatChange) {
  protection_map m;
  ASSERT_TRUE(m.add(at_page(0), 4 * pg, prot_r));
  ASSERT_TRUE(m.add(at_page(4), 4 * pg, prot_rw));
  ASSERT_TRUE(m.add(at_page(8), 4 * pg, prot_rx));
  // R stays R; RW and RX each lose a right: two changes with their own `from`.
  auto c = m.tighten(at_page(2), 8 * pg, prot_r);
  ASSERT_TRUE(c) << c.err().message();
  expect_changes(*c, {{4, 4, prot_rw, prot_r}, {8, 2, prot_rx, prot_r}});
  EXPECT_TRUE(m.all(at_page(0), 10 * pg, prot_r));
  EXPECT_EQ(m.at(at_page(10)), prot_rx);
  EXPECT_EQ(m.ranges(), 2u) << "[0, 10) R merged, [10, 12) RX";
}

TEST(ProtectionMap, TighteningNeighboursToTheSameProtectionMergesThem) {
  protection_map m;
  ASSERT_TRUE(m.add(at_page(0), 3 * pg, prot_rw));
  ASSERT_TRUE(m.tighten(at_page(0), pg, prot_r));
  EXPECT_EQ(m.ranges(), 2u);
  ASSERT_TRUE(m.tighten(at_page(2), pg, prot_r));
  EXPECT_EQ(m.ranges(), 3u) << "R, RW, R";
  auto c = m.tighten(at_page(1), pg, prot_r);
  ASSERT_TRUE(c);
  expect_changes(*c, {{1, 1, prot_rw, prot_r}});
  EXPECT_EQ(m.ranges(), 1u) << "the middle joins both neighbours";
  EXPECT_TRUE(m.all(at_page(0), 3 * pg, prot_r));
}

TEST(ProtectionMap, TighteningToNoneIsATightening) {
  protection_map m;
  ASSERT_TRUE(m.add(at_page(0), 4 * pg, prot_rx));
  auto c = m.tighten(at_page(1), pg, protection::none);
  ASSERT_TRUE(c);
  expect_changes(*c, {{1, 1, prot_rx, protection::none}});
  // A page recorded with no rights is still recorded: tightening it again is an empty change,
  // not an out_of_bounds.
  auto again = m.tighten(at_page(1), pg, protection::none);
  ASSERT_TRUE(again) << again.err().message();
  EXPECT_TRUE(again->empty());
  EXPECT_TRUE(m.all(at_page(1), pg, protection::none));
}

TEST(ProtectionMap, RefusesWideningAndRecordsNothing) {
  protection_map m;
  ASSERT_TRUE(m.add(at_page(0), 4 * pg, prot_r));
  ASSERT_TRUE(m.add(at_page(4), 4 * pg, prot_rw));
  ASSERT_TRUE(m.add(at_page(8), 4 * pg, prot_rx));
  const auto before = snapshot(m, 12);
  const std::size_t ranges_before = m.ranges();

  struct req {
    std::uint64_t start, pages;
    protection p;
    const char* what;
  };
  const req widening[] = {
      {0, 1, prot_rw, "R -> RW"},
      {0, 8, prot_rw, "RW over R and RW: the R part widens"},
      {8, 1, prot_rw, "RX -> RW gains W"},
      {4, 1, prot_rx, "RW -> RX gains X"},
      {2, 8, prot_r | protection::exec, "R+RW+RX -> RX: R and RW gain X"},
  };
  for (const auto& r : widening) {
    EXPECT_EQ(m.plan(at_page(r.start), r.pages * pg, r.p).code(), memory_errc::protection_widened)
        << r.what;
    EXPECT_EQ(m.tighten(at_page(r.start), r.pages * pg, r.p).code(),
              memory_errc::protection_widened)
        << r.what;
  }
  EXPECT_EQ(m.ranges(), ranges_before);
  EXPECT_EQ(snapshot(m, 12), before);
}

TEST(ProtectionMap, PagesWithoutRecordedProtectionAreOutOfBounds) {
  protection_map m;
  ASSERT_TRUE(m.add(at_page(4), 4 * pg, prot_rw));
  ASSERT_TRUE(m.add(at_page(10), 4 * pg, prot_rw));
  const std::pair<std::uint64_t, std::uint64_t> outside[] = {
      {0, 1},   // before everything
      {3, 2},   // starts before the first range
      {6, 4},   // runs into the gap
      {4, 10},  // spans the gap
      {13, 2},  // past the end
      {100, 1}, // far away
  };
  for (auto [start, pages] : outside) {
    EXPECT_EQ(m.tighten(at_page(start), pages * pg, prot_r).code(), memory_errc::out_of_bounds)
        << start << "+" << pages;
    EXPECT_EQ(m.plan(at_page(start), pages * pg, prot_r).code(), memory_errc::out_of_bounds)
        << start << "+" << pages;
  }
  EXPECT_TRUE(m.all(at_page(4), 4 * pg, prot_rw));
  EXPECT_TRUE(m.all(at_page(10), 4 * pg, prot_rw));
  EXPECT_EQ(m.ranges(), 2u);
}

TEST(ProtectionMap, RefusesUnalignedEmptyAndWrappingRanges) {
  protection_map m;
  ASSERT_TRUE(m.add(at_page(0), 16 * pg, prot_rw));
  const guest_phys_addr top{~0ull - pg + 1}; // the last page of the address space
  struct req {
    guest_phys_addr start;
    std::uint64_t size;
    memory_errc want;
    const char* what;
  };
  const req bad[] = {
      {guest_phys_addr{0x800}, pg, memory_errc::unaligned, "unaligned start"},
      {at_page(1), 0x800, memory_errc::unaligned, "unaligned size"},
      {at_page(1), pg + 1, memory_errc::unaligned, "size one byte over"},
      {at_page(1), 0, memory_errc::unaligned, "empty"},
      {top, 2 * pg, memory_errc::out_of_bounds, "wraps 2^64"},
      {at_page(1), ~0ull - pg + 1, memory_errc::out_of_bounds, "huge size wraps"},
  };
  for (const auto& r : bad) {
    EXPECT_EQ(m.add(r.start, r.size, prot_r).code(), r.want) << "add: " << r.what;
    EXPECT_EQ(m.remove(r.start, r.size).code(), r.want) << "remove: " << r.what;
    EXPECT_EQ(m.tighten(r.start, r.size, prot_r).code(), r.want) << "tighten: " << r.what;
    EXPECT_EQ(m.plan(r.start, r.size, prot_r).code(), r.want) << "plan: " << r.what;
    if (r.size == 0 || r.want == memory_errc::out_of_bounds) {
      EXPECT_FALSE(m.all(r.start, r.size, prot_rw)) << "all: " << r.what;
    }
  }
  EXPECT_EQ(m.ranges(), 1u);
  EXPECT_TRUE(m.all(at_page(0), 16 * pg, prot_rw));
}

TEST(ProtectionMap, TheCapRefusesMoreRangesAndLeavesTheMapUnchanged) {
  protection_map m(3);
  EXPECT_EQ(m.max_ranges(), 3u);
  ASSERT_TRUE(m.add(at_page(0), 16 * pg, prot_rw));
  ASSERT_TRUE(m.tighten(at_page(4), pg, prot_r)); // RW R RW: at the cap
  EXPECT_EQ(m.ranges(), 3u);
  const auto before = snapshot(m, 16);

  // Another hole would make 5 ranges; touching the start would make 4.
  EXPECT_EQ(m.plan(at_page(8), pg, prot_r).code(), memory_errc::too_many_ranges);
  EXPECT_EQ(m.tighten(at_page(8), pg, prot_r).code(), memory_errc::too_many_ranges);
  EXPECT_EQ(m.tighten(at_page(0), pg, prot_r).code(), memory_errc::too_many_ranges);
  EXPECT_EQ(m.ranges(), 3u);
  EXPECT_EQ(snapshot(m, 16), before);

  // At the cap, a redundant request is still an empty change, not an error.
  auto same = m.tighten(at_page(4), pg, prot_r);
  ASSERT_TRUE(same) << same.err().message();
  EXPECT_TRUE(same->empty());
  // A change that merges into a neighbour keeps the count: allowed at the cap.
  auto grow = m.tighten(at_page(3), pg, prot_r);
  ASSERT_TRUE(grow) << grow.err().message();
  expect_changes(*grow, {{3, 1, prot_rw, prot_r}});
  EXPECT_EQ(m.ranges(), 3u);
  // So is one that removes a range: [0, 16) all R becomes one range.
  auto all = m.tighten(at_page(0), 16 * pg, prot_r);
  ASSERT_TRUE(all) << all.err().message();
  EXPECT_EQ(m.ranges(), 1u);

  // add() is capped too.
  protection_map two(2);
  ASSERT_TRUE(two.add(at_page(0), pg, prot_rw));
  ASSERT_TRUE(two.add(at_page(2), pg, prot_rw));
  EXPECT_EQ(two.add(at_page(4), pg, prot_rw).code(), memory_errc::too_many_ranges);
  EXPECT_EQ(two.ranges(), 2u);
  EXPECT_EQ(two.at(at_page(4)), protection::none);
}

TEST(ProtectionMap, PlanRecordsNothing) {
  protection_map m;
  ASSERT_TRUE(m.add(at_page(0), 16 * pg, prot_rw));
  auto p = m.plan(at_page(4), 2 * pg, prot_r);
  ASSERT_TRUE(p);
  expect_changes(*p, {{4, 2, prot_rw, prot_r}});
  EXPECT_EQ(m.ranges(), 1u);
  EXPECT_TRUE(m.all(at_page(0), 16 * pg, prot_rw));
  // Planning twice gives the same answer; tighten() then gives it too.
  auto p2 = m.plan(at_page(4), 2 * pg, prot_r);
  ASSERT_TRUE(p2);
  expect_changes(*p2, {{4, 2, prot_rw, prot_r}});
  auto t = m.tighten(at_page(4), 2 * pg, prot_r);
  ASSERT_TRUE(t);
  expect_changes(*t, {{4, 2, prot_rw, prot_r}});
  auto after = m.plan(at_page(4), 2 * pg, prot_r);
  ASSERT_TRUE(after);
  EXPECT_TRUE(after->empty());
}

TEST(ProtectionMap, AllAndAt) {
  protection_map m;
  ASSERT_TRUE(m.add(at_page(0), 4 * pg, prot_r));
  ASSERT_TRUE(m.add(at_page(4), 4 * pg, prot_rw));
  ASSERT_TRUE(m.add(at_page(10), 2 * pg, prot_rw));

  EXPECT_TRUE(m.all(at_page(0), 4 * pg, prot_r));
  EXPECT_TRUE(m.all(at_page(1), pg, prot_r));
  EXPECT_FALSE(m.all(at_page(0), 4 * pg, prot_rw)) << "exactly p, not a superset";
  EXPECT_FALSE(m.all(at_page(0), 5 * pg, prot_r)) << "runs into RW";
  EXPECT_TRUE(m.all(at_page(4), 4 * pg, prot_rw));
  EXPECT_FALSE(m.all(at_page(4), 8 * pg, prot_rw)) << "spans a gap";
  EXPECT_FALSE(m.all(at_page(8), pg, protection::none)) << "unrecorded is not none";
  EXPECT_FALSE(m.all(at_page(0), 0, prot_r)) << "empty";

  EXPECT_EQ(m.at(guest_phys_addr{0}), prot_r);
  EXPECT_EQ(m.at(guest_phys_addr{4 * pg - 1}), prot_r);
  EXPECT_EQ(m.at(guest_phys_addr{4 * pg}), prot_rw);
  EXPECT_EQ(m.at(guest_phys_addr{8 * pg}), protection::none);
  EXPECT_EQ(m.at(guest_phys_addr{11 * pg + 123}), prot_rw);
  EXPECT_EQ(m.at(guest_phys_addr{12 * pg}), protection::none);
  EXPECT_EQ(m.at(guest_phys_addr{~0ull}), protection::none);

  protection_map empty;
  EXPECT_EQ(empty.at(guest_phys_addr{0}), protection::none);
  EXPECT_FALSE(empty.all(at_page(0), pg, protection::none));
}

// Saving: the map encodes itself and decodes only as the map of the regions it was built over.

std::vector<region> owned_regions() {
  return {
      {"boot_info", region_kind::boot_info, at_page(1), pg, prot_r, true},
      {"image.text", region_kind::image, at_page(256), 4 * pg, prot_rx, true},
      {"heap", region_kind::heap, at_page(512), 16 * pg, prot_rw, true},
  };
}

const std::error_code corrupt = make_error_code(memory_errc::snapshot_corrupt);

result<protection_map> decode_bytes(const std::vector<std::byte>& bytes) {
  byte_reader r(bytes, corrupt, "protection section");
  KILN_TRY_ASSIGN(auto m, protection_map::decode(r, owned_regions()));
  KILN_TRY(r.done());
  return m;
}

std::vector<std::byte> encode_map(const protection_map& m) {
  byte_writer w;
  m.encode(w);
  return w.take();
}

TEST(ProtectionMapSave, RoundTripsRangesAndCap) {
  protection_map m(40);
  ASSERT_TRUE(m.add(at_page(256), 4 * pg, prot_rx));
  ASSERT_TRUE(m.add(at_page(512), 16 * pg, prot_rw));
  ASSERT_TRUE(m.tighten(at_page(515), 2 * pg, prot_r));
  const auto bytes = encode_map(m);
  EXPECT_EQ(bytes.size(), 8u + 4 + 4 * 17) << "u64 cap, u32 count, four ranges";
  auto back = decode_bytes(bytes);
  ASSERT_TRUE(back) << back.err().message();
  EXPECT_EQ(back->max_ranges(), 40u);
  const auto want = m.list(), got = back->list();
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got[i].start, want[i].start);
    EXPECT_EQ(got[i].size, want[i].size);
    EXPECT_EQ(got[i].to, want[i].to);
  }
  EXPECT_EQ(encode_map(*back), bytes);
}

/// Decoding `bytes` fails with snapshot_corrupt, naming `field`.
void expect_refused(const std::vector<std::byte>& bytes, const std::string& field) {
  auto back = decode_bytes(bytes);
  ASSERT_FALSE(back) << field << " was accepted";
  EXPECT_EQ(back.code(), memory_errc::snapshot_corrupt);
  EXPECT_NE(back.err().message().find("protection section: " + field), std::string::npos)
      << back.err().message();
}

TEST(ProtectionMapSave, RefusesRangesTheRegionsDoNotAllow) {
  protection_map wider(8);
  ASSERT_TRUE(wider.add(at_page(256), 4 * pg, prot_rw | prot_rx));
  expect_refused(encode_map(wider), "protection range outside the guest's memory or wider");
  protection_map kilns(8);
  ASSERT_TRUE(kilns.add(at_page(1), pg, prot_r));
  expect_refused(encode_map(kilns), "protection range outside the guest's memory or wider");
  protection_map past(8);
  ASSERT_TRUE(past.add(at_page(512), 17 * pg, prot_rw));
  expect_refused(encode_map(past), "protection range outside the guest's memory or wider");
}

TEST(ProtectionMapSave, RefusesDamagedBytes) {
  protection_map m(8);
  ASSERT_TRUE(m.add(at_page(512), 16 * pg, prot_rw));
  const auto good = encode_map(m);
  for (std::size_t cut = 0; cut < good.size(); ++cut)
    expect_refused({good.begin(), good.begin() + static_cast<std::ptrdiff_t>(cut)}, "truncated");
  auto bad_prot = good;
  bad_prot.back() = std::byte{8};
  expect_refused(bad_prot, "protection range");
  auto over_cap = good;
  over_cap[0] = std::byte{0};
  expect_refused(over_cap, "too many protection ranges");
  auto huge_cap = good;
  huge_cap[2] = std::byte{2}; // 2^17 + 8
  expect_refused(huge_cap, "too many protection ranges");
  protection_map half(8);
  ASSERT_TRUE(half.add(at_page(512), 8 * pg, prot_rw));
  auto unaligned = encode_map(half);
  unaligned[20] = std::byte{1}; // size 0x8001, inside the heap: add() refuses it
  expect_refused(unaligned, "protection range: ");
  auto trailing = good;
  trailing.push_back(std::byte{0});
  expect_refused(trailing, "trailing bytes");
}

} // namespace
} // namespace kiln::memory
