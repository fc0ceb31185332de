// Tests for memory/x86_64/page_tables.hpp: walks the built tables the way the CPU's walker does.
#include <kiln/memory/layout.hpp>
#include <kiln/memory/x86_64/page_tables.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <optional>

namespace kiln::memory::x86_64 {
namespace {

constexpr std::uint64_t mib = 1ull << 20, gib = 1ull << 30;
constexpr std::uint64_t p_bit = 1ull << 0, rw_bit = 1ull << 1, a_bit = 1ull << 5, d_bit = 1ull << 6,
                        ps_bit = 1ull << 7, nx_bit = 1ull << 63;
constexpr std::uint64_t addr_mask = 0x000f'ffff'ffff'f000ull;
constexpr std::uint64_t large_addr_mask = 0x000f'ffff'ffe0'0000ull;

struct leaf {
  std::uint64_t phys = 0;
  bool writable = false; // RW on every level
  bool nx = false;       // NX on any level
  bool large = false;    // a 2 MiB PDE leaf
  std::uint64_t entry = 0;
};

/// The translation of `va` through `img` as a CPU computes it, or nullopt where a level is not
/// present. A table pointer that leads outside the image is a test failure.
std::optional<leaf> walk(const page_table_image& img, std::uint64_t va) {
  leaf out;
  out.writable = true;
  auto next = [&](std::uint64_t entry_or_root, unsigned shift) -> std::optional<std::uint64_t> {
    const std::uint64_t table = entry_or_root & addr_mask;
    const std::uint64_t index = (table - img.root.value) / page_size;
    if (table < img.root.value || (index + 1) * 512 > img.entries.size()) {
      ADD_FAILURE() << "table pointer " << std::hex << table << " outside the image";
      return std::nullopt;
    }
    const std::uint64_t e = img.entries[index * 512 + ((va >> shift) & 511)];
    if (!(e & p_bit)) return std::nullopt;
    out.writable = out.writable && (e & rw_bit);
    out.nx = out.nx || (e & nx_bit);
    return e;
  };
  auto pml4e = next(img.root.value, 39);
  if (!pml4e) return std::nullopt;
  auto pdpte = next(*pml4e, 30);
  if (!pdpte) return std::nullopt;
  if (*pdpte & ps_bit) {
    ADD_FAILURE() << "unexpected 1 GiB page";
    return std::nullopt;
  }
  auto pde = next(*pdpte, 21);
  if (!pde) return std::nullopt;
  if (*pde & ps_bit) {
    out.large = true;
    out.entry = *pde;
    out.phys = (*pde & large_addr_mask) | (va & (large_page_size - 1));
    return out;
  }
  auto pte = next(*pde, 12);
  if (!pte) return std::nullopt;
  out.entry = *pte;
  out.phys = (*pte & addr_mask) | (va & (page_size - 1));
  return out;
}

region make(std::string name, region_kind kind, std::uint64_t start, std::uint64_t size,
            protection prot, bool visible = true) {
  return region{std::move(name), kind, guest_phys_addr{start}, size, prot, visible};
}

// A sandbox-like memory: the fixed low pages, a two-segment image, a region without rights, a
// heap that starts mid-chunk and then covers four whole 2 MiB chunks, and the stack at the top.
class PageTables : public ::testing::Test {
protected:
  static constexpr std::uint64_t heap_start = 3 * mib, heap_end = 12 * mib;
  static constexpr std::uint64_t stack_start = 16 * mib - 256 * 1024;

  void SetUp() override {
    auto m = guest_memory::create(16 * mib);
    ASSERT_TRUE(m);
    mem_.emplace(std::move(m).value());
    using enum region_kind;
    for (auto r : {make("boot_info", boot_info, 0x1000, 0x1000, prot_r),
                   make("system", system_tables, 0x2000, 0x1000, prot_r),
                   make("page_tables", page_tables, 0x10000, fixed::page_tables_max, prot_r, false),
                   make("ist", ist_stack, 0x90000, 0x10000, prot_rw),
                   make("io_in", io_in, 0xa0000, 0x10000, prot_rw),
                   make("io_out", io_out, 0xb0000, 0x10000, prot_rw),
                   make("image.0", image, 0x100000, 0x1000, prot_rx),
                   make("image.1", image, 0x101000, 0x2000, prot_rw),
                   make("no_rights", image, 0x110000, 0x1000, protection::none),
                   make("heap", heap, heap_start, heap_end - heap_start, prot_rw),
                   make("stack", stack, stack_start, 16 * mib - stack_start, prot_rw)})
      ASSERT_TRUE(mem_->add_region(r)) << r.name;
  }

  page_table_image build(bool use_nx, std::uint64_t max_bytes = fixed::page_tables_max) {
    auto img = build_identity_page_tables(*mem_, fixed::page_tables, max_bytes, use_nx);
    EXPECT_TRUE(img) << img.err().message();
    return img ? std::move(img).value() : page_table_image{};
  }

