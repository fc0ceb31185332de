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
  // Waits until the runtime has handed back the memory of the sandboxes destroyed so far: a
  // return has happened since `seen`, and none for 300 ms (the runtime waits for destruction to
  // pause 100 ms, then trims on a thread of its own).
  static void memory_returned(runtime& rt, std::uint64_t& seen) {
    const auto until = clock_type::now() + scaled_budget(std::chrono::seconds(10));
    std::uint64_t n = rt.stats().memory_returns;
    while (n <= seen && clock_type::now() < until) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      n = rt.stats().memory_returns;
    }
    for (std::uint64_t was = n - 1; was != n && clock_type::now() < until;) {
      was = n;
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      n = rt.stats().memory_returns;
    }
    EXPECT_GT(n, seen) << "no memory return after the round";
    seen = n;
  }

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
  // The runtime hands freed memory back by itself (runtime_options::return_memory_after); each
  // reading below waits until it has, for the round just ended.
  runtime_options opts;
  // At most one per thread, so that the idle round (one sandbox a thread) reaches it too.
  opts.return_memory_after = static_cast<std::uint32_t>(std::min<std::size_t>(16, threads));
  // Warm-up, one whole round: process-wide state that stays by design (the backend probe,
  // Unicorn's one-time initialisation, glibc's malloc arenas for that many threads, and the
  // 64 MiB heaps those arenas reserved as they grew: address space, whose pages were handed
  // back, which the next round reuses).
  {
    runtime rt(opts);
    std::uint64_t seen = 0;
    round(rt, threads, per_thread, dog, wrong);
    memory_returned(rt, seen);
  }
  const proc_counters before_runtime = read_proc_settled(at_start);
  proc_counters idle, peak, after, peak2, after2, trimmed;
  double trim_ms = 0;
  std::uint64_t alive_after = 0, returns = 0;
  {
    runtime rt(opts);
    std::uint64_t seen = 0;
    round(rt, threads, 1, dog, wrong);
    memory_returned(rt, seen);
    // The runtime's threads (its workers and its service thread), no sandbox.
    const long idle_threads = before_runtime.threads + static_cast<long>(rt.worker_count()) + 1;
    idle = read_proc_settled(idle_threads);
    peak = round(rt, threads, per_thread, dog, wrong);
    memory_returned(rt, seen);
    after = read_proc_settled(idle_threads);
    peak2 = round(rt, threads, per_thread, dog, wrong); // churn again: nothing may accumulate
    memory_returned(rt, seen);
    after2 = read_proc_settled(idle_threads);
    alive_after = rt.stats().sandboxes;
    returns = rt.stats().memory_returns;
    const auto trim_start = clock_type::now();
    ::malloc_trim(0); // what the runtime's own return left for the allocator to give back
    trim_ms = std::chrono::duration<double, std::milli>(clock_type::now() - trim_start).count();
    trimmed = read_proc();
  }
  const proc_counters end = read_proc_settled(before_runtime.threads);
  const double secs = std::chrono::duration<double>(clock_type::now() - t0).count();
  std::printf("[ stress   ] 3 x %zu sandboxes from %zu threads: %.1f s; the runtime returned "
              "memory %llu times; a malloc_trim after that took %.1f ms\n",
              threads * per_thread, threads, secs, static_cast<unsigned long long>(returns),
              trim_ms);
  for (auto& [name, c] : {std::pair{"no runtime", before_runtime},
                          {"idle runtime", idle},
                          {"peak (all alive)", peak},
                          {"after destroy", after},
                          {"peak, 2nd round", peak2},
                          {"after 2nd round", after2},
                          {"then malloc_trim", trimmed},
                          {"runtime gone", end}})
    std::printf("[ stress   ]   %-18s %s\n", name, c.str().c_str());
  EXPECT_EQ(wrong.load(), 0u);
  EXPECT_EQ(alive_after, 0u);
  // Back to the idle runtime once every sandbox is destroyed, after each round (a leaked
  // sandbox would hold several mappings: hundreds in all), and to the process without a
  // runtime once the runtime is gone (ADVERSARIAL 23: within 2%).
  const std::pair<const proc_counters*, const proc_counters*> checks[] = {
      {&after, &idle}, {&after2, &idle}, {&end, &before_runtime}};
  for (const auto& [c, base] : checks) {
    EXPECT_EQ(c->fds, base->fds) << c->str();
    EXPECT_EQ(c->threads, base->threads) << c->str();
  }
  if (under_sanitizer) {
    // The sanitizer's allocator maps, keeps (quarantine) and replaces memory on its own: the
    // mapping and memory figures above are printed but not compared.
    return;
  }
  // Each sandbox has its own memory mapping at least.
  EXPECT_GE(peak.maps, idle.maps + static_cast<long>(threads * per_thread));
  for (const auto& [c, base] : checks) {
    EXPECT_LE(c->heap_kib, base->heap_kib + (8 << 10)) << c->str(); // no live allocation left
    // RSS: 2%, or 4 MiB where 2% is less (pages of the libraries and the test touched again).
    EXPECT_LE(c->rss_kib, base->rss_kib + std::max(4l << 10, base->rss_kib / 50))
        << c->str() << "; baseline " << base->str();
  }
  // Mappings. While the runtime lives, the malloc arenas of its worker threads keep the 64 MiB
  // heaps they grew into during a round (about 50 mappings for 2,000 emulated sandboxes), their
  // pages handed back: freed chunks in each thread's cache pin them until the thread ends. So
  // the first round's end is the baseline for the second (nothing may accumulate), and the
  // process without a runtime for the runtime gone.
  const std::pair<const proc_counters*, const proc_counters*> map_checks[] = {
      {&after2, &after}, {&end, &before_runtime}};
  // 2%, or 8 mappings (four arena heaps with their guard areas) where 2% is fewer.
  for (const auto& [c, base] : map_checks)
    EXPECT_LE(c->maps, base->maps + std::max(8l, base->maps / 50))
        << c->str() << "; baseline " << base->str();
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
