// address_space: host files mapped read-only into the guest's file room.
#include <kiln/memory/address_space.hpp>
#include <kiln/memory/layout.hpp>
#include <kiln/memory/memory_errc.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cstddef>

namespace kiln::memory {

result<void> address_space::write_file_table() {
  const auto table = files_.table();
  KILN_TRY(
      mem_.write(fixed::boot_info + fixed::file_table_offset, std::as_bytes(std::span(table))));
  const std::uint64_t count = files_.size();
  return mem_.write_object(fixed::boot_info + offsetof(kiln_boot_info, file_count), count);
}

result<const mapped_file*> address_space::map_file(std::string_view path, std::string name,
                                                   std::uint64_t at) {
  KILN_TRY_ASSIGN(name, files_.name_for(path, std::move(name)));
  KILN_TRY_ASSIGN(auto file, host_file::open(std::string(path)));
  const std::uint64_t size = align_up(file.identity().size, page_size);
  const std::uint64_t room_lo = mem_.size(), room_hi = mem_.address_limit();
  if (size > room_hi - room_lo)
    return error(memory_errc::file_too_large,
                 fmt::format("{} is {} bytes; the file room holds {}", path, file.identity().size,
                             room_hi - room_lo));
  KILN_TRY_ASSIGN(const guest_phys_addr addr, files_.place(at, size, room_lo, room_hi, path));

  auto slot = std::make_unique<mapped_file>(mapped_file{name, std::move(file), addr, size, {}});
  KILN_TRY(mem_.map_file(addr, size, slot->file.fd()));
  // From here on, undo what was done if a later step fails.
  auto undo = [&](error e) -> error {
    (void)tables_->set(addr, size, protection::none);
    (void)mem_.remove_region(addr);
    (void)view_->map_memory(mem_);
    (void)mem_.unmap_file(addr, size);
    return e;
  };
  if (auto r = mem_.add_region(
          {"file:" + name, region_kind::file, addr, size, prot_r, true, region_backing::file});
      !r)
    return undo(std::move(r).err());
  if (auto r = tables_->set(addr, size, prot_r); !r) return undo(std::move(r).err());
  if (auto r = view_->map_memory(mem_); !r) return undo(std::move(r).err());
  auto watch = file_fault_watch::create(mem_.host_address_for_mapping(addr), size, &faults_);
  if (!watch) return undo(std::move(watch).err());
  slot->watch = std::move(*watch);
  const mapped_file* added = slot.get();
  files_.add(std::move(slot));
  if (auto r = write_file_table(); !r) {
    (void)files_.take(name);
    return undo(std::move(r).err());
  }
  ++counters_.files_mapped;
  return added;
}

result<void> address_space::unmap_file(std::string_view name) {
  std::unique_ptr<mapped_file> slot = files_.take(name);
  if (!slot) return error(memory_errc::file_not_mapped, std::string(name));
  // The guest stops seeing it first (table, view, page tables), then the host mapping goes.
  KILN_TRY(write_file_table());
  KILN_TRY(mem_.remove_region(slot->addr));
  KILN_TRY(view_->map_memory(mem_));
  KILN_TRY(tables_->set(slot->addr, slot->mapped_size, protection::none));
  KILN_TRY(mem_.unmap_file(slot->addr, slot->mapped_size));
  ++counters_.files_unmapped;
  return {};
}

std::vector<saved_file> address_space::saved_files() const {
  std::vector<saved_file> out;
  for (const auto& f : files_)
    out.push_back({f->name, f->file.identity(), f->addr, f->mapped_size});
  return out;
}

result<void> address_space::sync_files(std::span<const saved_file> want) {
  // Unmap what the snapshot does not have (or has elsewhere), then map what is missing.
  for (std::size_t i = files_.size(); i-- > 0;) {
    const auto& f = files_[i];
    const bool keep = std::any_of(want.begin(), want.end(), [&](const auto& sf) {
      return sf.name == f.name && sf.addr == f.addr &&
             sf.identity.inode == f.file.identity().inode &&
             sf.identity.device == f.file.identity().device;
    });
    if (!keep) KILN_TRY(unmap_file(f.name));
  }
  for (const auto& sf : want) {
    if (files_.find(sf.name)) continue;
    KILN_TRY_ASSIGN(const mapped_file* f, map_file(sf.identity.path, sf.name, sf.addr.value));
    const auto& now = f->file.identity();
    if (now.device != sf.identity.device || now.inode != sf.identity.inode ||
        now.size != sf.identity.size || now.mtime_ns != sf.identity.mtime_ns) {
      (void)unmap_file(sf.name);
      return error(memory_errc::file_not_mapped,
                   fmt::format("mapped file '{}' ({}) changed since the snapshot", sf.name,
                               sf.identity.path));
    }
  }
  return {};
}

} // namespace kiln::memory
