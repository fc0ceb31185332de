// The kick signal: a no-op handler installed once per process, unblocked on each vCPU thread.
#include <kiln/vcpu/kvm/detail/kick_signal.hpp>
#include <kiln/vcpu/vcpu_errc.hpp>

#include <fmt/format.h>

#include <cerrno>
#include <system_error>

#include <pthread.h>
#include <signal.h>

namespace kiln::vcpu::kvm::detail {

namespace {

// SAFETY (signal handler): does nothing, so it is async-signal-safe and leaves errno alone.
// Its only purpose is to exist: a delivered, handled signal makes KVM_RUN return -EINTR, where
// the default action for a realtime signal would terminate the process.
extern "C" void kiln_kvm_kick_handler(int) {}

error sigaction_error(int err) {
  return error(vcpu_errc::create_failed,
               fmt::format("sigaction(SIGRTMIN+{}): {}", kick_signal_offset,
                           std::generic_category().message(err)));
}

result<void> install_once() {
  const int sig = kick_signal();
  struct sigaction old {};
  if (::sigaction(sig, nullptr, &old) == -1) return sigaction_error(errno);
  const bool has_handler = (old.sa_flags & SA_SIGINFO) != 0
                               ? old.sa_sigaction != nullptr
                               : (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN);
  if (has_handler && old.sa_handler != &kiln_kvm_kick_handler)
    return error(vcpu_errc::create_failed,
                 fmt::format("SIGRTMIN+{} already has a handler; kiln needs it to kick vCPUs",
                             kick_signal_offset));

  struct sigaction sa {};
  sa.sa_handler = &kiln_kvm_kick_handler;
  sigemptyset(&sa.sa_mask);
  // SA_RESTART does not weaken the kick: KVM_RUN fails with plain -EINTR (never -ERESTARTSYS),
  // which the kernel never restarts, with or without the flag. What the flag buys: a kick that
  // lands just after run() returned interrupts whatever the worker thread does next, and with
  // SA_RESTART its restartable syscalls (read, write, futex waits...) resume instead of
  // failing with EINTR in code that may not expect it.
  sa.sa_flags = SA_RESTART;
  if (::sigaction(sig, &sa, nullptr) == -1) return sigaction_error(errno);
  return ok();
}

} // namespace

int kick_signal() noexcept {
  return SIGRTMIN + kick_signal_offset;
}

result<void> install_kick_handler() {
  // A function-local static: initialised exactly once, thread-safely. A failure is remembered;
  // it means the process itself claims the signal, which does not change later.
  static const result<void> installed = install_once();
  return installed;
}

void unblock_kick_signal_on_this_thread() noexcept {
  thread_local bool unblocked = false;
  if (unblocked) return;
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, kick_signal());
  // Cannot fail with a valid `how` and set.
  ::pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
  unblocked = true;
}

} // namespace kiln::vcpu::kvm::detail
