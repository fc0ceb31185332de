// Tests for memory/address_space.hpp: the guest's requests, mapped files and snapshots keep RAM,
// protections, page tables, the file table and the guest's view in step. The view here writes
// down what it is told; the real ones (both vCPU backends) run the same paths in the e2e tests.
#include <kiln/memory/address_space.hpp>
#include <kiln/memory/layout.hpp>
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/x86_64/page_tables.hpp>

#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

namespace kiln::memory {
namespace {

namespace fs = std::filesystem;
constexpr std::uint64_t mib = 1ull << 20;
constexpr std::uint64_t size = 16 * mib, room = 8 * mib, stack_size = 256 * 1024;
constexpr guest_phys_addr heap_at{2 * mib};

/// A guest_view that writes down what the address space tells it.
struct told_view final : guest_view {
  struct protect_call {
    std::uint64_t gpa, size;
    protection p;
  };
  std::vector<protect_call> protects;
  std::vector<std::size_t> maps; // the region count each map_memory saw

  result<void> map_memory(const guest_memory& mem) override {
    maps.push_back(mem.regions().size());
    return {};
  }
  result<void> protect(guest_phys_addr gpa, std::uint64_t len, protection p) override {
    protects.push_back({gpa.value, len, p});
    return {};
  }
};

region make(std::string name, region_kind kind, std::uint64_t start, std::uint64_t len,
            protection prot, bool visible = true) {
  return region{std::move(name), kind, guest_phys_addr{start}, len, prot, visible};
}

kiln_memory_request request(std::uint32_t op, std::uint64_t addr, std::uint64_t len,
                            protection p = protection::none) {
  kiln_memory_request r{};
  r.op = op;
  r.prot = static_cast<std::uint32_t>(p);
  r.addr = addr;
  r.size = len;
  return r;
}

// A sandbox-like address space: kiln's fixed low pages, an image, a heap from 2 MiB to 12 MiB,
// the stack at the top of RAM, the page tables, and a file room of 8 MiB above RAM.
class AddressSpace : public ::testing::Test {
protected:
  void SetUp() override {
    std::string t = (fs::temp_directory_path() / "kiln-space-XXXXXX").string();
    ASSERT_NE(::mkdtemp(t.data()), nullptr);
    dir_ = t;
    auto m = guest_memory::create(size, room);
    ASSERT_TRUE(m) << m.err().message();
    using enum region_kind;
    for (auto r :
         {make("boot_info", boot_info, fixed::boot_info.value, fixed::boot_info_size, prot_r),
          make("system", system_tables, fixed::system_tables.value, fixed::system_tables_size,
               prot_r),
          make("io_in", io_in, fixed::io_in.value, fixed::io_buffer_size, prot_rw),
          make("io_out", io_out, fixed::io_out.value, fixed::io_buffer_size, prot_rw),
          make("image", image, 0x100000, 0x2000, prot_rx),
          make("heap", region_kind::heap, heap_at.value, 10 * mib, prot_rw),
          make("stack", stack, size - stack_size, stack_size, prot_rw)})
      ASSERT_TRUE(m->add_region(r)) << r.name;
    auto img = x86_64::build_identity_page_tables(*m, fixed::page_tables, fixed::page_tables_max,
                                                  /*nx=*/true);
    ASSERT_TRUE(img) << img.err().message();
    ASSERT_TRUE(m->add_region(make("page_tables", page_tables, fixed::page_tables.value,
                                   fixed::page_tables_max, prot_r, /*visible=*/false)));
    ASSERT_TRUE(m->write(fixed::page_tables, std::as_bytes(std::span(img->entries))));
    space_.emplace(std::move(*m), /*bookkeeping=*/true);
    space_->attach(view_, nullptr, nullptr);
    ASSERT_TRUE(space_->init_fresh(*img, /*nx=*/true, /*extra_ranges=*/16));
  }
  void TearDown() override {
    space_.reset();
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  std::uint32_t serve(const kiln_memory_request& r) {
    auto s = space_->serve(r);
    EXPECT_TRUE(s) << s.err().message();
    return s ? *s : ~0u;
  }
  std::string file(const std::string& name, std::uint64_t bytes) {
    const auto path = (dir_ / name).string();
    std::ofstream(path) << std::string(bytes, 'f');
    return path;
  }
  std::uint64_t file_count() {
    auto n = space_->ram().read_object<std::uint64_t>(fixed::boot_info +
                                                      offsetof(kiln_boot_info, file_count));
    EXPECT_TRUE(n);
    return n ? *n : ~0ull;
  }

  fs::path dir_;
  told_view view_;
  std::optional<address_space> space_;
};

TEST_F(AddressSpace, ProtectTightensTheBookkeepingAndTellsTheView) {
  const std::uint64_t page = heap_at.value + 4 * page_size;
  EXPECT_EQ(serve(request(KILN_MEMORY_PROTECT, page, page_size, prot_r)), KILN_MEMORY_OK);
  EXPECT_EQ(space_->protections().at(guest_phys_addr{page}), prot_r);
  ASSERT_EQ(view_.protects.size(), 1u);
  EXPECT_EQ(view_.protects[0].gpa, page);
  EXPECT_EQ(view_.protects[0].p, prot_r);
  EXPECT_GT(space_->page_table_edits(), 0u);
  EXPECT_EQ(space_->counters().protect_requests, 1u);
  // A write there is named for what the guest did.
  auto why = space_->describe_fault(page, /*write=*/true, /*fetch=*/false, 0x1234);
  ASSERT_TRUE(why);
  EXPECT_NE(why->find("a page the guest made read-only"), std::string::npos) << *why;

  // Asking again changes nothing and costs nothing.
  EXPECT_EQ(serve(request(KILN_MEMORY_PROTECT, page, page_size, prot_r)), KILN_MEMORY_OK);
  EXPECT_EQ(space_->counters().protect_noops, 1u);
  EXPECT_EQ(view_.protects.size(), 1u);
}

TEST_F(AddressSpace, RequestsTheGuestMayNotMakeAreRefusedAndChangeNothing) {
  const std::uint64_t page = heap_at.value;
  ASSERT_EQ(serve(request(KILN_MEMORY_PROTECT, page, page_size, prot_r)), KILN_MEMORY_OK);
  EXPECT_EQ(serve(request(KILN_MEMORY_PROTECT, page, page_size, prot_rw)), KILN_MEMORY_WIDENS);
  EXPECT_EQ(serve(request(KILN_MEMORY_RELEASE, page, page_size)), KILN_MEMORY_NOT_WRITABLE);
  EXPECT_EQ(serve(request(KILN_MEMORY_PROTECT, fixed::io_in.value, page_size, prot_r)),
            KILN_MEMORY_NOT_OWNED);
  EXPECT_EQ(serve(request(KILN_MEMORY_RELEASE, 0x100000, page_size)), KILN_MEMORY_NOT_OWNED);
  EXPECT_EQ(serve(request(KILN_MEMORY_PROTECT, page + 1, page_size, prot_r)),
            KILN_MEMORY_UNALIGNED);
  EXPECT_EQ(serve(request(KILN_MEMORY_PROTECT, page, 0, prot_r)), KILN_MEMORY_UNALIGNED);
  EXPECT_EQ(serve(request(KILN_MEMORY_PROTECT, ~0ull & ~(page_size - 1), 2 * page_size, prot_r)),
            KILN_MEMORY_UNALIGNED);
  EXPECT_EQ(serve(request(9, page, page_size)), KILN_MEMORY_BAD_REQUEST);
  EXPECT_EQ(serve(request(KILN_MEMORY_PROTECT, page, page_size, static_cast<protection>(8))),
            KILN_MEMORY_BAD_REQUEST);
  EXPECT_EQ(space_->protections().at(guest_phys_addr{page}), prot_r);
  EXPECT_EQ(view_.protects.size(), 1u);
  EXPECT_EQ(space_->counters().protect_refused, 2u); // the widening and the I/O buffer
}

TEST_F(AddressSpace, ReleaseDiscardsTheGuestsPages) {
  const guest_phys_addr page = heap_at + 8 * page_size;
  const char text[] = "handed back";
  ASSERT_TRUE(space_->ram().write(page, std::as_bytes(std::span(text))));
  EXPECT_EQ(serve(request(KILN_MEMORY_RELEASE, page.value, page_size)), KILN_MEMORY_OK);
  auto first = space_->ram().read_object<std::uint64_t>(page);
  ASSERT_TRUE(first);
  EXPECT_EQ(*first, 0u);
  EXPECT_EQ(space_->counters().released_bytes, page_size);
}

TEST_F(AddressSpace, AMappedFileIsInTheTableTheRegionsAndTheView) {
  const auto path = file("data.bin", 5000);
  auto f = space_->map_file(path, "", 0);
  ASSERT_TRUE(f) << f.err().message();
  EXPECT_EQ((*f)->name, "data.bin");
  EXPECT_GE((*f)->addr.value, size);
  EXPECT_EQ((*f)->addr.value % (2 * mib), 0u);
  EXPECT_EQ(file_count(), 1u);
  ASSERT_FALSE(view_.maps.empty());
  const std::size_t regions_mapped = view_.maps.back();
  auto entry =
      space_->ram().read_object<kiln_file_entry>(fixed::boot_info + fixed::file_table_offset);
  ASSERT_TRUE(entry);
  EXPECT_STREQ(entry->name, "data.bin");
  EXPECT_EQ(entry->size, 5000u);
  auto byte = space_->ram().read_object<char>(guest_phys_addr{entry->addr});
  ASSERT_TRUE(byte);
  EXPECT_EQ(*byte, 'f');
  auto why = space_->describe_fault(entry->addr, /*write=*/true, /*fetch=*/false, 0);
  ASSERT_TRUE(why);
  EXPECT_NE(why->find("read-only mapped file 'data.bin'"), std::string::npos) << *why;

  ASSERT_TRUE(space_->unmap_file("data.bin"));
  EXPECT_EQ(file_count(), 0u);
  EXPECT_TRUE(space_->files().empty());
  EXPECT_EQ(view_.maps.back(), regions_mapped - 1);
  EXPECT_EQ(space_->unmap_file("data.bin").code(), memory_errc::file_not_mapped);
  EXPECT_EQ(space_->counters().files_mapped, 1u);
  EXPECT_EQ(space_->counters().files_unmapped, 1u);
}

TEST_F(AddressSpace, AFileThatCannotBeMappedLeavesNothingBehind) {
  const std::size_t regions = space_->ram().regions().size();
  EXPECT_FALSE(space_->map_file((dir_ / "missing").string(), "", 0));
  EXPECT_EQ(space_->map_file(file("big", room + 1), "", 0).code(), memory_errc::file_too_large);
  EXPECT_EQ(space_->map_file(file("odd", 10), "", size + 1).code(), memory_errc::unaligned);
  EXPECT_TRUE(space_->files().empty());
  EXPECT_EQ(space_->ram().regions().size(), regions);
  EXPECT_EQ(file_count(), 0u);
  EXPECT_EQ(space_->counters().files_mapped, 0u);
}

TEST_F(AddressSpace, RestoreBringsBytesProtectionsAndFilesBack) {
  const guest_phys_addr a = heap_at, b = heap_at + 16 * page_size;
  ASSERT_TRUE(space_->ram().write_object(a, std::uint64_t{0x5eed}));
  ASSERT_EQ(serve(request(KILN_MEMORY_PROTECT, b.value, page_size, prot_r)), KILN_MEMORY_OK);
  ASSERT_TRUE(space_->map_file(file("kept", 100), "", 0));
  auto image = space_->capture();
  ASSERT_TRUE(image) << image.err().message();
  ASSERT_TRUE(space_->rebase(*image));
  const protection_map prot = space_->protections();
  const auto tables = space_->saved_tables();
  const auto files = space_->saved_files();
  std::vector<region> ram;
  for (const auto& r : space_->ram().regions())
    if (r.kind != region_kind::file) ram.push_back(r);
  ASSERT_TRUE(space_->same_layout(ram, size, room));
  EXPECT_FALSE(space_->same_layout(ram, size, room + 2 * mib));

  // The guest moves on: a byte changes, a page is tightened further, the file goes.
  ASSERT_TRUE(space_->ram().write_object(a, std::uint64_t{0xbad}));
  ASSERT_EQ(serve(request(KILN_MEMORY_PROTECT, b.value, page_size, protection::none)),
            KILN_MEMORY_OK);
  ASSERT_TRUE(space_->unmap_file("kept"));

  EXPECT_FALSE(space_->restore_remaps(image->get()));
  auto back = space_->restore({*image, ram, prot, tables, files, /*nx=*/true}, /*nx=*/true);
  ASSERT_TRUE(back) << back.err().message();
  EXPECT_FALSE(back->remapped);
  EXPECT_GE(back->pages, 1u);
  auto v = space_->ram().read_object<std::uint64_t>(a);
  ASSERT_TRUE(v);
  EXPECT_EQ(*v, 0x5eedu);
  EXPECT_EQ(space_->protections().at(b), prot_r);
  EXPECT_EQ(view_.protects.back().p, prot_r); // the view was told of the loosening back
  ASSERT_EQ(space_->files().size(), 1u);
  EXPECT_EQ(space_->files()[0].name, "kept");
  EXPECT_EQ(file_count(), 1u);
}

TEST_F(AddressSpace, TheFilesSectionRoundTripsAndRefusesFilesOutsideTheRoom) {
  ASSERT_TRUE(space_->map_file(file("a", 10), "first", 0));
  ASSERT_TRUE(space_->map_file(file("b", 3 * page_size), "second", 0));
  const auto files = space_->saved_files();
  byte_writer w;
  encode_saved_files(w, files);
  const auto bytes = w.take();
  const std::error_code corrupt = memory_errc::snapshot_corrupt;
  byte_reader r(bytes, corrupt, "files section");
  auto back = decode_saved_files(r, size, room);
  ASSERT_TRUE(back) << back.err().message();
  ASSERT_EQ(back->size(), 2u);
  EXPECT_EQ((*back)[1].name, "second");
  EXPECT_EQ((*back)[1].addr, files[1].addr);
  EXPECT_EQ((*back)[1].identity.inode, files[1].identity.inode);
  byte_reader small(bytes, corrupt, "files section");
  EXPECT_EQ(decode_saved_files(small, size, 2 * mib).code(), memory_errc::snapshot_corrupt)
      << "the second file lies past a 2 MiB room";
}

} // namespace
} // namespace kiln::memory
