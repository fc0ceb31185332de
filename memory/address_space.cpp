// address_space: building a guest's memory, the guest's protect and release requests, and the
// faults it names. Mapped files and snapshots are in address_space_files.cpp and
// address_space_snapshot.cpp.
#include <kiln/memory/address_space.hpp>
#include <kiln/memory/layout.hpp>
#include <kiln/memory/memory_errc.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cstddef>

namespace kiln::memory {

namespace {

constexpr unsigned prot_bits_mask = KILN_PROT_READ | KILN_PROT_WRITE | KILN_PROT_EXEC;

/// The host mapping's protection that goes with guest rights `p` (exec is the guest's concern).
protection host_level(protection p) noexcept {
  if (has(p, protection::write)) return prot_rw;
  if (has(p, protection::read)) return prot_r;
  return protection::none;
}

const char* rights(protection p) noexcept {
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

protection host_level(const region& r, protection p) noexcept {
  if (p == r.prot || has(p, protection::write)) return prot_rw;
  if (has(p, protection::read)) return prot_r;
  return protection::none;
}

void address_space::attach(guest_view& view, void (*lost_pages)(void*) noexcept,
                           void* context) noexcept {
  view_ = &view;
  faults_.notify = lost_pages;
  faults_.context = context;
}

result<void> address_space::init_fresh(const x86_64::page_table_image& img, bool nx,
                                       std::size_t extra_ranges) {
  tables_.emplace(mem_, img, fixed::page_tables_max, nx);
  std::size_t owned_regions = 0;
  for (const auto& r : mem_.regions())
    if (guest_owned(r.kind)) ++owned_regions;
  prot_ = protection_map(owned_regions + extra_ranges);
  for (const auto& r : mem_.regions())
    if (guest_owned(r.kind)) KILN_TRY(prot_.add(r.start, r.size, r.prot));
  return {};
}

result<void> address_space::init_saved(const x86_64::page_table_editor::state& tables, bool nx) {
  KILN_TRY(watch_image());
  tables_.emplace(mem_, tables, nx);
  return {};
}

result<void> address_space::adopt(const saved_memory& s, bool nx) {
  // The view starts from the regions' own rights; bring it (and the host) to the snapshot's.
  protection_map initial(s.prot.max_ranges());
  for (const auto& r : s.regions)
    if (guest_owned(r.kind)) KILN_TRY(initial.add(r.start, r.size, r.prot));
  prot_ = initial;
  KILN_TRY(sync_files(s.files));
  KILN_TRY(apply_protections(s.prot, /*remapped=*/true));
  prot_ = s.prot;
  if (nx != s.nx) KILN_TRY(retable(s.regions));
  return {};
}

result<void> address_space::retable(std::span<const region> regions) {
  for (const auto& r : regions)
    if (r.guest_visible && r.prot != protection::none)
      KILN_TRY(tables_->set(r.start, r.size, r.prot));
  for (const auto& c : prot_.list())
    KILN_TRY(tables_->set(c.start, c.size, c.to));
  return {};
}

// ---- the guest's requests -----------------------------------------------------------------------

bool address_space::owned(std::uint64_t addr, std::uint64_t end, bool heap_or_stack_only) const {
  for (std::uint64_t at = addr; at < end;) {
    const region* r = mem_.find(guest_phys_addr{at});
    if (!r) return false;
    const bool ok = r->kind == region_kind::heap || r->kind == region_kind::stack ||
                    (!heap_or_stack_only && r->kind == region_kind::image);
    if (!ok) return false;
    at = r->end().value;
  }
  return true;
}

result<std::uint32_t> address_space::serve_protect(std::uint64_t addr, std::uint64_t size,
                                                   protection p) {
  // Validate everything against the bookkeeping before touching anything.
  auto changes = prot_.plan(guest_phys_addr{addr}, size, p);
  if (!changes) {
    ++counters_.protect_refused;
    const auto code = changes.code();
    if (code == memory_errc::protection_widened) return KILN_MEMORY_WIDENS;
    if (code == memory_errc::too_many_ranges) return KILN_MEMORY_LIMIT;
    return KILN_MEMORY_NOT_OWNED;
  }
  ++counters_.protect_requests;
  if (bookkeeping_ && changes->empty()) {
    ++counters_.protect_noops; // already so: no syscall, no view call, no page-table edit
    return KILN_MEMORY_OK;
  }
  if (!bookkeeping_) {
    // Measurement mode: apply the whole request as if nothing were recorded.
    const protection from = changes->empty() ? p : changes->front().from;
    changes->assign(1, protection_change{guest_phys_addr{addr}, size, from, p});
  }
  // Page tables for the splits must be there before anything is applied.
  std::uint64_t need = 0;
  for (const auto& c : *changes) {
    KILN_TRY_ASSIGN(auto n, tables_->tables_needed(c.start, c.size));
    need += n;
  }
  if (need > tables_->free_tables()) {
    ++counters_.protect_refused;
    return KILN_MEMORY_LIMIT;
  }
  KILN_TRY(prot_.tighten(guest_phys_addr{addr}, size, p));
  for (const auto& c : *changes) {
    KILN_TRY(tables_->set(c.start, c.size, c.to));
    // The host mapping is read-write until a page is first tightened; after that it follows
    // the guest's rights. Walk region by region, since that first state is per region.
    for (std::uint64_t at = c.start.value, end = c.start.value + c.size; at < end;) {
      const region* r = mem_.find(guest_phys_addr{at});
      const std::uint64_t piece_end = std::min(end, r->end().value);
      const protection before = c.from == r->prot ? prot_rw : host_level(c.from);
      if (!bookkeeping_ || before != host_level(c.to))
        KILN_TRY(mem_.host_protect(guest_phys_addr{at}, piece_end - at, host_level(c.to)));
      at = piece_end;
    }
    KILN_TRY(view_->protect(c.start, c.size, c.to));
  }
  return KILN_MEMORY_OK;
}

result<std::uint32_t> address_space::serve_release(std::uint64_t addr, std::uint64_t size) {
  if (!owned(addr, addr + size, /*heap_or_stack_only=*/true)) return KILN_MEMORY_NOT_OWNED;
  if (!prot_.all(guest_phys_addr{addr}, size, prot_rw)) return KILN_MEMORY_NOT_WRITABLE;
  ++counters_.release_requests;
  KILN_TRY(mem_.discard(guest_phys_addr{addr}, size));
  counters_.released_bytes += size;
  return KILN_MEMORY_OK;
}

result<std::uint32_t> address_space::serve(const kiln_memory_request& req) {
  std::uint64_t end = 0;
  if (req.size == 0 || !is_aligned(req.addr, page_size) || !is_aligned(req.size, page_size) ||
      __builtin_add_overflow(req.addr, req.size, &end))
    return KILN_MEMORY_UNALIGNED;
  result<std::uint32_t> r = KILN_MEMORY_BAD_REQUEST;
  switch (req.op) {
  case KILN_MEMORY_PROTECT:
    if (req.prot & ~prot_bits_mask) return KILN_MEMORY_BAD_REQUEST;
    if (!owned(req.addr, end, /*heap_or_stack_only=*/false)) {
      ++counters_.protect_refused;
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
  // The bookkeeping validated the request; a failure now is the host's (ENOMEM from mprotect, a
  // full page-table area), except a cap the guest reached.
  if (!r && r.code() == memory_errc::too_many_ranges) return KILN_MEMORY_LIMIT;
  return r;
}

// ---- faults -------------------------------------------------------------------------------------

std::optional<std::string> address_space::describe_fault(std::uint64_t addr, bool write, bool fetch,
                                                         std::uint64_t rip) const {
  const char* access = fetch ? "execute" : write ? "write" : "read";
  const region* r = mem_.find(guest_phys_addr{addr});
  if (r && r->kind == region_kind::file)
    if (const mapped_file* f = files_.containing(guest_phys_addr{addr}))
      return fmt::format("{} at {:#x} in read-only mapped file '{}' (rip {:#x})", access, addr,
                         f->name, rip);
  // Data is never executable: NX in the page tables on KVM, the region's rights on the emulated
  // backend; both say so in the same words.
  if (fetch && r && r->guest_visible && r->kind != region_kind::file &&
      !has(r->prot, protection::exec))
    return fmt::format("execute at {:#x} in non-executable {} (rip {:#x})", addr, r->name, rip);
  if (!r && addr >= mem_.size() && addr < mem_.address_limit())
    return fmt::format("{} at {:#x}: no file is mapped there (rip {:#x})", access, addr, rip);
  if (r && guest_owned(r->kind)) {
    const protection now = prot_.at(guest_phys_addr{addr});
    if (now != r->prot)
      return fmt::format("{} at {:#x}, a page the guest made {} (rip {:#x})", access, addr,
                         rights(now), rip);
  }
  return std::nullopt;
}

std::optional<std::string> address_space::describe_lost_pages(std::string_view source) const {
  // Where the first lost page was, if a fault handler saw one (0: none did), as a guest address.
  const std::uintptr_t host = faults_.first_lost.load(std::memory_order_acquire);
  const auto lost = mem_.guest_address_of(reinterpret_cast<const void*>(host));
  const mapped_file* holder = lost ? files_.containing(*lost) : nullptr;
  for (const auto& f : files_) {
    const bool hit = holder == f.get();
    auto now = f->file.current_size();
    const bool shrank = now && *now < f->file.identity().size;
    if (hit || (host == 0 && shrank)) {
      std::string where = hit ? fmt::format("page {:#x} is gone", lost->value)
                              : fmt::format("it is now {} bytes", now ? *now : 0);
      return fmt::format("mapped file '{}' ({}) was truncated from {} bytes after it was "
                         "mapped: {}",
                         f->name, f->file.identity().path, f->file.identity().size, where);
    }
  }
  // On KVM no handler saw the touch (the kernel's own access failed): look at the files.
  if (host == 0 && mem_.image())
    if (const auto shrunk = mem_.image()->first_shrunk_file()) {
      const auto& file = shrunk->layer->file();
      return fmt::format("the snapshot file backing guest memory was truncated: it is now {} "
                         "bytes, its data ended at {}{}",
                         shrunk->size_now, shrunk->data_end,
                         file ? " (" + file->path + ")" : std::string());
    }
  if (lost && lost->value < mem_.size())
    return fmt::format("the snapshot file backing guest memory was truncated: page {:#x} is "
                       "gone{}",
                       lost->value,
                       source.empty() ? std::string() : " (" + std::string(source) + ")");
  if (host != 0) return std::string("a mapped file lost pages under the guest");
  return std::nullopt;
}

std::vector<protection> address_space::host_protections() const {
  std::vector<protection> out(mem_.size() / page_size, prot_rw);
  for (const auto& c : prot_.list())
    if (const auto* r = mem_.find(c.start))
      std::fill_n(out.begin() + static_cast<std::ptrdiff_t>(c.start.value / page_size),
                  c.size / page_size, host_level(*r, c.to));
  return out;
}

} // namespace kiln::memory
