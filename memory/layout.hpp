// Where everything lives in guest-physical memory: fixed low pages, the image, heap and stack.
#pragma once

#include <kiln/memory/address.hpp>
#include <kiln/support/result.hpp>

#include <cstdint>

namespace kiln::memory {

/// The fixed low part of every guest's memory (identity-mapped; addresses are guest-physical):
///
///   0x0000_0000  null page                 unmapped, so a null dereference faults
///   0x0000_1000  boot info page        R   boot_info, then the file table and command line
///   0x0000_2000  system page           R   GDT (null, code64, data, TSS) and the TSS
///   0x0001_0000  page tables           -   identity tables, not visible to the guest
///   0x0008_f000  IST guard                 unmapped
///   0x0009_0000  IST stack (64 KiB)    RW  exception handlers run here
///   0x000a_0000  in buffer (64 KiB)    RW  host -> guest
///   0x000b_0000  out buffer (64 KiB)   RW  guest -> host
///   0x0010_0000  ELF image                 one region per loadable segment
///   2 MiB-aligned after the image: heap    RW  (heap_size, or all that is left)
///   ...          stack guard page          unmapped
///   memory_size - stack_size: stack    RW  up to memory_size (initial rsp)
namespace fixed {
inline constexpr guest_phys_addr boot_info{0x1000};
inline constexpr std::uint64_t boot_info_size = 0x1000;
inline constexpr guest_phys_addr system_tables{0x2000};
inline constexpr std::uint64_t system_tables_size = 0x1000;
inline constexpr guest_phys_addr page_tables{0x10000};
inline constexpr std::uint64_t page_tables_max = 0x7f000 - 0x10000;
inline constexpr guest_phys_addr ist_stack{0x90000};
inline constexpr std::uint64_t ist_stack_size = 0x10000;
inline constexpr guest_phys_addr io_in{0xa0000};
inline constexpr guest_phys_addr io_out{0xb0000};
inline constexpr std::uint64_t io_buffer_size = 0x10000;
inline constexpr guest_phys_addr image_base{0x100000};
inline constexpr std::uint64_t min_memory = 4ull << 20;
inline constexpr std::uint64_t max_memory = 64ull << 30;
/// Guest-physical room above RAM where host files are mapped (see guest_memory).
inline constexpr std::uint64_t max_file_room = 64ull << 30;
// Inside the boot info page:
inline constexpr std::uint64_t file_table_offset = 0x100; // after struct kiln_boot_info
inline constexpr std::uint64_t max_files = 32;
inline constexpr std::uint64_t cmdline_offset = 0xc00;
inline constexpr std::uint64_t cmdline_max = 0x1000 - 0xc00; // NUL included
// Inside the system page:
inline constexpr std::uint64_t gdt_offset = 0x0;
inline constexpr std::uint64_t tss_offset = 0x100;
} // namespace fixed

struct layout_config {
  std::uint64_t memory_size = 16ull << 20;
  std::uint64_t heap_size = 0; // 0: everything between the image and the stack guard
  std::uint64_t stack_size = 256ull << 10;
};

/// The variable part of the layout, computed from the config and the image's end.
struct layout {
  std::uint64_t memory_size = 0;
  guest_phys_addr image_end;  // page-aligned end of the highest loadable segment
  guest_phys_addr heap_start; // 2 MiB-aligned
  std::uint64_t heap_size = 0;
  guest_phys_addr stack_guard; // the unmapped page below the stack
  guest_phys_addr stack_bottom;
  guest_phys_addr stack_top; // == memory_size
};

/// Plans the layout; refuses sizes that are unaligned, out of range or do not fit.
result<layout> plan_layout(const layout_config& cfg, guest_phys_addr image_end);

} // namespace kiln::memory
