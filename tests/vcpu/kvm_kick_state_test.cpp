// Tests of the KVM backend's kick protocol (kick_state, kick_signal) against a simulated KVM_RUN.
#include "../test_env.hpp"

#include <kiln/vcpu/kvm/detail/kick_signal.hpp>
#include <kiln/vcpu/kvm/detail/kick_state.hpp>
#include <kiln/vcpu/vcpu_errc.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <functional>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include <poll.h>
#include <pthread.h>
#include <signal.h>

namespace kiln::vcpu::kvm::detail {
namespace {

using clock_type = std::chrono::steady_clock;
using std::chrono::microseconds;
using std::chrono::milliseconds;

std::uint8_t load_byte(std::uint8_t& b) {
  return std::atomic_ref<std::uint8_t>(b).load();
}

// ---- a signal that only counts, for the bookkeeping tests ----------------------------------

std::atomic<int> counted_signals{0};
std::atomic<pthread_t> last_signalled_thread{};
static_assert(std::atomic<int>::is_always_lock_free);

extern "C" void count_signal(int) {
  counted_signals.fetch_add(1);
  last_signalled_thread.store(::pthread_self());
}

int counting_signal() {
  static const int sig = [] {
    struct sigaction sa {};
    sa.sa_handler = &count_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    ::sigaction(SIGRTMIN + 6, &sa, nullptr);
    return SIGRTMIN + 6;
  }();
  return sig;
}

class kick_state_test : public ::testing::Test {
protected:
  void SetUp() override { counted_signals.store(0); }
  std::uint8_t immediate_exit_ = 0;
  kick_state ks_{&immediate_exit_, counting_signal()};
};

TEST_F(kick_state_test, starts_with_nothing_pending) {
  EXPECT_FALSE(ks_.pending());
  EXPECT_EQ(ks_.requests(), 0u);
  EXPECT_EQ(load_byte(immediate_exit_), 0);
}

TEST_F(kick_state_test, kick_outside_run_sets_immediate_exit_and_sends_no_signal) {
  ks_.kick();
  EXPECT_TRUE(ks_.pending());
  EXPECT_EQ(ks_.requests(), 1u);
  EXPECT_EQ(load_byte(immediate_exit_), 1);
  EXPECT_EQ(counted_signals.load(), 0);
}

TEST_F(kick_state_test, consume_takes_every_kick_so_far_and_clears_immediate_exit) {
  ks_.kick();
  ks_.kick();
  ks_.kick();
  ks_.consume();
  EXPECT_FALSE(ks_.pending()) << "kicks pending together coalesce into one cancellation";
  EXPECT_EQ(load_byte(immediate_exit_), 0);
  EXPECT_EQ(ks_.requests(), 3u) << "requests() counts every kick";
}

TEST_F(kick_state_test, kick_after_consume_is_pending_again) {
  ks_.kick();
  ks_.consume();
  ks_.kick();
  EXPECT_TRUE(ks_.pending());
  EXPECT_EQ(load_byte(immediate_exit_), 1);
}

TEST_F(kick_state_test, clearing_a_stale_immediate_exit_keeps_a_pending_kick) {
  ks_.kick();
  ks_.clear_stale_immediate_exit();
  EXPECT_EQ(load_byte(immediate_exit_), 0);
  EXPECT_TRUE(ks_.pending()) << "requests_ is the truth; immediate_exit only an accelerator";
}

TEST_F(kick_state_test, forced_immediate_exit_is_restored_from_the_kick_state) {
  ks_.force_immediate_exit();
  EXPECT_EQ(load_byte(immediate_exit_), 1);
  ks_.restore_immediate_exit();
  EXPECT_EQ(load_byte(immediate_exit_), 0) << "nothing pending";

  // Case 8: a kick during an I/O completion pass survives the restore.
  ks_.force_immediate_exit();
  ks_.kick();
  ks_.restore_immediate_exit();
  EXPECT_EQ(load_byte(immediate_exit_), 1);
  EXPECT_TRUE(ks_.pending());
}

TEST_F(kick_state_test, kick_inside_run_signals_the_running_thread_once) {
  ks_.enter_run();
  ks_.kick(); // from the vCPU thread itself: the signal is delivered before pthread_kill returns
  EXPECT_EQ(counted_signals.load(), 1);
  EXPECT_TRUE(::pthread_equal(last_signalled_thread.load(), ::pthread_self()));
  ks_.leave_run();
  ks_.kick();
  EXPECT_EQ(counted_signals.load(), 1) << "no signal once the thread has left run()";
  EXPECT_EQ(ks_.requests(), 2u);
}

TEST_F(kick_state_test, kick_from_another_thread_signals_the_thread_in_run) {
  std::atomic<bool> in_run{false}, kicked{false};
  pthread_t vcpu_thread{};
  std::thread vcpu([&] {
    vcpu_thread = ::pthread_self();
    ks_.enter_run();
    in_run.store(true);
    const auto give_up = clock_type::now() + std::chrono::seconds(5);
    while (counted_signals.load() == 0 && clock_type::now() < give_up)
      std::this_thread::yield();
    while (!kicked.load())
      std::this_thread::yield(); // kick() has returned
    ks_.leave_run();
  });
  while (!in_run.load())
    std::this_thread::yield();
  ks_.kick();
  kicked.store(true);
  vcpu.join();
  EXPECT_EQ(counted_signals.load(), 1);
  EXPECT_TRUE(::pthread_equal(last_signalled_thread.load(), vcpu_thread));
  EXPECT_TRUE(ks_.pending());
}

TEST_F(kick_state_test, leave_run_waits_for_a_kicker_inside_pthread_kill) {
  // Many kickers against many short runs on short-lived threads: a kicker must never signal a
  // thread that left run() and exited (R5 waits for K5). Checked here only as "nothing crashes,
  // nothing hangs"; ASan/TSan builds see more.
  std::atomic<bool> stop{false};
  std::vector<std::thread> kickers;
  for (int k = 0; k < 2; ++k)
    kickers.emplace_back([&] {
      while (!stop.load()) {
        ks_.kick();
        // ThreadSanitizer delivers a signal only where it chooses to, and a flood of them
        // starves the thread they target: unpaced, this test ran for over 8 minutes under it.
        if (test::under_tsan) std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
    });
  for (int t = 0; t < 200; ++t) {
    std::thread([&] {
      for (int i = 0; i < 20; ++i) {
        ks_.enter_run();
        if (ks_.pending()) ks_.consume();
        ks_.leave_run();
      }
    }).join();
  }
  stop.store(true);
  for (auto& k : kickers)
    k.join();
  EXPECT_GT(ks_.requests(), 0u);
}

// ---- the kick signal -----------------------------------------------------------------------

TEST(kick_signal_test, is_sigrtmin_plus_3_and_installs_once) {
  EXPECT_EQ(kick_signal(), SIGRTMIN + kick_signal_offset);
  ASSERT_TRUE(install_kick_handler());
  ASSERT_TRUE(install_kick_handler()) << "idempotent";
  struct sigaction sa {};
  ASSERT_EQ(::sigaction(kick_signal(), nullptr, &sa), 0);
  EXPECT_NE(sa.sa_handler, SIG_DFL);
  EXPECT_NE(sa.sa_handler, SIG_IGN);
  // A delivered kick signal does nothing (the default action would end the process).
  unblock_kick_signal_on_this_thread();
  ASSERT_EQ(::pthread_kill(::pthread_self(), kick_signal()), 0);
}

extern "C" void foreign_handler(int) {}

TEST(kick_signal_test, refuses_a_signal_someone_else_handles) {
  // A fresh process (threadsafe style re-executes the binary): the install result is cached.
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        struct sigaction sa {};
        sa.sa_handler = &foreign_handler;
        sigemptyset(&sa.sa_mask);
        ::sigaction(kick_signal(), &sa, nullptr);
        auto r = install_kick_handler();
        std::fprintf(stderr, "install: %s\n", r ? "ok" : r.err().message().c_str());
        std::_Exit(!r && r.code() == vcpu_errc::create_failed ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "already has a handler");
}

// ---- the run loop against a simulated KVM_RUN ------------------------------------------------

/// KVM_RUN as the kernel does it, for one vCPU thread, with the real kick signal: poll
/// immediate_exit once on entry (-EINTR if set), then "run the guest" until a signal is pending
/// (the check before each guest entry, or the IPI out of guest mode) or the guest exits by itself.
class simulated_kvm {
public:
  static constexpr int hung = -1;

  explicit simulated_kvm(std::uint8_t& immediate_exit) : immediate_exit_(immediate_exit) {}

  /// The guest exits by itself after `d` (an io_out, say); nullopt: it spins forever (`jmp $`).
  void guest_exits_after(std::optional<microseconds> d) { exit_after_ = d; }
  /// Called on the vCPU thread at the top of KVM_RUN, before the poll, signals deliverable.
  std::function<void()> on_entry;
  /// Called on the vCPU thread after the guest exited by itself, before KVM_RUN returns.
  std::function<void()> on_exit;

  /// 0 (an exit), EINTR, or `hung` when a spinning guest saw no signal for 5 s.
  int run() {
    calls.fetch_add(1);
    if (on_entry) on_entry();
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, kick_signal());
    ::pthread_sigmask(SIG_BLOCK, &block, &old);
    int result = EINTR;
    if (std::atomic_ref<std::uint8_t>(immediate_exit_).load() == 0) {
      guest_entries.fetch_add(1);
      sigset_t in_guest = old;
      sigdelset(&in_guest, kick_signal());
      const auto d =
          exit_after_.value_or(std::chrono::duration_cast<microseconds>(std::chrono::seconds(5)));
      timespec ts{static_cast<time_t>(d.count() / 1000000),
                  static_cast<long>(d.count() % 1000000) * 1000};
      // Atomically unblocks the kick signal and waits: a signal already pending ends it at once.
      const int r = ::ppoll(nullptr, 0, &ts, &in_guest);
      if (r == 0) result = exit_after_ ? 0 : hung;
      if (result == 0 && on_exit) on_exit();
    }
    ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
    return result;
  }

  std::atomic<std::uint64_t> calls{0}, guest_entries{0};

private:
  std::uint8_t& immediate_exit_;
  std::optional<microseconds> exit_after_;
};

enum class outcome { exited, cancelled, hung };

const char* name(outcome o) {
  switch (o) {
  case outcome::exited:
    return "exited";
  case outcome::cancelled:
    return "cancelled";
  case outcome::hung:
    return "hung";
  }
  return "?";
}

/// kvm_backend::run() and run_until_exit() (vcpu/kvm/kvm_vcpu.cpp), steps R1..R5.
outcome run(kick_state& ks, simulated_kvm& kvm) {
  unblock_kick_signal_on_this_thread();
  ks.enter_run(); // R1
  outcome o;
  for (;;) {
    if (ks.pending()) { // R2
      ks.consume();
      o = outcome::cancelled;
      break;
    }
    const int r = kvm.run(); // R3
    if (r == 0) {
      o = outcome::exited;
      break;
    }
    if (r == simulated_kvm::hung) {
      o = outcome::hung;
      break;
    }
    if (ks.pending()) { // R4
      ks.consume();
      o = outcome::cancelled;
      break;
    }
    ks.clear_stale_immediate_exit();
  }
  ks.leave_run(); // R5
  return o;
}

class kick_protocol_test : public ::testing::Test {
protected:
  void SetUp() override {
    auto r = install_kick_handler();
    ASSERT_TRUE(r) << r.err().message();
  }
  std::uint8_t immediate_exit_ = 0;
  kick_state ks_{&immediate_exit_, kick_signal()};
  simulated_kvm kvm_{immediate_exit_};
};

TEST_F(kick_protocol_test, case1_kick_before_run_cancels_without_entering_kvm) {
  ks_.kick();
  EXPECT_EQ(run(ks_, kvm_), outcome::cancelled);
  EXPECT_EQ(kvm_.calls.load(), 0u);
  EXPECT_EQ(load_byte(immediate_exit_), 0);
}

TEST_F(kick_protocol_test, case2_3_kick_after_the_pending_check_is_caught_by_the_poll) {
  // The kick lands after R2 but before KVM_RUN polls immediate_exit; its signal is delivered in
  // user space and lost, but immediate_exit is already 1.
  kvm_.on_entry = [this] {
    if (kvm_.calls.load() == 1) ks_.kick();
  };
  EXPECT_EQ(run(ks_, kvm_), outcome::cancelled);
  EXPECT_EQ(kvm_.guest_entries.load(), 0u) << "the guest never ran";
  EXPECT_FALSE(ks_.pending());
}

TEST_F(kick_protocol_test, case3_kick_while_the_guest_runs_interrupts_it) {
  std::thread kicker([this] {
    while (kvm_.guest_entries.load() == 0)
      std::this_thread::yield();
    std::this_thread::sleep_for(milliseconds(1));
    ks_.kick();
  });
  EXPECT_EQ(run(ks_, kvm_), outcome::cancelled);
  kicker.join();
  EXPECT_EQ(kvm_.guest_entries.load(), 1u);
}

TEST_F(kick_protocol_test, case4_kick_after_a_real_exit_is_sticky) {
  kvm_.guest_exits_after(microseconds(0));
  kvm_.on_exit = [this] { std::thread([this] { ks_.kick(); }).join(); };
  EXPECT_EQ(run(ks_, kvm_), outcome::exited) << "the exit is not lost";
  kvm_.on_exit = nullptr;
  const auto calls = kvm_.calls.load();
  EXPECT_EQ(run(ks_, kvm_), outcome::cancelled);
  EXPECT_EQ(kvm_.calls.load(), calls) << "cancelled at R2, without KVM_RUN";
  EXPECT_EQ(run(ks_, kvm_), outcome::exited) << "consumed";
}

TEST_F(kick_protocol_test, case5_kick_between_runs_cancels_the_next_one) {
  kvm_.guest_exits_after(microseconds(0));
  EXPECT_EQ(run(ks_, kvm_), outcome::exited);
  std::thread([this] { ks_.kick(); }).join();
  EXPECT_EQ(run(ks_, kvm_), outcome::cancelled);
  EXPECT_EQ(run(ks_, kvm_), outcome::exited);
}

TEST_F(kick_protocol_test, case6_stale_immediate_exit_costs_one_call_and_no_cancellation) {
  // A K2 that landed after consume() cleared the byte: immediate_exit = 1 with nothing pending.
  kvm_.guest_exits_after(microseconds(0));
  std::atomic_ref<std::uint8_t>(immediate_exit_).store(1);
  EXPECT_EQ(run(ks_, kvm_), outcome::exited);
  EXPECT_EQ(kvm_.calls.load(), 2u) << "one wasted KVM_RUN, then the guest";
  EXPECT_EQ(kvm_.guest_entries.load(), 1u);
  EXPECT_EQ(load_byte(immediate_exit_), 0);
}

TEST_F(kick_protocol_test, case6_kick_after_consume_read_the_counter_stays_pending) {
  ks_.kick();
  ks_.consume();
  ks_.kick(); // its K1 after consume's read
  EXPECT_TRUE(ks_.pending());
  EXPECT_EQ(run(ks_, kvm_), outcome::cancelled);
}

TEST_F(kick_protocol_test, case8_kick_during_an_io_completion_pass_is_not_lost) {
  ks_.force_immediate_exit();
  std::thread([this] { ks_.kick(); }).join();
  ks_.restore_immediate_exit();
  kvm_.guest_exits_after(microseconds(0));
  EXPECT_EQ(run(ks_, kvm_), outcome::cancelled);
}

TEST_F(kick_protocol_test, random_kicks_stop_a_spinning_guest_every_time) {
  constexpr int iterations = 500;
  std::mt19937 rng(4242);
  std::uniform_int_distribution<int> delay_us(0, 300);
  std::vector<double> latency_us;
  latency_us.reserve(iterations);
  for (int i = 0; i < iterations; ++i) {
    const auto delay = microseconds(delay_us(rng));
    std::atomic<clock_type::rep> kicked_at{0};
    std::thread kicker([&] {
      if (delay.count() > 0) std::this_thread::sleep_for(delay);
      kicked_at.store(clock_type::now().time_since_epoch().count());
      ks_.kick();
    });
    const outcome o = run(ks_, kvm_);
    const auto returned = clock_type::now();
    kicker.join();
    ASSERT_EQ(o, outcome::cancelled) << "iteration " << i << ": " << name(o);
    latency_us.push_back(
        std::max(0.0, std::chrono::duration<double, std::micro>(
                          returned - clock_type::time_point(clock_type::duration(kicked_at.load())))
                          .count()));
  }
  std::sort(latency_us.begin(), latency_us.end());
  std::printf("[ kick   ] simulated KVM_RUN, %d kicks after 0..300 us: latency p50 %.1f us, p99 "
              "%.1f us, max %.1f us\n",
              iterations, latency_us[latency_us.size() / 2],
              latency_us[latency_us.size() * 99 / 100], latency_us.back());
  EXPECT_EQ(ks_.requests(), static_cast<std::uint64_t>(iterations));
}

TEST_F(kick_protocol_test, random_kicks_against_exiting_guests_are_each_seen_exactly_once) {
  // The guest exits by itself every 0..50 us; a kicker fires at random, each time only after
  // the previous kick was observed, so kicks == cancellations exactly.
  std::mt19937 rng(99);
  std::uniform_int_distribution<int> guest_us(0, 50);
  std::atomic<std::uint64_t> kicks{0}, observed{0};
  std::atomic<bool> stop{false};
  std::thread kicker([&] {
    std::mt19937 krng(7);
    std::uniform_int_distribution<int> delay_us(0, 100);
    while (!stop.load()) {
      if (observed.load() != kicks.load()) {
        std::this_thread::yield();
        continue;
      }
      std::this_thread::sleep_for(microseconds(delay_us(krng)));
      if (stop.load()) break;
      kicks.fetch_add(1);
      ks_.kick();
    }
  });
  std::uint64_t exits = 0, hangs = 0;
  const auto start = clock_type::now();
  while (observed.load() < 1000 && clock_type::now() - start < std::chrono::seconds(10)) {
    kvm_.guest_exits_after(microseconds(guest_us(rng)));
    switch (run(ks_, kvm_)) {
    case outcome::exited:
      ++exits;
      break;
    case outcome::cancelled:
      observed.fetch_add(1);
      break;
    case outcome::hung:
      ++hangs;
      break;
    }
  }
  stop.store(true);
  kicker.join();
  if (kicks.load() > observed.load()) {
    kvm_.guest_exits_after(microseconds(0));
    EXPECT_EQ(run(ks_, kvm_), outcome::cancelled) << "the last kick is still pending";
    observed.fetch_add(1);
  }
  EXPECT_GE(observed.load(), 1000u);
  EXPECT_EQ(kicks.load(), observed.load());
  EXPECT_EQ(hangs, 0u);
  kvm_.guest_exits_after(microseconds(0));
  EXPECT_EQ(run(ks_, kvm_), outcome::exited) << "nothing left pending";
  std::printf("[ kick   ] simulated KVM_RUN, exiting guest: %llu kicks, %llu exits\n",
              static_cast<unsigned long long>(kicks.load()),
              static_cast<unsigned long long>(exits));
}

} // namespace
} // namespace kiln::vcpu::kvm::detail
