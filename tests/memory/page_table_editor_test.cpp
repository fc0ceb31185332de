// Tests for memory/x86_64/page_table_editor.hpp: walks the live tables in guest memory after edits.
#include <kiln/memory/layout.hpp>
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/x86_64/page_table_editor.hpp>
#include <kiln/memory/x86_64/page_tables.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace kiln::memory::x86_64 {
namespace {

constexpr std::uint64_t mib = 1ull << 20;
constexpr std::uint64_t chunk = large_page_size;
constexpr std::uint64_t p_bit = 1ull << 0, rw_bit = 1ull << 1, a_bit = 1ull << 5, d_bit = 1ull << 6,
                        ps_bit = 1ull << 7, nx_bit = 1ull << 63;
constexpr std::uint64_t addr_mask = 0x000f'ffff'ffff'f000ull;
constexpr std::uint64_t large_addr_mask = 0x000f'ffff'ffe0'0000ull;
constexpr std::uint64_t tables_begin = fixed::page_tables.value;
constexpr std::uint64_t tables_end = tables_begin + fixed::page_tables_max;

struct leaf {
  std::uint64_t phys = 0;
  bool writable = false; // RW on every level
  bool nx = false;       // NX on any level
  bool large = false;    // a 2 MiB PDE leaf
  std::uint64_t entry = 0;
};

/// The translation of `va` as a CPU computes it, reading the tables from guest memory, or
/// nullopt where a level is not present. A table pointer outside the reserved table area is a
/// test failure.
std::optional<leaf> walk(const guest_memory& mem, std::uint64_t va) {
  leaf out;
  out.writable = true;
  auto next = [&](std::uint64_t entry_or_root, unsigned shift) -> std::optional<std::uint64_t> {
    const std::uint64_t table = entry_or_root & addr_mask;
    if (table < tables_begin || table + page_size > tables_end) {
      ADD_FAILURE() << "table pointer " << std::hex << table << " outside the table area";
      return std::nullopt;
    }
    auto e = mem.read_object<std::uint64_t>(guest_phys_addr{table + ((va >> shift) & 511) * 8});
    if (!e) {
      ADD_FAILURE() << e.err().message();
      return std::nullopt;
    }
    if (!(*e & p_bit)) return std::nullopt;
    out.writable = out.writable && (*e & rw_bit);
    out.nx = out.nx || (*e & nx_bit);
    return *e;
  };
  auto pml4e = next(tables_begin, 39);
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
    out.phys = (*pde & large_addr_mask) | (va & (chunk - 1));
    return out;
  }
  auto pte = next(*pde, 12);
  if (!pte) return std::nullopt;
  out.entry = *pte;
  out.phys = (*pte & addr_mask) | (va & (page_size - 1));
  return out;
}

/// The raw PD entry that maps 2 MiB chunk `c` (an address) in the first GiB.
std::uint64_t pde_of(const guest_memory& mem, std::uint64_t c) {
  auto e = mem.read_object<std::uint64_t>(
      guest_phys_addr{tables_begin + 2 * page_size + (c / chunk) * 8});
  EXPECT_TRUE(e);
  return e ? *e : 0;
}

region make(std::string name, region_kind kind, std::uint64_t start, std::uint64_t size,
            protection prot, bool visible = true) {
  return region{std::move(name), kind, guest_phys_addr{start}, size, prot, visible};
}

// A sandbox-like memory: the fixed low pages, a two-segment image, a heap of whole 2 MiB chunks
// from 2 MiB up to `heap_end`, the stack at the top of RAM, and a file room above it. The
// tables are built and written as the sandbox does, then handed to the editor.
class PageTableEditor : public ::testing::Test {
protected:
  static constexpr std::uint64_t heap_start = 2 * mib;
  static constexpr std::uint64_t stack_size = 256 * 1024;

