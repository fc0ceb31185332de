// Records which pages of a host range are touched, in first-touch order, by page protection.
#pragma once

#include <kiln/support/result.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

namespace kiln::memory {

namespace detail {
struct touch_state; // shared with the signal handler; defined in touch_recorder.cpp
}

/// Records the first touch of each page of a host range, in order: the working set of a
/// sandbox on the emulated backend (Unicorn reads and writes guest RAM through host pointers
/// into kiln's mapping), so that later loads of its snapshot can prefetch those pages first.
///
/// How: start() makes the range's accessible pages PROT_NONE. A process-wide SIGSEGV handler
/// (installed on the first start() and kept) catches the first access to each armed page,
/// appends the page's index to a preallocated array, gives the page back its intended
/// protection and returns, so the faulting instruction retries and succeeds. A SIGSEGV that is
/// not a first touch of an armed page (a genuine crash, a write to a page recorded read-only, a
/// PROT_NONE page of the range) goes to the handler that was installed before kiln's (ASan's,
/// a crash reporter's), or gets the default action.
///
/// Limitations, by construction:
/// - The kernel does not raise signals for its own accesses: a syscall that reads or writes an
///   untouched armed page (write(fd, page), read(fd, page), pread into guest RAM, io_uring,
///   vmsplice...) fails with EFAULT and records nothing. Host code that hands guest RAM to the
///   kernel while recording must touch those pages from user space first (a one-byte read per
///   page is enough: it records the page and restores its protection, write included). The
///   runtime stops recording before it writes a snapshot.
/// - While armed, protections inside the range must be changed only through set_protection():
///   the handler trusts the protections it was given.
/// - Every isolated touched page splits a VMA while recording (an overflow, see overflowed(),
///   past vm.max_map_count). stop() merges them back only where the kernel can: a private
///   mapping never written before start() (no anon_vma yet) keeps one VMA per island of pages
///   written while recording, with the right protections. Writing one page of each such VMA
///   before start() avoids that (the split parts then share its anon_vma).
/// - The range must use base pages (not hugetlbfs): a refused per-page mprotect ends recording
///   as an overflow does.
/// - A debugger sees every first touch as a SIGSEGV (gdb: `handle SIGSEGV nostop noprint`).
/// - A handler installed later for SIGSEGV that does not chain to the previous one disables
///   recording (faults then reach that handler instead).
///
/// Thread-safety: touches from any number of threads are recorded exactly (a page touched by
/// two threads at once is recorded once). start(), stop() and set_protection() are ordinary
/// calls for one owning thread; stop() and set_protection() must not run while other threads
/// touch the range (the recording call has ended). touched() and overflowed() may be read from
/// any thread. Several recorders (disjoint ranges, any threads) may be active in a process.
class touch_recorder {
public:
  touch_recorder() noexcept; // not armed
  ~touch_recorder();         // stops (restores every protection) if still armed
  touch_recorder(touch_recorder&& o) noexcept;
  touch_recorder& operator=(touch_recorder&& o) noexcept;
  touch_recorder(const touch_recorder&) = delete;
  touch_recorder& operator=(const touch_recorder&) = delete;

  /// Arms [host, host + page_prot.size() * page_size), which must be mapped and page-aligned,
  /// with page i currently at protection page_prot[i] (PROT_NONE, PROT_READ or
  /// PROT_READ|PROT_WRITE, each optionally with PROT_EXEC). Every page whose entry is not
  /// PROT_NONE is made PROT_NONE (runs coalesced into one mprotect each) and gets its entry's
  /// protection back on its first touch. PROT_NONE entries are left alone and never recorded.
  /// Costs one byte per page (committed here) and four per recorded page.
  /// Errors: std::errc::invalid_argument (null or unaligned host, no pages, more than 2^32
  /// pages, an entry that is not one of the protections above); memory_errc::overlapping_region
  /// (another recorder is armed over part of the range); memory_errc::too_many_ranges (too many
  /// recorders armed in the process); the errno of a failed sigaction, mmap or mprotect (the
  /// range is then left as it was).
  static result<touch_recorder> start(std::byte* host, std::span<const int> page_prot);

  /// Disarms: every page not touched gets its protection back, and the range is as it was
  /// before start() (with set_protection()'s changes applied). Returns the touched pages'
  /// indexes (relative to `host`) in first-touch order, each once; after an overflow, the prefix
  /// recorded before it. Errors: std::errc::invalid_argument (not armed); the errno of a failed
  /// mprotect (the recorder is disarmed anyway; pages left PROT_NONE then crash when touched).
  result<std::vector<std::uint32_t>> stop();

  /// Changes the protection of pages [first_page, first_page + count) to `prot` (same values as
  /// start()'s entries): a page not touched yet gets it on its first touch (a PROT_NONE page
  /// becomes recordable, a page set to PROT_NONE is no longer recorded); a touched page gets it
  /// now. The runtime calls this instead of mprotect while recording. Errors:
  /// std::errc::invalid_argument (not armed, pages outside the range, a bad prot); the errno of
  /// a failed mprotect (protections of the pages before the failing one are changed).
  result<void> set_protection(std::uint64_t first_page, std::uint64_t count, int prot);

  /// Pages recorded so far (any thread; exact once the touching threads are done).
  std::uint64_t touched() const noexcept;
  /// True if the kernel refused a per-page mprotect in the handler (ENOMEM when the process
  /// reaches vm.max_map_count VMAs, since every isolated touched page splits one): the handler
  /// then restored the whole range at once and recording stopped early, so stop() returns a
  /// prefix of the first-touch order. Stays readable after stop().
  bool overflowed() const noexcept;
  /// True between a successful start() and stop().
  bool armed() const noexcept;

private:
  explicit touch_recorder(std::unique_ptr<detail::touch_state> s) noexcept;
  std::unique_ptr<detail::touch_state> s_;
};

} // namespace kiln::memory
