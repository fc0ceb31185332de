// scan_pages: PAGEMAP_SCAN over a host range, with a /proc/self/pagemap fallback.
#include <kiln/memory/address.hpp>
#include <kiln/memory/detail/pagemap_scan.hpp>
#include <kiln/memory/memory_errc.hpp>
#include <kiln/support/unique_fd.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <iterator>
#include <optional>

namespace kiln::memory::detail {
namespace {

using range_list = std::vector<std::pair<std::uintptr_t, std::uintptr_t>>;

void append(range_list& out, std::uintptr_t lo, std::uintptr_t hi) {
  if (!out.empty() && out.back().second == lo)
    out.back().second = hi;
  else
    out.emplace_back(lo, hi);
}

/// Sets the PAGEMAP_SCAN categories that select `filter`'s pages.
void set_categories(pm_scan_arg& arg, page_filter filter) {
  switch (filter) {
  case page_filter::resident:
    // Not mincore: a read of an untouched or discarded anonymous page maps the shared zero
    // page, which costs nothing but mincore reports resident.
    arg.category_mask = page_is_present | page_is_pfnzero;
    arg.category_inverted = page_is_pfnzero;
    break;
  case page_filter::private_:
    // Not the zero page either: where no layer of an image has data, RAM is anonymous memory,
    // and a read there maps the zero page, which holds nothing of this guest's.
    arg.category_mask = page_is_present | page_is_file | page_is_pfnzero;
    arg.category_inverted = page_is_file | page_is_pfnzero;
    break;
  case page_filter::touched:
    arg.category_mask = page_is_present;
    break;
  case page_filter::clean:
    arg.category_mask = page_is_present;
    arg.category_anyof_mask = page_is_file | page_is_pfnzero;
    break;
  }
}

/// `filter`'s pages of [lo, hi) by PAGEMAP_SCAN on `fd` (/proc/self/pagemap); nothing where the
/// kernel has no PAGEMAP_SCAN (before Linux 6.7), even after a first part was scanned.
std::optional<range_list> scan_by_ioctl(int fd, std::uintptr_t lo, std::uintptr_t hi,
                                        page_filter filter) {
  range_list out;
  page_region regions[256];
  pm_scan_arg arg{};
  arg.size = sizeof arg;
  arg.start = lo;
  arg.end = hi;
  arg.vec = reinterpret_cast<std::uintptr_t>(regions);
  arg.vec_len = std::size(regions);
  set_categories(arg, filter);
  arg.return_mask = page_is_present;
  for (;;) {
    const int n = ::ioctl(fd, pagemap_scan_request, &arg);
    if (n < 0) return std::nullopt;
    for (int i = 0; i < n; ++i)
      append(out, regions[i].start, regions[i].end);
    if (arg.walk_end >= hi) return out;
    arg.start = arg.walk_end;
  }
}

// The bits of a /proc/self/pagemap entry that the fallback reads.
constexpr std::uint64_t pm_present = 1ull << 63, pm_file_or_shared = 1ull << 61,
                        pm_exclusive = 1ull << 56;

/// Whether a /proc/self/pagemap entry is one of `filter`'s pages, as far as the entry tells.
bool entry_matches(std::uint64_t e, page_filter filter) {
  switch (filter) {
  case page_filter::resident:
    return (e & (pm_present | pm_exclusive)) == (pm_present | pm_exclusive);
  case page_filter::private_:
    return (e & (pm_present | pm_file_or_shared | pm_exclusive)) == (pm_present | pm_exclusive);
  case page_filter::touched:
    return (e & pm_present) != 0;
  case page_filter::clean:
    return (e & (pm_present | pm_file_or_shared)) == (pm_present | pm_file_or_shared);
  }
  return false;
}

/// `filter`'s pages of [lo, hi) from the /proc/self/pagemap entries on `fd`, 8 bytes a page.
result<range_list> scan_by_read(int fd, std::uintptr_t lo, std::uintptr_t hi, page_filter filter) {
  range_list out;
  std::vector<std::uint64_t> entries(4096);
  const std::uint64_t first = lo / page_size;
  for (std::uint64_t done = 0, total = (hi - lo) / page_size; done < total;) {
    const std::uint64_t n = std::min<std::uint64_t>(entries.size(), total - done);
    const auto want = static_cast<ssize_t>(n * sizeof(std::uint64_t));
    const ssize_t got = ::pread(fd, entries.data(), static_cast<std::size_t>(want),
                                static_cast<off_t>((first + done) * sizeof(std::uint64_t)));
    if (got != want)
      return got < 0 ? errno_error("read /proc/self/pagemap")
                     : error(memory_errc::out_of_bounds, "short pagemap read");
    for (std::uint64_t i = 0; i < n; ++i)
      if (entry_matches(entries[i], filter)) {
        const std::uintptr_t at = lo + (done + i) * page_size;
        append(out, at, at + page_size);
      }
    done += n;
  }
  return out;
}

} // namespace

result<range_list> scan_pages(std::uintptr_t lo, std::uintptr_t hi, page_filter filter) {
  if (lo >= hi) return range_list{};
  unique_fd fd(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  if (!fd) return errno_error("open /proc/self/pagemap");
  if (auto scanned = scan_by_ioctl(fd.get(), lo, hi, filter)) return std::move(*scanned);
  return scan_by_read(fd.get(), lo, hi, filter);
}

} // namespace kiln::memory::detail