  void build(bool nx, std::uint64_t size = 16 * mib, std::uint64_t room = 2 * mib,
             std::uint64_t heap_end = 12 * mib) {
    editor_.reset();
    mem_.reset();
    nx_ = nx;
    auto m = guest_memory::create(size, room);
    ASSERT_TRUE(m) << m.err().message();
    mem_.emplace(std::move(m).value());
    using enum region_kind;
    for (auto r :
         {make("boot_info", boot_info, fixed::boot_info.value, fixed::boot_info_size, prot_r),
          make("system", system_tables, fixed::system_tables.value, fixed::system_tables_size,
               prot_r),
          make("ist", ist_stack, fixed::ist_stack.value, fixed::ist_stack_size, prot_rw),
          make("io_in", io_in, fixed::io_in.value, fixed::io_buffer_size, prot_rw),
          make("io_out", io_out, fixed::io_out.value, fixed::io_buffer_size, prot_rw),
          make("image.0", image, 0x100000, 0x1000, prot_rx),
          make("image.1", image, 0x101000, 0x2000, prot_rw),
          make("heap", heap, heap_start, heap_end - heap_start, prot_rw),
          make("stack", stack, size - stack_size, stack_size, prot_rw)})
      ASSERT_TRUE(mem_->add_region(r)) << r.name;
    auto img = build_identity_page_tables(*mem_, fixed::page_tables, fixed::page_tables_max, nx);
    ASSERT_TRUE(img) << img.err().message();
    ASSERT_TRUE(mem_->add_region(make("page_tables", page_tables, tables_begin,
                                      fixed::page_tables_max, prot_r, /*visible=*/false)));
    ASSERT_TRUE(mem_->write(fixed::page_tables, std::as_bytes(std::span(img->entries))));
    built_tables_ = img->entries.size() / 512;
    pd_count_ = (mem_->address_limit() + (1ull << 30) - 1) >> 30;
    editor_.emplace(*mem_, *img, fixed::page_tables_max, nx);

    // The model: what every page of [0, address_limit) should translate to.
    model_.assign(mem_->address_limit() / page_size, protection::none);
    for (const auto& r : mem_->regions())
      if (r.guest_visible)
        for (std::uint64_t a = r.start.value; a < r.end().value; a += page_size)
          model_[a / page_size] = r.prot;
  }

  guest_memory& mem() { return *mem_; }
  page_table_editor& ed() { return *editor_; }

  /// set() through the editor, recording the change in the model when it succeeds.
  result<std::uint64_t> set(std::uint64_t start, std::uint64_t size, protection p) {
    auto r = editor_->set(guest_phys_addr{start}, size, p);
    if (r)
      for (std::uint64_t a = start; a < start + size; a += page_size)
        model_[a / page_size] = p;
    return r;
  }

  std::vector<std::byte> table_bytes() {
    std::vector<std::byte> out(fixed::page_tables_max);
    EXPECT_TRUE(mem_->read(fixed::page_tables, out));
    return out;
  }

  /// Table pages reachable from the root: PML4, PDPT, PDs and the page tables they point to.
  std::uint64_t reachable_tables() {
    std::uint64_t n = 2 + pd_count_;
    for (std::uint64_t i = 0; i < pd_count_ * 512; ++i) {
      auto e =
          mem_->read_object<std::uint64_t>(guest_phys_addr{tables_begin + 2 * page_size + i * 8});
      if (e && (*e & p_bit) && !(*e & ps_bit)) ++n;
    }
    return n;
  }

  /// Every page translates as the model says (identity, rights, NX), and the editor's count of
  /// tables in use is what the tables reach.
  void expect_matches_model() {
    std::uint64_t bad = 0;
    for (std::uint64_t page = 0; page < model_.size() && bad < 10; ++page) {
      const std::uint64_t va = page * page_size + 0x123;
      const protection p = model_[page];
      const auto t = walk(*mem_, va);
      if (t.has_value() != (p != protection::none)) {
        ADD_FAILURE() << std::hex << "page 0x" << page * page_size << " present " << t.has_value()
                      << ", expected " << (p != protection::none);
        ++bad;
        continue;
      }
      if (!t) continue;
      const bool ok = t->phys == va && t->writable == has(p, protection::write) &&
                      t->nx == (nx_ && !has(p, protection::exec)) && (t->entry & a_bit) &&
                      (t->entry & d_bit);
      if (!ok) {
        ADD_FAILURE() << std::hex << "page 0x" << page * page_size << ": phys 0x" << t->phys
                      << " writable " << t->writable << " nx " << t->nx << " entry 0x" << t->entry
                      << ", expected prot " << static_cast<int>(p);
        ++bad;
      }
    }
    EXPECT_EQ(ed().tables_in_use(), reachable_tables());
    EXPECT_EQ(ed().tables_in_use() + ed().free_tables(), ed().table_capacity());
  }

