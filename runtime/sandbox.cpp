// sandbox: builds guest memory and a vCPU, then runs the hypercall loop of each call.
#include <kiln/guest/abi.h>
#include <kiln/memory/elf_loader.hpp>
#include <kiln/memory/guest_memory.hpp>
#include <kiln/memory/x86_64/page_tables.hpp>
#include <kiln/memory/x86_64/system_tables.hpp>
#include <kiln/runtime/detail/sandbox_impl.hpp>
#include <kiln/runtime/sandbox.hpp>
#include <kiln/runtime/wire.hpp>
#include <kiln/vcpu/x86_64/long_mode.hpp>

#include <fmt/format.h>

#include <cstdio>
#include <cstring>
#include <vector>

namespace kiln {

using memory::guest_phys_addr;
namespace fixed = memory::fixed;

bool poisons(errc e) noexcept {
  switch (e) {
  case errc::guest_fault:
  case errc::stack_overflow:
  case errc::memory_violation:
  case errc::guest_aborted:
  case errc::invalid_port:
  case errc::malformed_message:
  case errc::guest_halted:
  case errc::unexpected_exit:
  case errc::cancelled:
  case errc::deadline_exceeded:
  case errc::backend_failure:
  case errc::not_ready:
    return true;
  case errc::poisoned:
  case errc::function_not_found:
  case errc::bad_arguments:
  case errc::guest_error:
  case errc::result_too_large:
  case errc::queue_full:
  case errc::reentrant_call:
    return false;
  }
  return true;
}

using detail::step;

namespace {

const char* access_name(vcpu::access_kind a) {
  switch (a) {
  case vcpu::access_kind::read:
    return "read";
  case vcpu::access_kind::write:
    return "write";
  case vcpu::access_kind::execute:
    return "execute";
  }
  return "?";
}

} // namespace

result<void> sandbox::impl::build(const memory::elf_image& image) {
  using memory::region_kind;
  attach_space();
  auto& mem = space.ram();
  // kiln's own regions, the image's, then heap and stack, each where kiln_region puts it.
  auto add = [&](region_kind k) {
    return mem.add_region(*memory::kiln_region(k, layout, config.stack_size));
  };
  for (auto k : {region_kind::boot_info, region_kind::system_tables, region_kind::ist_stack,
                 region_kind::io_in, region_kind::io_out})
    KILN_TRY(add(k));
  KILN_TRY(memory::load_elf(image, mem));
  KILN_TRY(add(region_kind::heap));
  KILN_TRY(add(region_kind::stack));

  // System tables (GDT, TSS with the exception stack) and boot info.
  const auto sys = memory::x86_64::build_system_tables(
      fixed::system_tables, fixed::ist_stack.value + fixed::ist_stack_size);
  KILN_TRY(mem.write(fixed::system_tables, sys.page));

  kiln_boot_info bi{};
  bi.magic = KILN_ABI_MAGIC;
  bi.abi_major = KILN_ABI_VERSION_MAJOR;
  bi.abi_minor = KILN_ABI_VERSION_MINOR;
  bi.features = cpu->abi_features() | KILN_FEATURE_FILE_TABLE | KILN_FEATURE_MEMORY_OPS;
  bi.memory_size = layout.memory_size;
  bi.heap_start = layout.heap_start.value;
  bi.heap_size = layout.heap_size;
  bi.stack_bottom = layout.stack_bottom.value;
  bi.stack_top = layout.stack_top.value;
  bi.ist_stack_top = fixed::ist_stack.value + fixed::ist_stack_size;
  bi.in_buf = fixed::io_in.value;
  bi.in_buf_size = fixed::io_buffer_size;
  bi.out_buf = fixed::io_out.value;
  bi.out_buf_size = fixed::io_buffer_size;
  bi.files = fixed::boot_info.value + fixed::file_table_offset;
  bi.file_count = 0;
  if (config.cmdline.size() >= fixed::cmdline_max)
    return error(memory::memory_errc::bad_size, "command line longer than 1023 bytes");
  bi.cmdline = fixed::boot_info.value + fixed::cmdline_offset;
  bi.cmdline_len = config.cmdline.size();
  KILN_TRY(mem.write_object(fixed::boot_info, bi));
  KILN_TRY(mem.write(guest_phys_addr{bi.cmdline}, std::as_bytes(std::span(config.cmdline))));

  // Page tables last: they map every region added above.
  const bool nx = (cpu->abi_features() & KILN_FEATURE_NX) != 0;
  KILN_TRY_ASSIGN(auto tables, memory::x86_64::build_identity_page_tables(
                                   mem, fixed::page_tables, fixed::page_tables_max, nx));
  // The region spans the whole reserved area: pages past the built tables are where later
  // splits (guest protect requests, mapped files) take their tables from.
  KILN_TRY(
      mem.add_region(*memory::kiln_region(region_kind::page_tables, layout, config.stack_size)));
  KILN_TRY(mem.write(fixed::page_tables, std::as_bytes(std::span(tables.entries))));
  KILN_TRY(space.init_fresh(tables, nx, config.max_protection_ranges));

  KILN_TRY(cpu->map_memory(mem));
  backend_calls_at_build = cpu->stats().map_calls;
  KILN_TRY(cpu->set_special_registers(vcpu::x86_64::long_mode_state(tables.root, sys, nx)));
  vcpu::registers regs;
  regs.rip = image.entry.value;
  regs.rsp = layout.stack_top.value;
  regs.rdi = fixed::boot_info.value;
  regs.rflags = 0x2;
  KILN_TRY(cpu->set_registers(regs));
  KILN_TRY(cpu->set_fpu(vcpu::fpu_state{}));
  scratch.resize(fixed::io_buffer_size);
  return {};
}

step sandbox::impl::on_exit(const vcpu::exit& e, bool init) {
  using namespace vcpu::exits;
  struct visitor {
    impl& self;
    bool init;
    step operator()(const io_out& io) const {
      ++self.stats.exits_io;
      return self.on_hypercall(io, init);
    }
    step operator()(const io_in& io) const {
      return step::failed(error(errc::invalid_port, fmt::format("in from port {:#x}", io.port)));
    }
    step operator()(const halt& h) const {
      return step::failed(error(errc::guest_halted, fmt::format("hlt at rip {:#x}", h.rip)));
    }
    step operator()(const mmio& m) const {
      return step::failed(
          error(errc::memory_violation, fmt::format("{} of unbacked guest-physical {:#x}",
                                                    m.write ? "write" : "read", m.gpa)));
    }
    step operator()(const exception& x) const {
      return self.on_exception(x.vector, x.error_code, x.rip, x.cr2);
    }
    step operator()(const memory_fault& f) const {
      if (f.address >= self.layout.stack_guard.value && f.address < self.layout.stack_bottom.value)
        return step::failed(error(errc::stack_overflow,
                                  fmt::format("at rip {:#x}, address {:#x}", f.rip, f.address)));
      if (auto named = self.name_memory_fault(f.address, f.access == vcpu::access_kind::write,
                                              f.access == vcpu::access_kind::execute, f.rip))
        return step::failed(std::move(*named));
      return step::failed(
          error(errc::memory_violation,
                fmt::format("{} {} address {:#x} at rip {:#x}", access_name(f.access),
                            f.unmapped ? "of unmapped" : "forbidden at", f.address, f.rip)));
    }
    step operator()(const backing_lost& b) const {
      // The truncated file, when that is what happened (checked in on_exit, before this).
      return step::failed(
          error(errc::memory_violation,
                fmt::format("guest memory{} lost its host backing{} (rip {:#x})",
                            b.gpa_known ? fmt::format(" at {:#x}", b.gpa) : std::string(),
                            b.hw_poison ? ": the host page is poisoned" : "", b.rip)));
    }
    step operator()(const shutdown& s) const {
      return step::failed(
          error(errc::guest_halted, fmt::format("triple fault (shutdown) near rip {:#x}", s.rip)));
    }
    step operator()(const fail_entry& f) const {
      return step::failed(
          error(errc::unexpected_exit, fmt::format("VM entry failed, reason {:#x}", f.reason)));
    }
    step operator()(const cancelled&) const { return step::kicked(); }
    step operator()(const internal_error& i) const {
      return step::failed(
          error(errc::unexpected_exit, fmt::format("{} at rip {:#x}", i.what, i.rip)));
    }
  };
  ++stats.exits;
  if (!std::holds_alternative<io_out>(e)) ++stats.exits_other;
  // Lost pages of a truncated file come first: the emulated backend was kicked by the SIGBUS
  // handler; on KVM the touch surfaces as backing_lost, or as another exit of a guest that read
  // what it did not expect.
  if (space.lost_pages_seen() || std::holds_alternative<backing_lost>(e) ||
      (!space.files().empty() && !std::holds_alternative<io_out>(e)))
    if (auto lost = lost_file_pages()) return step::failed(std::move(*lost));
  return std::visit(visitor{*this, init}, e);
}

result<value> sandbox::impl::run_until_ready() {
  log_budget = config.log_budget_per_call;
  for (;;) {
    step s = on_exit(cpu->run(), /*init=*/true);
    switch (s.kind) {
    case step::resume:
      continue;
    case step::done:
      return std::move(s.result);
    case step::park: // no worker to run it on during create(): tell the guest
      if (auto w = write_host_result({KILN_STATUS_HOST_ERROR, value{},
                                      "asynchronous host functions are not available during init"});
          !w)
        return std::move(w).err();
      continue;
    case step::interrupted:
      return error(errc::cancelled, "during guest init");
    case step::fail:
      return std::move(s.err);
    }
  }
}

sandbox::run_state sandbox::impl::resume() {
  using rs = sandbox::run_state;
  std::uint64_t faults = 0, major = 0;
  hear_load();
  if (auto bad = known_corrupt()) return fail_call(std::move(*bad));
  if (!to_prefault.empty()) prefault_resident();
  before_run(faults, major);
  for (;;) {
    step s = on_exit(cpu->run(), /*init=*/false);
    if (s.kind != step::resume)
      after_run(faults, major, s.kind == step::done || s.kind == step::fail);
    switch (s.kind) {
    case step::resume:
      continue;
    case step::done:
      // A result computed over data known to be corrupt is never handed out.
      if (auto bad = known_corrupt()) return fail_call(std::move(*bad));
      calling = false;
      stats.last_call_time = std::chrono::steady_clock::now() - call_started;
      return {rs::done, std::move(s.result), {}, {}};
    case step::interrupted:
      return {rs::interrupted, {}, {}, {}};
    case step::park:
      return {rs::host_call, {}, {}, std::move(s.host)};
    case step::fail:
      return fail_call(std::move(s.err));
    }
  }
}

sandbox::run_state sandbox::impl::fail_call(error e) {
  calling = false;
  stats.last_call_time = std::chrono::steady_clock::now() - call_started;
  const bool ours = e.code.category() == category_of<errc>();
  if (!ours || poisons(static_cast<errc>(e.code.value()))) set_poison(e);
  return {sandbox::run_state::failed, {}, std::move(e), {}};
}

std::optional<error> sandbox::impl::known_corrupt() const {
  const auto& img = space.ram().image();
  if (!img) return std::nullopt;
  if (auto why = img->corruption())
    return error(memory::memory_errc::snapshot_corrupt, "guest memory: " + *why);
  return std::nullopt;
}

sandbox::sandbox(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
sandbox::~sandbox() = default;

result<std::unique_ptr<sandbox>> sandbox::create(const sandbox_config& config,
                                                 host_functions functions) {
  const auto t0 = std::chrono::steady_clock::now();
  if (functions.refused()) return *functions.refused();
  KILN_TRY_ASSIGN(auto kind, vcpu::resolve(config.backend));
  memory::layout_config lc{config.memory_size, config.heap_size, config.stack_size};
  if (config.memory_size < fixed::min_memory || config.stack_size >= config.memory_size)
    return error(memory::memory_errc::bad_size,
                 "memory size must be at least 4 MiB and above the stack size");
  const guest_phys_addr image_limit{config.memory_size - config.stack_size - memory::page_size};
  KILN_TRY_ASSIGN(auto image,
                  memory::read_elf_file(config.guest_path, fixed::image_base, image_limit));
  KILN_TRY_ASSIGN(auto layout, memory::plan_layout(lc, image.end));
  KILN_TRY_ASSIGN(auto mem, memory::guest_memory::create(config.memory_size, config.file_room));
  auto p = std::make_unique<impl>(config, std::move(functions), std::move(mem));
  p->layout = layout;
  KILN_TRY_ASSIGN(p->cpu, vcpu::create(kind));
  KILN_TRY(p->build(image));
  for (const auto& f : config.files)
    KILN_TRY(p->map_file(f));
  if (auto r = p->run_until_ready(); !r)
    return error(r.err().code, "during guest init: " + r.err().detail);
  p->ready = true;
  p->stats.create_time = std::chrono::steady_clock::now() - t0;
  return std::unique_ptr<sandbox>(new sandbox(std::move(p)));
}

result<void> sandbox::begin_call(std::string_view name, std::span<const value> args) {
  impl& s = *impl_;
  if (s.is_poisoned) return error(errc::poisoned, s.poison.message());
  if (s.calling) return error(errc::not_ready, "a call is already in progress");
  KILN_TRY_ASSIGN(auto n, wire::encode_call(s.scratch, KILN_MSG_CALL, name, args));
  KILN_TRY(s.write_in(std::span(s.scratch).first(n)));
  ++s.stats.calls;
  s.calling = true;
  s.call_started = std::chrono::steady_clock::now();
  s.log_budget = s.config.log_budget_per_call;
  return {};
}

sandbox::run_state sandbox::resume() {
  impl& s = *impl_;
  if (!s.calling) return {run_state::failed, {}, error(errc::not_ready, "no call in progress"), {}};
  return s.resume();
}

result<void> sandbox::finish_host_call(const host_call_outcome& outcome) {
  impl& s = *impl_;
  if (!s.calling) return error(errc::not_ready, "no call in progress");
  return s.write_host_result(outcome);
}

void sandbox::poison_with(error why) {
  impl_->calling = false;
  impl_->set_poison(std::move(why));
}

bool sandbox::in_call() const noexcept {
  return impl_->calling;
}

result<value> sandbox::call(std::string_view name, std::span<const value> args) {
  KILN_TRY(begin_call(name, args));
  for (;;) {
    run_state r = resume();
    switch (r.kind) {
    case run_state::done:
      return std::move(r.result);
    case run_state::failed:
      return std::move(r.err);
    case run_state::interrupted:
      poison_with(error(errc::cancelled));
      return error(errc::cancelled);
    case run_state::host_call:
      // An asynchronous host function needs a worker to wait on; the guest hears why.
      if (auto w =
              finish_host_call({KILN_STATUS_HOST_ERROR, value{},
                                r.host.function->name +
                                    " is asynchronous: it needs a sandbox run by kiln::runtime"});
          !w) {
        poison_with(w.err());
        return std::move(w).err();
      }
      continue;
    }
  }
}

void sandbox::kick() noexcept {
  impl_->cpu->kick();
}
bool sandbox::poisoned() const noexcept {
  return impl_->is_poisoned;
}
const error& sandbox::poison_reason() const noexcept {
  return impl_->poison;
}
vcpu::backend_kind sandbox::backend() const noexcept {
  return impl_->cpu->kind();
}

sandbox_stats sandbox::stats() const noexcept {
  impl_->update_load_stats();
  sandbox_stats s = impl_->stats;
  s.vcpu = impl_->cpu->stats();
  s.memory = impl_->memory_stats_now();
  return s;
}

} // namespace kiln
