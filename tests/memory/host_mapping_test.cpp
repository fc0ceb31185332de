// Tests for memory/host_mapping.hpp: size checks, zeroed RW bytes, PROT_NONE guards, RAII moves.
#include <kiln/memory/address.hpp>
#include <kiln/memory/host_mapping.hpp>
#include <kiln/memory/memory_errc.hpp>

#include <gtest/gtest.h>

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>
#include <utility>

namespace kiln::memory {
namespace {

/// The permission string ("rw-p", "---p") of the mapping holding `p` in /proc/self/maps, or ""
/// when no mapping holds it.
std::string perms_at(const void* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    std::uintptr_t lo = 0, hi = 0;
    char perms[5] = {};
    if (std::sscanf(line.c_str(), "%" SCNxPTR "-%" SCNxPTR " %4s", &lo, &hi, perms) == 3 &&
        a >= lo && a < hi)
      return perms;
  }
  return {};
}

/// True if the page holding `p` is mapped (mincore fails with ENOMEM on an unmapped range).
bool is_mapped(const void* p) {
  unsigned char vec = 0;
  void* page = reinterpret_cast<void*>(align_down(reinterpret_cast<std::uintptr_t>(p), page_size));
  return ::mincore(page, page_size, &vec) == 0;
}

TEST(HostMapping, DefaultIsEmpty) {
  host_mapping m;
  EXPECT_FALSE(m);
  EXPECT_EQ(m.data(), nullptr);
  EXPECT_EQ(m.size(), 0u);
}

TEST(HostMapping, RejectsBadSizes) {
  EXPECT_EQ(host_mapping::anonymous(0).code(), memory_errc::bad_size);
  EXPECT_EQ(host_mapping::anonymous(page_size + 1).code(), memory_errc::bad_size);
  EXPECT_EQ(host_mapping::anonymous(100).code(), memory_errc::bad_size);
  // size + two guard pages wraps 2^64.
  EXPECT_EQ(host_mapping::anonymous(~0ull - page_size + 1).code(), memory_errc::bad_size);
}

TEST(HostMapping, ReportsMmapFailureAsErrno) {
  // Page-aligned and no overflow, but far beyond any user address space.
  auto m = host_mapping::anonymous(1ull << 62);
  ASSERT_FALSE(m);
  EXPECT_EQ(m.code(), std::errc::not_enough_memory);
  EXPECT_NE(m.err().detail.find("mmap"), std::string::npos);
}

TEST(HostMapping, IsZeroedAndWritable) {
  auto m = host_mapping::anonymous(16 * page_size);
  ASSERT_TRUE(m) << m.err().message();
  ASSERT_TRUE(*m);
  EXPECT_EQ(m->size(), 16 * page_size);
  EXPECT_TRUE(is_aligned(reinterpret_cast<std::uintptr_t>(m->data()), page_size));
  EXPECT_TRUE(
      std::all_of(m->data(), m->data() + m->size(), [](std::byte b) { return b == std::byte{0}; }));
  std::fill(m->data(), m->data() + m->size(), std::byte{0xa5});
  EXPECT_EQ(m->data()[m->size() - 1], std::byte{0xa5});
  EXPECT_EQ(perms_at(m->data()), "rw-p");
  EXPECT_EQ(perms_at(m->data() + m->size() - 1), "rw-p");
}

TEST(HostMapping, GuardPagesAreInaccessible) {
  auto m = host_mapping::anonymous(4 * page_size, /*guards=*/true);
  ASSERT_TRUE(m);
  EXPECT_EQ(perms_at(m->data() - 1), "---p") << "guard below";
  EXPECT_EQ(perms_at(m->data() - page_size), "---p") << "guard below";
  EXPECT_EQ(perms_at(m->data() + m->size()), "---p") << "guard above";
  EXPECT_EQ(perms_at(m->data() + m->size() + page_size - 1), "---p") << "guard above";
}

TEST(HostMapping, UnmapsEverythingOnDestruction) {
  std::byte* data = nullptr;
  std::uint64_t size = 0;
  {
    auto m = host_mapping::anonymous(4 * page_size);
    ASSERT_TRUE(m);
    data = m->data();
    size = m->size();
    ASSERT_TRUE(is_mapped(data - page_size));
  }
  EXPECT_FALSE(is_mapped(data - page_size)) << "guard below";
  EXPECT_FALSE(is_mapped(data));
  EXPECT_FALSE(is_mapped(data + size)) << "guard above";
}

TEST(HostMapping, MoveTransfersOwnership) {
  auto r = host_mapping::anonymous(2 * page_size);
  ASSERT_TRUE(r);
  host_mapping a = std::move(r).value();
  std::byte* const data = a.data();
  data[0] = std::byte{7};

  host_mapping b(std::move(a));
  EXPECT_FALSE(a); // NOLINT(bugprone-use-after-move): the moved-from state is the contract
  EXPECT_EQ(a.data(), nullptr);
  EXPECT_EQ(a.size(), 0u);
  EXPECT_EQ(b.data(), data);
  EXPECT_EQ(b.size(), 2 * page_size);
  EXPECT_EQ(b.data()[0], std::byte{7});
  EXPECT_TRUE(is_mapped(data));
}

TEST(HostMapping, MoveAssignmentReleasesTheOldMapping) {
  auto first = host_mapping::anonymous(page_size);
  auto second = host_mapping::anonymous(page_size);
  ASSERT_TRUE(first && second);
  host_mapping target = std::move(first).value();
  std::byte* const old_data = target.data();
  std::byte* const new_data = second->data();

  target = std::move(second).value();
  EXPECT_EQ(target.data(), new_data);
  EXPECT_FALSE(is_mapped(old_data));
  EXPECT_TRUE(is_mapped(new_data));

  host_mapping& alias = target;
  target = std::move(alias); // self-move keeps the mapping
  EXPECT_EQ(target.data(), new_data);
  EXPECT_TRUE(is_mapped(new_data));
}

TEST(HostMapping, WorksWithoutGuards) {
  auto m = host_mapping::anonymous(2 * page_size, /*guards=*/false);
  ASSERT_TRUE(m);
  EXPECT_EQ(m->size(), 2 * page_size);
  EXPECT_EQ(perms_at(m->data()), "rw-p");
  EXPECT_EQ(perms_at(m->data() + m->size() - 1), "rw-p");
}

} // namespace
} // namespace kiln::memory
