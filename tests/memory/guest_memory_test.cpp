// Tests for memory/guest_memory.hpp: the region table and the bounds of every checked access.
#include <kiln/memory/guest_memory.hpp>
#include <kiln/memory/layout.hpp>

#include "../test_env.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <optional>
#include <random>
#include <string>
#include <system_error>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

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

// ---- The file room and the host-side changes ------------------------------------------------

TEST(GuestMemoryCreate, AFileRoomExtendsTheAddressLimit) {
  auto plain = guest_memory::create(16 * mib);
  ASSERT_TRUE(plain);
  EXPECT_EQ(plain->address_limit(), 16 * mib);
  auto roomy = guest_memory::create(16 * mib, 4 * mib);
  ASSERT_TRUE(roomy) << roomy.err().message();
  EXPECT_EQ(roomy->size(), 16 * mib);
  EXPECT_EQ(roomy->address_limit(), 20 * mib);
  EXPECT_TRUE(roomy->owns_host_address(roomy->host_address_for_mapping(guest_phys_addr{0})));
  EXPECT_TRUE(
      roomy->owns_host_address(roomy->host_address_for_mapping(guest_phys_addr{20 * mib - 1})));
  EXPECT_FALSE(
      roomy->owns_host_address(roomy->host_address_for_mapping(guest_phys_addr{20 * mib})));
}

TEST(GuestMemoryCreate, HostAddressesTurnBackIntoGuestAddressesInsideTheReservationOnly) {
  auto m = guest_memory::create(16 * mib, 4 * mib);
  ASSERT_TRUE(m);
  for (std::uint64_t a : {std::uint64_t{0}, 5 * mib + 123, 16 * mib, 20 * mib - 1}) {
    const auto back = m->guest_address_of(m->host_address_for_mapping(guest_phys_addr{a}));
    ASSERT_TRUE(back) << a;
    EXPECT_EQ(back->value, a);
  }
  EXPECT_FALSE(m->guest_address_of(m->host_address_for_mapping(guest_phys_addr{20 * mib})));
  EXPECT_FALSE(m->guest_address_of(m->host_address_for_mapping(guest_phys_addr{0}) - 1));
  EXPECT_FALSE(m->guest_address_of(nullptr));
  int on_the_stack = 0;
  EXPECT_FALSE(m->guest_address_of(&on_the_stack));
}

TEST(GuestMemoryCreate, RejectsBadFileRooms) {
  for (std::uint64_t room : {page_size, mib, 2 * mib + page_size, fixed::max_file_room + 2 * mib})
    EXPECT_EQ(guest_memory::create(16 * mib, room).code(), memory_errc::bad_size) << room;
}

// 16 MiB of RAM and a 4 MiB file room; a temp directory for files to map.
class GuestMemoryRoom : public ::testing::Test {
protected:
  static constexpr std::uint64_t room = 16 * mib, limit = 20 * mib;

