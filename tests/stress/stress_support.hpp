// Shared pieces of the stress tests: the scale knob, a hang watchdog, threads that always join,
// latency percentiles and the process resource counters (fds, threads, mappings, RSS) read from
// /proc/self.
#pragma once

#include "../e2e/backend_fixture.hpp"

#include <kiln/runtime/runtime.hpp>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_future.hpp>

#include <malloc.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <mutex>
#include <source_location>
#include <string>
#include <thread>
#include <vector>

namespace kiln::test::stress {

using namespace std::chrono_literals;
using clock_type = std::chrono::steady_clock;

/// KILN_STRESS_SCALE sizes every stress test: 1 is the full size of the adversarial cases
/// (100 sandboxes x 100 callers x 500 calls, 50 x 500 kills, 2,000 sandboxes from 200 threads),
/// 0.1 a tenth of it. Unset, each test runs its CI size, chosen to keep the whole binary well
/// under a minute on two cores with the emulated backend (about 17 s there).
inline double scale() {
  // 0: unset (or not a positive number), so each test runs its CI size.
  static const double s = [] {
    const double v = env_number("KILN_STRESS_SCALE", 0.0, 0.0);
    return v > 0 ? v : 0.0;
  }();
  return s;
}

/// `full` scaled by KILN_STRESS_SCALE (at least 1), or `ci` when it is unset.
inline std::size_t scaled(std::size_t full, std::size_t ci) {
  if (scale() == 0.0) return ci;
  return std::max<std::size_t>(1,
                               static_cast<std::size_t>(static_cast<double>(full) * scale() + 0.5));
}

/// Tests of known, reported bugs run only with KILN_STRESS_KNOWN_BUGS=1 (they fail until fixed).
inline bool run_known_bugs() {
  const char* e = std::getenv("KILN_STRESS_KNOWN_BUGS");
  return e && std::string(e) == "1";
}

/// Threads in these tests are never a bare std::thread: a test body that returns early (an
/// ASSERT_*, a GTEST_SKIP) with one still joinable ends in std::terminate ("terminate called
/// without an active exception") instead of a failure. A plain worker is a std::jthread (joined
/// by its destructor); an io_context and the threads that run it are an `io_pool`. Either one
/// must be declared after everything its thread uses (the watchdog included, so that a hang in
/// the join is still caught), so that it is joined before any of that is destroyed.

/// An io_context run by `threads` threads of its own (0: none, the context is only used as an
/// executor) until join() or destruction, which drops the work guard, lets the handlers already
/// queued finish (the tests queue only short timers and posts) and joins the threads. Handlers
/// that use something must be outlived by it; a runtime whose host functions queue work here is
/// declared after the pool, so that it stops before the pool drains. Not movable: handlers
/// refer to the context.
class io_pool {
public:
  using executor_type = boost::asio::io_context::executor_type;

  explicit io_pool(std::size_t threads = 1) : guard_(boost::asio::make_work_guard(ctx_)) {
    threads_.reserve(threads);
    for (std::size_t i = 0; i < threads; ++i)
      threads_.emplace_back([this] { ctx_.run(); });
  }
  ~io_pool() { join(); }
  io_pool(const io_pool&) = delete;
  io_pool& operator=(const io_pool&) = delete;

  boost::asio::io_context& context() noexcept { return ctx_; }
  executor_type get_executor() noexcept { return ctx_.get_executor(); }

  /// Lets the threads return once the queued work is done and joins them. Idempotent; call it
  /// from the thread that owns the pool, never from one of its own handlers.
  void join() {
    guard_.reset();
    for (auto& t : threads_)
      if (t.joinable()) t.join();
  }

private:
  boost::asio::io_context ctx_;
  boost::asio::executor_work_guard<executor_type> guard_;
  std::vector<std::thread> threads_; // joined by join(), before ctx_ and guard_ go
};

/// Fails the run instead of letting it hang: if not disarmed (destroyed) within `budget`, it
/// prints what it was watching and the caller's diagnostics, then a failure in gtest's format,
/// and ends the process with exit status 1. It does not return into the test: a hung call holds
/// references into the test's frame (promises, counters, the runtime), and unwinding that frame
/// under it, or running the remaining tests beside it, would be a use-after-free. std::_Exit
/// runs no destructors or atexit handlers, which would block on (or tear down under) the very
/// threads that hang; stdio is flushed by hand first. No XML report is written for the run.
/// KILN_STRESS_WATCHDOG_S overrides every budget (seconds).
class watchdog {
public:
  watchdog(std::string what, std::chrono::seconds budget, std::function<std::string()> diag = {},
           std::source_location where = std::source_location::current())
      : what_(std::move(what)), diag_(std::move(diag)), where_(where) {
    // The test's name is read here, on the test's thread: trip() must not take gtest's locks,
    // which a hung thread might hold.
    if (const auto* info = ::testing::UnitTest::GetInstance()->current_test_info())
      test_ = std::string(info->test_suite_name()) + "." + info->name();
    if (const char* e = std::getenv("KILN_STRESS_WATCHDOG_S"); e && std::atoi(e) > 0)
      budget = std::chrono::seconds(std::atoi(e));
    thread_ = std::jthread([this, budget] {
      std::unique_lock lock(mu_);
      if (!cv_.wait_for(lock, budget, [this] { return disarmed_; }))
        trip("not finished within " + std::to_string(budget.count()) + " s");
    });
  }
  ~watchdog() {
    {
      std::lock_guard lock(mu_);
      disarmed_ = true;
    }
    cv_.notify_all();
  }
  watchdog(const watchdog&) = delete;
  watchdog& operator=(const watchdog&) = delete;

