// The probe guest: long mode, a stack, an SSE computation and a port write, checked.
#include <kiln/guest/abi.h>
#include <kiln/memory/guest_memory.hpp>
#include <kiln/memory/layout.hpp>
#include <kiln/memory/x86_64/page_tables.hpp>
#include <kiln/memory/x86_64/system_tables.hpp>
#include <kiln/vcpu/vcpu.hpp>
#include <kiln/vcpu/vcpu_errc.hpp>
#include <kiln/vcpu/x86_64/long_mode.hpp>
#include <kiln/vcpu/x86_64/probe_guest.hpp>

#include <fmt/format.h>

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <variant>

namespace kiln::vcpu::x86_64 {
namespace {

constexpr std::uint64_t memory_size = 4ull << 20; // the least guest_memory takes
constexpr memory::guest_phys_addr code_at{0x100000};
constexpr memory::guest_phys_addr stack_at{0x3ff000};
constexpr std::uint64_t stack_top = 0x400000;
constexpr std::uint16_t port = 0x10;
constexpr std::uint32_t seed = 0x6b696c6e;   // "nlik"
constexpr std::uint32_t expected = seed * 2; // paddq doubles it (mod 2^32 in eax)

// clang-format off
constexpr std::array<std::uint8_t, 28> code = {
    0xb8, 0x6e, 0x6c, 0x69, 0x6b, // mov $seed, %eax
    0x50,                         // push %rax
    0x59,                         // pop %rcx
    0x66, 0x48, 0x0f, 0x6e, 0xc1, // movq %rcx, %xmm0
    0x66, 0x0f, 0xd4, 0xc0,       // paddq %xmm0, %xmm0
    0x66, 0x48, 0x0f, 0x7e, 0xc0, // movq %xmm0, %rax
    0xba, 0x10, 0x00, 0x00, 0x00, // mov $port, %edx
    0xef,                         // out %eax, (%dx)
    0xf4,                         // hlt
};
// clang-format on

/// What the program ended in, for the reason a backend is refused.
std::string describe(const exit& e) {
  if (const auto* o = std::get_if<exits::io_out>(&e))
    return fmt::format("a write of {:#x} to port {:#x}", o->value, o->port);
  if (const auto* x = std::get_if<exits::exception>(&e))
    return fmt::format("exception {} at rip {:#x}", x->vector, x->rip);
  if (const auto* i = std::get_if<exits::internal_error>(&e))
    return fmt::format("{} at rip {:#x}", i->what, i->rip);
  if (const auto* f = std::get_if<exits::fail_entry>(&e))
    return fmt::format("VM entry failed, reason {:#x}", f->reason);
  return exit_name(e);
}

result<memory::guest_memory> build_memory(std::uint64_t features,
                                          memory::x86_64::system_tables& sys,
                                          memory::guest_phys_addr& root) {
  using memory::region;
  using memory::region_kind;
  namespace fixed = memory::fixed;
  KILN_TRY_ASSIGN(auto mem, memory::guest_memory::create(memory_size));
  KILN_TRY(mem.add_region(region{"system_tables", region_kind::system_tables, fixed::system_tables,
                                 fixed::system_tables_size, memory::prot_r, true}));
  KILN_TRY(mem.add_region(
      region{"code", region_kind::image, code_at, memory::page_size, memory::prot_rx, true}));
  KILN_TRY(mem.add_region(
      region{"stack", region_kind::stack, stack_at, memory::page_size, memory::prot_rw, true}));
  sys = memory::x86_64::build_system_tables(fixed::system_tables, stack_top);
  KILN_TRY(mem.write(fixed::system_tables, sys.page));
  KILN_TRY(mem.write(code_at, std::as_bytes(std::span(code))));
  const bool nx = (features & KILN_FEATURE_NX) != 0;
  KILN_TRY_ASSIGN(auto tables, memory::x86_64::build_identity_page_tables(
                                   mem, fixed::page_tables, fixed::page_tables_max, nx));
  KILN_TRY(mem.add_region(region{"page_tables", region_kind::page_tables, fixed::page_tables,
                                 memory::align_up(tables.bytes(), memory::page_size),
                                 memory::prot_r, false}));
  KILN_TRY(mem.write(fixed::page_tables, std::as_bytes(std::span(tables.entries))));
  root = tables.root;
  return mem;
}

} // namespace

result<void> run_probe_guest(std::unique_ptr<vcpu> fresh) {
  memory::x86_64::system_tables sys;
  memory::guest_phys_addr root{0};
  KILN_TRY_ASSIGN(auto mem, build_memory(fresh->abi_features(), sys, root));
  // Declared after the memory: the vCPU that maps it goes first.
  const std::unique_ptr<vcpu> cpu = std::move(fresh);
  KILN_TRY(cpu->map_memory(mem));
  const bool nx = (cpu->abi_features() & KILN_FEATURE_NX) != 0;
  KILN_TRY(cpu->set_special_registers(long_mode_state(root, sys, nx)));
  registers r;
  r.rip = code_at.value;
  r.rsp = stack_top;
  r.rflags = 0x2;
  KILN_TRY(cpu->set_registers(r));
  const exit e = cpu->run();
  if (const auto* o = std::get_if<exits::io_out>(&e);
      o && o->port == port && o->size == 4 && o->value == expected)
    return {};
  return error(vcpu_errc::backend_unavailable,
               fmt::format("the {} backend cannot run kiln's guests on this host: a 64-bit probe "
                           "guest (stack, SSE, port write) ended in {} instead of a write of {:#x} "
                           "to port {:#x}",
                           to_string(cpu->kind()), describe(e), expected, port));
}

} // namespace kiln::vcpu::x86_64
