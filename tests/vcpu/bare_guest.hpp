// Test harness: a vCPU of one backend over 4 MiB of guest memory running hand-assembled code.
#pragma once

#include <kiln/guest/abi.h>
#include <kiln/memory/guest_memory.hpp>
#include <kiln/memory/layout.hpp>
#include <kiln/memory/x86_64/page_tables.hpp>
#include <kiln/memory/x86_64/system_tables.hpp>
#include <kiln/vcpu/vcpu.hpp>
#include <kiln/vcpu/x86_64/long_mode.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <sstream>
#include <string>
#include <variant>
#include <vector>

namespace kiln::test {

/// The guest-physical map the harness builds (identity-mapped, like every kiln guest):
///
///   0x0000_2000  system page  R    GDT and TSS (memory/x86_64/system_tables)
///   0x0001_0000  page tables  R    not visible to the guest
///   0x0010_0000  code         RX   4 KiB, the test's machine code at its start
///   0x0020_0000  data         RW   64 KiB
///   0x0030_0000  (gap)             unmapped: no region, no page-table entry
///   0x003f_0000  stack        RW   64 KiB, rsp = 0x40_0000 at entry
struct bare_layout {
  static constexpr std::uint64_t memory_size = 4ull << 20;
  static constexpr memory::guest_phys_addr code{0x100000};
  static constexpr std::uint64_t code_size = 0x1000;
  static constexpr memory::guest_phys_addr data{0x200000};
  static constexpr std::uint64_t data_size = 0x10000;
  static constexpr memory::guest_phys_addr gap{0x300000};
  static constexpr memory::guest_phys_addr stack{0x3f0000};
  static constexpr std::uint64_t stack_size = 0x10000;
  static constexpr std::uint64_t stack_top = 0x400000;
};

/// Extra page-table entries to add before the tables are written, to make the page walker
/// disagree on purpose with the backend's own view of memory.
struct pte_patch {
  std::uint64_t va; // identity-mapped 4 KiB page
  bool writable;    // RW bit in the leaf
};

/// One vCPU and the memory it runs on. Move-only; the vCPU is declared after the memory it maps,
/// so it is destroyed first.
struct bare_guest {
  memory::guest_memory mem;
  std::unique_ptr<vcpu::vcpu> cpu;

  /// Code bytes go at bare_layout::code; RIP starts there, RSP at the stack top. Built the way
  /// sandbox::build builds a guest (runtime/sandbox.cpp), minus the ELF loader and boot info.
  static result<bare_guest> create(vcpu::backend_kind kind, std::span<const std::uint8_t> code,
                                   std::span<const pte_patch> patches = {}) {
    using memory::region;
    using memory::region_kind;
    using L = bare_layout;
    namespace fixed = memory::fixed;
    KILN_TRY_ASSIGN(auto cpu, vcpu::create(kind));
    // As sandbox::build does: NX in the page tables and EFER only where the backend has it.
    const bool nx = (cpu->abi_features() & KILN_FEATURE_NX) != 0;
    KILN_TRY_ASSIGN(auto mem, memory::guest_memory::create(L::memory_size));
    KILN_TRY(
        mem.add_region(region{"system_tables", region_kind::system_tables, fixed::system_tables,
                              fixed::system_tables_size, memory::prot_r, true}));
    KILN_TRY(mem.add_region(
        region{"code", region_kind::image, L::code, L::code_size, memory::prot_rx, true}));
    KILN_TRY(mem.add_region(
        region{"data", region_kind::heap, L::data, L::data_size, memory::prot_rw, true}));
    KILN_TRY(mem.add_region(
        region{"stack", region_kind::stack, L::stack, L::stack_size, memory::prot_rw, true}));
    const auto sys = memory::x86_64::build_system_tables(fixed::system_tables, L::stack_top);
    KILN_TRY(mem.write(fixed::system_tables, sys.page));
    KILN_TRY(mem.write(L::code, std::as_bytes(code)));

    KILN_TRY_ASSIGN(auto tables, memory::x86_64::build_identity_page_tables(
                                     mem, fixed::page_tables, fixed::page_tables_max, nx));
    for (const auto& p : patches)
      if (!patch(tables, p)) return error(memory::memory_errc::out_of_bounds, "pte patch");
    KILN_TRY(mem.add_region(region{"page_tables", region_kind::page_tables, fixed::page_tables,
                                   memory::align_up(tables.bytes(), memory::page_size),
                                   memory::prot_r, false}));
    KILN_TRY(mem.write(fixed::page_tables, std::as_bytes(std::span(tables.entries))));

    bare_guest g{std::move(mem), std::move(cpu)};
    KILN_TRY(g.cpu->map_memory(g.mem));
    KILN_TRY(g.cpu->set_special_registers(vcpu::x86_64::long_mode_state(tables.root, sys, nx)));
    vcpu::registers r;
    r.rip = L::code.value;
    r.rsp = L::stack_top;
    r.rflags = 0x2;
    KILN_TRY(g.cpu->set_registers(r));
    return g;
  }