  /// Reports a hang found elsewhere (a wait that timed out) and ends the process with status 1.
  [[noreturn]] void trip(const std::string& why) const {
    // Several threads may find the same hang at once: the first reports, the others wait for
    // its exit (the lock is never released); but not forever, in case the first is stuck in
    // diag_ (a lock the hung thread holds).
    static std::timed_mutex reporting;
    if (!reporting.try_lock_for(30s)) {
      std::fflush(nullptr);
      std::_Exit(1);
    }
    std::fflush(stdout);
    std::fprintf(stderr, "\n*** stress watchdog: %s: %s\n", what_.c_str(), why.c_str());
    if (diag_) std::fprintf(stderr, "%s\n", diag_().c_str());
    std::fflush(stderr);
    std::printf("%s:%u: Failure\nstress watchdog: %s: %s\n[  FAILED  ] %s (hang: the process "
                "exits with status 1; no later test runs)\n",
                where_.file_name(), static_cast<unsigned>(where_.line()), what_.c_str(),
                why.c_str(), test_.empty() ? "(no test)" : test_.c_str());
    std::fflush(nullptr);
    std::_Exit(1);
  }

private:
  std::string what_;
  std::function<std::string()> diag_;
  std::source_location where_;
  std::string test_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool disarmed_ = false;
  std::jthread thread_; // last: joined first, while the members it reads are alive
};

/// Waits for `f`; a wait longer than `limit` is a hang and trips the watchdog.
template <class T>
T get_or_trip(std::future<T>& f, const watchdog& dog, const std::string& what,
              std::chrono::seconds limit = 60s) {
  if (f.wait_for(limit) != std::future_status::ready)
    dog.trip(what + " did not complete within " + std::to_string(limit.count()) + " s");
  return f.get();
}

/// Percentiles of a set of durations, in microseconds.
struct latency_summary {
  std::size_t n = 0;
  double p50_us = 0, p99_us = 0, max_us = 0;
  std::string str() const {
    char buf[160];
    std::snprintf(buf, sizeof buf, "n=%zu p50=%.0f us p99=%.0f us max=%.0f us", n, p50_us, p99_us,
                  max_us);
    return buf;
  }
};
inline latency_summary summarize(std::vector<clock_type::duration> v) {
  latency_summary s;
  s.n = v.size();
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  auto us = [](clock_type::duration d) {
    return std::chrono::duration<double, std::micro>(d).count();
  };
  auto at = [&](double q) { return us(v[std::min(v.size() - 1, std::size_t(q * v.size()))]); };
  s.p50_us = at(0.50);
  s.p99_us = at(0.99);
  s.max_us = us(v.back());
  return s;
}

// under_sanitizer: see test_env.hpp.

/// What the process holds right now. heap_kib: bytes malloc has handed out and not had back
/// (mallinfo2), to tell live allocations from memory the allocator keeps after free().
struct proc_counters {
  long fds = 0, threads = 0, maps = 0, rss_kib = 0, heap_kib = 0;
  std::string str() const {
    return "fds=" + std::to_string(fds) + " threads=" + std::to_string(threads) +
           " maps=" + std::to_string(maps) + " rss=" + std::to_string(rss_kib / 1024) +
           " MiB heap-in-use=" + std::to_string(heap_kib / 1024) + " MiB";
  }
};
inline proc_counters read_proc() {
  proc_counters c;
  for ([[maybe_unused]] auto& e : std::filesystem::directory_iterator("/proc/self/fd"))
    ++c.fds;
  --c.fds; // the directory iterator's own descriptor
  {
    std::ifstream st("/proc/self/status");
    std::string line;
    while (std::getline(st, line)) {
      if (line.rfind("Threads:", 0) == 0) c.threads = std::stol(line.substr(8));
      if (line.rfind("VmRSS:", 0) == 0) c.rss_kib = std::stol(line.substr(6));
    }
  }
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line))
    ++c.maps;
  const struct mallinfo2 mi = ::mallinfo2();
  c.heap_kib = static_cast<long>((mi.uordblks + mi.hblkhd) / 1024);
  return c;
}

/// read_proc() once the thread count is down to `threads` (see thread_count_settled()).
inline proc_counters read_proc_settled(long threads) {
  thread_count_settled(threads);
  return read_proc();
}

/// The backend fixture with a quiet log sink (the e2e one appends to a vector, which is not
/// safe from several workers) and blocking create/destroy helpers with a watchdog.
class stress_test : public backend_test {
protected:
  sandbox_config quiet_config(const std::string& guest) const {
    sandbox_config c = config_for(guest);
    c.log_sink = [](std::string_view) {};
    return c;
  }
  // Blocking helpers that never throw (they run on the tests' own threads): a failure comes
  // back as a value, a hang trips the watchdog.
  static async_sandbox create_or_trip(runtime& rt, const sandbox_config& c, host_functions fns,
                                      const watchdog& dog) {
    std::promise<async_sandbox> p;
    rt.async_create(c, std::move(fns), [&p](error_code, async_sandbox sb) { p.set_value(sb); });
    auto f = p.get_future();
    return get_or_trip(f, dog, "async_create");
  }
  static error_code destroy_or_trip(const async_sandbox& sb, const watchdog& dog) {
    std::promise<error_code> p;
    sb.async_destroy([&p](error_code ec) { p.set_value(ec); });
    auto f = p.get_future();
    return get_or_trip(f, dog, "async_destroy");
  }
  static std::pair<error_code, value> call_or_trip(const async_sandbox& sb, std::string name,
                                                   std::vector<value> args, const watchdog& dog) {
    std::promise<std::pair<error_code, value>> p;
    sb.async_call(name, std::move(args), [&p](error_code ec, value v) {
      p.set_value({ec, std::move(v)});
    });
    auto f = p.get_future();
    return get_or_trip(f, dog, "call " + name);
  }
};

} // namespace kiln::test::stress