  void SetUp() override {
    auto m = guest_memory::create(16 * mib, 4 * mib);
    ASSERT_TRUE(m) << m.err().message();
    mem_.emplace(std::move(m).value());
    std::random_device rd;
    dir_ = std::filesystem::temp_directory_path() /
           ("kiln_guest_memory_test." + std::to_string(::getpid()) + "." + std::to_string(rd()));
    ASSERT_TRUE(std::filesystem::create_directory(dir_));
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  guest_memory& mem() { return *mem_; }

  /// A file of `bytes` (byte i is i * 7 + 1, mod 256), opened read-only; the caller closes it.
  int make_file(std::size_t bytes) {
    const auto path = dir_ / ("file" + std::to_string(files_++));
    std::vector<unsigned char> data(bytes);
    for (std::size_t i = 0; i < bytes; ++i)
      data[i] = static_cast<unsigned char>(i * 7 + 1);
    const int w = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
    EXPECT_GE(w, 0);
    EXPECT_EQ(::write(w, data.data(), bytes), static_cast<ssize_t>(bytes));
    ::close(w);
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    EXPECT_GE(fd, 0);
    return fd;
  }

  /// One byte read or written through the host mapping, really performed.
  unsigned char host_read(std::uint64_t a) {
    // SAFETY: `a` lies in this guest's reservation; the tests expect some reads to fault.
    return *reinterpret_cast<volatile unsigned char*>(
        mem().host_address_for_mapping(guest_phys_addr{a}));
  }
  void host_write(std::uint64_t a, unsigned char v) {
    // SAFETY: as in host_read().
    *reinterpret_cast<volatile unsigned char*>(mem().host_address_for_mapping(guest_phys_addr{a})) =
        v;
  }

  std::optional<guest_memory> mem_;
  std::filesystem::path dir_;
  int files_ = 0;
};

TEST_F(GuestMemoryRoom, FileRegionsLiveInTheRoomAndOthersInRam) {
  using enum region_kind;
  EXPECT_TRUE(mem().add_region(make_region("f", room, 3 * page_size, prot_r, file)));
  EXPECT_TRUE(mem().add_region(make_region("last", limit - page_size, page_size, prot_r, file)));
  EXPECT_TRUE(mem().add_region(make_region("heap", 16 * mib - page_size, page_size)));
  struct req {
    std::uint64_t start, size;
    region_kind kind;
    memory_errc want;
    const char* what;
  };
  const req bad[] = {
      {0x200000, page_size, file, memory_errc::out_of_bounds, "a file region in RAM"},
      {room - page_size, 2 * page_size, file, memory_errc::out_of_bounds,
       "a file region starting in RAM"},
      {room + 2 * mib, page_size, heap, memory_errc::out_of_bounds, "a heap in the room"},
      {room - 2 * page_size, 4 * page_size, heap, memory_errc::out_of_bounds,
       "a heap running into the room"},
      {limit - page_size, 2 * page_size, file, memory_errc::out_of_bounds,
       "a file region past the room"},
      {limit, page_size, file, memory_errc::out_of_bounds, "a file region at the limit"},
      {room + page_size, page_size, file, memory_errc::overlapping_region, "overlaps f"},
      {room + 0x800, page_size, file, memory_errc::unaligned, "unaligned"},
  };
  for (const auto& r : bad)
    EXPECT_EQ(mem().add_region(make_region("new", r.start, r.size, prot_r, r.kind)).code(), r.want)
        << r.what;
  EXPECT_EQ(mem().regions().size(), 3u);
}

TEST_F(GuestMemoryRoom, OnlyFileRegionsCanBeRemoved) {
  using enum region_kind;
  ASSERT_TRUE(mem().add_region(make_region("heap", 0x200000, 0x2000)));
  ASSERT_TRUE(mem().add_region(make_region("f", room, 2 * page_size, prot_r, file)));
  EXPECT_EQ(mem().remove_region(guest_phys_addr{0x200000}).code(), memory_errc::out_of_bounds);
  EXPECT_EQ(mem().remove_region(guest_phys_addr{room + page_size}).code(),
            memory_errc::out_of_bounds)
      << "not the start of the region";
  EXPECT_EQ(mem().remove_region(guest_phys_addr{room + 2 * mib}).code(), memory_errc::out_of_bounds)
      << "no region there";
  EXPECT_EQ(mem().regions().size(), 2u);
  ASSERT_TRUE(mem().remove_region(guest_phys_addr{room}));
  EXPECT_EQ(mem().regions().size(), 1u);
  EXPECT_EQ(mem().find(guest_phys_addr{room}), nullptr);
  EXPECT_EQ(mem().remove_region(guest_phys_addr{room}).code(), memory_errc::out_of_bounds)
      << "already removed";
  // The room can take a file region there again.
  EXPECT_TRUE(mem().add_region(make_region("g", room, page_size, prot_r, file)));
}

TEST_F(GuestMemoryRoom, HostProtectMakesPagesReadOnlyInTheHost) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const std::uint64_t a = 0x400000;
  host_write(a, 0x5a);
  ASSERT_TRUE(mem().host_protect(guest_phys_addr{a}, 2 * page_size, prot_r));
  EXPECT_EQ(host_read(a), 0x5a) << "still readable";
  EXPECT_EXIT(host_write(a + page_size + 1, 1), test::killed_by(SIGSEGV), "");
  host_write(a + 2 * page_size, 3); // the page after the range stays writable

  // Exec is a guest-side right: RX is R in the host.
  ASSERT_TRUE(mem().host_protect(guest_phys_addr{a}, page_size, prot_rx));
  EXPECT_EXIT(host_write(a, 1), test::killed_by(SIGSEGV), "");

  ASSERT_TRUE(mem().host_protect(guest_phys_addr{a}, page_size, protection::none));
  EXPECT_EXIT(host_read(a), test::killed_by(SIGSEGV), "");

