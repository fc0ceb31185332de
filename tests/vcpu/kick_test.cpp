// Kick tests of one backend (ADVERSARIAL 15, 16): latency, kick before run, sticky kick, stress.
#include "../test_env.hpp"
#include "bare_guest.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <random>
#include <string_view>
#include <thread>
#include <vector>

namespace kiln::test {
namespace {

namespace exits = vcpu::exits;

/// Built once per backend (KILN_TEST_BACKEND is kvm or emulated); the kvm build is labelled
/// `kvm` and skips where /dev/kvm is unusable.
vcpu::backend_kind backend_under_test() {
  return std::string_view(KILN_TEST_BACKEND) == "kvm" ? vcpu::backend_kind::kvm
                                                      : vcpu::backend_kind::emulated;
}
using clock_type = std::chrono::steady_clock;
using std::chrono::microseconds;
using std::chrono::milliseconds;

/// A runaway guest that never exits by itself: rax counts its loops, so a test can tell a guest
/// that ran from a kick that landed before the guest was entered.
const std::vector<std::uint8_t> spin_code = {
    0x48, 0xff, 0xc0, // 0: inc %rax
    0xeb, 0xfb,       // 3: jmp 0
};

/// A hypercall loop: eax counts up, one `out` per iteration.
const std::vector<std::uint8_t> hypercall_loop_code = {
    0xef,       // 0: out %eax,(%dx)
    0xeb, 0x00, // 1: jmp 3
    0xff, 0xc0, // 3: inc %eax
    0xeb, 0xf9, // 5: jmp 0
};

/// Kicks the vCPU if an armed run() outlives its limit (a lost kick would otherwise hang the
/// test), and aborts the process if even that kick is not honoured.
class run_watchdog {
public:
  explicit run_watchdog(vcpu::vcpu& cpu) : cpu_(cpu), thread_([this] { loop(); }) {}
  ~run_watchdog() {
    {
      std::lock_guard lock(m_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  run_watchdog(const run_watchdog&) = delete;
  run_watchdog& operator=(const run_watchdog&) = delete;

  void arm(milliseconds limit) {
    {
      std::lock_guard lock(m_);
      limit_ = limit;
      deadline_ = clock_type::now() + limit;
      armed_ = true;
      rescued_ = false;
    }
    cv_.notify_all();
  }
  void disarm() {
    std::lock_guard lock(m_);
    armed_ = false;
  }
  /// Kicks the watchdog had to send: each one is a kick the code under test lost.
  int rescues() const {
    std::lock_guard lock(m_);
    return rescues_;
  }

private:
  void loop() {
    std::unique_lock lock(m_);
    while (!stop_) {
      if (!armed_) {
        cv_.wait(lock);
        continue;
      }
      const auto deadline = deadline_;
      cv_.wait_until(lock, deadline);
      if (stop_ || !armed_ || clock_type::now() < deadline_) continue;
      if (rescued_) {
        // A failure, not an abort: the run is stuck in the kernel, so the test cannot return.
        std::fprintf(stderr,
                     "watchdog: run() ignored a rescue kick for %lld ms\n[  FAILED  ] "
                     "a kick was lost; ending the test binary\n",
                     static_cast<long long>(limit_.count()));
        std::fflush(stderr);
        std::_Exit(1);
      }
      ++rescues_;
      rescued_ = true;
      deadline_ = clock_type::now() + limit_;
      lock.unlock();
      cpu_.kick();
      lock.lock();
    }
  }

  vcpu::vcpu& cpu_;
  mutable std::mutex m_;
  std::condition_variable cv_;
  bool stop_ = false, armed_ = false, rescued_ = false;
  int rescues_ = 0;
  milliseconds limit_{0};
  clock_type::time_point deadline_{};
  std::thread thread_; // last: starts after the state it reads
};

class kick_test : public ::testing::Test {
protected:
  void SetUp() override {
    const auto st = vcpu::probe(backend_under_test());
    if (!st.usable && backend_under_test() == vcpu::backend_kind::kvm && kvm_required())
      FAIL() << "KILN_REQUIRE_KVM=1, but the kvm backend is unusable: " << st.reason;
    if (!st.usable)
      GTEST_SKIP() << vcpu::to_string(backend_under_test())
                   << " backend unusable here: " << st.reason;
  }

  void load(const std::vector<std::uint8_t>& code) {
    auto g = bare_guest::create(backend_under_test(), code);
    ASSERT_TRUE(g) << g.err().message();
    g_.emplace(std::move(*g));
    g_->edit_registers([](vcpu::registers& r) { r.rdx = 0x10; });
  }

  std::optional<bare_guest> g_;
};

double percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  const auto i = static_cast<std::size_t>(p * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

TEST_F(kick_test, kick_stops_a_runaway_guest_within_a_bound) {
  ASSERT_NO_FATAL_FAILURE(load(spin_code));
  constexpr int iterations = 250;
  const auto bound = scaled_budget(milliseconds(2000)); // generous; the p99 is printed
  run_watchdog watchdog(*g_->cpu);
  std::mt19937 rng(12345);
  std::uniform_int_distribution<int> delay_us(0, 2000);
  std::vector<double> latency_us;
  latency_us.reserve(iterations);
  int ran = 0; // iterations in which the guest executed before the kick stopped it

  for (int i = 0; i < iterations; ++i) {
    const auto delay = microseconds(delay_us(rng));
    std::atomic<clock_type::rep> kicked_at{0};
    std::thread kicker([&] {
      if (delay.count() > 0) std::this_thread::sleep_for(delay);
      kicked_at.store(clock_type::now().time_since_epoch().count());
      g_->cpu->kick();
    });
    ASSERT_NO_FATAL_FAILURE(g_->edit_registers([](vcpu::registers& r) { r.rax = 0; }));
    watchdog.arm(scaled_budget(milliseconds(5000)));
    const vcpu::exit e = g_->cpu->run();
    const auto returned = clock_type::now();
    watchdog.disarm();
    kicker.join(); // the next iteration starts with no kick in flight
    ASSERT_TRUE(std::holds_alternative<exits::cancelled>(e)) << i << ": " << describe(e);
    const auto latency = returned - clock_type::time_point(clock_type::duration(kicked_at.load()));
    EXPECT_LT(latency, bound) << "iteration " << i;
    latency_us.push_back(std::max(0.0, std::chrono::duration<double, std::micro>(latency).count()));
    auto regs = g_->cpu->get_registers();
    ASSERT_TRUE(regs) << regs.err().message();
    ASSERT_GE(regs->rip, bare_layout::code.value) << "a cancelled loop stays in the loop";
    ASSERT_LT(regs->rip, bare_layout::code.value + spin_code.size());
    ran += regs->rax > 0;
  }
  EXPECT_EQ(watchdog.rescues(), 0);
  // Kicks that all landed before the guest was entered would prove nothing about stopping one.
  EXPECT_GE(ran, iterations / 10) << "the guest ran in only " << ran << " of " << iterations;
  std::printf("[ kick   ] %s, runaway loop, %d kicks after 0..2 ms (%d after the guest ran): "
              "latency p50 %.1f us, p99 %.1f us, max %.1f us\n",
              vcpu::to_string(backend_under_test()), iterations, ran, percentile(latency_us, 0.5),
              percentile(latency_us, 0.99), percentile(latency_us, 1.0));
  const auto s = g_->cpu->stats();
  EXPECT_EQ(s.kicks, static_cast<std::uint64_t>(iterations));
  EXPECT_EQ(s.exits, static_cast<std::uint64_t>(iterations));
}

TEST_F(kick_test, kick_before_run_cancels_the_next_run_at_once_and_only_it) {
  ASSERT_NO_FATAL_FAILURE(load(hypercall_loop_code));
  g_->cpu->kick();
  g_->cpu->kick(); // kicks pending together coalesce into one cancellation
  const auto t0 = clock_type::now();
  const vcpu::exit e = g_->cpu->run();
  const auto took = clock_type::now() - t0;
  ASSERT_TRUE(std::holds_alternative<exits::cancelled>(e)) << describe(e);
  EXPECT_LT(took, scaled_budget(milliseconds(100))) << "cancelled without entering the guest";
  EXPECT_EQ(g_->rip(), bare_layout::code.value) << "the guest did not run";
  // Consumed: the guest runs normally now.
  const vcpu::exit next = g_->cpu->run();
  const auto* out = std::get_if<exits::io_out>(&next);
  ASSERT_NE(out, nullptr) << describe(next);
  EXPECT_EQ(out->value, 0u);
  EXPECT_EQ(g_->cpu->stats().kicks, 2u);
}

TEST_F(kick_test, kick_after_an_exit_is_sticky_until_the_next_run) {
  ASSERT_NO_FATAL_FAILURE(load(hypercall_loop_code));
  vcpu::exit e = g_->cpu->run();
  ASSERT_TRUE(std::holds_alternative<exits::io_out>(e)) << describe(e);
  // A kill aimed at a host call in progress (ADVERSARIAL 16): from another thread, while the
  // vCPU thread is outside run().
  std::thread([&] { g_->cpu->kick(); }).join();
  e = g_->cpu->run();
  ASSERT_TRUE(std::holds_alternative<exits::cancelled>(e)) << describe(e);
  e = g_->cpu->run();
  const auto* out = std::get_if<exits::io_out>(&e);
  ASSERT_NE(out, nullptr) << describe(e);
  EXPECT_EQ(out->value, 1u) << "the hypercall loop resumes where it was";
}

TEST_F(kick_test, random_kicks_in_a_hypercall_loop_are_each_seen_exactly_once) {
  ASSERT_NO_FATAL_FAILURE(load(hypercall_loop_code));
  constexpr std::uint64_t target_kicks = 1000;
  const auto time_limit = scaled_budget(std::chrono::seconds(10));
  run_watchdog watchdog(*g_->cpu);

  // The kicker fires only after the previous kick was observed, so kicks never coalesce and
  // kicks == cancellations must hold exactly (a lost kick leaves the kicker waiting; an
  // invented one makes cancellations exceed kicks).
  std::atomic<std::uint64_t> kicks{0}, observed{0};
  std::atomic<bool> stop{false};
  std::thread kicker([&] {
    std::mt19937 rng(777);
    std::uniform_int_distribution<int> delay_us(0, 100);
    while (!stop.load()) {
      if (observed.load() != kicks.load()) {
        std::this_thread::yield();
        continue;
      }
      const int d = delay_us(rng);
      if (d < 10) {
        // Short delays spin: they land on the exit path, where stickiness matters.
        const auto until = clock_type::now() + microseconds(d);
        while (clock_type::now() < until) {
        }
      } else {
        std::this_thread::sleep_for(microseconds(d));
      }
      if (stop.load()) break;
      kicks.fetch_add(1);
      g_->cpu->kick();
    }
  });

  std::uint64_t outs = 0, runs = 0, expected_value = 0, other = 0;
  const auto start = clock_type::now();
  while (observed.load() < target_kicks && clock_type::now() - start < time_limit) {
    watchdog.arm(scaled_budget(milliseconds(5000)));
    const vcpu::exit e = g_->cpu->run();
    watchdog.disarm();
    ++runs;
    if (const auto* out = std::get_if<exits::io_out>(&e)) {
      // Every `out` is seen exactly once, in order, across cancellations and resumes.
      if (out->value != expected_value) {
        ADD_FAILURE() << "out value " << out->value << ", expected " << expected_value;
        break;
      }
      ++expected_value;
      ++outs;
    } else if (std::holds_alternative<exits::cancelled>(e)) {
      observed.fetch_add(1);
    } else {
      ++other;
      ADD_FAILURE() << "unexpected exit " << describe(e);
      break;
    }
  }
  stop.store(true);
  kicker.join();
  // A kick fired just before the loop ended is still pending: the next run must see it.
  if (kicks.load() > observed.load()) {
    const vcpu::exit e = g_->cpu->run();
    EXPECT_TRUE(std::holds_alternative<exits::cancelled>(e)) << describe(e);
    if (std::holds_alternative<exits::cancelled>(e)) observed.fetch_add(1);
  }
  EXPECT_GE(observed.load(), target_kicks) << "the loop ran out of time";
  EXPECT_EQ(kicks.load(), observed.load());
  EXPECT_EQ(watchdog.rescues(), 0);
  EXPECT_EQ(other, 0u);
  // Nothing left pending: the guest runs on.
  const vcpu::exit last = g_->cpu->run();
  EXPECT_TRUE(std::holds_alternative<exits::io_out>(last)) << describe(last);
  std::printf("[ kick   ] %s, hypercall loop: %llu kicks, %llu outs, %llu runs in %.2f s\n",
              vcpu::to_string(backend_under_test()), static_cast<unsigned long long>(kicks.load()),
              static_cast<unsigned long long>(outs), static_cast<unsigned long long>(runs),
              std::chrono::duration<double>(clock_type::now() - start).count());
}

} // namespace
} // namespace kiln::test
