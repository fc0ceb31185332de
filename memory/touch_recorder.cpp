// touch_recorder: PROT_NONE arming, a lock-free registry and a chaining SIGSEGV handler.
#include <kiln/memory/address.hpp>
#include <kiln/memory/host_mapping.hpp>
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/touch_recorder.hpp>

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <mutex>
#include <system_error>
#include <utility>

namespace kiln::memory {
namespace {

// One byte per page, read and written with std::atomic_ref by the handler and by the owner:
// bits 0-2 hold the protection the page is meant to have (PROT_READ/WRITE/EXEC), bits 4-5 its
// phase. Only the handler moves a page from untouched to claimed (by compare-exchange, so a page
// two threads fault on at once is claimed, and recorded, by exactly one of them).
constexpr std::uint8_t prot_bits = PROT_READ | PROT_WRITE | PROT_EXEC;
constexpr std::uint8_t phase_bits = 0x30;
constexpr std::uint8_t phase_untouched = 0x00; // armed (PROT_NONE in the kernel) if prot != 0
constexpr std::uint8_t phase_claimed = 0x10;   // recorded; its restoring mprotect is under way
constexpr std::uint8_t phase_restored = 0x20;  // recorded; its protection is back in place

using cell_ref = std::atomic_ref<std::uint8_t>;
static_assert(cell_ref::is_always_lock_free, "the signal handler needs lock-free page cells");
static_assert(std::atomic<std::uint64_t>::is_always_lock_free);
static_assert(std::atomic<std::uintptr_t>::is_always_lock_free);

} // namespace

namespace detail {

/// A recorder's state, at a stable address the handler reaches through the registry.
struct touch_state {
  std::uintptr_t base = 0;
  std::uint64_t pages = 0;
  host_mapping cells_mem; // `pages` cells, zero until written: committed as they are used
  host_mapping order_mem; // `pages` indexes; only the recorded prefix is ever committed
  std::uint8_t* cells = nullptr;
  std::uint32_t* order = nullptr;
  std::atomic<std::uint64_t> count{0};
  std::atomic<bool> armed{false}; // false: being restored (stop or overflow), nothing recorded
  std::atomic<bool> overflowed{false};
  std::atomic<bool> restore_failed{false}; // some page may stay PROT_NONE: faults there are real
  int slot = -1;                           // registry slot while armed; owner thread only