  std::optional<guest_memory> mem_;
  std::optional<page_table_editor> editor_;
  std::vector<protection> model_;
  std::uint64_t built_tables_ = 0;
  std::uint64_t pd_count_ = 0;
  bool nx_ = true;
};

TEST_F(PageTableEditor, StartsFromTheBuiltTables) {
  build(true);
  EXPECT_EQ(ed().tables_in_use(), built_tables_);
  EXPECT_EQ(ed().tables_in_use(), 5u) << "PML4, PDPT, PD, chunk 0 and the stack's chunk";
  EXPECT_EQ(ed().table_capacity(), fixed::page_tables_max / page_size);
  EXPECT_EQ(ed().free_tables(), ed().table_capacity() - 5);
  EXPECT_EQ(ed().edits(), 0u);
  expect_matches_model();
}

TEST_F(PageTableEditor, SplitsALeafForOnePageAndFoldsItBack) {
  for (bool nx : {true, false}) {
    SCOPED_TRACE(nx ? "with NX" : "without NX");
    build(nx);
    const std::uint64_t page = 4 * mib + 5 * page_size;
    const std::uint64_t pde_before = pde_of(mem(), 4 * mib);
    ASSERT_TRUE(pde_before & ps_bit) << "the heap chunk starts as a 2 MiB leaf";
    const auto bytes_before = table_bytes();
    const std::uint64_t in_use = ed().tables_in_use(), free_before = ed().free_tables();

    auto needed = ed().tables_needed(guest_phys_addr{page}, page_size);
    ASSERT_TRUE(needed);
    EXPECT_EQ(*needed, 1u);
    auto n = set(page, page_size, prot_r);
    ASSERT_TRUE(n) << n.err().message();
    EXPECT_GT(*n, 0u);
    EXPECT_EQ(*n, ed().edits());
    EXPECT_EQ(ed().tables_in_use(), in_use + 1);
    EXPECT_EQ(ed().free_tables(), free_before - 1);

    auto t = walk(mem(), page + 8);
    ASSERT_TRUE(t);
    EXPECT_FALSE(t->large);
    EXPECT_FALSE(t->writable);
    EXPECT_EQ(t->nx, nx);
    EXPECT_EQ(t->phys, page + 8);
    // The other 511 pages of the chunk are now 4 KiB pages that keep their rights.
    for (std::uint64_t a = 4 * mib; a < 6 * mib; a += page_size) {
      if (a == page) continue;
      auto o = walk(mem(), a + 0x10);
      ASSERT_TRUE(o) << std::hex << a;
      EXPECT_FALSE(o->large) << std::hex << a;
      EXPECT_TRUE(o->writable) << std::hex << a;
      EXPECT_EQ(o->phys, a + 0x10) << std::hex << a;
    }
    auto neighbour = walk(mem(), 6 * mib);
    ASSERT_TRUE(neighbour);
    EXPECT_TRUE(neighbour->large) << "the next chunk is untouched";
    expect_matches_model();

    // Back to RW: the table is uniform again and folds into the original 2 MiB leaf.
    const std::uint64_t edits_before = ed().edits();
    auto back = set(page, page_size, prot_rw);
    ASSERT_TRUE(back) << back.err().message();
    EXPECT_EQ(*back, ed().edits() - edits_before);
    EXPECT_EQ(ed().tables_in_use(), in_use);
    EXPECT_EQ(ed().free_tables(), free_before);
    EXPECT_EQ(pde_of(mem(), 4 * mib), pde_before);
    auto folded = walk(mem(), page);
    ASSERT_TRUE(folded);
    EXPECT_TRUE(folded->large);
    EXPECT_TRUE(folded->writable);
    expect_matches_model();
    // Only the (now unreachable) table page itself differs from the start.
    const auto bytes_after = table_bytes();
    const std::uint64_t split_page = in_use; // the first page past the built tables
    for (std::uint64_t i = 0; i < bytes_after.size(); ++i) {
      if (i / page_size != split_page) {
        ASSERT_EQ(bytes_after[i], bytes_before[i]) << i;
      }
    }

    // The freed page is reused by the next split.
    ASSERT_TRUE(set(8 * mib, page_size, protection::none));
    EXPECT_EQ(ed().tables_in_use(), in_use + 1);
    EXPECT_EQ(pde_of(mem(), 8 * mib) & addr_mask, tables_begin + split_page * page_size);
    expect_matches_model();
  }
}

