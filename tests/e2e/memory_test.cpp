// End to end: the guest-owned memory contract (protect, release, heap) and mapped host files.
#include "backend_fixture.hpp"

#include <kiln/memory/memory_errc.hpp>

#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <vector>

namespace kiln::test {
namespace {

constexpr std::uint64_t page = 4096, mib = 1ull << 20;
using memory::memory_errc;

/// A temporary directory with files of known bytes, removed at the end.
class temp_files {
public:
  temp_files() {
    dir_ = std::filesystem::temp_directory_path() /
           ("kiln-memory-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter_++));
    std::filesystem::create_directories(dir_);
  }
  ~temp_files() {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  /// A file of `size` bytes, byte i = (i * 7 + seed) & 0xff; returns its path.
  std::string make(const std::string& name, std::uint64_t size, unsigned seed = 1) {
    std::vector<char> bytes(size);
    for (std::uint64_t i = 0; i < size; ++i)
      bytes[i] = static_cast<char>((i * 7 + seed) & 0xff);
    const auto p = (dir_ / name).string();
    std::ofstream(p, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(size));
    return p;
  }
  static std::uint64_t expected_sum(std::uint64_t size, unsigned seed = 1) {
    std::uint64_t s = 0;
    for (std::uint64_t i = 0; i < size; ++i)
      s += (i * 7 + seed) & 0xff;
    return s;
  }
  std::filesystem::path dir() const { return dir_; }

private:
  std::filesystem::path dir_;
  static inline int counter_ = 0;
};

class memory_e2e : public backend_test {
protected:
  std::unique_ptr<sandbox> make_with(sandbox_config c) {
    auto sb = sandbox::create(c);
    EXPECT_TRUE(sb) << (sb ? "" : sb.err().message());
    return sb ? std::move(*sb) : nullptr;
  }
  /// A page-aligned address in the heap that the allocator has not handed out.
  static std::uint64_t spare_heap(sandbox& sb, std::uint64_t offset_pages = 0) {
    const auto start = as<std::uint64_t>(sb.call("heap_start"));
    const auto size = as<std::uint64_t>(sb.call("heap_size"));
    return (start + size / 2 + offset_pages * page) & ~(page - 1);
  }
};

TEST_F(memory_e2e, protect_tightens_and_a_later_write_faults_with_a_named_error) {
  auto sb = make("memory_test");
  ASSERT_NE(sb, nullptr);
  const auto a = spare_heap(*sb);
  ASSERT_TRUE(sb->call("poke", a, std::int32_t{9}));
  EXPECT_EQ(as<std::int32_t>(sb->call("protect", a, page, std::int32_t{KILN_PROT_READ})),
            KILN_MEMORY_OK);
  EXPECT_EQ(as<std::int32_t>(sb->call("peek", a)), 9); // still readable
  auto w = sb->call("poke", a, std::int32_t{1});
  ASSERT_FALSE(w);
  EXPECT_EQ(w.code(), errc::memory_violation) << w.err().message();
  EXPECT_NE(w.err().message().find("read-only"), std::string::npos) << w.err().message();
  EXPECT_TRUE(sb->poisoned());
}

TEST_F(memory_e2e, protect_to_none_makes_reads_fault) {
  auto sb = make("memory_test");
  ASSERT_NE(sb, nullptr);
  const auto a = spare_heap(*sb);
  EXPECT_EQ(as<std::int32_t>(sb->call("protect", a, 2 * page, std::int32_t{KILN_PROT_NONE})),
            KILN_MEMORY_OK);
  EXPECT_EQ(as<std::int32_t>(sb->call("peek", a - page)), 0); // the neighbour is untouched
  auto r = sb->call("peek", a + page);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), errc::memory_violation) << r.err().message();
  EXPECT_NE(r.err().message().find("no access"), std::string::npos) << r.err().message();
}

TEST_F(memory_e2e, widening_and_foreign_ranges_are_refused_into_the_guest) {
  auto sb = make("memory_test");
  ASSERT_NE(sb, nullptr);
  const auto a = spare_heap(*sb);
  const auto call_protect = [&](std::uint64_t addr, std::uint64_t size, std::int32_t prot) {
    return as<std::int32_t>(sb->call("protect", addr, size, prot));
  };
  ASSERT_EQ(call_protect(a, page, KILN_PROT_READ), KILN_MEMORY_OK);
  EXPECT_EQ(call_protect(a, page, KILN_PROT_READ | KILN_PROT_WRITE), KILN_MEMORY_WIDENS);
  EXPECT_EQ(call_protect(a, page, KILN_PROT_READ | KILN_PROT_EXEC), KILN_MEMORY_WIDENS);
  EXPECT_EQ(call_protect(0x1000, page, KILN_PROT_NONE), KILN_MEMORY_NOT_OWNED);  // boot info
  EXPECT_EQ(call_protect(0xa0000, page, KILN_PROT_READ), KILN_MEMORY_NOT_OWNED); // in buffer
  EXPECT_EQ(call_protect(a + 1, page, KILN_PROT_READ), KILN_MEMORY_UNALIGNED);
  EXPECT_EQ(call_protect(a, 0, KILN_PROT_READ), KILN_MEMORY_UNALIGNED);
  EXPECT_EQ(call_protect(a, page, 8), KILN_MEMORY_BAD_REQUEST);
  EXPECT_EQ(call_protect(~0ull & ~(page - 1), 2 * page, KILN_PROT_READ), KILN_MEMORY_UNALIGNED);
  EXPECT_FALSE(sb->poisoned());
  EXPECT_EQ(as<std::int32_t>(sb->call("peek", a)), 0); // the sandbox carries on
  EXPECT_EQ(sb->stats().memory.protect_refused, 4u);
}

TEST_F(memory_e2e, redundant_requests_issue_nothing_to_the_host) {
  auto sb = make("memory_test");
  ASSERT_NE(sb, nullptr);
  const auto a = spare_heap(*sb);
  constexpr std::uint64_t pages = 64;
  ASSERT_EQ(as<std::int32_t>(sb->call("protect", a, pages * page, std::int32_t{KILN_PROT_READ})),
            KILN_MEMORY_OK);
  const auto before = sb->stats().memory;
  EXPECT_GT(before.host_syscalls, 0u);
  EXPECT_GT(before.page_table_edits, 0u);
  // The same range again, whole and then page by page: every request changes nothing.
  EXPECT_EQ(as<std::int32_t>(sb->call("protect", a, pages * page, std::int32_t{KILN_PROT_READ})),
            KILN_MEMORY_OK);
  EXPECT_EQ(
      as<std::int32_t>(sb->call("protect_pages", a, pages * page, std::int32_t{KILN_PROT_READ})),
      KILN_MEMORY_OK);
  const auto after = sb->stats().memory;
  EXPECT_EQ(after.host_syscalls, before.host_syscalls);
  EXPECT_EQ(after.backend_calls, before.backend_calls);
  EXPECT_EQ(after.page_table_edits, before.page_table_edits);
  EXPECT_EQ(after.protect_noops - before.protect_noops, pages + 1);
  EXPECT_EQ(after.protection_ranges, before.protection_ranges);
}

TEST_F(memory_e2e, without_bookkeeping_every_request_reaches_the_host) {
  auto c = config_for("memory_test");
  c.memory_bookkeeping = false;
  auto sb = make_with(c);
  ASSERT_NE(sb, nullptr);
  const auto a = spare_heap(*sb);
  constexpr std::uint64_t pages = 16;
  ASSERT_EQ(as<std::int32_t>(sb->call("protect", a, pages * page, std::int32_t{KILN_PROT_READ})),
            KILN_MEMORY_OK);
  const auto before = sb->stats().memory;
  EXPECT_EQ(
      as<std::int32_t>(sb->call("protect_pages", a, pages * page, std::int32_t{KILN_PROT_READ})),
      KILN_MEMORY_OK);
  const auto after = sb->stats().memory;
  EXPECT_EQ(after.host_syscalls - before.host_syscalls, pages);
  EXPECT_EQ(after.page_table_edits, before.page_table_edits); // the editor compares anyway
}

TEST_F(memory_e2e, the_range_cap_answers_limit_and_keeps_earlier_changes) {
  auto c = config_for("memory_test");
  c.max_protection_ranges = 6;
  auto sb = make_with(c);
  ASSERT_NE(sb, nullptr);
  const auto a = spare_heap(*sb);
  std::int32_t last = KILN_MEMORY_OK;
  int served = 0;
  for (int i = 0; i < 10 && last == KILN_MEMORY_OK; ++i) {
    last = as<std::int32_t>(sb->call("protect", a + 2 * page * static_cast<std::uint64_t>(i), page,
                                     std::int32_t{KILN_PROT_READ}));
    served += last == KILN_MEMORY_OK;
  }
  EXPECT_EQ(last, KILN_MEMORY_LIMIT);
  EXPECT_GE(served, 2);
  EXPECT_FALSE(sb->poisoned());
  EXPECT_EQ(as<std::int32_t>(sb->call("peek", a)), 0);
  auto w = sb->call("poke", a, std::int32_t{1}); // the first page is still read-only
  EXPECT_EQ(w.code(), errc::memory_violation);
}

TEST_F(memory_e2e, released_pages_read_zero_and_leave_resident_memory) {
  auto sb = make("memory_test");
  ASSERT_NE(sb, nullptr);
  const auto a = spare_heap(*sb);
  constexpr std::uint64_t size = 256 * page;
  ASSERT_TRUE(sb->call("touch", a, size, std::int64_t{5}));
  EXPECT_EQ(as<std::uint64_t>(sb->call("sum_pages", a, size)), 5u * 256);
  const auto resident_before = sb->resident_bytes();
  ASSERT_TRUE(resident_before);
  EXPECT_EQ(as<std::int32_t>(sb->call("release", a, size)), KILN_MEMORY_OK);
  // Measured before the guest reads them again: a read maps the kernel's zero page on most
  // hosts, but some kernels (this project's build machine's, for one) allocate a page instead.
  const auto resident_after = sb->resident_bytes();
  ASSERT_TRUE(resident_after);
  EXPECT_LE(*resident_after + size, *resident_before);
  EXPECT_EQ(as<std::uint64_t>(sb->call("sum_pages", a, size)), 0u);
  const auto m = sb->stats().memory;
  EXPECT_EQ(m.release_requests, 1u);
  EXPECT_EQ(m.released_bytes, size);
  // Released pages stay mapped and writable.
  ASSERT_TRUE(sb->call("touch", a, size, std::int64_t{2}));
  EXPECT_EQ(as<std::uint64_t>(sb->call("sum_pages", a, size)), 2u * 256);
}

TEST_F(memory_e2e, release_of_protected_or_foreign_pages_is_refused) {
  auto sb = make("memory_test");
  ASSERT_NE(sb, nullptr);
  const auto a = spare_heap(*sb);
  ASSERT_EQ(as<std::int32_t>(sb->call("protect", a, page, std::int32_t{KILN_PROT_READ})),
            KILN_MEMORY_OK);
  EXPECT_EQ(as<std::int32_t>(sb->call("release", a, 2 * page)), KILN_MEMORY_NOT_WRITABLE);
  EXPECT_EQ(as<std::int32_t>(sb->call("release", std::uint64_t{0x100000}, page)),
            KILN_MEMORY_NOT_OWNED); // the image
  EXPECT_FALSE(sb->poisoned());
}

TEST_F(memory_e2e, heap_contract_sizes_reuse_and_clean_exhaustion) {
  auto c = config_for("memory_test");
  c.memory_size = 32 * mib;
  c.heap_size = 8 * mib;
  c.stack_size = 128 * 1024;
  auto sb = make_with(c);
  ASSERT_NE(sb, nullptr);
  EXPECT_EQ(as<std::uint64_t>(sb->call("heap_size")), 8 * mib);
  EXPECT_EQ(as<std::uint64_t>(sb->call("stack_top")) - as<std::uint64_t>(sb->call("stack_bottom")),
            128u * 1024);
  const auto got = as<std::uint64_t>(sb->call("exhaust", 256 * 1024ull));
  EXPECT_GT(got, 7 * mib);
  EXPECT_LE(got, 8 * mib);
  // Everything was freed: the same again succeeds just as far.
  EXPECT_EQ(as<std::uint64_t>(sb->call("exhaust", 256 * 1024ull)), got);
  EXPECT_TRUE(as<bool>(sb->call("realloc_check")));
  EXPECT_TRUE(as<bool>(sb->call("aligned_check")));
  EXPECT_FALSE(sb->poisoned());
}

TEST_F(memory_e2e, large_frees_are_handed_back) {
  auto c = config_for("memory_test");
  c.memory_size = 96 * mib;
  auto sb = make_with(c);
  ASSERT_NE(sb, nullptr);
  const auto before = sb->resident_bytes();
  ASSERT_TRUE(before);
  const auto released = as<std::uint64_t>(sb->call("alloc_free", 64 * mib, std::int32_t{2}));
  EXPECT_GE(released, 2 * 60 * mib);
  const auto after = sb->resident_bytes();
  ASSERT_TRUE(after);
  EXPECT_LT(*after, *before + 8 * mib) << "resident before " << *before << ", after " << *after;
  const auto m = sb->stats().memory;
  EXPECT_EQ(m.released_bytes, released);
  EXPECT_EQ(m.release_requests, as<std::uint64_t>(sb->call("heap_release_calls")));
}

TEST_F(memory_e2e, files_mapped_at_create_are_found_by_name) {
  temp_files tmp;
  const std::uint64_t size = 3 * page + 100;
  auto c = config_for("memory_test");
  c.files.push_back({tmp.make("data.bin", size), "", 0});
  c.files.push_back({tmp.make("other", 10, 3), "second", 0});
  auto sb = make_with(c);
  ASSERT_NE(sb, nullptr);
  EXPECT_EQ(as<std::int32_t>(sb->call("file_count")), 2);
  EXPECT_EQ(as<std::string>(sb->call("file_name", std::int32_t{0})), "data.bin");
  EXPECT_EQ(as<std::int64_t>(sb->call("file_size", std::string("data.bin"))),
            static_cast<std::int64_t>(size));
  EXPECT_EQ(as<std::uint64_t>(sb->call("file_sum", std::string("data.bin"))),
            temp_files::expected_sum(size));
  EXPECT_EQ(as<std::uint64_t>(sb->call("file_sum", std::string("second"))),
            temp_files::expected_sum(10, 3));
  EXPECT_EQ(as<std::int32_t>(sb->call("file_byte", std::string("data.bin"), size - 1)),
            static_cast<std::int32_t>(((size - 1) * 7 + 1) & 0xff));
  EXPECT_EQ(as<std::int32_t>(sb->call("file_byte", std::string("data.bin"), size)), -1);
  EXPECT_EQ(as<std::int64_t>(sb->call("file_size", std::string("missing"))), -1);
  const auto files = sb->mapped_files();
  ASSERT_EQ(files.size(), 2u);
  EXPECT_EQ(files[0].guest_address % (2 * mib), 0u);
  EXPECT_EQ(sb->stats().memory.files_mapped, 2u);
}

TEST_F(memory_e2e, a_write_into_a_mapped_file_faults_with_a_named_error) {
  temp_files tmp;
  auto c = config_for("memory_test");
  c.files.push_back({tmp.make("ro", page), "", 0});
  auto sb = make_with(c);
  ASSERT_NE(sb, nullptr);
  auto w = sb->call("file_write", std::string("ro"));
  ASSERT_FALSE(w);
  EXPECT_EQ(w.code(), errc::memory_violation) << w.err().message();
  EXPECT_NE(w.err().message().find("mapped file 'ro'"), std::string::npos) << w.err().message();
  // The file on disk is untouched.
  std::ifstream in(tmp.dir() / "ro", std::ios::binary);
  char first = 0;
  in.read(&first, 1);
  EXPECT_EQ(first, 1);
}

TEST_F(memory_e2e, map_and_unmap_between_calls) {
  temp_files tmp;
  auto sb = make("memory_test");
  ASSERT_NE(sb, nullptr);
  EXPECT_EQ(as<std::int32_t>(sb->call("file_count")), 0);
  const std::uint64_t size = 5 * mib + 123;
  auto info = sb->map_file({tmp.make("big", size, 9), "big", 0});
  ASSERT_TRUE(info) << info.err().message();
  EXPECT_EQ(info->size, size);
  EXPECT_EQ(as<std::uint64_t>(sb->call("file_sum", std::string("big"))),
            temp_files::expected_sum(size, 9));
  const auto edits_mapped = sb->stats().memory.page_table_edits;
  EXPECT_GT(edits_mapped, 0u);
  ASSERT_TRUE(sb->unmap_file("big"));
  EXPECT_EQ(as<std::int64_t>(sb->call("file_size", std::string("big"))), -1);
  EXPECT_EQ(sb->unmap_file("big").code(), memory_errc::file_not_mapped);
  // The old address is gone from the guest.
  auto r = sb->call("peek", info->guest_address);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), errc::memory_violation) << r.err().message();
  EXPECT_NE(r.err().message().find("no file is mapped there"), std::string::npos)
      << r.err().message();
}