  ASSERT_TRUE(mem().host_protect(guest_phys_addr{a}, 2 * page_size, prot_rw));
  host_write(a + page_size + 1, 9);
  EXPECT_EQ(host_read(a + page_size + 1), 9);
  EXPECT_EQ(host_read(a), 0x5a) << "protection changes keep the bytes";
}

TEST_F(GuestMemoryRoom, DiscardZeroesPagesAndReleasesThem) {
  ASSERT_TRUE(mem().add_region(make_region("heap", 0x200000, 2 * mib)));
  const guest_phys_addr a{0x200000 + 16 * page_size};
  auto untouched = mem().resident_bytes(a, 16 * page_size);
  ASSERT_TRUE(untouched);
  EXPECT_EQ(*untouched, 0u) << "MAP_NORESERVE memory is not resident until written";

  ASSERT_TRUE(mem().write(a, filled(16 * page_size, 0xee)));
  auto before = mem().resident_bytes(a, 16 * page_size);
  ASSERT_TRUE(before);
  EXPECT_EQ(*before, 16 * page_size);

  ASSERT_TRUE(mem().discard(a + 4 * page_size, 8 * page_size));
  auto after = mem().resident_bytes(a, 16 * page_size);
  ASSERT_TRUE(after);
  EXPECT_LT(*after, *before);
  auto gone = mem().resident_bytes(a + 4 * page_size, 8 * page_size);
  ASSERT_TRUE(gone);
  EXPECT_EQ(*gone, 0u);

  auto out = filled(16 * page_size, 0x11);
  ASSERT_TRUE(mem().read(a, out));
  EXPECT_EQ(std::vector<std::byte>(out.begin(), out.begin() + 4 * page_size),
            filled(4 * page_size, 0xee));
  EXPECT_EQ(std::vector<std::byte>(out.begin() + 4 * page_size, out.begin() + 12 * page_size),
            filled(8 * page_size, 0));
  EXPECT_EQ(std::vector<std::byte>(out.begin() + 12 * page_size, out.end()),
            filled(4 * page_size, 0xee));
}

TEST_F(GuestMemoryRoom, MapFileShowsTheFileAndUnmapFileTakesItAway) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const std::size_t bytes = 2 * page_size + 1000; // the last page is partly past the end
  const int fd = make_file(bytes);
  ASSERT_GE(fd, 0);
  const guest_phys_addr at{room + 2 * mib};
  ASSERT_TRUE(mem().map_file(at, 3 * page_size, fd));
  ::close(fd); // the mapping keeps no reference to the descriptor

  for (std::size_t i : {std::size_t{0}, std::size_t{1}, page_size, 2 * page_size + 999})
    EXPECT_EQ(host_read(at.value + i), static_cast<unsigned char>(i * 7 + 1)) << i;
  EXPECT_EQ(host_read(at.value + bytes), 0) << "past the file's end, in its last page";
  EXPECT_EQ(host_read(at.value + 3 * page_size - 1), 0);

  // Through a file region, the checked accessors read the same bytes.
  ASSERT_TRUE(
      mem().add_region(make_region("f", at.value, 3 * page_size, prot_r, region_kind::file)));
  auto b = mem().read_object<unsigned char>(at + 1234);
  ASSERT_TRUE(b);
  EXPECT_EQ(*b, static_cast<unsigned char>(1234 * 7 + 1));
  EXPECT_TRUE(mem().resident_bytes(at, 3 * page_size)) << "the room can be queried";

  // The mapping is read-only.
  EXPECT_EXIT(host_write(at.value, 1), test::killed_by(SIGSEGV), "");
  // The rest of the room stays inaccessible.
  EXPECT_EXIT(host_read(room), test::killed_by(SIGSEGV), "");

  ASSERT_TRUE(mem().unmap_file(at, 3 * page_size));
  ASSERT_TRUE(mem().remove_region(at));
  auto none = mem().resident_bytes(at, 3 * page_size);
  ASSERT_TRUE(none);
  EXPECT_EQ(*none, 0u);
  EXPECT_EXIT(host_read(at.value), test::killed_by(SIGSEGV), "");
  EXPECT_EXIT(host_read(at.value + 2 * page_size), test::killed_by(SIGSEGV), "");
}

TEST_F(GuestMemoryRoom, MapFileReportsTheMmapErrno) {
  EXPECT_EQ(mem().map_file(guest_phys_addr{room}, page_size, -1).code(),
            std::make_error_code(std::errc::bad_file_descriptor));
}

