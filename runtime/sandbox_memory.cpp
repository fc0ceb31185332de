// sandbox memory: the guest's memory requests and faults, and mapped host files, passed to the
// address space (memory/address_space) and turned into the sandbox's errors.
#include <kiln/memory/memory_errc.hpp>
#include <kiln/runtime/detail/sandbox_impl.hpp>

#include <cstddef>

namespace kiln {

using detail::step;
using memory::guest_phys_addr;
namespace fixed = memory::fixed;

void sandbox::impl::attach_space() noexcept {
  space.attach(
      *cpu, [](void* c) noexcept { static_cast<vcpu::vcpu*>(c)->kick(); }, cpu.get());
}

step sandbox::impl::on_memory_request(const detail::hypercall& hc) {
  const std::uint32_t len = hc.value;
  end_recording(); // the request may reprotect or discard armed pages
  auto& mem = space.ram();
  auto req = mem.read_object<kiln_memory_request>(fixed::io_out); // one copy, then parsed
  if (!req) return step::failed(std::move(req).err());
  std::uint32_t status = KILN_MEMORY_BAD_REQUEST;
  if (len == sizeof(kiln_memory_request)) {
    auto served = space.serve(*req);
    // The request was validated before anything changed: a failure is the host's, and leaves
    // the guest's memory state uncertain.
    if (!served)
      return step::failed(error(errc::backend_failure,
                                "serving a guest memory request: " + served.err().message()));
    status = *served;
  }
  if (auto w = mem.write_object(fixed::io_out + offsetof(kiln_memory_request, status), status); !w)
    return step::failed(std::move(w).err());
  return step::resume_guest();
}

std::optional<error> sandbox::impl::name_memory_fault(std::uint64_t addr, bool write, bool fetch,
                                                      std::uint64_t rip) const {
  if (auto why = space.describe_fault(addr, write, fetch, rip))
    return error(errc::memory_violation, std::move(*why));
  return std::nullopt;
}

std::optional<error> sandbox::impl::lost_file_pages() const {
  if (auto why = space.describe_lost_pages(base ? base->source : std::string_view()))
    return error(errc::memory_violation, std::move(*why));
  return std::nullopt;
}

result<mapped_file_info> sandbox::impl::map_file(const file_mapping& request) {
  if (calling) return error(errc::not_ready, "files are mapped between calls");
  if (is_poisoned) return error(errc::poisoned, poison.message());
  KILN_TRY_ASSIGN(const memory::mapped_file* f,
                  space.map_file(request.path, request.name, request.guest_address));
  return mapped_file_info{f->name, f->file.identity().path, f->addr.value, f->file.identity().size};
}

memory_stats sandbox::impl::memory_stats_now() const {
  const auto& c = space.counters();
  memory_stats s;
  s.host_syscalls = space.ram().host_syscalls();
  s.backend_calls = cpu->stats().map_calls - backend_calls_at_build;
  s.page_table_edits = space.page_table_edits();
  s.protect_requests = c.protect_requests;
  s.protect_noops = c.protect_noops;
  s.protect_refused = c.protect_refused;
  s.release_requests = c.release_requests;
  s.released_bytes = c.released_bytes;
  s.files_mapped = c.files_mapped;
  s.files_unmapped = c.files_unmapped;
  s.protection_ranges = space.protections().ranges();
  s.page_tables = space.page_tables_in_use();
  return s;
}

// ---- public API ---------------------------------------------------------------------------------

result<mapped_file_info> sandbox::map_file(const file_mapping& request) {
  impl_->end_recording();
  return impl_->map_file(request);
}

result<void> sandbox::unmap_file(std::string_view name) {
  impl_->end_recording();
  if (impl_->calling) return error(errc::not_ready, "files are unmapped between calls");
  return impl_->space.unmap_file(name);
}

std::vector<mapped_file_info> sandbox::mapped_files() const {
  std::vector<mapped_file_info> out;
  for (const auto& f : impl_->space.files())
    out.push_back({f->name, f->file.identity().path, f->addr.value, f->file.identity().size});
  return out;
}

result<std::uint64_t> sandbox::resident_bytes() const {
  const auto& mem = impl_->space.ram();
  return mem.resident_bytes(guest_phys_addr{0}, mem.size());
}

} // namespace kiln
