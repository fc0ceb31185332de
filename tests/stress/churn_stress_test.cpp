// Stress (ADVERSARIAL 23, reduced): sandboxes created, called and destroyed from many threads;
// fds, threads, mappings and RSS return to their baseline afterwards.
#include "stress_support.hpp"

#include <barrier>

#include <malloc.h>

namespace kiln::test::stress {
namespace {
namespace asio = boost::asio;

class churn_stress : public stress_test {
protected:
  // Each of `threads` threads creates `per_thread` sandboxes, waits until every thread holds all
  // of its own (the peak), calls each, then destroys them. Returns the counters at the peak.
  proc_counters round(runtime& rt, std::size_t threads, std::size_t per_thread, const watchdog& dog,
                      std::atomic<std::uint64_t>& wrong) {
    const sandbox_config cfg = quiet_config("calc");
    proc_counters peak;
    std::uint64_t alive = 0;
    std::barrier sync(static_cast<std::ptrdiff_t>(threads), [&]() noexcept {
      peak = read_proc();
      alive = rt.stats().sandboxes;
    });
    auto body = [&](std::size_t t) {
      std::vector<async_sandbox> mine;
      for (std::size_t i = 0; i < per_thread; ++i) {
        mine.push_back(create_or_trip(rt, cfg, {}, dog));
        if (!mine.back()) wrong.fetch_add(1);
      }
      sync.arrive_and_wait();
      for (std::size_t i = 0; i < mine.size(); ++i) {
        if (!mine[i]) continue;
        const auto x = static_cast<std::int32_t>(t * 1000 + i);
        auto [ec, v] = call_or_trip(mine[i], "add_i32", {x, 1}, dog);
        if (ec || v != value{x + 1}) wrong.fetch_add(1);
      }
      for (auto& sb : mine)
        if (sb && destroy_or_trip(sb, dog)) wrong.fetch_add(1);
    };
    {
      std::vector<std::jthread> ts;
      for (std::size_t t = 0; t < threads; ++t)
        ts.emplace_back(body, t);
    } // joined
    EXPECT_EQ(alive, threads * per_thread) << "sandboxes alive at the peak";
    return peak;
  }
};

TEST_F(churn_stress, counters_return_to_baseline) {
  const std::size_t threads = scaled(200, 20), per_thread = 10;
  std::atomic<std::uint64_t> wrong{0};
  watchdog dog("churn", 240s + std::chrono::seconds(threads * per_thread / 10));
  const auto t0 = clock_type::now();
  const long at_start = thread_count(); // this thread and the watchdog's
  // Warm-up at the same thread count: process-wide state that stays by design (the backend
  // probe, glibc's malloc arenas for that many threads, Unicorn's one-time initialisation).
  {
    runtime rt;
    round(rt, threads, 1, dog, wrong);
  }
  const proc_counters before_runtime = read_proc_settled(at_start);
  proc_counters idle, peak, after, peak2, after2, trimmed;
  std::uint64_t alive_after = 0;
  {
    runtime rt;
    round(rt, threads, 1, dog, wrong);
    // The runtime's threads (its workers and its service thread), no sandbox.
    idle = read_proc_settled(before_runtime.threads + static_cast<long>(rt.worker_count()) + 1);
    peak = round(rt, threads, per_thread, dog, wrong);
    after = read_proc_settled(idle.threads);
    peak2 = round(rt, threads, per_thread, dog, wrong); // churn again: nothing may accumulate
    after2 = read_proc_settled(idle.threads);
    alive_after = rt.stats().sandboxes;
    ::malloc_trim(0); // what of the RSS is memory the allocator kept after free()
    trimmed = read_proc();
  }
  const proc_counters end = read_proc_settled(before_runtime.threads);
  const double secs = std::chrono::duration<double>(clock_type::now() - t0).count();
  std::printf("[ stress   ] 2 x %zu sandboxes from %zu threads: %.1f s\n", threads * per_thread,
              threads, secs);
  for (auto& [name, c] : {std::pair{"no runtime", before_runtime},
                          {"idle runtime", idle},
                          {"peak (all alive)", peak},
                          {"after destroy", after},
                          {"peak, 2nd round", peak2},
                          {"after 2nd round", after2},
                          {"after malloc_trim", trimmed},
                          {"runtime gone", end}})
    std::printf("[ stress   ]   %-18s %s\n", name, c.str().c_str());
  EXPECT_EQ(wrong.load(), 0u);
  EXPECT_EQ(alive_after, 0u);
  // Back to the idle runtime once every sandbox is destroyed, after each round (a leaked
  // sandbox would hold several mappings: hundreds in all) ...
  for (const proc_counters* c : {&after, &after2}) {
    EXPECT_LE(c->fds, idle.fds + 2) << c->str();
    EXPECT_EQ(c->threads, idle.threads) << c->str();
  }
  EXPECT_LE(end.fds, before_runtime.fds + 2);
  EXPECT_EQ(end.threads, before_runtime.threads);
  if (under_sanitizer) {
    // The sanitizer's allocator maps, keeps (quarantine) and replaces memory on its own: the
    // mapping and memory figures above are printed but not compared.
    return;
  }
  // Each sandbox has its own memory mapping at least.
  EXPECT_GE(peak.maps, idle.maps + static_cast<long>(threads * per_thread));
  for (const proc_counters* c : {&after, &after2}) {
    EXPECT_LE(c->maps, idle.maps + 8) << c->str();
    EXPECT_LE(c->heap_kib, idle.heap_kib + (8 << 10)) << c->str(); // no live allocation left
  }
  // ... RSS flat from one round to the next (the allocator may keep freed memory, but reuses it)
  const long peak_growth_kib = peak.rss_kib - idle.rss_kib;
  EXPECT_LE(after2.rss_kib, after.rss_kib + std::max(32l << 10, peak_growth_kib / 10))
      << "RSS grew from " << after.rss_kib / 1024 << " to " << after2.rss_kib / 1024
      << " MiB over a second round";
  // ... and back to the process without a runtime once the runtime is gone.
  EXPECT_LE(end.maps, before_runtime.maps + 8);
  EXPECT_LE(end.rss_kib, before_runtime.rss_kib + std::max(64l << 10, peak_growth_kib / 10))
      << "RSS " << end.rss_kib / 1024 << " MiB, " << before_runtime.rss_kib / 1024
      << " MiB before the runtime";
}

// Whole runtimes created, used and destroyed in a row: each owns threads and io_contexts (fds),
// and every one of them must be gone once its destructor returns.
TEST_F(churn_stress, runtimes_come_and_go) {
  // This caught runtime::stop() leaking its runtime (3 fds) when the service stopped before
  // the slice timer's cancellation ran: the pending wait handler held the runtime strongly.
  const std::size_t rounds = scaled(1000, 100);
  watchdog dog("runtime churn", 240s);
  auto one = [&] {
    runtime rt({.workers = 2});
    auto sb = create_or_trip(rt, quiet_config("calc"), {}, dog);
    ASSERT_TRUE(sb);
    auto [ec, v] = call_or_trip(sb, "add_i32", {40, 2}, dog);
    EXPECT_FALSE(ec) << ec.message();
    EXPECT_EQ(v, value{std::int32_t{42}});
  };
  // An ASSERT in `one` returns from the lambda only: stop the test there too.
  ASSERT_NO_FATAL_FAILURE(one()); // process-wide state that stays by design
  const proc_counters before = read_proc();
  for (std::size_t i = 0; i < rounds; ++i)
    ASSERT_NO_FATAL_FAILURE(one());
  const proc_counters after = read_proc_settled(before.threads);
  std::printf("[ stress   ] %zu runtimes: before %s\n[ stress   ]   after %s\n", rounds,
              before.str().c_str(), after.str().c_str());
  EXPECT_LE(after.fds, before.fds + 2);
  EXPECT_EQ(after.threads, before.threads);
  if (!under_sanitizer) {
    EXPECT_LE(after.maps, before.maps + 8);
  }
}

} // namespace
} // namespace kiln::test::stress
