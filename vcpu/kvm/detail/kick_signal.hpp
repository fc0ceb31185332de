// The realtime signal that kicks a vCPU thread out of KVM_RUN: its number, handler and mask.
#pragma once

#include <kiln/support/result.hpp>

namespace kiln::vcpu::kvm::detail {

/// Offset of the kick signal above SIGRTMIN. The process must leave SIGRTMIN+3 to kiln.
inline constexpr int kick_signal_offset = 3;

/// SIGRTMIN + kick_signal_offset (SIGRTMIN is a glibc function call, not a constant).
int kick_signal() noexcept;

/// Installs, once per process, a no-op handler for the kick signal, so that delivering it only
/// makes KVM_RUN return EINTR. Fails (create_failed) if someone else already handles that signal:
/// kiln would otherwise run their handler on every kick. Thread-safe.
result<void> install_kick_handler();

/// Unblocks the kick signal on the calling thread (once per thread; later calls cost a
/// thread_local load). A thread that blocks it again can still be kicked, but only through
/// `immediate_exit`, i.e. not out of a guest that never exits.
void unblock_kick_signal_on_this_thread() noexcept;

} // namespace kiln::vcpu::kvm::detail
