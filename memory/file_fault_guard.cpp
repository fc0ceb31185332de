// file_fault_watch: a registry of watched file mappings read by a chaining SIGBUS handler.
#include <kiln/memory/address.hpp>
#include <kiln/memory/file_fault_guard.hpp>
#include <kiln/memory/memory_errc.hpp>

#include <signal.h>
#include <sys/mman.h>

#include <array>
#include <mutex>
#include <thread>
#include <utility>

namespace kiln::memory {
namespace {

constexpr int max_watches = 4096;

struct slot {
  std::atomic<std::uintptr_t> begin{0}; // 0: free; written last on registration, first on removal
  std::atomic<std::uintptr_t> end{0};
  std::atomic<file_fault_state*> state{nullptr};
  std::atomic<bool> writable{false};
};

std::array<slot, max_watches> slots;
std::mutex registry_mutex; // registration only; the handler never takes it
/// Handlers between their first look at the slots and their last use of one: reset() waits for
/// none to be running after it frees a slot, so a state is never used after its watch is gone
/// (seq_cst on both sides: a handler either sees the slot freed or is waited for).
std::atomic<int> handlers_running{0};
struct sigaction previous_action {};
std::once_flag install_once;
int install_errno = 0;

void chain(int sig, siginfo_t* info, void* context) {
  if (previous_action.sa_flags & SA_SIGINFO) {
    if (previous_action.sa_sigaction) previous_action.sa_sigaction(sig, info, context);
    return;
  }
  if (previous_action.sa_handler == SIG_IGN) return;
  if (previous_action.sa_handler == SIG_DFL) {
    // Restore the default and return: the access faults again and the default action runs.
    ::signal(sig, SIG_DFL);
    return;
  }
  previous_action.sa_handler(sig);
}

void on_sigbus(int sig, siginfo_t* info, void* context) {
  const int saved_errno = errno;
  const auto addr = reinterpret_cast<std::uintptr_t>(info->si_addr);
  handlers_running.fetch_add(1, std::memory_order_seq_cst);
  for (auto& s : slots) {
    const std::uintptr_t b = s.begin.load(std::memory_order_seq_cst);
    if (b == 0 || addr < b || addr >= s.end.load(std::memory_order_relaxed)) continue;
    file_fault_state* st = s.state.load(std::memory_order_relaxed);
    const std::uintptr_t page = addr & ~static_cast<std::uintptr_t>(page_size - 1);
    // SAFETY: mmap is a plain syscall (async-signal-safe in practice); MAP_FIXED replaces only
    // the one lost page of a file mapping kiln owns, with a zero page the access can finish on.
    const int prot =
        s.writable.load(std::memory_order_relaxed) ? PROT_READ | PROT_WRITE : PROT_READ;
    void* p = ::mmap(reinterpret_cast<void*>(page), page_size, prot,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (p == MAP_FAILED) break; // cannot patch it: let the previous handler decide
    std::uintptr_t none = 0;
    st->first_lost.compare_exchange_strong(none, page, std::memory_order_release);
    if (st->notify) st->notify(st->context);
    handlers_running.fetch_sub(1, std::memory_order_seq_cst);
    errno = saved_errno;
    return;
  }
  handlers_running.fetch_sub(1, std::memory_order_seq_cst); // before a chain that may not return
  errno = saved_errno;
  chain(sig, info, context);
}

void install() {
  struct sigaction sa {};
  sa.sa_sigaction = on_sigbus;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  if (::sigaction(SIGBUS, &sa, &previous_action) != 0) install_errno = errno;
}

} // namespace

result<file_fault_watch> file_fault_watch::create(const std::byte* host, std::uint64_t len,
                                                  file_fault_state* state, bool writable) {
  std::call_once(install_once, install);
  if (install_errno != 0)
    return error(std::error_code(install_errno, std::generic_category()), "sigaction(SIGBUS)");
  std::lock_guard lock(registry_mutex);
  for (int i = 0; i < max_watches; ++i) {
    slot& s = slots[static_cast<std::size_t>(i)];
    if (s.begin.load(std::memory_order_relaxed) != 0) continue;
    s.end.store(reinterpret_cast<std::uintptr_t>(host) + len, std::memory_order_relaxed);
    s.state.store(state, std::memory_order_relaxed);
    s.writable.store(writable, std::memory_order_relaxed);
    s.begin.store(reinterpret_cast<std::uintptr_t>(host), std::memory_order_release);
    return file_fault_watch(i);
  }
  return error(memory_errc::too_many_ranges, "too many mapped files in this process");
}

void file_fault_watch::reset() noexcept {
  if (slot_ < 0) return;
  std::lock_guard lock(registry_mutex);
  slots[static_cast<std::size_t>(slot_)].begin.store(0, std::memory_order_seq_cst);
  slot_ = -1;
  // A handler on another thread may still hold this slot's state: wait until it is done (a
  // handler never blocks, so this is short).
  while (handlers_running.load(std::memory_order_seq_cst) != 0)
    std::this_thread::yield();
}

file_fault_watch::~file_fault_watch() {
  reset();
}

file_fault_watch::file_fault_watch(file_fault_watch&& o) noexcept
    : slot_(std::exchange(o.slot_, -1)) {}

file_fault_watch& file_fault_watch::operator=(file_fault_watch&& o) noexcept {
  if (this != &o) {
    reset();
    slot_ = std::exchange(o.slot_, -1);
  }
  return *this;
}

} // namespace kiln::memory