  /// Reads the registers, applies `f` to them, writes them back.
  template <class F> void edit_registers(F&& f) {
    auto r = cpu->get_registers();
    ASSERT_TRUE(r) << r.err().message();
    f(*r);
    auto w = cpu->set_registers(*r);
    ASSERT_TRUE(w) << w.err().message();
  }

  std::uint64_t rip() {
    auto r = cpu->get_registers();
    EXPECT_TRUE(r) << (r ? "" : r.err().message());
    return r ? r->rip : 0;
  }

private:
  /// Sets the leaf entry of `p.va` in its 4 KiB page table (the chunk must already have one).
  static bool patch(memory::x86_64::page_table_image& img, const pte_patch& p) {
    constexpr std::uint64_t present = 1, write = 2, accessed = 1u << 5, dirty = 1u << 6,
                            large = 1u << 7, addr_mask = 0x000f'ffff'ffff'f000ull;
    const std::uint64_t pde = img.entries[(2 + p.va / (1ull << 30)) * 512 +
                                          (p.va % (1ull << 30)) / memory::large_page_size];
    if (!(pde & present) || (pde & large)) return false;
    const std::uint64_t pt = ((pde & addr_mask) - img.root.value) / memory::page_size;
    img.entries[pt * 512 + (p.va % memory::large_page_size) / memory::page_size] =
        (p.va & addr_mask) | present | accessed | dirty | (p.writable ? write : 0);
    return true;
  }
};

/// "io_out{port=0x10, size=4, value=0x7}": for failure messages.
inline std::string describe(const vcpu::exit& e) {
  std::ostringstream s;
  s << std::hex << std::showbase << vcpu::exit_name(e);
  std::visit(
      [&](const auto& x) {
        using T = std::decay_t<decltype(x)>;
        namespace ex = vcpu::exits;
        if constexpr (std::is_same_v<T, ex::io_out>)
          s << "{port=" << x.port << ", size=" << int{x.size} << ", value=" << x.value << "}";
        else if constexpr (std::is_same_v<T, ex::io_in>)
          s << "{port=" << x.port << ", size=" << int{x.size} << "}";
        else if constexpr (std::is_same_v<T, ex::halt> || std::is_same_v<T, ex::shutdown>)
          s << "{rip=" << x.rip << "}";
        else if constexpr (std::is_same_v<T, ex::mmio>)
          s << "{gpa=" << x.gpa << ", size=" << int{x.size} << ", write=" << x.write << "}";
        else if constexpr (std::is_same_v<T, ex::exception>)
          s << "{vector=" << int{x.vector} << ", rip=" << x.rip << ", cr2=" << x.cr2 << "}";
        else if constexpr (std::is_same_v<T, ex::memory_fault>)
          s << "{address=" << x.address << ", access=" << int(x.access)
            << ", unmapped=" << x.unmapped << ", rip=" << x.rip << "}";
        else if constexpr (std::is_same_v<T, ex::fail_entry>)
          s << "{reason=" << x.reason << "}";
        else if constexpr (std::is_same_v<T, ex::internal_error>)
          s << "{" << x.what << ", rip=" << x.rip << "}";
      },
      e);
  return s.str();
}

} // namespace kiln::test
