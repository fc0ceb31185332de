// Shared pieces of the stress tests: the scale knob, a hang watchdog, latency percentiles and
// the process resource counters (fds, threads, mappings, RSS) read from /proc/self.
#pragma once

#include "../e2e/backend_fixture.hpp"

#include <kiln/runtime/runtime.hpp>

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
  static const double s = [] {
    const char* e = std::getenv("KILN_STRESS_SCALE");
    if (!e || !*e) return 0.0;
    char* end = nullptr;
    const double v = std::strtod(e, &end);
    return (end != e && v > 0) ? v : 0.0;
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

/// Fails the run instead of letting it hang: if not disarmed (destroyed) within `budget`, it
/// prints what it was watching and the caller's diagnostics, then aborts the process (a hung
/// call holds references into the test's frame, so returning from the test is not safe).
/// KILN_STRESS_WATCHDOG_S overrides every budget (seconds).
class watchdog {
public:
  watchdog(std::string what, std::chrono::seconds budget, std::function<std::string()> diag = {})
      : what_(std::move(what)), diag_(std::move(diag)) {
    if (const char* e = std::getenv("KILN_STRESS_WATCHDOG_S"); e && std::atoi(e) > 0)
      budget = std::chrono::seconds(std::atoi(e));
    thread_ = std::thread([this, budget] {
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
    thread_.join();
  }
  watchdog(const watchdog&) = delete;
  watchdog& operator=(const watchdog&) = delete;

  /// Reports a hang found elsewhere (a wait that timed out) and aborts.
  [[noreturn]] void trip(const std::string& why) const {
    std::fprintf(stderr, "\n*** stress watchdog: %s: %s\n", what_.c_str(), why.c_str());
    if (diag_) std::fprintf(stderr, "%s\n", diag_().c_str());
    std::fflush(stderr);
    std::abort();
  }

private:
  std::string what_;
  std::function<std::string()> diag_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool disarmed_ = false;
  std::thread thread_;
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

/// True in a sanitizer build: its allocator makes and drops mappings of its own and replaces
/// malloc (mallinfo2 reads zero), so the process counters are compared more loosely.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
inline constexpr bool under_sanitizer = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
inline constexpr bool under_sanitizer = true;
#else
inline constexpr bool under_sanitizer = false;
#endif
#else
inline constexpr bool under_sanitizer = false;
#endif

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
