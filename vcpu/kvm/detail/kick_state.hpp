// The kick protocol between kick() on any thread and run() on the vCPU thread, with its races.
#pragma once

#include <atomic>
#include <cstdint>

#include <pthread.h>

namespace kiln::vcpu::kvm::detail {

// ---------------------------------------------------------------------------------------------
// How a kick stops a vCPU, step by step, and why no window loses a kick or invents one.
//
// State: `requests_` (atomic, bumped by every kick), `consumed_` (vCPU thread only; a kick is
// pending while they differ), the run area's `immediate_exit` byte (polled by the kernel once
// at the start of KVM_RUN, after it finishes the last exit's I/O), and `run_state_` (bit 0: the
// vCPU thread is inside run(); the rest: kickers signalling it, in units of 2). All seq_cst.
//
//   kick(), any thread                           run(), the vCPU thread
//   K1 ++requests_                               R1 enter_run(): record thread id, set in_run
//   K2 immediate_exit = 1                        R2 pending()? -> consume(), return cancelled
//   K3 if in_run: signallers += 1 (a CAS that    R3 KVM_RUN: finish last exit's I/O, poll
//      succeeds only while in_run is set)           immediate_exit, check signals before
//   K4    pthread_kill(thread, kick signal)         every guest entry
//   K5    signallers -= 1                        R4 EINTR: pending()? -> consume(), cancelled;
//                                                   else clear_stale_immediate_exit(), to R2
//                                                R5 leave_run(): clear in_run, wait until no
//                                                   kicker is signalling
//
// 1. Kick before run(): K1 precedes R2, which returns cancelled without entering the guest.
// 2. Kick after R2, before the kernel polls immediate_exit in R3: the poll sees K2's 1, KVM_RUN
//    fails with EINTR at once, and R4 sees K1.
// 3. Kick after that poll (guest running or about to run): K3 sees in_run. (If it did not, K3
//    would precede R1 in the total order, so K1 < K3 < R1 < R2 and R2 would have seen K1.) The
//    signal is either pending at the kernel's pre-entry check or IPIs the CPU out of guest mode;
//    KVM_RUN fails with EINTR. A signal that lands while the thread is still in user space
//    before R3 only runs the no-op handler; but K2 precedes K4, so R3's poll reads 1.
// 4. Kick after KVM_RUN returned a real exit: run() returns that exit (nothing is lost) and the
//    kick stays pending (sticky): the next run() returns cancelled at R2. A signal sent in this
//    window reaches the thread outside KVM_RUN and does nothing (handler is a no-op, SA_RESTART).
// 5. Kick after run() returned (in_run clear): K1 and K2 only; the next run() returns cancelled
//    at R2.
// 6. Kick racing consume() (which reads requests_, then clears immediate_exit): kicks whose K1
//    came before the read coalesce into this cancellation; a later K1 stays pending. A K2 that
//    lands after the clear can leave immediate_exit at 1 with nothing pending; the next KVM_RUN
//    then fails with EINTR and R4 clears it and retries: one wasted ioctl, never a false
//    cancellation and never a busy loop. immediate_exit is only an accelerator; requests_ is the
//    truth, and R2 checks it before every KVM_RUN.
// 7. pthread_kill uses the thread id only between K3 and K5, while run_state_ counts the kicker,
//    and R5 waits for that count to drain; so it never targets a thread that has left run() and
//    might have exited. R5 waits at most for pthread_kill calls already in flight.
// 8. A kick during an I/O completion pass outside run() (force_immediate_exit /
//    restore_immediate_exit) is not lost either: the restore may clear its K2, but R2 of the
//    next run() sees its K1.
//
// A sticky kick is what the vCPU interface promises ("the next run() if none is running"). A
// runtime that must not cancel call N+1 because of a kill aimed at call N keys its kills to a
// call generation, and treats a `cancelled` with no kill for the current call as spurious.
// kick() must not race with destruction: the owner keeps the vCPU alive while anyone may kick.
// ---------------------------------------------------------------------------------------------

/// The kick state of one vCPU. `immediate_exit` points at the run area's byte of that name,
/// which the kernel reads; every access here to it is atomic.
class kick_state {
public:
  /// `signal`: the realtime signal whose (no-op) handler is installed.
  kick_state(std::uint8_t* immediate_exit, int signal) noexcept
      : immediate_exit_(immediate_exit), signal_(signal) {}
  kick_state(const kick_state&) = delete;
  kick_state& operator=(const kick_state&) = delete;

  /// K1..K5. Any thread, any time while the owner lives; async-signal-safe.
  void kick() noexcept;

  /// R1 and R5; the vCPU thread, around its KVM_RUN loop.
  void enter_run() noexcept;
  void leave_run() noexcept;

  /// The vCPU thread: is a kick not yet consumed? (R2, R4)
  bool pending() const noexcept { return requests_.load(std::memory_order_seq_cst) != consumed_; }
  /// The vCPU thread: takes every kick so far and clears immediate_exit.
  void consume() noexcept;
  /// The vCPU thread, after EINTR with nothing pending (case 6).
  void clear_stale_immediate_exit() noexcept { store_immediate_exit(0); }

  /// The vCPU thread, outside run(): make KVM_RUN return before entering the guest, then put
  /// back what the kick state says (case 8).
  void force_immediate_exit() noexcept { store_immediate_exit(1); }
  void restore_immediate_exit() noexcept { store_immediate_exit(pending() ? 1 : 0); }

  /// kick() calls so far. Any thread.
  std::uint64_t requests() const noexcept { return requests_.load(std::memory_order_relaxed); }

private:
  static constexpr std::uint32_t in_run_bit = 1;
  static constexpr std::uint32_t signaller = 2;

  void store_immediate_exit(std::uint8_t v) noexcept {
    std::atomic_ref<std::uint8_t>(*immediate_exit_).store(v, std::memory_order_seq_cst);
  }

  std::uint8_t* const immediate_exit_;
  const int signal_;
  std::atomic<std::uint64_t> requests_{0};
  std::uint64_t consumed_ = 0;
  std::atomic<std::uint32_t> run_state_{0};
  pthread_t thread_{}; // written in R1 only, read in K4 only (ordered by run_state_)
};

} // namespace kiln::vcpu::kvm::detail