TEST_F(GuestMemoryRoom, HostSyscallsCountsEachHostChange) {
  EXPECT_EQ(mem().host_syscalls(), 0u);
  ASSERT_TRUE(mem().host_protect(guest_phys_addr{0x200000}, page_size, prot_r));
  EXPECT_EQ(mem().host_syscalls(), 1u);
  ASSERT_TRUE(mem().host_protect(guest_phys_addr{0x200000}, page_size, prot_rw));
  EXPECT_EQ(mem().host_syscalls(), 2u);
  ASSERT_TRUE(mem().discard(guest_phys_addr{0x200000}, page_size));
  EXPECT_EQ(mem().host_syscalls(), 3u);
  const int fd = make_file(page_size);
  ASSERT_TRUE(mem().map_file(guest_phys_addr{room}, page_size, fd));
  ::close(fd);
  EXPECT_EQ(mem().host_syscalls(), 4u);
  ASSERT_TRUE(mem().unmap_file(guest_phys_addr{room}, page_size));
  EXPECT_EQ(mem().host_syscalls(), 5u);
  // A query is not a change.
  ASSERT_TRUE(mem().resident_bytes(guest_phys_addr{0x200000}, page_size));
  EXPECT_EQ(mem().host_syscalls(), 5u);
  // A syscall that fails was still issued.
  EXPECT_FALSE(mem().map_file(guest_phys_addr{room}, page_size, -1));
  EXPECT_EQ(mem().host_syscalls(), 6u);
  // A range refused before any syscall is not counted.
  EXPECT_FALSE(mem().host_protect(guest_phys_addr{0x200800}, page_size, prot_r));
  EXPECT_FALSE(mem().discard(guest_phys_addr{room}, page_size));
  EXPECT_FALSE(mem().unmap_file(guest_phys_addr{0}, page_size));
  EXPECT_EQ(mem().host_syscalls(), 6u);
}

TEST_F(GuestMemoryRoom, HostChangesRefuseRangesOutsideTheirPart) {
  // nullopt: the call succeeds. host_protect() and discard() work on RAM, map_file() and
  // unmap_file() on the room; resident_bytes() on either, but not across both.
  using enum memory_errc;
  using want = std::optional<memory_errc>;
  struct req {
    std::uint64_t start, len;
    want ram, room_calls, resident;
    const char* what;
  };
  const req cases[] = {
      {0x200800, page_size, unaligned, unaligned, unaligned, "unaligned start"},
      {0x200000, 0x800, unaligned, unaligned, unaligned, "unaligned length"},
      {0x200000, 0, unaligned, unaligned, unaligned, "empty"},
      {room + 0x800, page_size, unaligned, unaligned, unaligned, "unaligned start in the room"},
      {0x200000, page_size, std::nullopt, out_of_bounds, std::nullopt, "RAM"},
      {room - page_size, 2 * page_size, out_of_bounds, out_of_bounds, out_of_bounds,
       "across RAM's end"},
      {room, page_size, out_of_bounds, std::nullopt, std::nullopt, "the room"},
      {limit - page_size, 2 * page_size, out_of_bounds, out_of_bounds, out_of_bounds,
       "across the limit"},
      {limit, page_size, out_of_bounds, out_of_bounds, out_of_bounds, "past the limit"},
      {~0ull - page_size + 1, 2 * page_size, out_of_bounds, out_of_bounds, out_of_bounds,
       "wraps 2^64"},
  };
  const int fd = make_file(page_size);
  ASSERT_GE(fd, 0);
  auto check = [](const result<void>& r, want w, const char* call, const char* what) {
    if (w) {
      EXPECT_EQ(r.code(), *w) << call << ": " << what;
    } else {
      EXPECT_TRUE(r) << call << ": " << what << ": " << r.err().message();
    }
  };
  for (const auto& c : cases) {
    const guest_phys_addr a{c.start};
    check(mem().host_protect(a, c.len, prot_rw), c.ram, "host_protect", c.what);
    check(mem().discard(a, c.len), c.ram, "discard", c.what);
    check(mem().map_file(a, c.len, fd), c.room_calls, "map_file", c.what);
    check(mem().unmap_file(a, c.len), c.room_calls, "unmap_file", c.what);
    auto r = mem().resident_bytes(a, c.len);
    if (c.resident) {
      EXPECT_EQ(r.code(), *c.resident) << "resident_bytes: " << c.what;
    } else {
      EXPECT_TRUE(r) << "resident_bytes: " << c.what;
    }
  }
  ::close(fd);
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
                                                       {stack, "stack"},
                                                       {file, "file"}};
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