  std::byte* page_addr(std::uint64_t i) const noexcept {
    // SAFETY: i < pages, inside the range start() validated.
    return reinterpret_cast<std::byte*>(base + i * page_size);
  }
  cell_ref cell(std::uint64_t i) const noexcept { return cell_ref(cells[i]); }
};

} // namespace detail

namespace {

using detail::touch_state;

// The registry: fixed slots the handler scans without locks. A slot is published by storing
// `begin` last; it is retired by clearing `begin` and then waiting until no handler is inside
// it (`inflight`), so the state it points to is never freed under a running handler.
struct slot {
  std::atomic<std::uintptr_t> begin{0}; // 0: free
  std::atomic<std::uintptr_t> end{0};
  std::atomic<touch_state*> rec{nullptr};
  std::atomic<std::uint32_t> inflight{0};
};

constexpr int max_recorders = 256;
std::array<slot, max_recorders> slots;
std::atomic<int> slots_used{0}; // high-water mark: the handler scans [0, slots_used)
std::mutex registry_mutex;      // registration only; the handler never takes it
struct sigaction previous_action {};
std::once_flag install_once;
int install_errno = 0;

error invalid(const char* what) {
  return error(std::make_error_code(std::errc::invalid_argument), what);
}

bool valid_prot(int p) {
  return p == PROT_NONE || ((p & PROT_READ) != 0 && (p & ~int{prot_bits}) == 0);
}

/// Whether the access that faulted is one `prot` allows, i.e. whether it succeeds on retry once
/// the page has `prot`. Tells a fault that raced with the page's restoring from a real one.
bool access_allowed(int prot, const void* context) noexcept {
#if defined(__x86_64__)
  // SAFETY: an SA_SIGINFO handler's third argument is the interrupted ucontext_t; for a page
  // fault the kernel stores the hardware error code in REG_ERR (bit 1: write, bit 4: fetch).
  const auto* uc = static_cast<const ucontext_t*>(context);
  const auto err = static_cast<std::uint64_t>(uc->uc_mcontext.gregs[REG_ERR]);
  if (err & 0x10) return (prot & PROT_EXEC) != 0;
  if (err & 0x02) return (prot & PROT_WRITE) != 0;
  return (prot & PROT_READ) != 0;
#else
  // Without the access type, treat a fault on a restored page as real: a thread that raced
  // another's restoring then crashes instead of a genuine fault looping forever.
  (void)prot;
  (void)context;
  return false;
#endif
}

/// Gives every page its intended protection, one mprotect per run of equal protection (PROT_NONE
/// runs left alone). Allocates nothing: the handler calls it on overflow. Returns 0 or an errno;
/// goes on after a failure so that as much as possible is restored.
int restore_all(const touch_state& s) noexcept {
  int failed = 0;
  std::uint64_t i = 0;
  while (i < s.pages) {
    const int prot = s.cell(i).load(std::memory_order_relaxed) & prot_bits;
    std::uint64_t j = i + 1;
    while (j < s.pages && (s.cell(j).load(std::memory_order_relaxed) & prot_bits) == prot)
      ++j;
    // SAFETY: [i, j) lies inside the recorder's range; this gives it back what it had.
    if (prot != 0 && ::mprotect(s.page_addr(i), (j - i) * page_size, prot) != 0 && failed == 0)
      failed = errno;
    i = j;
  }
  return failed;
}

/// A per-page mprotect failed (ENOMEM at vm.max_map_count): stop recording, restore everything.
void overflow(touch_state& s) noexcept {
  s.armed.store(false, std::memory_order_seq_cst);
  // One restorer; other threads faulting meanwhile see !armed and retry until it is done.
  if (s.overflowed.exchange(true, std::memory_order_acq_rel)) return;
  if (restore_all(s) != 0) s.restore_failed.store(true, std::memory_order_release);
}

enum class verdict { retry, not_ours };

/// A SEGV_ACCERR at `addr` inside `s`'s range.
verdict on_fault(touch_state& s, std::uintptr_t addr, const void* context) noexcept {
  const std::uint64_t page = (addr - s.base) / page_size;
  const cell_ref cell = s.cell(page);
  std::uint8_t v = cell.load(std::memory_order_acquire);
  for (;;) {
    const int prot = v & prot_bits;
    if (prot == 0) return verdict::not_ours; // the range's own PROT_NONE page
    if (!s.armed.load(std::memory_order_acquire)) {
      // stop() or an overflow is restoring the range: the access succeeds once it is done.
      if (s.restore_failed.load(std::memory_order_acquire)) return verdict::not_ours;
      return access_allowed(prot, context) ? verdict::retry : verdict::not_ours;
    }
    const std::uint8_t phase = v & phase_bits;
    if (phase == phase_claimed) return verdict::retry; // another thread is restoring it
    if (phase == phase_restored) // raced with the restoring, or a right the page lacks
      return access_allowed(prot, context) ? verdict::retry : verdict::not_ours;
    if (cell.compare_exchange_weak(v, static_cast<std::uint8_t>(prot | phase_claimed),
                                   std::memory_order_acq_rel, std::memory_order_acquire))
      break;
  }
  const int prot = v & prot_bits;
  // Claimed pages are distinct, so n < pages.
  const std::uint64_t n = s.count.fetch_add(1, std::memory_order_relaxed);
  s.order[n] = static_cast<std::uint32_t>(page);
  // SAFETY: mprotect is a plain syscall (async-signal-safe in practice, as in
  // file_fault_guard); it gives one armed page of the recorder's range its intended protection.
  if (::mprotect(s.page_addr(page), page_size, prot) != 0) overflow(s);
  cell.store(static_cast<std::uint8_t>(prot | phase_restored), std::memory_order_release);
  return verdict::retry;
}

/// Hands a signal that is not ours to the handler installed before kiln's, as the kernel would
/// have run it (its mask, SA_NODEFER), or to the default action.
void chain(int sig, siginfo_t* info, void* context) noexcept {
  const struct sigaction& prev = previous_action;
  const bool from_fault = info->si_code > 0; // raised by the CPU; <= 0: sent by kill/raise
  if (!(prev.sa_flags & SA_SIGINFO) &&
      (prev.sa_handler == SIG_DFL || (prev.sa_handler == SIG_IGN && from_fault))) {
    // The kernel does not let a fault's SIGSEGV be ignored either. Restore the default action
    // and let the signal come again: a faulting access repeats when this returns.
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    ::sigaction(sig, &dfl, nullptr);
    if (!from_fault) ::raise(sig);
    return;
  }
  if (!(prev.sa_flags & SA_SIGINFO) && prev.sa_handler == SIG_IGN) return;
  // Ours runs with SA_NODEFER and an empty mask; block what the previous one asked for, so a
  // handler that siglongjmps or returns sees what it would have seen without kiln. The kernel
  // restores the interrupted mask when the handlers return.
  sigset_t mask = prev.sa_mask;
  if (!(prev.sa_flags & SA_NODEFER)) sigaddset(&mask, sig);
  ::pthread_sigmask(SIG_BLOCK, &mask, nullptr);
  if (prev.sa_flags & SA_SIGINFO) {
    if (prev.sa_sigaction) prev.sa_sigaction(sig, info, context);
  } else {
    prev.sa_handler(sig);
  }
}

void on_sigsegv(int sig, siginfo_t* info, void* context) {
  const int saved_errno = errno;
  // An armed page is PROT_NONE over a mapped VMA: SEGV_ACCERR. SEGV_MAPERR (nothing mapped),
  // SEGV_PKUERR and signals sent by kill are never ours.
  if (info->si_code == SEGV_ACCERR) {
    const auto addr = reinterpret_cast<std::uintptr_t>(info->si_addr);
    const int n = slots_used.load(std::memory_order_acquire);
    for (int i = 0; i < n; ++i) {
      slot& sl = slots[static_cast<std::size_t>(i)];
      const std::uintptr_t b = sl.begin.load(std::memory_order_relaxed);
      if (b == 0 || addr < b || addr >= sl.end.load(std::memory_order_relaxed)) continue;
      // Pin the slot, then check again that it still covers addr: after this fetch_add either
      // we see the slot retired, or its retirement waits for our fetch_sub (both seq_cst).
      sl.inflight.fetch_add(1, std::memory_order_seq_cst);
      bool found = false;
      verdict v = verdict::not_ours;
      const std::uintptr_t b2 = sl.begin.load(std::memory_order_seq_cst);
      if (b2 != 0 && addr >= b2 && addr < sl.end.load(std::memory_order_relaxed)) {
        found = true;
        v = on_fault(*sl.rec.load(std::memory_order_relaxed), addr, context);
      }
      sl.inflight.fetch_sub(1, std::memory_order_release);
      if (!found) continue; // retired or reused meanwhile: look on
      if (v == verdict::retry) {
        errno = saved_errno;
        return;
      }
      break; // ranges are disjoint: no other slot covers addr
    }
  }
  errno = saved_errno;
  chain(sig, info, context);
}

void install() {
  // Read the previous action before ours is in place, so the handler never sees it half-written.
  if (::sigaction(SIGSEGV, nullptr, &previous_action) != 0) {
    install_errno = errno;
    return;
  }
  struct sigaction sa {};
  sa.sa_sigaction = on_sigsegv;
  // SA_ONSTACK: a stack overflow (a guard page is also SEGV_ACCERR) still reaches the previous
  // handler on the thread's alternate stack. SA_NODEFER with an empty mask: the handler is
  // reentrant and chain() applies the previous handler's own mask. Not SA_RESETHAND: it stays.
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  if (::sigaction(SIGSEGV, &sa, nullptr) != 0) install_errno = errno;
}

result<void> register_range(touch_state& s) {
  const std::uintptr_t end = s.base + s.pages * page_size;
  std::lock_guard lock(registry_mutex);
  const int n = slots_used.load(std::memory_order_relaxed);
  int free = -1;
  for (int i = 0; i < n; ++i) {
    const slot& sl = slots[static_cast<std::size_t>(i)];
    const std::uintptr_t b = sl.begin.load(std::memory_order_relaxed);
    if (b == 0) {
      if (free < 0) free = i;
      continue;
    }
    if (b < end && s.base < sl.end.load(std::memory_order_relaxed))
      return error(memory_errc::overlapping_region, "another touch_recorder is armed there");
  }
  if (free < 0) {
    if (n == max_recorders)
      return error(memory_errc::too_many_ranges, "too many touch recorders in this process");
    free = n;
  }
  slot& sl = slots[static_cast<std::size_t>(free)];
  sl.end.store(end, std::memory_order_relaxed);
  sl.rec.store(&s, std::memory_order_relaxed);
  sl.begin.store(s.base, std::memory_order_seq_cst);
  if (free == n) slots_used.store(n + 1, std::memory_order_release);
  s.slot = free;
  return ok();
}

void unregister_range(touch_state& s) noexcept {
  std::lock_guard lock(registry_mutex);
  slot& sl = slots[static_cast<std::size_t>(s.slot)];
  sl.begin.store(0, std::memory_order_seq_cst);
  // A handler that pinned the slot before the store above finishes in microseconds.
  while (sl.inflight.load(std::memory_order_seq_cst) != 0)
    ::sched_yield();
  sl.rec.store(nullptr, std::memory_order_relaxed);
  s.slot = -1;
}

} // namespace

result<touch_recorder> touch_recorder::start(std::byte* host, std::span<const int> page_prot) {
  const auto base = reinterpret_cast<std::uintptr_t>(host);
  const std::uint64_t pages = page_prot.size();
  std::uintptr_t len = 0;
  std::uintptr_t end = 0;
  if (base == 0 || !is_aligned(base, page_size)) return invalid("touch_recorder: unaligned host");
  if (pages == 0 || pages > (std::uint64_t{1} << 32) ||
      __builtin_mul_overflow(pages, page_size, &len) || __builtin_add_overflow(base, len, &end))
    return invalid("touch_recorder: page count");
  for (const int p : page_prot)
    if (!valid_prot(p)) return invalid("touch_recorder: page protection");

  std::call_once(install_once, install);
  if (install_errno != 0)
    return error(std::error_code(install_errno, std::generic_category()), "sigaction(SIGSEGV)");

  auto s = std::make_unique<detail::touch_state>();
  s->base = base;
  s->pages = pages;
  KILN_TRY_ASSIGN(s->cells_mem, host_mapping::anonymous(align_up(pages, page_size), false));
  KILN_TRY_ASSIGN(s->order_mem, host_mapping::anonymous(
                                    align_up(pages * sizeof(std::uint32_t), page_size), false));
  s->cells = reinterpret_cast<std::uint8_t*>(s->cells_mem.data());
  // SAFETY: a fresh page-aligned anonymous mapping holds `pages` uint32_t.
  s->order = reinterpret_cast<std::uint32_t*>(s->order_mem.data());
  for (std::uint64_t i = 0; i < pages; ++i)
    s->cells[i] = static_cast<std::uint8_t>(page_prot[i]);
  s->armed.store(true, std::memory_order_relaxed);

  // Register before arming: from the first mprotect on, any thread may fault in the range.
  KILN_TRY(register_range(*s));
  std::uint64_t i = 0;
  while (i < pages) {
    if (page_prot[i] == PROT_NONE) {
      ++i;
      continue;
    }
    std::uint64_t j = i + 1;
    while (j < pages && page_prot[j] != PROT_NONE)
      ++j;
    // SAFETY: [i, j) lies inside the caller's range, which it vouched is mapped.
    if (::mprotect(s->page_addr(i), (j - i) * page_size, PROT_NONE) != 0) {
      error e = errno_error("mprotect(PROT_NONE) arming a touch_recorder");
      s->armed.store(false, std::memory_order_seq_cst);
      (void)restore_all(*s);
      unregister_range(*s);
      return e;
    }
    i = j;
  }
  return touch_recorder(std::move(s));
}

result<std::vector<std::uint32_t>> touch_recorder::stop() {
  if (!armed()) return invalid("touch_recorder: not armed");
  detail::touch_state& s = *s_;
  s.armed.store(false, std::memory_order_seq_cst);
  // Restores the pages touched too (to what they already have): runs stay whole, and an
  // overflow's restore that failed gets a second chance here.
  const int failed = restore_all(s);
  if (failed != 0) s.restore_failed.store(true, std::memory_order_release);
  unregister_range(s); // waits for handlers still inside: after it, `order` is final
  std::vector<std::uint32_t> order(s.order, s.order + s.count.load(std::memory_order_acquire));
  s.cells_mem = host_mapping();
  s.order_mem = host_mapping();
  s.cells = nullptr;
  s.order = nullptr;
  if (failed != 0)
    return error(std::error_code(failed, std::generic_category()),
                 "mprotect restoring a touch_recorder's range");
  return order;
}

result<void> touch_recorder::set_protection(std::uint64_t first_page, std::uint64_t count,
                                            int prot) {
  if (!armed()) return invalid("touch_recorder: not armed");
  detail::touch_state& s = *s_;
  if (!valid_prot(prot) || first_page > s.pages || count > s.pages - first_page)
    return invalid("touch_recorder: set_protection range or protection");
  const std::uint64_t last = first_page + count;
  const auto with_prot = [prot](std::uint8_t v) {
    return static_cast<std::uint8_t>((v & phase_bits) | prot);
  };
  if (s.overflowed.load(std::memory_order_acquire)) {
    // The whole range is restored: change it now, like plain memory.
    for (std::uint64_t p = first_page; p < last; ++p)
      s.cell(p).store(with_prot(s.cell(p).load(std::memory_order_relaxed)),
                      std::memory_order_release);
    if (count != 0 && ::mprotect(s.page_addr(first_page), count * page_size, prot) != 0)
      return errno_error("mprotect (touch_recorder::set_protection)");
    return ok();
  }
  std::uint64_t p = first_page;
  while (p < last) {
    const cell_ref cell = s.cell(p);
    std::uint8_t v = cell.load(std::memory_order_acquire);
    while ((v & phase_bits) == phase_claimed) { // a handler is finishing it (a racing touch)
      ::sched_yield();
      v = cell.load(std::memory_order_acquire);
    }
    if ((v & phase_bits) == phase_untouched) {
      // Still PROT_NONE in the kernel (armed, or a PROT_NONE entry): only the bookkeeping
      // changes. The exchange loses only to the handler claiming it; then look again.
      if (cell.compare_exchange_strong(v, with_prot(v), std::memory_order_acq_rel)) ++p;
      continue;
    }
    // A run of touched pages: its protection changes now, and the cells once that succeeded.
    std::uint64_t q = p + 1;
    while (q < last && (s.cell(q).load(std::memory_order_acquire) & phase_bits) == phase_restored)
      ++q;
    // SAFETY: [p, q) lies inside the recorder's range.
    if (::mprotect(s.page_addr(p), (q - p) * page_size, prot) != 0)
      return errno_error("mprotect (touch_recorder::set_protection)");
    for (; p < q; ++p)
      s.cell(p).store(with_prot(s.cell(p).load(std::memory_order_relaxed)),
                      std::memory_order_release);
  }
  return ok();
}

std::uint64_t touch_recorder::touched() const noexcept {
  return s_ ? s_->count.load(std::memory_order_relaxed) : 0;
}

bool touch_recorder::overflowed() const noexcept {
  return s_ && s_->overflowed.load(std::memory_order_acquire);
}

bool touch_recorder::armed() const noexcept {
  return s_ && s_->slot >= 0;
}

touch_recorder::touch_recorder() noexcept = default;

touch_recorder::touch_recorder(std::unique_ptr<detail::touch_state> s) noexcept
    : s_(std::move(s)) {}

touch_recorder::~touch_recorder() {
  if (armed()) (void)stop();
}

touch_recorder::touch_recorder(touch_recorder&& o) noexcept : s_(std::move(o.s_)) {}

touch_recorder& touch_recorder::operator=(touch_recorder&& o) noexcept {
  if (this != &o) {
    if (armed()) (void)stop();
    s_ = std::move(o.s_);
  }
  return *this;
}

} // namespace kiln::memory
