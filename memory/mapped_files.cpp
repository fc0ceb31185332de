// mapped_files: names, placement and the file table of the files in a guest's file room.
#include <kiln/memory/layout.hpp>
#include <kiln/memory/mapped_files.hpp>
#include <kiln/memory/memory_errc.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <utility>

namespace kiln::memory {

result<std::string> mapped_files::name_for(std::string_view path, std::string name) const {
  if (name.empty()) {
    const auto slash = path.find_last_of('/');
    name = std::string(slash == std::string_view::npos ? path : path.substr(slash + 1));
  }
  if (name.empty() || name.size() >= KILN_FILE_NAME_MAX || name.find('\0') != std::string::npos)
    return error(memory_errc::file_name_invalid,
                 fmt::format("'{}': 1..{} bytes, no NUL", name, KILN_FILE_NAME_MAX - 1));
  if (find(name)) return error(memory_errc::file_name_invalid, "'" + name + "' is already mapped");
  if (files_.size() >= fixed::max_files)
    return error(memory_errc::too_many_ranges,
                 fmt::format("at most {} files per sandbox", fixed::max_files));
  return name;
}

result<guest_phys_addr> mapped_files::place(std::uint64_t at, std::uint64_t size,
                                            std::uint64_t room_lo, std::uint64_t room_hi,
                                            std::string_view path) const {
  if (at != 0) {
    std::uint64_t end = 0;
    if (!is_aligned(at, page_size))
      return error(memory_errc::unaligned, "guest address of a mapped file");
    if (at < room_lo || __builtin_add_overflow(at, size, &end) || end > room_hi)
      return error(memory_errc::out_of_bounds,
                   fmt::format("[{:#x}, +{:#x}) is outside the file room [{:#x}, {:#x})", at, size,
                               room_lo, room_hi));
    for (const auto& f : files_)
      if (at < f->addr.value + f->mapped_size && f->addr.value < end)
        return error(memory_errc::overlapping_region,
                     fmt::format("[{:#x}, +{:#x}) overlaps mapped file '{}'", at, size, f->name));
    return guest_phys_addr{at};
  }
  std::vector<std::pair<std::uint64_t, std::uint64_t>> used;
  for (const auto& f : files_)
    used.emplace_back(f->addr.value, f->addr.value + f->mapped_size);
  std::sort(used.begin(), used.end());
  std::uint64_t candidate = align_up(room_lo, large_page_size);
  for (const auto& [lo, hi] : used) {
    if (candidate + size <= lo) break;
    candidate = std::max(candidate, align_up(hi, large_page_size));
  }
  if (candidate > room_hi || room_hi - candidate < size)
    return error(memory_errc::file_too_large,
                 fmt::format("no free {} bytes in the file room for {}", size, path));
  return guest_phys_addr{candidate};
}

std::unique_ptr<mapped_file> mapped_files::take(std::string_view name) {
  auto it =
      std::find_if(files_.begin(), files_.end(), [&](const auto& f) { return f->name == name; });
  if (it == files_.end()) return nullptr;
  std::unique_ptr<mapped_file> f = std::move(*it);
  files_.erase(it);
  return f;
}

const mapped_file* mapped_files::find(std::string_view name) const noexcept {
  for (const auto& f : files_)
    if (f->name == name) return f.get();
  return nullptr;
}

const mapped_file* mapped_files::containing(guest_phys_addr a) const noexcept {
  for (const auto& f : files_)
    if (a >= f->addr && a.value - f->addr.value < f->mapped_size) return f.get();
  return nullptr;
}

std::vector<kiln_file_entry> mapped_files::table() const {
  std::vector<kiln_file_entry> table(files_.size());
  for (std::size_t i = 0; i < files_.size(); ++i) {
    const mapped_file& f = *files_[i];
    std::memcpy(table[i].name, f.name.data(), f.name.size()); // the NUL comes from {}
    table[i].addr = f.addr.value;
    table[i].size = f.file.identity().size;
  }
  return table;
}

// ---- the files section of a snapshot ------------------------------------------------------------

namespace {
constexpr std::uint64_t max_saved_string = 4096; // a mapped file's name or path
} // namespace

void encode_saved_files(byte_writer& w, std::span<const saved_file> files) {
  w.put(static_cast<std::uint32_t>(files.size()));
  for (const auto& f : files) {
    w.str(f.name);
    w.str(f.identity.path);
    w.put(f.identity.device);
    w.put(f.identity.inode);
    w.put(f.identity.size);
    w.put(f.identity.mtime_ns);
    w.put(f.addr.value);
    w.put(f.mapped_size);
  }
}

namespace {

result<saved_file> decode_saved_file(byte_reader& r, std::uint64_t memory_size,
                                     std::uint64_t file_room) {
  saved_file f;
  KILN_TRY_ASSIGN(f.name, r.str(max_saved_string));
  KILN_TRY_ASSIGN(f.identity.path, r.str(max_saved_string));
  KILN_TRY_ASSIGN(f.identity.device, r.get<std::uint64_t>());
  KILN_TRY_ASSIGN(f.identity.inode, r.get<std::uint64_t>());
  KILN_TRY_ASSIGN(f.identity.size, r.get<std::uint64_t>());
  KILN_TRY_ASSIGN(f.identity.mtime_ns, r.get<std::int64_t>());
  KILN_TRY_ASSIGN(f.addr.value, r.get<std::uint64_t>());
  KILN_TRY_ASSIGN(f.mapped_size, r.get<std::uint64_t>());
  std::uint64_t end = 0;
  if (f.name.empty() || f.name.size() >= KILN_FILE_NAME_MAX || f.identity.size == 0 ||
      f.mapped_size != align_up(f.identity.size, page_size) ||
      !is_aligned(f.addr.value, page_size) || f.addr.value < memory_size ||
      __builtin_add_overflow(f.addr.value, f.mapped_size, &end) || end > memory_size + file_room)
    return r.bad(fmt::format("mapped file '{}'", f.name));
  return f;
}

} // namespace

result<std::vector<saved_file>> decode_saved_files(byte_reader& r, std::uint64_t memory_size,
                                                   std::uint64_t file_room) {
  KILN_TRY_ASSIGN(const auto n, r.get<std::uint32_t>());
  if (n > fixed::max_files) return r.bad("too many files");
  std::vector<saved_file> files;
  for (std::uint32_t i = 0; i < n; ++i) {
    KILN_TRY_ASSIGN(auto f, decode_saved_file(r, memory_size, file_room));
    files.push_back(std::move(f));
  }
  return files;
}

} // namespace kiln::memory
