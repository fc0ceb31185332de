// Stress (ADVERSARIAL 15): infinite-loop guests killed by their deadline 50 x 500 times; each
// kill ends in deadline_exceeded within a bound, poisons its sandbox, and never hangs.
#include "stress_support.hpp"

#include <sstream>

namespace kiln::test::stress {
namespace {
namespace asio = boost::asio;

class deadline_stress : public stress_test {
protected:
  struct params {
    std::size_t lanes;          // sandboxes spinning at once, each driven by its own thread
    std::size_t kills_per_lane; // spin calls per lane, each on a fresh sandbox
    unsigned workers = 0;       // 0: the runtime's default (one per hardware thread)
    std::chrono::microseconds min_timeout{1000}, max_timeout{5000};
    // Bounds on the kill latency (completion - deadline); generous: two shared cores. Scaled
    // by KILN_TIME_SCALE under emulation.
    std::chrono::milliseconds p50_bound{2000}, p99_bound{2000}, max_bound{2000};
    // The least share of calls whose guest was running when its deadline passed: a run whose
    // every deadline expired before its guest started killed nothing.
    double min_ran_share = 0.0;
  };

  // Each lane: create a `faults` sandbox, call `spin` with a 1-5 ms deadline, expect
  // deadline_exceeded, destroy the poisoned sandbox; the latency is completion - deadline.
  void run(const params& p) {
    const auto t0 = clock_type::now();
    runtime rt({.workers = p.workers});
    const sandbox_config cfg = quiet_config("faults");
    std::atomic<std::uint64_t> kills{0}, expired_before_start{0}, wrong{0}, doubles{0};
    std::mutex mu;
    std::vector<clock_type::duration> latencies;
    std::vector<std::string> details;
    watchdog dog(
        "deadline stress", 240s + std::chrono::seconds(p.lanes * p.kills_per_lane / 50), [&] {
          std::ostringstream os;
          os << "kills " << kills.load() << " of " << p.lanes * p.kills_per_lane
             << "; runtime calls " << rt.stats().calls << ", sandboxes " << rt.stats().sandboxes;
          return os.str();
        });

    auto lane = [&](std::size_t l) {
      std::vector<clock_type::duration> mine;
      mine.reserve(p.kills_per_lane);
      for (std::size_t k = 0; k < p.kills_per_lane; ++k) {
        async_sandbox sb = create_or_trip(rt, cfg, {}, dog);
        if (!sb) {
          wrong.fetch_add(1);
          std::lock_guard lock(mu);
          details.push_back("create failed: " + sb.last_error().message());
          return;
        }
        // Under emulation the deadlines stretch with everything else (KILN_TIME_SCALE): 1-5 ms
        // is less than the nested VM takes to enter a guest, and no guest would ever be killed.
        const auto min_timeout = std::chrono::microseconds(
            static_cast<long long>(static_cast<double>(p.min_timeout.count()) * time_scale()));
        const auto max_timeout = std::chrono::microseconds(
            static_cast<long long>(static_cast<double>(p.max_timeout.count()) * time_scale()));
        const auto span = (max_timeout - min_timeout).count() + 1;
        const auto timeout =
            min_timeout + std::chrono::microseconds((l * 7919 + k * 104729) % span);
        struct outcome {
          error_code ec;
          clock_type::time_point at;
        };
        auto done = std::make_shared<std::promise<outcome>>();
        auto invocations = std::make_shared<std::atomic<int>>(0);
        const auto submitted = clock_type::now();
        sb.async_call("spin", {}, call_options{.timeout = timeout},
                      [done, invocations, &doubles](error_code ec, value) {
                        const auto at = clock_type::now();
                        if (invocations->fetch_add(1) == 0)
                          done->set_value({ec, at});
                        else
                          doubles.fetch_add(1);
                      });
        auto f = done->get_future();
        const outcome o = get_or_trip(f, dog, "spin with a deadline on lane " + std::to_string(l));
        mine.push_back(o.at - (submitted + timeout));
        kills.fetch_add(1);
        std::string bad;
        if (o.ec != errc::deadline_exceeded) bad = "spin ended with " + o.ec.message();
        // A deadline that passes before the call starts fails it without running the guest
        // (no poison); once the guest runs, the kill poisons the sandbox.
        if (sb.poisoned()) {
          if (sb.poison_reason().code != errc::deadline_exceeded)
            bad = "poisoned by " + sb.poison_reason().message();
        } else if (sb.stats().calls == 0) {
          expired_before_start.fetch_add(1);
        } else {
          bad = "the guest ran and was killed, but the sandbox is not poisoned";
        }
        if (!bad.empty()) {
          wrong.fetch_add(1);
          std::lock_guard lock(mu);
          if (details.size() < 20) details.push_back(bad);
        }
        if (destroy_or_trip(sb, dog)) wrong.fetch_add(1);
      }
      std::lock_guard lock(mu);
      latencies.insert(latencies.end(), mine.begin(), mine.end());
    };

    {
      std::vector<std::jthread> lanes;
      for (std::size_t l = 0; l < p.lanes; ++l)
        lanes.emplace_back(lane, l);
    } // joined
    const runtime_stats st = rt.stats();
    rt.stop();

    const latency_summary s = summarize(latencies);
    std::printf("[ stress   ] %s: %zu lanes x %zu kills on %u workers: %.1f s; %llu expired before "
                "the guest started; preemptions %llu, stale kicks %llu\n",
                ::testing::UnitTest::GetInstance()->current_test_info()->name(), p.lanes,
                p.kills_per_lane, rt.worker_count(),
                std::chrono::duration<double>(clock_type::now() - t0).count(),
                (unsigned long long)expired_before_start, (unsigned long long)st.preemptions,
                (unsigned long long)st.stale_kicks);
    std::printf("[ stress   ]   kill latency (completion - deadline): %s\n", s.str().c_str());
    std::string d;
    for (auto& x : details)
      d += "\n  " + x;
    EXPECT_EQ(kills.load(), p.lanes * p.kills_per_lane);
    EXPECT_EQ(wrong.load(), 0u) << d;
    EXPECT_EQ(doubles.load(), 0u);
    const std::uint64_t ran = kills.load() - expired_before_start.load();
    EXPECT_GT(ran, 0u) << "every deadline expired before its guest started: nothing was killed";
    EXPECT_GE(static_cast<double>(ran), p.min_ran_share * static_cast<double>(kills.load()))
        << ran << " of " << kills.load() << " guests ran before their deadline";
    // ADVERSARIAL 15's target is p99 < 10 ms; kill_latency reports it (one guest per core) but
    // the bounds asserted are generous, for loaded CI machines.
    using ms = std::chrono::duration<double, std::milli>;
    EXPECT_LT(s.p50_us / 1e3, ms(scaled_budget(p.p50_bound)).count()) << s.str();
    EXPECT_LT(s.p99_us / 1e3, ms(scaled_budget(p.p99_bound)).count()) << s.str();
    EXPECT_LT(s.max_us / 1e3, ms(scaled_budget(p.max_bound)).count()) << s.str();
  }
};

// The shape on the default workers: 50 spinning guests share two workers, so most
// deadlines pass while the call still waits for its worker (deadline_exceeded, no poison).
// Deadlines up to 20 ms, so that some outlast their wait for a worker and kill a running guest.
TEST_F(deadline_stress, fifty_lanes_of_spinning_guests) {
  run({.lanes = 50,
       .kills_per_lane = scaled(500, 100),
       .max_timeout = std::chrono::milliseconds(20)});
}

// One spinning guest per worker, so that the latency is the kill's own: deadline timer on the
// service thread, kick, guest exit, completion.
TEST_F(deadline_stress, kill_latency) {
  run({.lanes = std::max(1u, std::thread::hardware_concurrency()),
       .kills_per_lane = scaled(500, 500),
       .min_ran_share = 0.5});
}

// More workers than cores (4x): guests really run when their deadline passes, and kicks compete
// with the spinning guests for the CPU.
TEST_F(deadline_stress, more_workers_than_cores) {
  const unsigned n = 4 * std::max(1u, std::thread::hardware_concurrency());
  run({.lanes = n, .kills_per_lane = scaled(500, 25), .workers = n});
}

// Hyperlight's shape (a thread per sandbox): 50 workers, each with one spinning guest, on however
// few cores. The scheduler decides when a spinning vCPU thread notices its kick, but one slow
// kick must not hold up every other deadline. (Before eb11f47 kick() waited for the vCPU on the
// single service thread: p50 ~5 s and p99 ~10 s past the deadline on two cores.)
TEST_F(deadline_stress, one_worker_per_spinning_guest) {
  run({.lanes = 50,
       .kills_per_lane = scaled(500, 20),
       .workers = 50,
       .p50_bound = std::chrono::milliseconds(500),
       .p99_bound = std::chrono::milliseconds(5000),
       .max_bound = std::chrono::milliseconds(10000)});
}

} // namespace
} // namespace kiln::test::stress