  std::optional<guest_memory> mem_;
};

TEST_F(PageTables, EveryPageMatchesItsRegion) {
  for (bool use_nx : {false, true}) {
    SCOPED_TRACE(use_nx ? "with NX" : "without NX");
    const auto img = build(use_nx);
    for (std::uint64_t page = 0; page < mem_->size(); page += page_size) {
      const std::uint64_t va = page + 0x567;
      const region* r = mem_->find(guest_phys_addr{page});
      const bool mapped = r && r->guest_visible && r->prot != protection::none;
      const auto t = walk(img, va);
      ASSERT_EQ(t.has_value(), mapped) << std::hex << "page 0x" << page;
      if (!t) continue;
      EXPECT_EQ(t->phys, va) << std::hex << "identity at 0x" << va;
      EXPECT_EQ(t->writable, has(r->prot, protection::write)) << std::hex << page;
      EXPECT_EQ(t->nx, use_nx && !has(r->prot, protection::exec)) << std::hex << page;
      EXPECT_TRUE(t->entry & a_bit) << "accessed preset at " << std::hex << page;
      EXPECT_TRUE(t->entry & d_bit) << "dirty preset at " << std::hex << page;
      const std::uint64_t chunk = align_down(page, large_page_size);
      const bool whole_chunk = r->start.value <= chunk && r->end().value >= chunk + large_page_size;
      EXPECT_EQ(t->large, whole_chunk) << std::hex << page;
    }
  }
}

TEST_F(PageTables, SampleAddresses) {
  const auto img = build(/*use_nx=*/true);
  EXPECT_FALSE(walk(img, 0)) << "null page";
  EXPECT_FALSE(walk(img, 0xfff));
  EXPECT_FALSE(walk(img, 0x3000)) << "gap after the system page";
  EXPECT_FALSE(walk(img, 0x10000)) << "page tables are invisible to the guest";
  EXPECT_FALSE(walk(img, 0x7e000));
  EXPECT_FALSE(walk(img, 0x8f000)) << "IST guard";
  EXPECT_FALSE(walk(img, 0x110000)) << "region without rights";
  EXPECT_FALSE(walk(img, 0x2ff000)) << "just below the heap";
  EXPECT_FALSE(walk(img, heap_end)) << "just past the heap";
  EXPECT_FALSE(walk(img, stack_start - page_size)) << "stack guard";
  EXPECT_FALSE(walk(img, 16 * mib)) << "past guest memory";
  EXPECT_FALSE(walk(img, 1 * gib));

  auto boot = walk(img, 0x1008);
  ASSERT_TRUE(boot);
  EXPECT_FALSE(boot->writable);
  EXPECT_TRUE(boot->nx);
  EXPECT_FALSE(boot->large);

  auto text = walk(img, 0x100010);
  ASSERT_TRUE(text);
  EXPECT_FALSE(text->writable);
  EXPECT_FALSE(text->nx);

  auto data = walk(img, 0x102fff);
  ASSERT_TRUE(data);
  EXPECT_TRUE(data->writable);
  EXPECT_TRUE(data->nx);
  EXPECT_FALSE(walk(img, 0x103000));

  auto heap_small = walk(img, heap_start);
  ASSERT_TRUE(heap_small);
  EXPECT_FALSE(heap_small->large) << "the heap's first chunk is shared with a gap";
  auto heap_large = walk(img, 4 * mib + 0x12345);
  ASSERT_TRUE(heap_large);
  EXPECT_TRUE(heap_large->large);
  EXPECT_EQ(heap_large->phys, 4 * mib + 0x12345);
  EXPECT_TRUE(heap_large->writable);
  EXPECT_TRUE(heap_large->nx);
  auto heap_last = walk(img, heap_end - 1);
  ASSERT_TRUE(heap_last);
  EXPECT_TRUE(heap_last->large);

  auto stack_top = walk(img, 16 * mib - 8);
  ASSERT_TRUE(stack_top);
  EXPECT_TRUE(stack_top->writable);
  EXPECT_FALSE(stack_top->large);
}

TEST_F(PageTables, CountsAndSizeMatchTheLayout) {
  const auto img = build(true);
  EXPECT_EQ(img.root, fixed::page_tables);
  EXPECT_EQ(img.large_pages, 4u) << "[4, 12) MiB of heap";
  // Chunk 0: 1+1+16+16+16+1+2 pages; [3, 4) MiB of heap: 256; the stack: 64.
  EXPECT_EQ(img.small_pages, 53u + 256u + 64u);
  // PML4, PDPT, one PD, and a page table for each of chunks 0, 1 and 7.
  EXPECT_EQ(img.entries.size(), 6u * 512u);
  EXPECT_EQ(img.bytes(), 6u * page_size);
}

TEST_F(PageTables, UpperLevelsOnlyPointDown) {
  const auto img = build(true);
  const std::uint64_t root = fixed::page_tables.value;
  EXPECT_EQ(img.entries[0] & addr_mask, root + page_size) << "PML4[0] -> PDPT";
  EXPECT_EQ(img.entries[512] & addr_mask, root + 2 * page_size) << "PDPT[0] -> PD";
  for (std::uint64_t e : {img.entries[0], img.entries[512]}) {
    EXPECT_TRUE(e & p_bit);
    EXPECT_TRUE(e & rw_bit) << "upper levels leave write rights to the leaf";
    EXPECT_FALSE(e & nx_bit) << "upper levels leave execute rights to the leaf";
    EXPECT_FALSE(e & ps_bit);
  }
  for (std::size_t i = 1; i < 512; ++i) {
    EXPECT_EQ(img.entries[i], 0u) << "PML4[" << i << "]";
    EXPECT_EQ(img.entries[512 + i], 0u) << "PDPT[" << i << "]";
  }
}

TEST_F(PageTables, TablesPointIntoTheirOwnBase) {
  auto img =
      build_identity_page_tables(*mem_, guest_phys_addr{0x40000}, fixed::page_tables_max, true);
  ASSERT_TRUE(img);
  EXPECT_EQ(img->root, guest_phys_addr{0x40000});
  EXPECT_EQ(img->entries[0] & addr_mask, 0x41000u);
  auto t = walk(*img, 0x100010); // walk() fails the test if a pointer leaves [base, base+bytes)
  ASSERT_TRUE(t);
  EXPECT_EQ(t->phys, 0x100010u);
}

TEST_F(PageTables, RejectsTablesLargerThanTheirArea) {
  const std::uint64_t needed = build(true).bytes();
  EXPECT_TRUE(build_identity_page_tables(*mem_, fixed::page_tables, needed, true));
  for (std::uint64_t max :
       {needed - 1, needed - page_size, 3 * page_size, page_size, std::uint64_t{0}}) {
    auto img = build_identity_page_tables(*mem_, fixed::page_tables, max, true);
    EXPECT_EQ(img.code(), memory_errc::layout_too_small) << "max_bytes " << max;
  }
}

TEST_F(PageTables, RejectsAnUnalignedBase) {
  auto img =
      build_identity_page_tables(*mem_, guest_phys_addr{0x10008}, fixed::page_tables_max, true);
  EXPECT_EQ(img.code(), memory_errc::unaligned);
}

TEST(PageTablesEmpty, MemoryWithoutRegionsMapsNothing) {
  auto m = guest_memory::create(4 * mib);
  ASSERT_TRUE(m);
  auto img = build_identity_page_tables(*m, fixed::page_tables, fixed::page_tables_max, true);
  ASSERT_TRUE(img);
  EXPECT_EQ(img->large_pages + img->small_pages, 0u);
  for (std::uint64_t a = 0; a < 4 * mib; a += page_size)
    ASSERT_FALSE(walk(*img, a)) << a;
}

TEST(PageTablesLarge, SpansSeveralPageDirectories) {
  // 4 GiB of address space (MAP_NORESERVE: nothing is touched but the tables themselves).
  auto m = guest_memory::create(4 * gib);
  ASSERT_TRUE(m) << m.err().message();
  ASSERT_TRUE(m->add_region(make("low", region_kind::heap, gib - 4 * mib, gib, prot_rw)));
  ASSERT_TRUE(
      m->add_region(make("high", region_kind::image, 3 * gib + page_size, page_size, prot_rx)));
  auto img = build_identity_page_tables(*m, fixed::page_tables, fixed::page_tables_max, true);
  ASSERT_TRUE(img);
  EXPECT_EQ(img->large_pages, 512u);
  EXPECT_EQ(img->small_pages, 1u);
  for (std::uint64_t g = 0; g < 4; ++g)
    EXPECT_TRUE(img->entries[512 + g] & p_bit) << "PDPT[" << g << "]";
  EXPECT_EQ(img->entries[512 + 4], 0u);

  for (std::uint64_t va : {gib - 4 * mib, gib - 1, gib, gib + 0x345678, 2 * gib - 4 * mib - 1}) {
    auto t = walk(*img, va);
    ASSERT_TRUE(t) << std::hex << va;
    EXPECT_TRUE(t->large);
    EXPECT_EQ(t->phys, va);
  }
  EXPECT_FALSE(walk(*img, gib - 4 * mib - 1));
  EXPECT_FALSE(walk(*img, 2 * gib - 4 * mib));
  EXPECT_FALSE(walk(*img, 3 * gib));
  auto high = walk(*img, 3 * gib + page_size + 5);
  ASSERT_TRUE(high);
  EXPECT_FALSE(high->large);
  EXPECT_FALSE(high->nx);
  EXPECT_FALSE(high->writable);
}

} // namespace
} // namespace kiln::memory::x86_64
