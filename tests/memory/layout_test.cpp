// Tests for memory/layout.hpp: the fixed low pages fit together, and plan_layout's arithmetic.
#include <kiln/guest/abi.h>
#include <kiln/memory/layout.hpp>
#include <kiln/memory/memory_errc.hpp>

#include <gtest/gtest.h>

#include <cstdint>

namespace kiln::memory {
namespace {

constexpr std::uint64_t mib = 1ull << 20;
constexpr guest_phys_addr small_image_end{0x104000};

TEST(FixedLayout, LowPagesDoNotOverlapAndLeaveTheNullPageFree) {
  EXPECT_GE(fixed::boot_info.value, page_size) << "the null page stays unmapped";
  EXPECT_LE(fixed::boot_info + fixed::boot_info_size, fixed::system_tables);
  EXPECT_LE(fixed::system_tables + fixed::system_tables_size, fixed::page_tables);
  // A guard page below the IST stack, after the page-table area.
  EXPECT_LE(fixed::page_tables.value + fixed::page_tables_max, fixed::ist_stack.value - page_size);
  EXPECT_LE(fixed::ist_stack + fixed::ist_stack_size, fixed::io_in);
  EXPECT_LE(fixed::io_in + fixed::io_buffer_size, fixed::io_out);
  EXPECT_LE(fixed::io_out + fixed::io_buffer_size, fixed::image_base);
  for (auto a : {fixed::boot_info, fixed::system_tables, fixed::page_tables, fixed::ist_stack,
                 fixed::io_in, fixed::io_out, fixed::image_base})
    EXPECT_TRUE(is_aligned(a.value, page_size)) << std::hex << a.value;
  EXPECT_TRUE(is_aligned(fixed::page_tables_max, page_size));
  EXPECT_TRUE(is_aligned(fixed::min_memory, large_page_size));
}

TEST(FixedLayout, BootInfoPageHoldsBootInfoFileTableAndCommandLine) {
  EXPECT_GE(fixed::file_table_offset, sizeof(kiln_boot_info));
  EXPECT_LE(fixed::file_table_offset + fixed::max_files * sizeof(kiln_file_entry),
            fixed::cmdline_offset);
  EXPECT_EQ(fixed::cmdline_offset + fixed::cmdline_max, fixed::boot_info_size);
}

TEST(FixedLayout, SystemPageHoldsGdtThenTss) {
  EXPECT_GE(fixed::tss_offset, fixed::gdt_offset + 5 * 8) << "null, code, data, 16-byte TSS";
  EXPECT_LE(fixed::tss_offset + 104, fixed::system_tables_size);
}

TEST(PlanLayout, DefaultConfigPutsHeapAfterImageAndStackAtTheTop) {
  auto l = plan_layout(layout_config{}, small_image_end);
  ASSERT_TRUE(l) << l.err().message();
  EXPECT_EQ(l->memory_size, 16 * mib);
  EXPECT_EQ(l->image_end, small_image_end);
  EXPECT_EQ(l->heap_start, guest_phys_addr{2 * mib}) << "next 2 MiB boundary after the image";
  EXPECT_EQ(l->stack_top, guest_phys_addr{16 * mib});
  EXPECT_EQ(l->stack_bottom, guest_phys_addr{16 * mib - (256ull << 10)});
  EXPECT_EQ(l->stack_guard, guest_phys_addr{l->stack_bottom.value - page_size});
  EXPECT_EQ(l->heap_size, l->stack_guard.value - l->heap_start.value)
      << "heap 0 takes all the room";
}

TEST(PlanLayout, ImageEndingOnA2MiBBoundaryStartsTheHeapThere) {
  auto l = plan_layout(layout_config{}, guest_phys_addr{4 * mib});
  ASSERT_TRUE(l);
  EXPECT_EQ(l->heap_start, guest_phys_addr{4 * mib});
}

TEST(PlanLayout, HonoursAnExplicitHeapSizeUpToTheRoomLeft) {
  layout_config cfg;
  cfg.heap_size = 1 * mib;
  auto l = plan_layout(cfg, small_image_end);
  ASSERT_TRUE(l);
  EXPECT_EQ(l->heap_size, 1 * mib);

  const std::uint64_t room = (16 * mib - (256ull << 10) - page_size) - 2 * mib;
  cfg.heap_size = room;
  auto full = plan_layout(cfg, small_image_end);
  ASSERT_TRUE(full);
  EXPECT_EQ(full->heap_size, room);

  cfg.heap_size = room + page_size;
  EXPECT_EQ(plan_layout(cfg, small_image_end).code(), memory_errc::layout_too_small);
}

TEST(PlanLayout, AcceptsTheExtremesOfMemorySize) {
  for (std::uint64_t size : {fixed::min_memory, fixed::max_memory}) {
    layout_config cfg;
    cfg.memory_size = size;
    auto l = plan_layout(cfg, small_image_end);
    ASSERT_TRUE(l) << size;
    EXPECT_EQ(l->stack_top, guest_phys_addr{size});
  }
}

TEST(PlanLayout, RejectsBadMemorySizes) {
  const std::pair<std::uint64_t, memory_errc> cases[] = {
      {0, memory_errc::bad_size},
      {fixed::min_memory - large_page_size, memory_errc::bad_size},
      {fixed::max_memory + large_page_size, memory_errc::bad_size},
      {~0ull, memory_errc::bad_size},
      {5 * mib, memory_errc::unaligned}, // page-aligned, not 2 MiB-aligned
      {8 * mib + page_size, memory_errc::unaligned},
  };
  for (auto [size, expected] : cases) {
    layout_config cfg;
    cfg.memory_size = size;
    EXPECT_EQ(plan_layout(cfg, small_image_end).code(), expected) << size;
  }
}

TEST(PlanLayout, RejectsBadStackAndHeapSizes) {
  for (std::uint64_t stack :
       {std::uint64_t{0}, 3 * page_size, 4 * page_size + 1, std::uint64_t{64 * 1024 + 8}}) {
    layout_config cfg;
    cfg.stack_size = stack;
    EXPECT_EQ(plan_layout(cfg, small_image_end).code(), memory_errc::bad_size) << stack;
  }
  layout_config cfg;
  cfg.stack_size = 4 * page_size;
  EXPECT_TRUE(plan_layout(cfg, small_image_end)) << "16 KiB is the smallest stack";

  layout_config heap;
  heap.heap_size = mib + 1;
  EXPECT_EQ(plan_layout(heap, small_image_end).code(), memory_errc::unaligned);
}

TEST(PlanLayout, RejectsABadImageEnd) {
  EXPECT_EQ(plan_layout(layout_config{}, guest_phys_addr{0}).code(), memory_errc::out_of_bounds);
  EXPECT_EQ(
      plan_layout(layout_config{}, guest_phys_addr{fixed::image_base.value - page_size}).code(),
      memory_errc::out_of_bounds);
  EXPECT_EQ(plan_layout(layout_config{}, guest_phys_addr{0x104001}).code(),
            memory_errc::out_of_bounds);
}

TEST(PlanLayout, RejectsLayoutsThatDoNotFit) {
  layout_config stack_fills;
  stack_fills.stack_size = stack_fills.memory_size;
  EXPECT_EQ(plan_layout(stack_fills, small_image_end).code(), memory_errc::layout_too_small);

  layout_config stack_and_guard_fill;
  stack_and_guard_fill.stack_size = stack_and_guard_fill.memory_size - page_size;
  EXPECT_EQ(plan_layout(stack_and_guard_fill, small_image_end).code(),
            memory_errc::layout_too_small);

  // The image reaches the 2 MiB chunk holding the stack guard: no room for a heap.
  EXPECT_EQ(plan_layout(layout_config{}, guest_phys_addr{15 * mib}).code(),
            memory_errc::layout_too_small);
  EXPECT_EQ(plan_layout(layout_config{}, guest_phys_addr{64 * mib}).code(),
            memory_errc::layout_too_small);
}

TEST(PlanLayout, RejectsAStackSizeWhoseGuardPageWraps) {
  layout_config cfg;
  cfg.stack_size = ~0ull - page_size + 1;
  auto l = plan_layout(cfg, small_image_end);
  EXPECT_EQ(l.code(), memory_errc::layout_too_small)
      << "stack_bottom " << std::hex << (l ? l->stack_bottom.value : 0);
}

TEST(PlanLayout, RejectsAnImageEndBeyondMemory) {
  auto l = plan_layout(layout_config{}, guest_phys_addr{~0ull - page_size + 1});
  EXPECT_FALSE(l) << "heap_start " << std::hex << (l ? l->heap_start.value : 0);
}

TEST(PlanLayout, NeverPlacesTheHeapBelowTheImageOrPastTheStackGuard) {
  // Every image end from the base to the limit, every 64 KiB: the result is ordered or refused.
  for (std::uint64_t end = fixed::image_base.value; end <= 16 * mib; end += 0x10000) {
    auto l = plan_layout(layout_config{}, guest_phys_addr{end});
    if (!l) {
      EXPECT_EQ(l.code(), memory_errc::layout_too_small) << std::hex << end;
      continue;
    }
    EXPECT_GE(l->heap_start.value, end);
    EXPECT_TRUE(is_aligned(l->heap_start.value, large_page_size));
    EXPECT_LE(l->heap_start.value + l->heap_size, l->stack_guard.value);
    EXPECT_GT(l->heap_size, 0u);
    EXPECT_EQ(l->stack_guard.value + page_size, l->stack_bottom.value);
  }
}

} // namespace
} // namespace kiln::memory
