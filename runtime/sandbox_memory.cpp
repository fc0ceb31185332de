// sandbox memory: guest protect/release requests over the bookkeeping, and mapped host files.
#include <kiln/memory/memory_errc.hpp>
#include <kiln/runtime/detail/sandbox_impl.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cstddef>
#include <cstring>

namespace kiln {

using detail::step;
using memory::guest_phys_addr;
using memory::protection;
namespace fixed = memory::fixed;

namespace {

constexpr unsigned prot_bits_mask = KILN_PROT_READ | KILN_PROT_WRITE | KILN_PROT_EXEC;

/// The host mapping's protection that goes with guest rights `p` (exec is the guest's concern).
protection host_level(protection p) {
  if (has(p, protection::write)) return memory::prot_rw;
  if (has(p, protection::read)) return memory::prot_r;
  return protection::none;
}

const char* rights(protection p) {
  switch (static_cast<unsigned>(p) & prot_bits_mask) {
  case 0:
    return "no access";
  case KILN_PROT_READ:
    return "read-only";
  case KILN_PROT_READ | KILN_PROT_WRITE:
    return "read-write";
  case KILN_PROT_READ | KILN_PROT_EXEC:
    return "read-execute";
  default:
    return "other";
  }
}

} // namespace

result<void> sandbox::impl::init_memory(const memory::x86_64::page_table_image& img, bool nx) {
  tables.emplace(mem, img, fixed::page_tables_max, nx);
  std::size_t owned_regions = 0;
  for (const auto& r : mem.regions())
    if (memory::guest_owned(r.kind)) ++owned_regions;
  prot = memory::protection_map(owned_regions + config.max_protection_ranges);
  for (const auto& r : mem.regions())
    if (memory::guest_owned(r.kind)) KILN_TRY(prot.add(r.start, r.size, r.prot));
  file_faults.context = cpu.get();
  file_faults.notify = [](void* c) noexcept { static_cast<vcpu::vcpu*>(c)->kick(); };
  return {};
}

bool sandbox::impl::owned(std::uint64_t addr, std::uint64_t end, bool heap_or_stack_only) const {
  for (std::uint64_t at = addr; at < end;) {
    const memory::region* r = mem.find(guest_phys_addr{at});
    if (!r) return false;
    const bool ok = r->kind == memory::region_kind::heap || r->kind == memory::region_kind::stack ||
                    (!heap_or_stack_only && r->kind == memory::region_kind::image);
    if (!ok) return false;
    at = r->end().value;
  }
  return true;
}

result<std::uint32_t> sandbox::impl::serve_protect(std::uint64_t addr, std::uint64_t size,
                                                   protection p) {
  // Validate everything against the bookkeeping before touching anything.
  auto changes = prot.plan(guest_phys_addr{addr}, size, p);
  if (!changes) {
    ++mstats.protect_refused;
    const auto code = changes.code();
    if (code == memory::memory_errc::protection_widened) return KILN_MEMORY_WIDENS;
    if (code == memory::memory_errc::too_many_ranges) return KILN_MEMORY_LIMIT;
    return KILN_MEMORY_NOT_OWNED;
  }
  ++mstats.protect_requests;
  if (config.memory_bookkeeping && changes->empty()) {
    ++mstats.protect_noops; // already so: no syscall, no backend call, no page-table edit
    return KILN_MEMORY_OK;
  }
  if (!config.memory_bookkeeping) {
    // Measurement mode: apply the whole request as if nothing were recorded.
    const protection from = changes->empty() ? p : changes->front().from;
    changes->assign(1, memory::protection_change{guest_phys_addr{addr}, size, from, p});
  }
  // Page tables for the splits must be there before anything is applied.
  std::uint64_t need = 0;
  for (const auto& c : *changes) {
    KILN_TRY_ASSIGN(auto n, tables->tables_needed(c.start, c.size));
    need += n;
  }
  if (need > tables->free_tables()) {
    ++mstats.protect_refused;
    return KILN_MEMORY_LIMIT;
  }
  KILN_TRY(prot.tighten(guest_phys_addr{addr}, size, p));
  for (const auto& c : *changes) {
    KILN_TRY(tables->set(c.start, c.size, c.to));
    // The host mapping is read-write until a page is first tightened; after that it follows
    // the guest's rights. Walk region by region, since that first state is per region.
    for (std::uint64_t at = c.start.value, end = c.start.value + c.size; at < end;) {
      const memory::region* r = mem.find(guest_phys_addr{at});
      const std::uint64_t piece_end = std::min(end, r->end().value);
      const protection before = c.from == r->prot ? memory::prot_rw : host_level(c.from);
      if (!config.memory_bookkeeping || before != host_level(c.to))
        KILN_TRY(mem.host_protect(guest_phys_addr{at}, piece_end - at, host_level(c.to)));
      at = piece_end;
    }
    KILN_TRY(cpu->protect(c.start, c.size, c.to));
  }
  return KILN_MEMORY_OK;
}

result<std::uint32_t> sandbox::impl::serve_release(std::uint64_t addr, std::uint64_t size) {
  if (!owned(addr, addr + size, /*heap_or_stack_only=*/true)) return KILN_MEMORY_NOT_OWNED;
  if (!prot.all(guest_phys_addr{addr}, size, memory::prot_rw)) return KILN_MEMORY_NOT_WRITABLE;
  ++mstats.release_requests;
  KILN_TRY(mem.discard(guest_phys_addr{addr}, size));
  mstats.released_bytes += size;
  return KILN_MEMORY_OK;
}

std::uint32_t sandbox::impl::serve_memory_request(const kiln_memory_request& req,
                                                  std::optional<error>& fatal) {
  std::uint64_t end = 0;
  if (req.size == 0 || !memory::is_aligned(req.addr, memory::page_size) ||
      !memory::is_aligned(req.size, memory::page_size) ||
      __builtin_add_overflow(req.addr, req.size, &end))
    return KILN_MEMORY_UNALIGNED;
  result<std::uint32_t> r = KILN_MEMORY_BAD_REQUEST;
  switch (req.op) {
  case KILN_MEMORY_PROTECT:
    if (req.prot & ~prot_bits_mask) return KILN_MEMORY_BAD_REQUEST;
    if (!owned(req.addr, end, /*heap_or_stack_only=*/false)) {
      ++mstats.protect_refused;
      return KILN_MEMORY_NOT_OWNED;
    }
    r = serve_protect(req.addr, req.size, static_cast<protection>(req.prot));
    break;
  case KILN_MEMORY_RELEASE:
    if (req.prot != 0) return KILN_MEMORY_BAD_REQUEST;
    r = serve_release(req.addr, req.size);
    break;
  default:
    return KILN_MEMORY_BAD_REQUEST;
  }
  if (!r) {
    // The bookkeeping validated the request; a failure now is the host's (ENOMEM from
    // mprotect, a full page-table area) and leaves the guest's memory state uncertain.
    if (r.code() == memory::memory_errc::too_many_ranges) return KILN_MEMORY_LIMIT;
    fatal = error(errc::backend_failure, "serving a guest memory request: " + r.err().message());
    return KILN_MEMORY_BAD_REQUEST;
  }
  return *r;
}

step sandbox::impl::on_memory_request(const detail::hypercall& hc) {
  const std::uint32_t len = hc.value;
  end_recording(); // the request may reprotect or discard armed pages
  auto req = mem.read_object<kiln_memory_request>(fixed::io_out); // one copy, then parsed
  if (!req) return step::failed(std::move(req).err());
  std::optional<error> fatal;
  const std::uint32_t status = len == sizeof(kiln_memory_request)
                                   ? serve_memory_request(*req, fatal)
                                   : std::uint32_t{KILN_MEMORY_BAD_REQUEST};
  if (fatal) return step::failed(std::move(*fatal));
  if (auto w = mem.write_object(fixed::io_out + offsetof(kiln_memory_request, status), status); !w)
    return step::failed(std::move(w).err());
  return step::resume_guest();
}

std::optional<error> sandbox::impl::name_memory_fault(std::uint64_t addr, bool write, bool fetch,
                                                      std::uint64_t rip) const {
  const char* access = fetch ? "execute" : write ? "write" : "read";
  const memory::region* r = mem.find(guest_phys_addr{addr});
  if (r && r->kind == memory::region_kind::file)
    if (const memory::mapped_file* f = files.containing(guest_phys_addr{addr}))
      return error(errc::memory_violation,
                   fmt::format("{} at {:#x} in read-only mapped file '{}' (rip {:#x})", access,
                               addr, f->name, rip));
  // Data is never executable: NX in the page tables on KVM, the region's rights on the emulated
  // backend; both say so in the same words.
  if (fetch && r && r->guest_visible && r->kind != memory::region_kind::file &&
      !memory::has(r->prot, memory::protection::exec))
    return error(
        errc::memory_violation,
        fmt::format("execute at {:#x} in non-executable {} (rip {:#x})", addr, r->name, rip));
  if (!r && addr >= mem.size() && addr < mem.address_limit())
    return error(
        errc::memory_violation,
        fmt::format("{} at {:#x}: no file is mapped there (rip {:#x})", access, addr, rip));
  if (r && memory::guest_owned(r->kind)) {
    const protection now = prot.at(guest_phys_addr{addr});
    if (now != r->prot)
      return error(errc::memory_violation,
                   fmt::format("{} at {:#x}, a page the guest made {} (rip {:#x})", access, addr,
                               rights(now), rip));
  }
  return std::nullopt;
}

std::optional<error> sandbox::impl::lost_file_pages() {
  // Where the first lost page was, if a fault handler saw one (0: none did), as a guest address.
  const std::uintptr_t host = file_faults.first_lost.load(std::memory_order_acquire);
  const auto lost = mem.guest_address_of(reinterpret_cast<const void*>(host));
  const memory::mapped_file* holder = lost ? files.containing(*lost) : nullptr;
  for (const auto& f : files) {
    const bool hit = holder == f.get();
    auto now = f->file.current_size();
    const bool shrank = now && *now < f->file.identity().size;
    if (hit || (host == 0 && shrank)) {
      std::string where = hit ? fmt::format("page {:#x} is gone", lost->value)
                              : fmt::format("it is now {} bytes", now ? *now : 0);
      return error(errc::memory_violation,
                   fmt::format("mapped file '{}' ({}) was truncated from {} bytes after it was "
                               "mapped: {}",
                               f->name, f->file.identity().path, f->file.identity().size, where));
    }
  }
  // On KVM no handler saw the touch (the kernel's own access failed): look at the files.
  if (host == 0 && mem.image())
    if (const auto shrunk = mem.image()->first_shrunk_file()) {
      const auto& file = shrunk->layer->file();
      return error(errc::memory_violation,
                   fmt::format("the snapshot file backing guest memory was truncated: it is now "
                               "{} bytes, its data ended at {}{}",
                               shrunk->size_now, shrunk->data_end,
                               file ? " (" + file->path + ")" : std::string()));
    }
  if (lost && lost->value < mem.size())
    return error(errc::memory_violation,
                 fmt::format("the snapshot file backing guest memory was truncated: page {:#x} "
                             "is gone{}",
                             lost->value,
                             base && !base->source.empty() ? " (" + base->source + ")" : ""));
  if (host != 0) return error(errc::memory_violation, "a mapped file lost pages under the guest");
  return std::nullopt;
}

result<void> sandbox::impl::write_file_table() {
  const auto table = files.table();
  KILN_TRY(mem.write(fixed::boot_info + fixed::file_table_offset, std::as_bytes(std::span(table))));
  const std::uint64_t count = files.size();
  return mem.write_object(fixed::boot_info + offsetof(kiln_boot_info, file_count), count);
}

result<mapped_file_info> sandbox::impl::map_file(const file_mapping& request) {
  if (calling) return error(errc::not_ready, "files are mapped between calls");
  if (is_poisoned) return error(errc::poisoned, poison.message());
  KILN_TRY_ASSIGN(std::string name, files.name_for(request.path, request.name));
  KILN_TRY_ASSIGN(auto file, memory::host_file::open(request.path));
  const std::uint64_t size = memory::align_up(file.identity().size, memory::page_size);
  const std::uint64_t room_lo = mem.size(), room_hi = mem.address_limit();
  if (size > room_hi - room_lo)
    return error(memory::memory_errc::file_too_large,
                 fmt::format("{} is {} bytes; the file room holds {}", request.path,
                             file.identity().size, room_hi - room_lo));
  KILN_TRY_ASSIGN(const guest_phys_addr addr,
                  files.place(request.guest_address, size, room_lo, room_hi, request.path));

  auto slot = std::make_unique<memory::mapped_file>(
      memory::mapped_file{name, std::move(file), addr, size, {}});
  KILN_TRY(mem.map_file(addr, size, slot->file.fd()));
  // From here on, undo what was done if a later step fails.
  auto undo = [&](error e) -> error {
    (void)tables->set(addr, size, protection::none);
    (void)mem.remove_region(addr);
    (void)cpu->map_memory(mem);
    (void)mem.unmap_file(addr, size);
    return e;
  };
  if (auto r = mem.add_region({"file:" + name, memory::region_kind::file, addr, size,
                               memory::prot_r, true, memory::region_backing::file});
      !r)
    return undo(std::move(r).err());
  if (auto r = tables->set(addr, size, memory::prot_r); !r) return undo(std::move(r).err());
  if (auto r = cpu->map_memory(mem); !r) return undo(std::move(r).err());
  auto watch =
      memory::file_fault_watch::create(mem.host_address_for_mapping(addr), size, &file_faults);
  if (!watch) return undo(std::move(watch).err());
  slot->watch = std::move(*watch);
  mapped_file_info info{name, slot->file.identity().path, addr.value, slot->file.identity().size};
  files.add(std::move(slot));
  if (auto r = write_file_table(); !r) {
    (void)files.take(name);
    return undo(std::move(r).err());
  }
  ++mstats.files_mapped;
  return info;
}

result<void> sandbox::impl::unmap_file(std::string_view name) {
  if (calling) return error(errc::not_ready, "files are unmapped between calls");
  std::unique_ptr<memory::mapped_file> slot = files.take(name);
  if (!slot) return error(memory::memory_errc::file_not_mapped, std::string(name));
  // The guest stops seeing it first (table, backend, page tables), then the host mapping goes.
  KILN_TRY(write_file_table());
  KILN_TRY(mem.remove_region(slot->addr));
  KILN_TRY(cpu->map_memory(mem));
  KILN_TRY(tables->set(slot->addr, slot->mapped_size, protection::none));
  KILN_TRY(mem.unmap_file(slot->addr, slot->mapped_size));
  ++mstats.files_unmapped;
  return {};
}

memory_stats sandbox::impl::memory_stats_now() const {
  memory_stats s = mstats;
  s.host_syscalls = mem.host_syscalls();
  s.backend_calls = cpu->stats().map_calls - backend_calls_at_build;
  s.page_table_edits = tables ? tables->edits() : 0;
  s.protection_ranges = prot.ranges();
  s.page_tables = tables ? tables->tables_in_use() : 0;
  return s;
}

// ---- public API ---------------------------------------------------------------------------------

result<mapped_file_info> sandbox::map_file(const file_mapping& request) {
  impl_->end_recording();
  return impl_->map_file(request);
}

result<void> sandbox::unmap_file(std::string_view name) {
  impl_->end_recording();
  return impl_->unmap_file(name);
}

std::vector<mapped_file_info> sandbox::mapped_files() const {
  std::vector<mapped_file_info> out;
  for (const auto& f : impl_->files)
    out.push_back({f->name, f->file.identity().path, f->addr.value, f->file.identity().size});
  return out;
}

result<std::uint64_t> sandbox::resident_bytes() const {
  return impl_->mem.resident_bytes(guest_phys_addr{0}, impl_->mem.size());
}

} // namespace kiln
