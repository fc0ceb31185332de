// Stress: time-slice preemption (kicks from the service thread) on short slices must never
// change what a guest computes, whether it only computes or also calls the host.
#include "stress_support.hpp"

#include <random>

namespace kiln::test::stress {
namespace {

std::uint64_t fnv1a(const bytes& b) { // what calc's `checksum` computes
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (std::byte x : b) {
    h ^= static_cast<std::uint8_t>(x);
    h *= 0x100000001b3ull;
  }
  return h;
}

class preemption_stress : public stress_test {
protected:
  // `rounds` times, 8 calls queued on each of `sandboxes` sandboxes sharing one worker whose
  // slice is 1 us: the worker is never idle and every slice tick (each 200 us) kicks whichever
  // guest runs, so guests are preempted at every point of their code; each result is checked.
  void run(const char* what, std::size_t sandboxes, std::size_t rounds) {
    const std::size_t per = 8;
    runtime rt({.workers = 1, .time_slice = std::chrono::microseconds(1)});
    watchdog dog(std::string("preemption: ") + what, 240s);
    host_functions fns;
    fns.add("host_add", [](std::int64_t a, std::int64_t b) { return a + b; });
    std::vector<async_sandbox> sbs;
    for (std::size_t i = 0; i < sandboxes; ++i) {
      sbs.push_back(create_or_trip(rt, quiet_config("calc"), fns, dog));
      ASSERT_TRUE(sbs.back());
    }
    std::mt19937_64 rng(42);
    std::size_t wrong = 0;
    std::string first;
    for (std::size_t r = 0; r < rounds; ++r) {
      struct pending {
        std::promise<std::pair<error_code, value>> p;
        value expected;
      };
      std::vector<std::shared_ptr<pending>> ps;
      std::vector<std::size_t> target;
      for (std::size_t q = 0; q < per * sbs.size(); ++q) {
        auto& sb = sbs[q % sbs.size()];
        target.push_back(q % sbs.size());
        auto k = std::make_shared<pending>();
        std::vector<value> args;
        std::string fn;
        if (std::string(what) == "checksum") {
          bytes d(1000 + rng() % 30000);
          for (auto& x : d)
            x = static_cast<std::byte>(rng());
          k->expected = fnv1a(d);
          fn = "checksum";
          args = {std::move(d)};
        } else {
          const auto a = static_cast<std::int64_t>(rng() % 1000);
          const auto b = static_cast<std::int64_t>(rng() % 1000);
          k->expected = a + b;
          fn = "call_host";
          args = {std::string("host_add"), a, b};
        }
        sb.async_call(fn, std::move(args), [k](error_code ec, value v) {
          k->p.set_value({ec, std::move(v)});
        });
        ps.push_back(k);
      }
      for (std::size_t i = 0; i < ps.size(); ++i) {
        auto f = ps[i]->p.get_future();
        auto [ec, v] = get_or_trip(f, dog, what);
        if (ec || v != ps[i]->expected) {
          if (wrong++ == 0)
            first = "round " + std::to_string(r) + ": " + (ec ? ec.message() : to_string(v)) +
                    " (" + sbs[target[i]].last_error().message() + ")";
        }
      }
    }
    const auto st = rt.stats();
    std::printf("[ stress   ] %s: %zu x %zu calls, %llu preemptions, %llu stale kicks, %zu wrong\n",
                what, rounds, per * sandboxes, (unsigned long long)st.preemptions,
                (unsigned long long)st.stale_kicks, wrong);
    EXPECT_EQ(wrong, 0u) << "first: " << first;
    for (auto& sb : sbs)
      EXPECT_FALSE(sb.poisoned()) << sb.poison_reason().message();
    EXPECT_GT(st.preemptions, 0u); // the slices really ended with kicks
  }
};

// Long computations with no exit in between: preempted hundreds of times, results intact.
TEST_F(preemption_stress, computing_guests) {
  run("checksum", 2, scaled(500, 50));
}

// Short calls that each make a host call (two hypercalls per call): a kick that lands while
// the guest is in its hypercall stub must not change what the guest sees. (Before eb11f47 the
// emulated kick stopped Unicorn from the service thread, which could leave RIP behind an
// instruction already executed: this failed every run, and computing_guests most runs.)
TEST_F(preemption_stress, guests_calling_the_host) {
  run("call_host", 2, scaled(5000, 500));
}

} // namespace
} // namespace kiln::test::stress