TEST_F(PageTableEditor, SettingTheCurrentProtectionWritesNothing) {
  build(true);
  const auto before = table_bytes();
  const std::uint64_t in_use = ed().tables_in_use();
  struct req {
    std::uint64_t start, size;
    protection p;
    const char* what;
  };
  const req same[] = {
      {heap_start, 10 * mib, prot_rw, "the whole heap, whole leaves"},
      {4 * mib + page_size, 3 * page_size, prot_rw, "part of a leaf"},
      {3 * mib, 2 * mib, prot_rw, "parts of two leaves"},
      {0x100000, page_size, prot_rx, "the text page, in chunk 0's table"},
      {0x101000, 2 * page_size, prot_rw, "the data pages"},
      {0x3000, page_size, protection::none, "a gap in chunk 0"},
      {12 * mib, 2 * mib, protection::none, "an empty chunk"},
      {12 * mib + page_size, page_size, protection::none, "part of an empty chunk"},
      {16 * mib, 2 * mib, protection::none, "the file room"},
      {16 * mib - stack_size, stack_size, prot_rw, "the stack"},
  };
  for (const auto& r : same) {
    auto n = set(r.start, r.size, r.p);
    ASSERT_TRUE(n) << r.what << ": " << n.err().message();
    EXPECT_EQ(*n, 0u) << r.what;
  }
  EXPECT_EQ(ed().edits(), 0u);
  EXPECT_EQ(ed().tables_in_use(), in_use);
  EXPECT_EQ(table_bytes(), before);
}

TEST_F(PageTableEditor, NoneMakesPagesNotPresent) {
  build(true);
  // Across a chunk boundary: two splits.
  const std::uint64_t start = 6 * mib - 2 * page_size, size = 4 * page_size;
  const std::uint64_t in_use = ed().tables_in_use();
  ASSERT_TRUE(set(start, size, protection::none));
  EXPECT_EQ(ed().tables_in_use(), in_use + 2);
  for (std::uint64_t a = start; a < start + size; a += page_size)
    EXPECT_FALSE(walk(mem(), a)) << std::hex << a;
  EXPECT_TRUE(walk(mem(), start - page_size));
  EXPECT_TRUE(walk(mem(), start + size));
  expect_matches_model();

  // A whole chunk becomes an empty PD entry; set back, it is one leaf again.
  ASSERT_TRUE(set(8 * mib, chunk, protection::none));
  EXPECT_EQ(pde_of(mem(), 8 * mib), 0u);
  EXPECT_FALSE(walk(mem(), 8 * mib + 0x1234));
  expect_matches_model();
  ASSERT_TRUE(set(8 * mib, chunk, prot_rw));
  auto t = walk(mem(), 8 * mib + 0x1234);
  ASSERT_TRUE(t);
  EXPECT_TRUE(t->large);
  EXPECT_TRUE(t->writable);

  // Unmapping the rest of a split chunk folds its table into an empty entry.
  ASSERT_TRUE(set(4 * mib, chunk - 2 * page_size, protection::none));
  EXPECT_EQ(pde_of(mem(), 4 * mib), 0u);
  EXPECT_EQ(ed().tables_in_use(), in_use + 1);
  expect_matches_model();
}

TEST_F(PageTableEditor, NxFollowsExecuteRightsOnlyWithNx) {
  for (bool nx : {true, false}) {
    SCOPED_TRACE(nx ? "with NX" : "without NX");
    build(nx);
    ASSERT_TRUE(set(4 * mib, page_size, prot_r));
    ASSERT_TRUE(set(4 * mib + page_size, page_size, prot_rx));
    ASSERT_TRUE(set(0x100000, page_size, prot_r)); // the text page loses X
    auto r = walk(mem(), 4 * mib);
    auto rx = walk(mem(), 4 * mib + page_size);
    auto rw = walk(mem(), 4 * mib + 2 * page_size);
    auto text = walk(mem(), 0x100000);
    ASSERT_TRUE(r && rx && rw && text);
    EXPECT_EQ(r->nx, nx);
    EXPECT_FALSE(rx->nx);
    EXPECT_EQ(rw->nx, nx);
    EXPECT_EQ(text->nx, nx);
    EXPECT_EQ((r->entry & nx_bit) != 0, nx);
    EXPECT_EQ((rx->entry & nx_bit), 0u);
    EXPECT_FALSE(rx->writable);
    expect_matches_model();
  }
}

