// Turns a host SIGBUS on a truncated mapped file into a per-sandbox error instead of a crash.
#pragma once

#include <kiln/support/result.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace kiln::memory {

/// What a sandbox learns when its guest touched pages a mapped file no longer has.
struct file_fault_state {
  /// Host address of the first lost page touched (0: none yet). Written by the signal handler.
  std::atomic<std::uintptr_t> first_lost{0};
  /// Called from the signal handler after a lost page was patched; must be async-signal-safe
  /// (kiln passes the vCPU's kick, which only stores atomics or sends a signal).
  void (*notify)(void* context) noexcept = nullptr;
  void* context = nullptr;
};

/// While a watch is registered over a file mapping, a SIGBUS at an address inside it (the
/// emulated backend reading a page past the end of a file that was truncated after mapping) is
/// handled: the lost page is replaced by a read-only zero page so the faulting access can
/// finish, the watch's state records the address and its notify hook is called. The sandbox
/// then fails the call with memory_errc::file_truncated at its next exit, and nothing else in
/// the process is affected. A SIGBUS anywhere else goes to the handler that was installed
/// before kiln's (or the default action).
///
/// (On KVM the same touch makes KVM_RUN fail with EFAULT instead of raising SIGBUS; the sandbox
/// names it the same way by checking the file's size.)
///
/// The process-wide handler is installed on the first watch and stays. Watches are few (one per
/// mapped file) and registered from ordinary threads; the handler only reads them.
class file_fault_watch {
public:
  file_fault_watch() = default;
  ~file_fault_watch();
  file_fault_watch(file_fault_watch&& o) noexcept;
  file_fault_watch& operator=(file_fault_watch&& o) noexcept;
  file_fault_watch(const file_fault_watch&) = delete;
  file_fault_watch& operator=(const file_fault_watch&) = delete;

  /// Watches host range [host, host+len). `state` must outlive the watch. A lost page is
  /// patched read-only, or read-write when `writable` (guest RAM mapped from a snapshot file,
  /// which the emulator may write before it stops). Errors: too many watches in the process
  /// (memory_errc::too_many_ranges), sigaction failure.
  static result<file_fault_watch> create(const std::byte* host, std::uint64_t len,
                                         file_fault_state* state, bool writable = false);

private:
  explicit file_fault_watch(int slot) : slot_(slot) {}
  void reset() noexcept;
  int slot_ = -1;
};

} // namespace kiln::memory
