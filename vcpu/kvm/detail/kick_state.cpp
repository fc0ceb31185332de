// The kick protocol: a sticky request counter, immediate_exit, and a signal while in run().
#include <kiln/vcpu/kvm/detail/kick_state.hpp>

#include <sched.h>
#include <signal.h>

namespace kiln::vcpu::kvm::detail {

static_assert(std::atomic_ref<std::uint8_t>::is_always_lock_free);
static_assert(std::atomic<std::uint64_t>::is_always_lock_free);

namespace {

void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

} // namespace

void kick_state::kick() noexcept {
  requests_.fetch_add(1, std::memory_order_seq_cst); // K1
  store_immediate_exit(1);                           // K2
  std::uint32_t s = run_state_.load(std::memory_order_seq_cst);
  while ((s & in_run_bit) != 0) {
    if (run_state_.compare_exchange_weak(s, s + signaller, std::memory_order_seq_cst)) { // K3
      // SAFETY (signal): the thread is inside run() and cannot leave it before K5 (R5 waits), so
      // its id is live. The handler is a no-op; delivery only makes KVM_RUN return EINTR.
      ::pthread_kill(thread_, signal_);                           // K4
      run_state_.fetch_sub(signaller, std::memory_order_release); // K5
      return;
    }
  }
}

void kick_state::enter_run() noexcept {
  thread_ = ::pthread_self();
  run_state_.fetch_or(in_run_bit, std::memory_order_seq_cst); // R1
}

void kick_state::leave_run() noexcept {
  run_state_.fetch_and(~in_run_bit, std::memory_order_seq_cst); // R5
  for (unsigned spins = 0; run_state_.load(std::memory_order_acquire) != 0; ++spins) {
    if (spins < 64)
      cpu_relax();
    else
      ::sched_yield();
  }
}

void kick_state::consume() noexcept {
  consumed_ = requests_.load(std::memory_order_seq_cst);
  store_immediate_exit(0);
}

} // namespace kiln::vcpu::kvm::detail