TEST_F(PageTableEditor, MapsAndUnmapsTheFileRoom) {
  build(true);
  ASSERT_EQ(mem().address_limit(), 18 * mib);
  const std::uint64_t room = 16 * mib;
  EXPECT_FALSE(walk(mem(), room));
  const std::uint64_t in_use = ed().tables_in_use();

  // A 3-page file at the room's start: one new table for the chunk.
  auto n = set(room, 3 * page_size, prot_r);
  ASSERT_TRUE(n) << n.err().message();
  EXPECT_EQ(ed().tables_in_use(), in_use + 1);
  for (std::uint64_t i = 0; i < 3; ++i) {
    auto t = walk(mem(), room + i * page_size + 7);
    ASSERT_TRUE(t) << i;
    EXPECT_EQ(t->phys, room + i * page_size + 7);
    EXPECT_FALSE(t->writable);
    EXPECT_TRUE(t->nx);
  }
  EXPECT_FALSE(walk(mem(), room + 3 * page_size));
  expect_matches_model();

  // Unmapped, the table is all empty and goes back to the pool.
  ASSERT_TRUE(set(room, 3 * page_size, protection::none));
  EXPECT_EQ(ed().tables_in_use(), in_use);
  EXPECT_EQ(pde_of(mem(), room), 0u);
  EXPECT_FALSE(walk(mem(), room));
  expect_matches_model();

  // The whole room is one 2 MiB leaf, and its last page is in range.
  ASSERT_TRUE(set(room, chunk, prot_r));
  auto big = walk(mem(), 18 * mib - 1);
  ASSERT_TRUE(big);
  EXPECT_TRUE(big->large);
  EXPECT_EQ(ed().tables_in_use(), in_use);
  ASSERT_TRUE(set(18 * mib - page_size, page_size, protection::none));
  EXPECT_FALSE(walk(mem(), 18 * mib - 1));
  EXPECT_TRUE(walk(mem(), 18 * mib - page_size - 1));
  expect_matches_model();
}

TEST_F(PageTableEditor, RefusesUnalignedAndOutOfRangeRequests) {
  build(true);
  const auto before = table_bytes();
  const std::uint64_t limit = mem().address_limit();
  struct req {
    std::uint64_t start, size;
    memory_errc want;
    const char* what;
  };
  const req bad[] = {
      {4 * mib + 0x800, page_size, memory_errc::unaligned, "unaligned start"},
      {4 * mib, 0x800, memory_errc::unaligned, "unaligned size"},
      {4 * mib, page_size + 8, memory_errc::unaligned, "size a few bytes over"},
      {4 * mib, 0, memory_errc::unaligned, "empty"},
      {limit, page_size, memory_errc::out_of_bounds, "at the address limit"},
      {limit - page_size, 2 * page_size, memory_errc::out_of_bounds, "across the address limit"},
      {(1ull << 30) - page_size, page_size, memory_errc::out_of_bounds, "below 1 GiB, above RAM"},
      {1ull << 30, page_size, memory_errc::out_of_bounds, "past the first PD"},
      {~0ull - page_size + 1, 2 * page_size, memory_errc::out_of_bounds, "wraps 2^64"},
  };
  for (const auto& r : bad) {
    for (protection p : {prot_r, protection::none}) {
      EXPECT_EQ(ed().set(guest_phys_addr{r.start}, r.size, p).code(), r.want) << r.what;
    }
    if (r.want == memory_errc::out_of_bounds) {
      EXPECT_EQ(ed().tables_needed(guest_phys_addr{r.start}, r.size).code(), r.want) << r.what;
    }
  }
  EXPECT_EQ(ed().edits(), 0u);
  EXPECT_EQ(ed().tables_in_use(), built_tables_);
  EXPECT_EQ(table_bytes(), before);
}

