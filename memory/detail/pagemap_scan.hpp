// The PAGEMAP_SCAN ioctl of /proc/self/pagemap (Linux 6.7+), declared here when the installed
// kernel headers predate it (Debian 12 ships 6.1 headers). Layout from linux/fs.h.
#pragma once

#include <linux/fs.h>
#include <sys/ioctl.h>

#include <kiln/support/result.hpp>

#include <cstdint>
#include <utility>
#include <vector>

namespace kiln::memory::detail {

#ifndef PAGEMAP_SCAN
inline constexpr std::uint64_t page_is_file = 1u << 2;
inline constexpr std::uint64_t page_is_present = 1u << 3;
inline constexpr std::uint64_t page_is_pfnzero = 1u << 5;

struct page_region {
  std::uint64_t start;
  std::uint64_t end;
  std::uint64_t categories;
};

struct pm_scan_arg {
  std::uint64_t size;
  std::uint64_t flags;
  std::uint64_t start;
  std::uint64_t end;
  std::uint64_t walk_end;
  std::uint64_t vec;
  std::uint64_t vec_len;
  std::uint64_t max_pages;
  std::uint64_t category_inverted;
  std::uint64_t category_mask;
  std::uint64_t category_anyof_mask;
  std::uint64_t return_mask;
};
static_assert(sizeof(pm_scan_arg) == 96, "struct pm_scan_arg");

inline const unsigned long pagemap_scan_request = _IOWR('f', 16, pm_scan_arg);
#else
inline constexpr std::uint64_t page_is_file = PAGE_IS_FILE;
inline constexpr std::uint64_t page_is_present = PAGE_IS_PRESENT;
inline constexpr std::uint64_t page_is_pfnzero = PAGE_IS_PFNZERO;
using page_region = ::page_region;
using pm_scan_arg = ::pm_scan_arg;
inline const unsigned long pagemap_scan_request = PAGEMAP_SCAN;
#endif

/// Which pages of a host range to find.
enum class page_filter {
  resident, // present, and not the kernel's shared zero page
  private_, // present, anonymous, not the shared zero page (in a MAP_PRIVATE file mapping:
            // written since mapped)
  touched,  // present, the shared zero page included (a read of a hole maps it)
  clean,    // present and still a file's page or the shared zero page: holds nothing that
            // would be lost if it were unmapped
};

/// The sub-ranges of host [lo, hi) (page-aligned) whose pages match `filter`, merged, in order.
/// PAGEMAP_SCAN where the kernel has it (Linux 6.7+: cost follows the mapped pages, not the
/// range), else a read of /proc/self/pagemap (8 bytes a page; for `resident`, present and
/// exclusively mapped; for `private_`, present, exclusively mapped and neither file nor shared;
/// for `touched`, present; for `clean`, present and file or shared, since the zero page cannot
/// be told apart there without privileges).
result<std::vector<std::pair<std::uintptr_t, std::uintptr_t>>>
scan_pages(std::uintptr_t lo, std::uintptr_t hi, page_filter filter);

} // namespace kiln::memory::detail
