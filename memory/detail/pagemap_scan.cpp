// scan_pages: PAGEMAP_SCAN over a host range, with a /proc/self/pagemap fallback.
#include <kiln/memory/address.hpp>
#include <kiln/memory/detail/pagemap_scan.hpp>
#include <kiln/memory/memory_errc.hpp>
#include <kiln/support/unique_fd.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <iterator>

namespace kiln::memory::detail {
namespace {

using range_list = std::vector<std::pair<std::uintptr_t, std::uintptr_t>>;

void append(range_list& out, std::uintptr_t lo, std::uintptr_t hi) {
  if (!out.empty() && out.back().second == lo)
    out.back().second = hi;
  else
    out.emplace_back(lo, hi);
}

} // namespace

result<range_list> scan_pages(std::uintptr_t lo, std::uintptr_t hi, page_filter filter) {
  range_list out;
  if (lo >= hi) return out;
  unique_fd fd(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  if (!fd) return errno_error("open /proc/self/pagemap");

  page_region regions[256];
  pm_scan_arg arg{};
  arg.size = sizeof arg;
  arg.start = lo;
  arg.end = hi;
  arg.vec = reinterpret_cast<std::uintptr_t>(regions);
  arg.vec_len = std::size(regions);
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
  arg.return_mask = page_is_present;
  bool scanned = true;
  for (;;) {
    const int n = ::ioctl(fd.get(), pagemap_scan_request, &arg);
    if (n < 0) {
      scanned = false; // no PAGEMAP_SCAN (before Linux 6.7)
      break;
    }
    for (int i = 0; i < n; ++i)
      append(out, regions[i].start, regions[i].end);
    if (arg.walk_end >= hi) break;
    arg.start = arg.walk_end;
  }
  if (scanned) return out;

  out.clear();
  constexpr std::uint64_t present = 1ull << 63, file_or_shared = 1ull << 61, exclusive = 1ull << 56;
  std::vector<std::uint64_t> entries(4096);
  const std::uint64_t first = lo / page_size;
  for (std::uint64_t done = 0, total = (hi - lo) / page_size; done < total;) {
    const std::uint64_t n = std::min<std::uint64_t>(entries.size(), total - done);
    const auto want = static_cast<ssize_t>(n * sizeof(std::uint64_t));
    const ssize_t got = ::pread(fd.get(), entries.data(), static_cast<std::size_t>(want),
                                static_cast<off_t>((first + done) * sizeof(std::uint64_t)));
    if (got != want)
      return got < 0 ? errno_error("read /proc/self/pagemap")
                     : error(memory_errc::out_of_bounds, "short pagemap read");
    for (std::uint64_t i = 0; i < n; ++i) {
      const std::uint64_t e = entries[i];
      bool match = false;
      switch (filter) {
      case page_filter::resident:
        match = (e & (present | exclusive)) == (present | exclusive);
        break;
      case page_filter::private_:
        match = (e & (present | file_or_shared | exclusive)) == (present | exclusive);
        break;
      case page_filter::touched:
        match = (e & present) != 0;
        break;
      case page_filter::clean:
        match = (e & (present | file_or_shared)) == (present | file_or_shared);
        break;
      }
      if (match) {
        const std::uintptr_t at = lo + (done + i) * page_size;
        append(out, at, at + page_size);
      }
    }
    done += n;
  }
  return out;
}

} // namespace kiln::memory::detail