TEST_F(memory_e2e, mapping_errors_are_typed_and_change_nothing) {
  temp_files tmp;
  auto c = config_for("memory_test");
  c.file_room = 4 * mib;
  auto sb = make_with(c);
  ASSERT_NE(sb, nullptr);
  const auto small = tmp.make("small", page);
  EXPECT_EQ(sb->map_file({(tmp.dir() / "nope").string(), "", 0}).code(),
            std::make_error_code(std::errc::no_such_file_or_directory));
  EXPECT_EQ(sb->map_file({tmp.dir().string(), "dir", 0}).code(), memory_errc::file_not_regular);
  EXPECT_EQ(sb->map_file({tmp.make("empty", 0), "", 0}).code(), memory_errc::file_empty);
  EXPECT_EQ(sb->map_file({tmp.make("huge", 5 * mib), "", 0}).code(), memory_errc::file_too_large);
  EXPECT_EQ(sb->map_file({small, std::string(80, 'x'), 0}).code(), memory_errc::file_name_invalid);
  auto first = sb->map_file({small, "a", 0});
  ASSERT_TRUE(first) << first.err().message();
  EXPECT_EQ(sb->map_file({small, "a", 0}).code(), memory_errc::file_name_invalid);
  EXPECT_EQ(sb->map_file({small, "b", first->guest_address}).code(),
            memory_errc::overlapping_region);
  EXPECT_EQ(sb->map_file({small, "c", first->guest_address + 1}).code(), memory_errc::unaligned);
  EXPECT_EQ(sb->map_file({small, "d", 0x1000}).code(), memory_errc::out_of_bounds);
  auto second = sb->map_file({small, "b", 0}); // the next free 2 MiB slot
  ASSERT_TRUE(second) << second.err().message();
  EXPECT_EQ(second->guest_address, first->guest_address + 2 * mib);
  EXPECT_EQ(as<std::int32_t>(sb->call("file_count")), 2);
  EXPECT_FALSE(sb->poisoned());
}

TEST_F(memory_e2e, a_file_truncated_after_mapping_fails_only_its_sandbox) {
  temp_files tmp;
  const auto path = tmp.make("shrinking", 8 * page);
  auto c = config_for("memory_test");
  c.files.push_back({path, "f", 0});
  auto victim = make_with(c);
  auto bystander = make_with(c);
  ASSERT_NE(victim, nullptr);
  ASSERT_NE(bystander, nullptr);
  ASSERT_EQ(as<std::uint64_t>(victim->call("file_touch_pages", std::string("f"))), 8u);
  ASSERT_EQ(::truncate(path.c_str(), static_cast<off_t>(page)), 0);
  auto r = victim->call("file_sum", std::string("f"));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), errc::memory_violation) << r.err().message();
  EXPECT_NE(r.err().message().find("truncated"), std::string::npos) << r.err().message();
  EXPECT_TRUE(victim->poisoned());
  // Another sandbox goes on with the pages that are left, and with its own memory.
  EXPECT_EQ(as<std::int32_t>(bystander->call("file_byte", std::string("f"), std::uint64_t{5})), 36);
  EXPECT_EQ(as<std::uint64_t>(bystander->call("heap_start")) % (2 * mib), 0u);
}

} // namespace
} // namespace kiln::test
