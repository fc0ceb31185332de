// Tests for memory/guest_memory.hpp: the region table and the bounds of every checked access.
#include <kiln/memory/guest_memory.hpp>
#include <kiln/memory/layout.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace kiln::memory {
namespace {

constexpr std::uint64_t mib = 1ull << 20;

region make_region(std::string name, std::uint64_t start, std::uint64_t size,
                   protection prot = prot_rw, region_kind kind = region_kind::heap) {
  return region{std::move(name), kind, guest_phys_addr{start}, size, prot};
}

std::vector<std::byte> filled(std::size_t n, std::uint8_t v) {
  return std::vector<std::byte>(n, std::byte{v});
}

TEST(GuestMemoryCreate, AcceptsPageAlignedSizesInRange) {
  for (std::uint64_t size : {fixed::min_memory, 16 * mib, fixed::min_memory + page_size}) {
    auto m = guest_memory::create(size);
    ASSERT_TRUE(m) << size << ": " << m.err().message();
    EXPECT_EQ(m->size(), size);
    EXPECT_TRUE(m->regions().empty());
  }
}

TEST(GuestMemoryCreate, RejectsBadSizes) {
  for (std::uint64_t size :
       {std::uint64_t{0}, page_size, fixed::min_memory - page_size, fixed::min_memory + 1,
        fixed::max_memory + page_size, std::uint64_t{~0ull}}) {
    EXPECT_EQ(guest_memory::create(size).code(), memory_errc::bad_size) << size;
  }
}

class GuestMemory : public ::testing::Test {
protected:
  void SetUp() override {
    auto m = guest_memory::create(16 * mib);
    ASSERT_TRUE(m) << m.err().message();
    mem_.emplace(std::move(m).value());
  }
  guest_memory& mem() { return *mem_; }
  std::optional<guest_memory> mem_;
};

TEST_F(GuestMemory, StartsZeroed) {
  ASSERT_TRUE(mem().add_region(make_region("all", 0, 16 * mib)));
  std::vector<std::byte> buf(16 * mib, std::byte{0xff});
  ASSERT_TRUE(mem().read(guest_phys_addr{0}, buf));
  EXPECT_TRUE(std::all_of(buf.begin(), buf.end(), [](std::byte b) { return b == std::byte{0}; }));
}

TEST_F(GuestMemory, KeepsRegionsSortedWhateverTheInsertionOrder) {
  ASSERT_TRUE(mem().add_region(make_region("c", 0x300000, 0x1000)));
  ASSERT_TRUE(mem().add_region(make_region("a", 0x100000, 0x1000)));
  ASSERT_TRUE(mem().add_region(make_region("b", 0x200000, 0x1000)));
  ASSERT_EQ(mem().regions().size(), 3u);
  EXPECT_EQ(mem().regions()[0].name, "a");
  EXPECT_EQ(mem().regions()[1].name, "b");
  EXPECT_EQ(mem().regions()[2].name, "c");
}

TEST_F(GuestMemory, AcceptsAdjacentRegions) {
  ASSERT_TRUE(mem().add_region(make_region("a", 0x100000, 0x1000)));
  EXPECT_TRUE(mem().add_region(make_region("b", 0x101000, 0x1000)));
  EXPECT_TRUE(mem().add_region(make_region("c", 0xff000, 0x1000)));
  EXPECT_TRUE(mem().add_region(make_region("last", 16 * mib - page_size, page_size)));
  EXPECT_TRUE(mem().add_region(make_region("first", 0, page_size)));
}

TEST_F(GuestMemory, RejectsEmptyUnalignedAndOutOfRangeRegions) {
  EXPECT_EQ(mem().add_region(make_region("empty", 0x100000, 0)).code(), memory_errc::bad_size);
  EXPECT_EQ(mem().add_region(make_region("start", 0x100800, 0x1000)).code(),
            memory_errc::unaligned);
  EXPECT_EQ(mem().add_region(make_region("size", 0x100000, 0x800)).code(), memory_errc::unaligned);
  EXPECT_EQ(mem().add_region(make_region("past", 16 * mib - page_size, 2 * page_size)).code(),
            memory_errc::out_of_bounds);
  EXPECT_EQ(mem().add_region(make_region("beyond", 16 * mib, page_size)).code(),
            memory_errc::out_of_bounds);
  // start + size wraps 2^64: checked arithmetic, not a small end.
  EXPECT_EQ(mem().add_region(make_region("wraps", ~0ull - page_size + 1, 2 * page_size)).code(),
            memory_errc::out_of_bounds);
  EXPECT_TRUE(mem().regions().empty());
}

TEST_F(GuestMemory, RejectsEveryKindOfOverlap) {
  ASSERT_TRUE(mem().add_region(make_region("base", 0x200000, 0x3000)));
  const std::pair<std::uint64_t, std::uint64_t> overlapping[] = {
      {0x200000, 0x3000},   // identical
      {0x1ff000, 0x2000},   // tail into its first page
      {0x202000, 0x2000},   // head out of its last page
      {0x201000, 0x1000},   // inside
      {0x100000, 0x200000}, // encloses
  };
  for (auto [start, size] : overlapping) {
    auto r = mem().add_region(make_region("new", start, size));
    EXPECT_EQ(r.code(), memory_errc::overlapping_region) << std::hex << start << "+" << size;
  }
  EXPECT_EQ(mem().regions().size(), 1u);
}

TEST_F(GuestMemory, FindsRegionsByAddressAndKind) {
  ASSERT_TRUE(
      mem().add_region(make_region("io_in", 0xa0000, 0x10000, prot_rw, region_kind::io_in)));
  ASSERT_TRUE(mem().add_region(make_region("heap", 0x200000, 0x2000, prot_rw, region_kind::heap)));

  EXPECT_EQ(mem().find(guest_phys_addr{0}), nullptr);
  EXPECT_EQ(mem().find(guest_phys_addr{0x9ffff}), nullptr);
  ASSERT_NE(mem().find(guest_phys_addr{0xa0000}), nullptr);
  EXPECT_EQ(mem().find(guest_phys_addr{0xa0000})->name, "io_in");
  EXPECT_EQ(mem().find(guest_phys_addr{0xaffff})->name, "io_in");
  EXPECT_EQ(mem().find(guest_phys_addr{0xb0000}), nullptr) << "end is exclusive";
  EXPECT_EQ(mem().find(guest_phys_addr{0x201fff})->name, "heap");
  EXPECT_EQ(mem().find(guest_phys_addr{0x202000}), nullptr);
  EXPECT_EQ(mem().find(guest_phys_addr{~0ull}), nullptr);

  ASSERT_NE(mem().find(region_kind::heap), nullptr);
  EXPECT_EQ(mem().find(region_kind::heap)->name, "heap");
  EXPECT_EQ(mem().find(region_kind::stack), nullptr);
}

TEST_F(GuestMemory, RoundTripsBytesAndObjects) {
  ASSERT_TRUE(mem().add_region(make_region("heap", 0x200000, 0x2000)));
  const auto in = filled(100, 0xab);
  ASSERT_TRUE(mem().write(guest_phys_addr{0x200ff0}, in));
  auto out = filled(100, 0);
  ASSERT_TRUE(mem().read(guest_phys_addr{0x200ff0}, out));
  EXPECT_EQ(out, in);

  struct pod {
    std::uint32_t a;
    std::uint64_t b;
  };
  ASSERT_TRUE(mem().write_object(guest_phys_addr{0x201101}, pod{7, 0x1122334455667788}));
  auto p = mem().read_object<pod>(guest_phys_addr{0x201101});
  ASSERT_TRUE(p);
  EXPECT_EQ(p->a, 7u);
  EXPECT_EQ(p->b, 0x1122334455667788u);

  ASSERT_TRUE(mem().zero(guest_phys_addr{0x200ff8}, 8));
  ASSERT_TRUE(mem().read(guest_phys_addr{0x200ff0}, out));
  EXPECT_EQ(std::vector<std::byte>(out.begin(), out.begin() + 8), filled(8, 0xab));
  EXPECT_EQ(std::vector<std::byte>(out.begin() + 8, out.begin() + 16), filled(8, 0));
  EXPECT_EQ(std::vector<std::byte>(out.begin() + 16, out.end()), filled(84, 0xab));
}

TEST_F(GuestMemory, AccessesTheWholeRegionButNotOneByteMore) {
  ASSERT_TRUE(mem().add_region(make_region("heap", 0x200000, 0x1000)));
  auto buf = filled(0x1000, 1);
  EXPECT_TRUE(mem().write(guest_phys_addr{0x200000}, buf));
  EXPECT_TRUE(mem().read(guest_phys_addr{0x200000}, buf));
  auto one_more = filled(0x1001, 1);
  EXPECT_EQ(mem().write(guest_phys_addr{0x200000}, one_more).code(), memory_errc::out_of_bounds);
  EXPECT_EQ(mem().read(guest_phys_addr{0x200000}, one_more).code(), memory_errc::out_of_bounds);
}

// ADVERSARIAL case 7: a range crossing a region's end, a gap, or two adjacent regions is refused
// as a whole; nothing is copied in either direction.
TEST_F(GuestMemory, RefusesRangesCrossingARegionEndWithoutCopyingAnything) {
  ASSERT_TRUE(mem().add_region(make_region("a", 0x200000, 0x1000)));
  ASSERT_TRUE(mem().add_region(make_region("b", 0x201000, 0x1000))); // adjacent to a
  ASSERT_TRUE(mem().add_region(make_region("c", 0x300000, 0x1000))); // after a gap
  ASSERT_TRUE(mem().write(guest_phys_addr{0x200fc0}, filled(64, 0x11)));
  ASSERT_TRUE(mem().write(guest_phys_addr{0x201000}, filled(64, 0x22)));

  struct probe {
    std::uint64_t addr, len;
    const char* what;
  };
  const probe probes[] = {
      {0x201ff8, 64, "region_end - 8, len 64 (then a gap)"},
      {0x200ff8, 64, "spans the adjacent regions a and b"},
      {0x2ffff8, 64, "starts in the gap before c"},
      {0x300ff8, 64, "crosses the end of c"},
      {0x300000, ~0ull, "a + len wraps 2^64"},
      {0x300001, ~0ull - 0x300000, "a + len == 2^64 exactly"},
      {16 * mib - 8, 64, "past the end of guest memory"},
      {~0ull - 7, 64, "at the top of the address space"},
  };
  for (const auto& p : probes) {
    if (p.len <= 64) {
      auto out = filled(p.len, 0x5a);
      EXPECT_EQ(mem().read(guest_phys_addr{p.addr}, out).code(), memory_errc::out_of_bounds)
          << p.what;
      EXPECT_EQ(out, filled(p.len, 0x5a)) << "read copied bytes: " << p.what;
      EXPECT_EQ(mem().write(guest_phys_addr{p.addr}, filled(p.len, 0x77)).code(),
                memory_errc::out_of_bounds)
          << p.what;
    }
    EXPECT_EQ(mem().zero(guest_phys_addr{p.addr}, p.len).code(), memory_errc::out_of_bounds)
        << p.what;
  }
  // Nothing was written by the refused accesses.
  auto a = filled(64, 0), b = filled(64, 0);
  ASSERT_TRUE(mem().read(guest_phys_addr{0x200fc0}, a));
  ASSERT_TRUE(mem().read(guest_phys_addr{0x201000}, b));
  EXPECT_EQ(a, filled(64, 0x11));
  EXPECT_EQ(b, filled(64, 0x22));
}

TEST_F(GuestMemory, ZeroLengthAccessesInsideARegionAreNoOps) {
  // An empty span may carry a null pointer: guest_memory must not hand it to memcpy (UB that
  // UBSan reports; see the report of this test's author).
  ASSERT_TRUE(mem().add_region(make_region("heap", 0x200000, 0x1000)));
  EXPECT_TRUE(mem().read(guest_phys_addr{0x200000}, std::span<std::byte>{}));
  EXPECT_TRUE(mem().write(guest_phys_addr{0x200fff}, std::span<const std::byte>{}));
  EXPECT_TRUE(mem().zero(guest_phys_addr{0x200800}, 0));
  EXPECT_EQ(mem().read(guest_phys_addr{0x201000}, std::span<std::byte>{}).code(),
            memory_errc::out_of_bounds)
      << "the address must still lie in a region";
}

TEST_F(GuestMemory, RefusesEveryAccessWithoutARegion) {
  std::array<std::byte, 1> one{};
  EXPECT_EQ(mem().read(guest_phys_addr{0}, one).code(), memory_errc::out_of_bounds);
  EXPECT_EQ(mem().write(guest_phys_addr{0x100000}, one).code(), memory_errc::out_of_bounds);
  EXPECT_EQ(mem().read_object<std::uint64_t>(guest_phys_addr{0x1000}).code(),
            memory_errc::out_of_bounds);
}

TEST_F(GuestMemory, HostAddressForMappingIsTheSameBytes) {
  ASSERT_TRUE(mem().add_region(make_region("heap", 0x200000, 0x1000)));
  ASSERT_TRUE(mem().write_object<std::uint32_t>(guest_phys_addr{0x200010}, 0xdeadbeef));
  std::uint32_t seen = 0;
  std::memcpy(&seen, mem().host_address_for_mapping(guest_phys_addr{0x200010}), sizeof seen);
  EXPECT_EQ(seen, 0xdeadbeefu);
  EXPECT_EQ(mem().host_address_for_mapping(guest_phys_addr{0x200010}),
            mem().host_address_for_mapping(guest_phys_addr{0}) + 0x200010);
}

TEST_F(GuestMemory, MovesRegionsAndBytes) {
  ASSERT_TRUE(mem().add_region(make_region("heap", 0x200000, 0x1000)));
  ASSERT_TRUE(mem().write_object<std::uint64_t>(guest_phys_addr{0x200000}, 42));
  guest_memory moved = std::move(*mem_);
  mem_.reset();
  ASSERT_EQ(moved.regions().size(), 1u);
  EXPECT_EQ(moved.size(), 16 * mib);
  auto v = moved.read_object<std::uint64_t>(guest_phys_addr{0x200000});
  ASSERT_TRUE(v);
  EXPECT_EQ(*v, 42u);
}

TEST(RegionKind, EveryKindHasAName) {
  using enum region_kind;
  const std::pair<region_kind, const char*> names[] = {{boot_info, "boot_info"},
                                                       {system_tables, "system_tables"},
                                                       {page_tables, "page_tables"},
                                                       {ist_stack, "ist_stack"},
                                                       {io_in, "io_in"},
                                                       {io_out, "io_out"},
                                                       {image, "image"},
                                                       {heap, "heap"},
                                                       {stack, "stack"}};
  for (auto [k, name] : names)
    EXPECT_STREQ(to_string(k), name);
}

TEST(Region, EndAndContains) {
  const auto r = make_region("r", 0x1000, 0x2000);
  EXPECT_EQ(r.end(), guest_phys_addr{0x3000});
  EXPECT_FALSE(r.contains(guest_phys_addr{0xfff}));
  EXPECT_TRUE(r.contains(guest_phys_addr{0x1000}));
  EXPECT_TRUE(r.contains(guest_phys_addr{0x2fff}));
  EXPECT_FALSE(r.contains(guest_phys_addr{0x3000}));
}

TEST(Address, AlignmentHelpers) {
  EXPECT_EQ(align_down(0x1fff, page_size), 0x1000u);
  EXPECT_EQ(align_up(0x1001, page_size), 0x2000u);
  EXPECT_EQ(align_up(0x2000, page_size), 0x2000u);
  EXPECT_TRUE(is_aligned(0x200000, large_page_size));
  EXPECT_FALSE(is_aligned(0x201000, large_page_size));
  EXPECT_TRUE(has(prot_rx, protection::exec));
  EXPECT_FALSE(has(prot_rw, protection::exec));
  EXPECT_EQ(prot_rw, protection::read | protection::write);
}

} // namespace
} // namespace kiln::memory
