// The emulated backend: a Unicorn engine per vCPU, its hooks turned into kiln's exit variant.
//
// Unicorn 2.0.1 facts this file depends on (measured; ../shared/notes/emulated-backend.md):
// - `out`/`in` are caught with UC_HOOK_INSN; the guest's stub is `out` + `jmp next`, so a stop
//   requested in the hook is exact and RIP afterwards is the instruction after the `out`.
// - Exceptions never reach the guest IDT: UC_HOOK_INTR gets the vector (CR2 set for #PF).
// - Region permissions are enforced per mapping (no NX bit in page tables); invalid accesses go
//   to UC_HOOK_MEM_INVALID with the exact address.
// - `hlt` ends uc_emu_start by itself with RIP after it.
// - uc_emu_start is called with until = 0, timeout = 0, count = 0: anything else flushes
//   translations or starts a timer thread per call.
#include <kiln/guest/abi.h>
#include <kiln/vcpu/emulated/emulated_vcpu.hpp>
#include <kiln/vcpu/vcpu_errc.hpp>

#include <fmt/format.h>
#include <unicorn/unicorn.h>

#include <sys/mman.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <optional>
#include <thread>
#include <vector>

namespace kiln::vcpu::emulated {
namespace {

error uc_error(vcpu_errc code, const char* what, uc_err err) {
  return error(code, std::string(what) + ": " + uc_strerror(err));
}

struct engine {
  uc_engine* uc = nullptr;
  engine() = default;
  engine(const engine&) = delete;
  engine& operator=(const engine&) = delete;
  ~engine() {
    if (uc) uc_close(uc);
  }
};

// Unicorn's ids of the general registers, in register_fields' order.
constexpr std::array<int, register_count> gpr_ids{
    UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_RCX,   UC_X86_REG_RDX, UC_X86_REG_RSI,
    UC_X86_REG_RDI, UC_X86_REG_RSP, UC_X86_REG_RBP,   UC_X86_REG_R8,  UC_X86_REG_R9,
    UC_X86_REG_R10, UC_X86_REG_R11, UC_X86_REG_R12,   UC_X86_REG_R13, UC_X86_REG_R14,
    UC_X86_REG_R15, UC_X86_REG_RIP, UC_X86_REG_RFLAGS};

// Unicorn 2.0.1 builds its engine on the first call after uc_open (uc_hook_add, here), and the
// build maps a 1 GiB read-write-execute translation buffer (measured: VmSize grows by 1 GiB and
// ~25 MiB). When that mmap fails (an address-space limit, vm.overcommit_memory=2, a policy that
// refuses writable and executable memory) Unicorn prints "Could not allocate dynamic translator
// buffer" and calls exit(1): the whole host process ends. 2.0.1 offers no way to make the buffer
// smaller. So kiln maps the same kind of buffer first, with headroom, and unmaps it: if that
// fails, creation fails with ENOMEM and a message instead. Engines being built at the same time
// (on other workers) have not made their own mapping yet, so the check holds one such buffer
// for every one of them, itself included, at the same time: it never serializes creations, and
// under pressure it refuses early rather than late. One buffer per mapping, as Unicorn maps
// them, because the kernel judges each mapping on its own (under heuristic overcommit a single
// 25 GiB mapping is refused on a 24 GiB machine where 23 of 1 GiB are not). Only a thread
// outside kiln that takes the room between the check and Unicorn's mmap (about a millisecond
// later) could still make Unicorn's mmap fail.
constexpr std::uint64_t translation_buffer_bytes = 1ull << 30;
constexpr std::uint64_t translation_headroom_bytes = 64ull << 20;

std::atomic<unsigned> engines_building{0};

result<void> check_room_for_engines(unsigned engines) {
  constexpr std::uint64_t bytes = translation_buffer_bytes + translation_headroom_bytes;
  std::vector<void*> held;
  held.reserve(engines);
  int err = 0;
  for (unsigned i = 0; i < engines && err == 0; ++i) {
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE | PROT_EXEC,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
      err = errno;
    else
      held.push_back(p);
  }
  for (void* p : held)
    ::munmap(p, bytes);
  if (err == 0) return {};
  std::string limit = "unlimited";
  if (rlimit rl{}; ::getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
    limit = fmt::format("{} MiB", rl.rlim_cur >> 20);
  return error(std::error_code(err, std::generic_category()),
               fmt::format("the emulator needs {} MiB of writable, executable address space for "
                           "its translation buffer ({} of them being built at once) and the host "
                           "refused it (mmap: {}; address space limit {})",
                           bytes >> 20, engines, std::strerror(err), limit));
}

class emulated_vcpu final : public vcpu {
public:
  static result<std::unique_ptr<vcpu>> create() {
    auto v = std::unique_ptr<emulated_vcpu>(new emulated_vcpu());
    if (uc_err e = uc_open(UC_ARCH_X86, UC_MODE_64, &v->engine_.uc); e != UC_ERR_OK)
      return uc_error(vcpu_errc::create_failed, "uc_open", e);
    const unsigned building = engines_building.fetch_add(1) + 1;
    struct built {
      ~built() { engines_building.fetch_sub(1); }
    } done;
    KILN_TRY(check_room_for_engines(building));
    KILN_TRY(v->install_hooks()); // the first hook builds the engine (see above)
    return std::unique_ptr<vcpu>(std::move(v));
  }

  backend_kind kind() const noexcept override { return backend_kind::emulated; }
  std::uint64_t abi_features() const noexcept override { return KILN_FEATURE_EMULATED; }

  result<void> map_memory(const memory::guest_memory& mem) override {
    std::vector<mapped_range> want;
    for (const auto& r : mem.regions()) {
      if (r.prot == memory::protection::none) continue;
      // Unicorn's permissions never exceed the host mapping's: a write Unicorn believes allowed
      // on a host read-only page would kill the host (trap 8).
      std::uint32_t perms = 0;
      if (has(r.prot, memory::protection::read)) perms |= UC_PROT_READ;
      if (has(r.prot, memory::protection::write)) perms |= UC_PROT_WRITE;
      if (has(r.prot, memory::protection::exec)) perms |= UC_PROT_EXEC;
      // SAFETY: the region lies inside guest memory's host mapping, which outlives this vCPU.
      want.push_back({r.start.value, r.size, perms, mem.host_address_for_mapping(r.start)});
    }
    // Unmap what went away or changed, then map what is new; an unchanged region costs nothing
    // (and keeps any narrower rights protect() gave parts of it).
    for (auto it = mapped_.begin(); it != mapped_.end();) {
      if (std::find(want.begin(), want.end(), *it) != want.end()) {
        ++it;
        continue;
      }
      ++stats_.map_calls;
      if (uc_err e = uc_mem_unmap(engine_.uc, it->start, it->size); e != UC_ERR_OK)
        return uc_error(vcpu_errc::map_failed, "uc_mem_unmap", e);
      it = mapped_.erase(it);
    }
    for (const auto& w : want) {
      if (std::find(mapped_.begin(), mapped_.end(), w) != mapped_.end()) continue;
      ++stats_.map_calls;
      if (uc_err e = uc_mem_map_ptr(engine_.uc, w.start, w.size, w.perms, w.host); e != UC_ERR_OK)
        return uc_error(vcpu_errc::map_failed,
                        fmt::format("uc_mem_map_ptr [{:#x}, +{:#x})", w.start, w.size).c_str(), e);
      mapped_.push_back(w);
    }
    exec_ranges_.clear();
    for (const auto& m : mapped_)
      if (m.perms & UC_PROT_EXEC) exec_ranges_.push_back({m.start, m.start + m.size});
    return {};
  }

  result<void> protect(memory::guest_phys_addr gpa, std::uint64_t size,
                       memory::protection p) override {
    std::uint32_t perms = 0;
    if (has(p, memory::protection::read)) perms |= UC_PROT_READ;
    if (has(p, memory::protection::write)) perms |= UC_PROT_WRITE;
    if (has(p, memory::protection::exec)) perms |= UC_PROT_EXEC;
    // uc_mem_protect splits Unicorn's region as needed and flushes its soft TLB, so a stale
    // translation cannot write a page the host just made read-only (measured on 2.0.1: a write
    // right after narrowing stops with UC_ERR_WRITE_PROT; ~150 us a call).
    ++stats_.map_calls;
    if (uc_err e = uc_mem_protect(engine_.uc, gpa.value, size, perms); e != UC_ERR_OK)
      return uc_error(vcpu_errc::map_failed, "uc_mem_protect", e);
    return {};
  }

  result<registers> get_registers() override {
    std::array<std::uint64_t, register_count> values{};
    std::array<void*, register_count> slots{};
    for (std::size_t i = 0; i < register_count; ++i)
      slots[i] = &values[i];
    if (uc_err e = uc_reg_read_batch(engine_.uc, const_cast<int*>(gpr_ids.data()), slots.data(),
                                     register_count);
        e != UC_ERR_OK)
      return uc_error(vcpu_errc::register_access, "uc_reg_read_batch", e);
    return from_array(values);
  }

  result<void> set_registers(const registers& r) override {
    auto values = to_array(r);
    std::array<void*, register_count> slots{};
    for (std::size_t i = 0; i < register_count; ++i)
      slots[i] = &values[i];
    if (uc_err e = uc_reg_write_batch(engine_.uc, const_cast<int*>(gpr_ids.data()), slots.data(),
                                      register_count);
        e != UC_ERR_OK)
      return uc_error(vcpu_errc::register_access, "uc_reg_write_batch", e);
    return {};
  }

  result<special_registers> get_special_registers() override {
    special_registers s;
    KILN_TRY(read(UC_X86_REG_CR0, s.cr0));
    KILN_TRY(read(UC_X86_REG_CR2, s.cr2));
    KILN_TRY(read(UC_X86_REG_CR3, s.cr3));
    KILN_TRY(read(UC_X86_REG_CR4, s.cr4));
    KILN_TRY(read(UC_X86_REG_CR8, s.cr8));
    uc_x86_msr msr{x86::msr_efer, 0};
    KILN_TRY(read(UC_X86_REG_MSR, msr));
    s.efer = msr.value;
    uc_x86_mmr gdt{}, idt{}, tr{};
    KILN_TRY(read(UC_X86_REG_GDTR, gdt));
    KILN_TRY(read(UC_X86_REG_IDTR, idt));
    KILN_TRY(read(UC_X86_REG_TR, tr));
    s.gdt = {gdt.base, static_cast<std::uint16_t>(gdt.limit)};
    s.idt = {idt.base, static_cast<std::uint16_t>(idt.limit)};
    s.tr.selector = tr.selector;
    s.tr.base = tr.base;
    s.tr.limit = tr.limit;
    s.tr.type = 0xb;
    s.tr.present = true;
    // Unicorn exposes selectors and the FS/GS bases; the descriptor caches follow from the GDT
    // when selectors are written back, which is how set_special_registers restores them.
    auto sel = [&](int id, segment& seg) -> result<void> {
      std::uint64_t v = 0;
      KILN_TRY(read(id, v));
      seg.selector = static_cast<std::uint16_t>(v);
      seg.present = seg.selector != 0;
      return {};
    };
    KILN_TRY(sel(UC_X86_REG_CS, s.cs));
    KILN_TRY(sel(UC_X86_REG_SS, s.ss));
    KILN_TRY(sel(UC_X86_REG_DS, s.ds));
    KILN_TRY(sel(UC_X86_REG_ES, s.es));
    KILN_TRY(sel(UC_X86_REG_FS, s.fs));
    KILN_TRY(sel(UC_X86_REG_GS, s.gs));
    s.cs.l = true;
    KILN_TRY(read(UC_X86_REG_FS_BASE, s.fs.base));
    KILN_TRY(read(UC_X86_REG_GS_BASE, s.gs.base));
    s.ldt.unusable = true;
    return s;
  }

  result<void> set_special_registers(const special_registers& s) override {
    // Order matters (notes/emulated-backend.md): tables, CR3, CR4, EFER, CR0, then selectors,
    // which Unicorn loads through the GDT and therefore through the page tables.
    uc_x86_mmr gdt{0, s.gdt.base, s.gdt.limit, 0};
    uc_x86_mmr idt{0, s.idt.base, s.idt.limit, 0};
    KILN_TRY(write(UC_X86_REG_GDTR, gdt));
    KILN_TRY(write(UC_X86_REG_IDTR, idt));
    KILN_TRY(write(UC_X86_REG_CR3, s.cr3));
    KILN_TRY(write(UC_X86_REG_CR4, s.cr4));
    uc_x86_msr efer{x86::msr_efer, s.efer & ~x86::efer_nxe}; // no NX on this backend
    KILN_TRY(write(UC_X86_REG_MSR, efer));
    KILN_TRY(write(UC_X86_REG_CR0, s.cr0));
    KILN_TRY(write(UC_X86_REG_CR2, s.cr2));
    KILN_TRY(write(UC_X86_REG_CS, std::uint64_t{s.cs.selector}));
    KILN_TRY(write(UC_X86_REG_SS, std::uint64_t{s.ss.selector}));
    KILN_TRY(write(UC_X86_REG_DS, std::uint64_t{s.ds.selector}));
    KILN_TRY(write(UC_X86_REG_ES, std::uint64_t{s.es.selector}));
    KILN_TRY(write(UC_X86_REG_FS, std::uint64_t{s.fs.selector}));
    KILN_TRY(write(UC_X86_REG_GS, std::uint64_t{s.gs.selector}));
    KILN_TRY(write(UC_X86_REG_FS_BASE, s.fs.base));
    KILN_TRY(write(UC_X86_REG_GS_BASE, s.gs.base));
    uc_x86_mmr tr{s.tr.selector, s.tr.base, s.tr.limit, 0x89};
    KILN_TRY(write(UC_X86_REG_TR, tr));
    return {};
  }

  result<fpu_state> get_fpu() override {
    fpu_state f;
    for (int i = 0; i < 8; ++i)
      KILN_TRY(read(UC_X86_REG_ST0 + i, f.st[i]));
    for (int i = 0; i < 16; ++i)
      KILN_TRY(read(UC_X86_REG_XMM0 + i, f.xmm[i]));
    std::uint64_t v = 0;
    KILN_TRY(read(UC_X86_REG_FPCW, v));
    f.fcw = static_cast<std::uint16_t>(v);
    KILN_TRY(read(UC_X86_REG_FPSW, v));
    f.fsw = static_cast<std::uint16_t>(v);
    KILN_TRY(read(UC_X86_REG_FPTAG, v));
    f.ftw = abridged_tag(static_cast<std::uint16_t>(v));
    KILN_TRY(read(UC_X86_REG_MXCSR, v));
    f.mxcsr = static_cast<std::uint32_t>(v);
    return f;
  }

  result<void> set_fpu(const fpu_state& f) override {
    // The status word first: its TOP field decides which physical register ST0..ST7 name.
    KILN_TRY(write(UC_X86_REG_FPCW, std::uint64_t{f.fcw}));
    KILN_TRY(write(UC_X86_REG_FPSW, std::uint64_t{f.fsw}));
    KILN_TRY(write(UC_X86_REG_FPTAG, std::uint64_t{full_tag(f.ftw)}));
    for (int i = 0; i < 8; ++i)
      KILN_TRY(write(UC_X86_REG_ST0 + i, f.st[i]));
    for (int i = 0; i < 16; ++i)
      KILN_TRY(write(UC_X86_REG_XMM0 + i, f.xmm[i]));
    KILN_TRY(write(UC_X86_REG_MXCSR, std::uint64_t{f.mxcsr}));
    return {};
  }

  // fpu_state::ftw is FXSAVE's abridged tag (1 bit a register: 1 = valid); Unicorn's FPTAG is
  // the full tag word (2 bits a register: 11 = empty). Valid registers map to 00 ("valid"); the
  // zero/special distinction is recomputed by the FPU from the register contents.
  static std::uint16_t full_tag(std::uint8_t abridged) {
    std::uint16_t tag = 0;
    for (int i = 0; i < 8; ++i)
      if (!(abridged & (1u << i))) tag |= 3u << (2 * i);
    return tag;
  }
  static std::uint8_t abridged_tag(std::uint16_t full) {
    std::uint8_t ftw = 0;
    for (int i = 0; i < 8; ++i)
      if (((full >> (2 * i)) & 3u) != 3u) ftw |= 1u << i;
    return ftw;
  }

  exit run() override;
  void kick() noexcept override;

  void invalidate_code(memory::guest_phys_addr gpa, std::uint64_t size) override {
    // Only executable ranges can hold translations; skip the call elsewhere (7 us per 4 KiB).
    const std::uint64_t lo = gpa.value;
    std::uint64_t hi = 0;
    if (__builtin_add_overflow(lo, size, &hi)) hi = ~0ull;
    for (const auto& [start, end] : exec_ranges_) {
      const std::uint64_t a = std::max(lo, start), b = std::min(hi, end);
      if (a < b) {
        uc_ctl_remove_cache(engine_.uc, a, b);
        ++stats_.code_invalidations;
      }
    }
  }

  vcpu_stats stats() const noexcept override {
    vcpu_stats s = stats_;
    s.kicks = kicks_.load(std::memory_order_relaxed);
    return s;
  }

private:
  emulated_vcpu() = default;

  template <class T> result<void> read(int id, T& out) {
    if (uc_err e = uc_reg_read(engine_.uc, id, &out); e != UC_ERR_OK)
      return uc_error(vcpu_errc::register_access, "uc_reg_read", e);
    return {};
  }
  template <class T> result<void> write(int id, const T& in) {
    if (uc_err e = uc_reg_write(engine_.uc, id, &in); e != UC_ERR_OK)
      return uc_error(vcpu_errc::register_access, "uc_reg_write", e);
    return {};
  }
  std::uint64_t rip() {
    std::uint64_t v = 0;
    uc_reg_read(engine_.uc, UC_X86_REG_RIP, &v);
    return v;
  }

  result<void> install_hooks();
  exit decode_stop(uc_err err);

  // Hooks: each records the exit and stops the engine. They run on the vCPU thread. A stop only
  // takes effect at the end of the translation block, so later instructions of the same block
  // may still run and fire hooks: the first exit recorded is the one reported.
  void record(exit e) {
    if (!pending_) pending_ = std::move(e);
  }
  static void on_out(uc_engine* uc, std::uint32_t port, int size, std::uint32_t value, void* self) {
    auto* v = static_cast<emulated_vcpu*>(self);
    v->record(
        exits::io_out{static_cast<std::uint16_t>(port), static_cast<std::uint8_t>(size), value});
    uc_emu_stop(uc);
  }
  static std::uint32_t on_in(uc_engine* uc, std::uint32_t port, int size, void* self) {
    auto* v = static_cast<emulated_vcpu*>(self);
    v->record(exits::io_in{static_cast<std::uint16_t>(port), static_cast<std::uint8_t>(size)});
    uc_emu_stop(uc);
    return 0;
  }
  static void on_interrupt(uc_engine* uc, std::uint32_t vector, void* self) {
    auto* v = static_cast<emulated_vcpu*>(self);
    std::uint64_t cr2 = 0;
    uc_reg_read(uc, UC_X86_REG_CR2, &cr2);
    // Unicorn does not expose the error code; the vector, RIP and CR2 are exact.
    v->record(exits::exception{static_cast<std::uint8_t>(vector), 0, v->rip(), cr2});
    uc_emu_stop(uc);
  }
  static bool on_invalid_memory(uc_engine* uc, uc_mem_type type, std::uint64_t address, int,
                                std::int64_t, void* self) {
    auto* v = static_cast<emulated_vcpu*>(self);
    access_kind access = access_kind::read;
    bool unmapped = false;
    switch (type) {
    case UC_MEM_READ_UNMAPPED:
      unmapped = true;
      break;
    case UC_MEM_WRITE_UNMAPPED:
      unmapped = true;
      access = access_kind::write;
      break;
    case UC_MEM_FETCH_UNMAPPED:
      unmapped = true;
      access = access_kind::execute;
      break;
    case UC_MEM_WRITE_PROT:
      access = access_kind::write;
      break;
    case UC_MEM_FETCH_PROT:
      access = access_kind::execute;
      break;
    case UC_MEM_READ_PROT:
      break;
    case UC_MEM_READ:
    case UC_MEM_WRITE:
    case UC_MEM_FETCH:
    case UC_MEM_READ_AFTER:
      break;
    }
    (void)uc;
    v->record(exits::memory_fault{address, access, unmapped, v->rip()});
    return false; // not handled: the engine stops with the matching UC_ERR_*
  }
  // At the start of every translation block: honour a pending kick. The stop takes effect when
  // this block ends, at a block boundary, where the engine's state is exact.
  static void on_block(uc_engine* uc, std::uint64_t, std::uint32_t, void* self) {
    auto* v = static_cast<emulated_vcpu*>(self);
    if (v->kick_pending_.load(std::memory_order_relaxed)) uc_emu_stop(uc);
  }
  static bool on_invalid_instruction(uc_engine* uc, void* self) {
    auto* v = static_cast<emulated_vcpu*>(self);
    v->record(exits::exception{6, 0, v->rip(), 0}); // #UD
    uc_emu_stop(uc);
    return false;
  }

  engine engine_;
  std::optional<exit> pending_;
  struct mapped_range {
    std::uint64_t start = 0, size = 0;
    std::uint32_t perms = 0;
    void* host = nullptr;
    bool operator==(const mapped_range&) const = default;
  };
  std::vector<mapped_range> mapped_; // what map_memory() gave Unicorn
  std::vector<std::pair<std::uint64_t, std::uint64_t>> exec_ranges_;
  vcpu_stats stats_;
  // Kick protocol, see kick().
  std::atomic<bool> kick_pending_{false};
  std::atomic<std::uint64_t> kicks_{0};
};

result<void> emulated_vcpu::install_hooks() {
  uc_hook h{};
  uc_engine* uc = engine_.uc;
  if (uc_err e = uc_hook_add(uc, &h, UC_HOOK_INSN, reinterpret_cast<void*>(&on_out), this, 1, 0,
                             UC_X86_INS_OUT);
      e != UC_ERR_OK)
    return uc_error(vcpu_errc::create_failed, "hook out", e);
  if (uc_err e = uc_hook_add(uc, &h, UC_HOOK_INSN, reinterpret_cast<void*>(&on_in), this, 1, 0,
                             UC_X86_INS_IN);
      e != UC_ERR_OK)
    return uc_error(vcpu_errc::create_failed, "hook in", e);
  if (uc_err e =
          uc_hook_add(uc, &h, UC_HOOK_INTR, reinterpret_cast<void*>(&on_interrupt), this, 1, 0);
      e != UC_ERR_OK)
    return uc_error(vcpu_errc::create_failed, "hook intr", e);
  if (uc_err e = uc_hook_add(uc, &h, UC_HOOK_MEM_INVALID,
                             reinterpret_cast<void*>(&on_invalid_memory), this, 1, 0);
      e != UC_ERR_OK)
    return uc_error(vcpu_errc::create_failed, "hook invalid memory", e);
  if (uc_err e = uc_hook_add(uc, &h, UC_HOOK_BLOCK, reinterpret_cast<void*>(&on_block), this, 1, 0);
      e != UC_ERR_OK)
    return uc_error(vcpu_errc::create_failed, "hook block", e);
  if (uc_err e = uc_hook_add(uc, &h, UC_HOOK_INSN_INVALID,
                             reinterpret_cast<void*>(&on_invalid_instruction), this, 1, 0);
      e != UC_ERR_OK)
    return uc_error(vcpu_errc::create_failed, "hook invalid instruction", e);
  return {};
}

// Kick protocol. kick() never calls uc_emu_stop from its own thread: Unicorn 2.0.1 can leave
// RIP behind an instruction it already executed when stopped asynchronously, so a resumed guest
// would run that instruction twice (upstream issue #1355; seen here as wrong results after
// time-slice kicks). Instead kick() only sets kick_pending_, and the block hook, running on the
// vCPU thread at the start of each translation block, stops the engine at that block's end.
//  1. A kick before run() is seen by run() before it starts the engine: cancelled at once.
//  2. A kick while the guest runs is seen by the next block's hook (a `jmp $` loop is one block
//     per iteration), so the stop lands within one block.
//  3. A kick that arrives after a hook already recorded an exit leaves kick_pending_ set: that
//     exit is returned, and the next run() returns cancelled (kicks are sticky until consumed).
//  4. The engine returning with nothing recorded and no kick pending means `hlt`.
void emulated_vcpu::kick() noexcept {
  kicks_.fetch_add(1, std::memory_order_relaxed);
  kick_pending_.store(true);
}

exit emulated_vcpu::run() {
  ++stats_.runs;
  for (;;) {
    if (kick_pending_.exchange(false)) {
      ++stats_.exits;
      return exits::cancelled{};
    }
    pending_.reset();
    const uc_err err = uc_emu_start(engine_.uc, rip(), 0, 0, 0);
    if (pending_) {
      ++stats_.exits;
      return std::move(*pending_);
    }
    if (kick_pending_.exchange(false)) {
      ++stats_.exits;
      return exits::cancelled{};
    }
    if (err != UC_ERR_OK) {
      ++stats_.exits;
      return decode_stop(err);
    }
    // Stopped with nothing recorded and no kick: `hlt`, which ends emulation by itself with
    // RIP after it. Anything else would be an engine quirk: resume.
    const std::uint64_t ip = rip();
    std::uint8_t prev = 0;
    if (ip > 0 && uc_mem_read(engine_.uc, ip - 1, &prev, 1) == UC_ERR_OK && prev == 0xf4) {
      ++stats_.exits;
      return exits::halt{ip};
    }
  }
}

exit emulated_vcpu::decode_stop(uc_err err) {
  return exits::internal_error{std::string("unicorn: ") + uc_strerror(err), rip()};
}

} // namespace

backend_status probe() {
  uc_engine* uc = nullptr;
  if (uc_err e = uc_open(UC_ARCH_X86, UC_MODE_64, &uc); e != UC_ERR_OK)
    return {backend_kind::emulated, false, std::string("uc_open: ") + uc_strerror(e)};
  uc_close(uc);
  unsigned major = 0, minor = 0;
  uc_version(&major, &minor);
  return {backend_kind::emulated, true,
          "Unicorn " + std::to_string(major) + "." + std::to_string(minor) + " CPU emulator"};
}

result<std::unique_ptr<vcpu>> create() {
  return emulated_vcpu::create();
}

} // namespace kiln::vcpu::emulated