TEST_F(PageTableEditor, TablesNeededMatchesWhatSetTakes) {
  struct req {
    std::uint64_t start, size;
    std::uint64_t needed;
    const char* what;
  };
  const req cases[] = {
      {4 * mib + 5 * page_size, page_size, 1, "one page inside a leaf"},
      {4 * mib, page_size, 1, "the first page of a leaf"},
      {6 * mib - page_size, page_size, 1, "the last page of a leaf"},
      {5 * mib, 2 * mib, 2, "halves of two leaves"},
      {4 * mib, 2 * mib, 0, "one whole leaf"},
      {2 * mib, 10 * mib, 0, "the whole heap"},
      {4 * mib + page_size, 4 * mib - page_size, 1, "a partial start, then whole chunks"},
      {4 * mib, 4 * mib + page_size, 1, "whole chunks, then a partial end"},
      {3 * mib, 6 * mib, 2, "partial, whole, partial"},
      {0x101000, page_size, 0, "a page in chunk 0, which already has a table"},
      {16 * mib - page_size, page_size, 0, "the stack's chunk has a table"},
      {12 * mib + page_size, page_size, 1, "a page in an empty chunk"},
      {16 * mib, 3 * page_size, 1, "the start of the file room"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    build(true);
    auto n = ed().tables_needed(guest_phys_addr{c.start}, c.size);
    ASSERT_TRUE(n) << n.err().message();
    EXPECT_EQ(*n, c.needed);
    // R is a real change everywhere in these ranges (RW or nothing before).
    const std::uint64_t free_before = ed().free_tables(), in_use = ed().tables_in_use();
    auto s = set(c.start, c.size, prot_r);
    ASSERT_TRUE(s) << s.err().message();
    EXPECT_GT(*s, 0u);
    EXPECT_EQ(free_before - ed().free_tables(), c.needed);
    EXPECT_EQ(ed().tables_in_use() - in_use, c.needed);
    expect_matches_model();
  }
}

TEST_F(PageTableEditor, AWholeChunkOverASplitOneReturnsItsTable) {
  build(true);
  const std::uint64_t in_use = ed().tables_in_use();
  ASSERT_TRUE(set(4 * mib + page_size, page_size, prot_r));
  EXPECT_EQ(ed().tables_in_use(), in_use + 1);
  ASSERT_TRUE(set(4 * mib, chunk, prot_r));
  EXPECT_EQ(ed().tables_in_use(), in_use);
  auto t = walk(mem(), 4 * mib + 0x5000);
  ASSERT_TRUE(t);
  EXPECT_TRUE(t->large);
  EXPECT_FALSE(t->writable);
  expect_matches_model();
}

// Random edits, each checked page by page against a model of what the tables should say.
TEST_F(PageTableEditor, RandomEditsMatchAModel) {
  build(true);
  std::mt19937_64 rng(20240611);
  const std::uint64_t pages = mem().address_limit() / page_size;
  const protection prots[] = {protection::none, prot_r, prot_rw, prot_rx};
  for (int step = 0; step < 150; ++step) {
    SCOPED_TRACE(step);
    std::uint64_t first = 0, count = 0;
    switch (rng() % 3) {
    case 0: // a few pages
      first = rng() % pages;
      count = 1 + rng() % 8;
      break;
    case 1: // up to two chunks' worth, anywhere
      first = rng() % pages;
      count = 1 + rng() % 1024;
      break;
    default: // whole chunks
      first = (rng() % (pages / 512)) * 512;
      count = 512 * (1 + rng() % 3);
      break;
    }
    count = std::min(count, pages - first);
    const protection p = prots[rng() % 4];
    const auto model_before = model_;
    const std::uint64_t edits_before = ed().edits();
    auto n = set(first * page_size, count * page_size, p);
    ASSERT_TRUE(n) << n.err().message();
    EXPECT_EQ(*n, ed().edits() - edits_before);
    EXPECT_EQ(*n == 0, model_ == model_before) << "edits exactly when something changes";
    expect_matches_model();
    if (HasFailure()) break;
  }
}

// 248 MiB of heap in 2 MiB leaves: more chunks than the table area has free pages.
class PageTableEditorPool : public PageTableEditor {
protected:
  void SetUp() override { build(true, 256 * mib, 0, 250 * mib); }
};

TEST_F(PageTableEditorPool, ExhaustingThePoolFailsAndChangesNothing) {
  const std::uint64_t free0 = ed().free_tables();
  ASSERT_GT(free0, 0u);
  ASSERT_LT(free0, 124u) << "the test needs more heap chunks than free tables";
  const std::uint64_t in_use0 = ed().tables_in_use();

  // One page in each heap chunk until the pool is empty.
  auto page_in = [](std::uint64_t i) { return (1 + i) * chunk + (i % 512) * page_size; };
  std::uint64_t i = 0;
  for (; i < free0; ++i) {
    auto n = set(page_in(i), page_size, prot_r);
    ASSERT_TRUE(n) << i << ": " << n.err().message();
  }
  EXPECT_EQ(ed().free_tables(), 0u);
  EXPECT_EQ(ed().tables_in_use(), in_use0 + free0);
  EXPECT_EQ(ed().tables_in_use(), ed().table_capacity());

  const auto bytes = table_bytes();
  const std::uint64_t edits = ed().edits();
  auto needed = ed().tables_needed(guest_phys_addr{page_in(i)}, page_size);
  ASSERT_TRUE(needed);
  EXPECT_EQ(*needed, 1u);
  EXPECT_EQ(ed().set(guest_phys_addr{page_in(i)}, page_size, prot_r).code(),
            memory_errc::too_many_ranges);
  EXPECT_EQ(ed().set(guest_phys_addr{page_in(i)}, page_size, protection::none).code(),
            memory_errc::too_many_ranges);
  EXPECT_EQ(table_bytes(), bytes);
  EXPECT_EQ(ed().edits(), edits);
  EXPECT_EQ(ed().tables_in_use(), ed().table_capacity());

  // Edits that need no new table still work: inside a split chunk, and whole chunks.
  ASSERT_TRUE(set(page_in(0) + page_size, page_size, prot_r));
  ASSERT_TRUE(set(page_in(i + 1) - page_in(i + 1) % chunk, chunk, prot_r));

  // Freeing one table (the first split folds back) lets one more split through.
  ASSERT_TRUE(set(page_in(0), 2 * page_size, prot_rw));
  EXPECT_EQ(ed().free_tables(), 1u);
  auto more = set(page_in(i), page_size, prot_r);
  ASSERT_TRUE(more) << more.err().message();
  EXPECT_EQ(ed().free_tables(), 0u);

  // A range over parts of two unsplit chunks needs two; with one free, nothing is written.
  ASSERT_TRUE(set(page_in(1), page_size, prot_rw));
  ASSERT_EQ(ed().free_tables(), 1u);
  const std::uint64_t a = (i + 4) * chunk - page_size; // last page of one chunk, first of next
  auto two = ed().tables_needed(guest_phys_addr{a}, 2 * page_size);
  ASSERT_TRUE(two);
  EXPECT_EQ(*two, 2u);
  const auto bytes2 = table_bytes();
  EXPECT_EQ(ed().set(guest_phys_addr{a}, 2 * page_size, prot_r).code(),
            memory_errc::too_many_ranges);
  EXPECT_EQ(table_bytes(), bytes2);
  EXPECT_EQ(ed().free_tables(), 1u);
  ASSERT_TRUE(set(page_in(2), page_size, prot_rw));
  ASSERT_TRUE(set(a, 2 * page_size, prot_r));
  EXPECT_EQ(ed().free_tables(), 0u);
  expect_matches_model();
}

TEST_F(PageTableEditorPool, ARedundantSetNeedsNoTableEvenWithAnEmptyPool) {
  for (std::uint64_t i = 0; ed().free_tables() > 0; ++i)
    ASSERT_TRUE(set((1 + i) * chunk, page_size, protection::none)) << i;
  const auto bytes = table_bytes();
  // Part of an unsplit RW leaf set to RW: nothing to do, so no table is needed.
  const std::uint64_t leaf = 120 * chunk;
  ASSERT_TRUE(pde_of(mem(), leaf) & ps_bit);
  auto n = set(leaf + page_size, 3 * page_size, prot_rw);
  ASSERT_TRUE(n) << n.err().message();
  EXPECT_EQ(*n, 0u);
  // The same for parts of two leaves, and for part of an empty chunk set to none.
  auto across = set(leaf + chunk / 2, chunk, prot_rw);
  ASSERT_TRUE(across) << across.err().message();
  EXPECT_EQ(*across, 0u);
  auto empty = set(250 * mib + page_size, page_size, protection::none);
  ASSERT_TRUE(empty) << empty.err().message();
  EXPECT_EQ(*empty, 0u);
  EXPECT_EQ(table_bytes(), bytes);
  expect_matches_model();
}

// Saving: the editor's bookkeeping encodes itself and decodes only inside its table area.

const std::error_code corrupt = make_error_code(memory_errc::snapshot_corrupt);
constexpr std::uint64_t max_tables = fixed::page_tables_max / page_size;

std::vector<std::byte> encode_state(const page_table_editor::state& s) {
  byte_writer w;
  s.encode(w);
  return w.take();
}

result<page_table_editor::state> decode_state(const std::vector<std::byte>& bytes,
                                              std::uint64_t limit = 20 * mib) {
  byte_reader r(bytes, corrupt, "page_tables section");
  KILN_TRY_ASSIGN(auto s, page_table_editor::state::decode(r, fixed::page_tables,
                                                           fixed::page_tables_max, limit));
  KILN_TRY(r.done());
  return s;
}

page_table_editor::state plausible_state() {
  return {fixed::page_tables, 1, 9, max_tables, {tables_begin + 0x7000, tables_begin + 0x4000}};
}

TEST(PageTableEditorSave, RoundTripsTheBookkeeping) {
  const auto s = plausible_state();
  const auto bytes = encode_state(s);
  EXPECT_EQ(bytes.size(), 4 * 8 + 4 + 2 * 8u);
  auto back = decode_state(bytes);
  ASSERT_TRUE(back) << back.err().message();
  EXPECT_EQ(back->root, s.root);
  EXPECT_EQ(back->pd_count, 1u);
  EXPECT_EQ(back->used_tables, 9u);
  EXPECT_EQ(back->max_tables, max_tables);
  EXPECT_EQ(back->free, s.free);
  EXPECT_EQ(encode_state(*back), bytes);
}

TEST_F(PageTableEditor, ASavedStateDecodesToAnEditorOfTheSameTables) {
  build(/*nx=*/true);
  ASSERT_TRUE(set(heap_start + 0x3000, page_size, prot_r)); // splits a 2 MiB leaf
  ASSERT_TRUE(set(heap_start, chunk, prot_rw));             // folds it back: a free table
  const auto saved = ed().save();
  ASSERT_FALSE(saved.free.empty());
  auto back = decode_state(encode_state(saved), mem().address_limit());
  ASSERT_TRUE(back) << back.err().message();
  page_table_editor again(mem(), *back, true);
  EXPECT_EQ(again.tables_in_use(), ed().tables_in_use());
  EXPECT_EQ(again.free_tables(), ed().free_tables());
}

void expect_refused(page_table_editor::state s, const std::string& field,
                    std::uint64_t limit = 20 * mib) {
  auto back = decode_state(encode_state(s), limit);
  ASSERT_FALSE(back) << field << " was accepted";
  EXPECT_EQ(back.code(), memory_errc::snapshot_corrupt);
  EXPECT_NE(back.err().message().find("page_tables section: " + field), std::string::npos)
      << back.err().message();
}

TEST(PageTableEditorSave, RefusesBookkeepingOutsideItsArea) {
  auto s = plausible_state();
  s.root = guest_phys_addr{0x20000};
  expect_refused(s, "page-table root");
  s = plausible_state();
  s.max_tables = max_tables + 1;
  expect_refused(s, "page-table capacity");
  s = plausible_state();
  s.used_tables = max_tables + 1;
  expect_refused(s, "page-table capacity");
  s = plausible_state();
  s.pd_count = 0;
  expect_refused(s, "page-table PD count");
  s = plausible_state();
  s.pd_count = 513;
  expect_refused(s, "page-table PD count");
  expect_refused(plausible_state(), "page-table PD count", (1ull << 30) + 4096);
  s = plausible_state();
  s.used_tables = 3;
  s.free = {};
  for (int i = 0; i < 4; ++i)
    s.free.push_back(tables_begin + 0x3000);
  expect_refused(s, "page-table free count");
  for (std::uint64_t page :
       {tables_begin, tables_begin + 0x2000, tables_begin + 0x9000, tables_begin + 0x4008}) {
    s = plausible_state();
    s.free = {page};
    expect_refused(s, "free page-table page");
  }
}

TEST(PageTableEditorSave, RefusesTruncatedOrTrailingBytes) {
  const auto good = encode_state(plausible_state());
  for (std::size_t cut = 0; cut < good.size(); ++cut) {
    auto back = decode_state({good.begin(), good.begin() + static_cast<std::ptrdiff_t>(cut)});
    ASSERT_FALSE(back) << cut;
    EXPECT_EQ(back.code(), memory_errc::snapshot_corrupt);
  }
  auto trailing = good;
  trailing.push_back(std::byte{0});
  EXPECT_EQ(decode_state(trailing).err().detail, "page_tables section: trailing bytes");
}

} // namespace
} // namespace kiln::memory::x86_64
