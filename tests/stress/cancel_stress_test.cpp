// Stress (ADVERSARIAL 16): 100 callers x 500 calls over 100 sandboxes, half of them cancelled at
// random points: no false cancellation, no hang, every completion handler runs exactly once.
#include "stress_support.hpp"

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>

#include <deque>
#include <memory>
#include <random>
#include <sstream>

namespace kiln::test::stress {
namespace {
namespace asio = boost::asio;

std::uint64_t fnv1a(const bytes& b) { // what calc's `checksum` computes
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (std::byte x : b) {
    h ^= static_cast<std::uint8_t>(x);
    h *= 0x100000001b3ull;
  }
  return h;
}

// Where a cancellation is emitted, relative to the call's life.
enum class cancel_at {
  never,
  initiation,       // right after async_call returns: still queued (it never runs inline)
  delay,            // 0-2 ms later: queued, running, parked in a host call, or done
  after_completion, // from the completion handler: the slot is already cleared, a no-op
  twice,            // at initiation and again after a delay
};

// Where the caller initiates its calls and emits its cancellations. Asio's cancellation slots
// are not thread-safe, so both happen on one executor:
//   worker: the sandbox's own worker (post both there); the completion runs there too.
//   caller: the caller's own io_context, which also runs the completion (bind_executor); the
//           runtime's kick then races a guest that is really running on another thread.
enum class emit_on { worker, caller };

struct attempt {
  std::size_t slot = 0;
  std::uint64_t epoch = 0; // generation of the slot's sandbox the attempt was sent to
  std::string fn;
  std::vector<value> args;
  value expected;
  cancel_at when = cancel_at::never;
  asio::cancellation_type_t type = asio::cancellation_type::terminal;
  std::chrono::microseconds delay{};
  int retries = 0;
  // Held by the attempt, which outlives the call: the handler and every emit keep it.
  asio::cancellation_signal sig;
  std::promise<std::pair<error_code, value>> done;
  std::atomic<int> invocations{0};
};

struct counters {
  std::atomic<std::uint64_t> attempts{0}, ok{0}, ok_despite_cancel{0}, aborted_queued{0}, killed{0},
      false_cancellations{0}, wrong_results{0}, collateral_poisoned{0}, collateral_destroyed{0},
      unexpected{0}, double_completions{0}, replaced{0}, destroyed{0}, by_when[5]{};
  std::mutex mu;
  std::vector<std::string> details; // first few unexpected outcomes, for the failure message
  void note(const std::string& s) {
    std::lock_guard lock(mu);
    if (details.size() < 20) details.push_back(s);
  }
};

class cancel_stress : public stress_test {
protected:
  struct params {
    std::size_t sandboxes, callers, calls_per_caller, window;
    emit_on where;
  };

  struct slot_entry {
    std::mutex mu;
    async_sandbox sb;
    std::uint64_t epoch = 0;
  };

  void run(const params& p) {
    const auto t0 = clock_type::now();
    counters n;
    // Replies for the asynchronous host function and the delayed emits run here. Declared
    // before the runtime, whose host function queues work on it: on an early return the runtime
    // stops first, then the pool drains (a reply to a stopped runtime is dropped).
    io_pool timers;

    host_functions fns;
    fns.add_async<std::int64_t(std::int64_t, std::int64_t)>(
        "host_add", [&timers](std::int64_t a, std::int64_t b, host_reply<std::int64_t> reply) {
          thread_local std::minstd_rand r(std::random_device{}());
          auto t = std::make_shared<asio::steady_timer>(timers.get_executor(),
                                                        std::chrono::microseconds(r() % 500));
          t->async_wait([t, reply, a, b](error_code) { reply(a + b); });
        });
    const sandbox_config cfg = quiet_config("calc");

    runtime rt; // default workers: one per hardware thread
    std::vector<std::unique_ptr<slot_entry>> slots;
    std::vector<std::vector<std::shared_ptr<attempt>>> all(p.callers);
    std::atomic<std::uint64_t> settled{0};
    watchdog dog("cancel stress", 240s + std::chrono::seconds(p.callers * p.calls_per_caller / 100),
                 [&] {
                   std::ostringstream os;
                   os << "settled " << settled.load() << " of " << n.attempts.load()
                      << " attempts; runtime calls " << rt.stats().calls << ", sandboxes "
                      << rt.stats().sandboxes;
                   return os.str();
                 });
    for (std::size_t i = 0; i < p.sandboxes; ++i) {
      auto e = std::make_unique<slot_entry>();
      e->sb = create_or_trip(rt, cfg, fns, dog);
      ASSERT_TRUE(e->sb) << e->sb.last_error().message();
      slots.push_back(std::move(e));
    }

    // A sandbox poisoned by a cancelled call is replaced (once per generation) and destroyed.
    auto replace = [&](std::size_t s, std::uint64_t epoch, const char* why) {
      slot_entry& e = *slots[s];
      std::lock_guard lock(e.mu);
      if (e.epoch != epoch) return; // someone replaced it already
      if (!e.sb.poisoned() || e.sb.poison_reason().code != errc::cancelled) {
        n.unexpected.fetch_add(1);
        n.note(std::string(why) + ": sandbox " + std::to_string(s) + " not poisoned by a cancel (" +
               e.sb.poison_reason().message() + ")");
      }
      async_sandbox old = e.sb;
      e.sb = create_or_trip(rt, cfg, fns, dog);
      ++e.epoch;
      n.replaced.fetch_add(1);
      old.async_destroy([&n](error_code ec) {
        if (ec) n.unexpected.fetch_add(1);
        n.destroyed.fetch_add(1);
      });
    };

    auto caller = [&](std::size_t c) {
      std::mt19937_64 rng(0x5eed0000 + c);
      // emit_on::caller: initiation, emits and completions run here, on a thread of its own.
      io_pool own(p.where == emit_on::caller ? 1 : 0);
      std::deque<std::shared_ptr<attempt>> inflight;

      auto issue = [&](const std::shared_ptr<attempt>& a) {
        async_sandbox sb;
        {
          slot_entry& e = *slots[a->slot];
          std::lock_guard lock(e.mu);
          sb = e.sb;
          a->epoch = e.epoch;
        }
        n.attempts.fetch_add(1);
        all[c].push_back(a);
        const bool on_worker = p.where == emit_on::worker;
        asio::any_io_executor ex = on_worker ? asio::any_io_executor(sb.get_executor())
                                             : asio::any_io_executor(own.get_executor());
        auto emit = [a] { a->sig.emit(a->type); };
        auto handler = [a, ex, emit, &n](error_code ec, value v) {
          if (a->invocations.fetch_add(1) == 0)
            a->done.set_value({ec, std::move(v)});
          else
            n.double_completions.fetch_add(1);
          if (a->when == cancel_at::after_completion) asio::post(ex, emit);
        };
        asio::post(ex, [sb, a, ex, emit, handler, on_worker] {
          if (on_worker)
            sb.async_call(a->fn, a->args, asio::bind_cancellation_slot(a->sig.slot(), handler));
          else
            sb.async_call(
                a->fn, a->args,
                asio::bind_cancellation_slot(a->sig.slot(), asio::bind_executor(ex, handler)));
          if (a->when == cancel_at::initiation || a->when == cancel_at::twice) emit();
        });
        if (a->when == cancel_at::delay || a->when == cancel_at::twice) {
          // On the caller's own context the timer keeps it running until the emit is done.
          auto t = std::make_shared<asio::steady_timer>(
              on_worker ? timers.get_executor() : own.get_executor(), a->delay);
          t->async_wait([t, ex, emit](error_code) { asio::post(ex, emit); });
        }
        inflight.push_back(a);
      };

      auto settle = [&](const std::shared_ptr<attempt>& a) {
        auto f = a->done.get_future();
        auto [ec, v] = get_or_trip(f, dog, "call " + a->fn + " on slot " + std::to_string(a->slot));
        settled.fetch_add(1);
        const bool cancelled = a->when != cancel_at::never;
        auto retry = [&] {
          if (++a->retries > 100) {
            n.unexpected.fetch_add(1);
            n.note("a call was retried 100 times");
            return;
          }
          auto b = std::make_shared<attempt>();
          b->slot = rng() % p.sandboxes;
          b->fn = a->fn;
          b->args = a->args;
          b->expected = a->expected;
          b->retries = a->retries;
          issue(b); // without a cancellation: it must succeed
        };
        if (!ec) {
          if (v != a->expected) {
            n.wrong_results.fetch_add(1);
            n.note(a->fn + " returned " + to_string(v) + ", expected " + to_string(a->expected));
          } else {
            (cancelled ? n.ok_despite_cancel : n.ok).fetch_add(1);
          }
        } else if (ec == asio::error::operation_aborted || ec == errc::cancelled) {
          if (!cancelled) {
            n.false_cancellations.fetch_add(1);
            n.note("false cancellation of " + a->fn + ": " + ec.message());
          } else {
            (ec == errc::cancelled ? n.killed : n.aborted_queued).fetch_add(1);
          }
          if (ec == errc::cancelled) replace(a->slot, a->epoch, "cancelled");
        } else if (ec == errc::poisoned) { // queued behind a call cancelled while it ran
          n.collateral_poisoned.fetch_add(1);
          replace(a->slot, a->epoch, "poisoned");
          retry();
        } else if (ec == asio::error::bad_descriptor) { // sent to a sandbox just replaced
          bool stale;
          {
            slot_entry& e = *slots[a->slot];
            std::lock_guard lock(e.mu);
            stale = e.epoch != a->epoch;
          }
          if (!stale) {
            n.unexpected.fetch_add(1);
            n.note("bad_descriptor from a live sandbox");
          }
          n.collateral_destroyed.fetch_add(1);
          retry();
        } else {
          n.unexpected.fetch_add(1);
          n.note(a->fn + " failed: " + ec.message());
        }
      };

      for (std::size_t i = 0; i < p.calls_per_caller; ++i) {
        auto a = std::make_shared<attempt>();
        a->slot = rng() % p.sandboxes;
        const std::int32_t x = static_cast<std::int32_t>(c * 1'000'000 + i);
        const std::int32_t y = static_cast<std::int32_t>(rng() % 1000);
        switch (rng() % 8) {
        case 0: { // a longer guest run, so that a cancellation can find it running
          bytes data(512 + rng() % 8192);
          for (auto& x8 : data)
            x8 = static_cast<std::byte>(rng());
          a->fn = "checksum";
          a->expected = fnv1a(data);
          a->args = {std::move(data)};
          break;
        }
        case 1: // parks in an asynchronous host function
          a->fn = "call_host";
          a->args = {std::string("host_add"), std::int64_t{x}, std::int64_t{y}};
          a->expected = std::int64_t{x} + y;
          break;
        default:
          a->fn = "add_i32";
          a->args = {x, y};
          a->expected = std::int32_t(x + y);
          break;
        }
        if (rng() % 2) {
          static constexpr cancel_at kinds[] = {cancel_at::initiation, cancel_at::delay,
                                                cancel_at::after_completion, cancel_at::twice};
          static constexpr asio::cancellation_type_t types[] = {asio::cancellation_type::terminal,
                                                                asio::cancellation_type::partial,
                                                                asio::cancellation_type::total};
          a->when = kinds[rng() % 4];
          a->type = types[rng() % 3];
          a->delay = std::chrono::microseconds(rng() % 2000);
        }
        n.by_when[static_cast<int>(a->when)].fetch_add(1);
        while (inflight.size() >= p.window) {
          auto front = inflight.front();
          inflight.pop_front();
          settle(front);
        }
        issue(a);
      }
      while (!inflight.empty()) {
        auto front = inflight.front();
        inflight.pop_front();
        settle(front);
      }
    }; // `own` drains (emits after completion, delayed emits) and joins here

    {
      std::vector<std::jthread> callers;
      for (std::size_t c = 0; c < p.callers; ++c)
        callers.emplace_back(caller, c);
    } // joined
    timers.join();
    while (n.destroyed.load() != n.replaced.load()) {
      if (clock_type::now() - t0 > 600s) dog.trip("old sandboxes never destroyed");
      std::this_thread::sleep_for(1ms);
    }
    const runtime_stats st = rt.stats();
    rt.stop();

    std::uint64_t total = 0;
    for (auto& v : all)
      for (auto& a : v) {
        ++total;
        EXPECT_EQ(a->invocations.load(), 1) << a->fn << " on slot " << a->slot;
      }
    const double secs = std::chrono::duration<double>(clock_type::now() - t0).count();
    std::printf("[ stress   ] %s: %zu sandboxes, %zu callers x %zu calls (window %zu), emit on %s: "
                "%.1f s\n",
                ::testing::UnitTest::GetInstance()->current_test_info()->name(), p.sandboxes,
                p.callers, p.calls_per_caller, p.window,
                p.where == emit_on::worker ? "worker" : "caller", secs);
    std::printf("[ stress   ]   attempts %llu: ok %llu, ok despite cancel %llu, aborted while "
                "queued %llu, killed while running %llu; collateral poisoned %llu, destroyed "
                "%llu; replaced %llu; preemptions %llu, stale kicks %llu\n",
                (unsigned long long)n.attempts, (unsigned long long)n.ok,
                (unsigned long long)n.ok_despite_cancel, (unsigned long long)n.aborted_queued,
                (unsigned long long)n.killed, (unsigned long long)n.collateral_poisoned,
                (unsigned long long)n.collateral_destroyed, (unsigned long long)n.replaced,
                (unsigned long long)st.preemptions, (unsigned long long)st.stale_kicks);
    std::printf("[ stress   ]   cancellations emitted: %llu at initiation, %llu after a delay, "
                "%llu after completion, %llu twice; %llu calls not cancelled\n",
                (unsigned long long)n.by_when[1], (unsigned long long)n.by_when[2],
                (unsigned long long)n.by_when[3], (unsigned long long)n.by_when[4],
                (unsigned long long)n.by_when[0]);
    std::string details;
    for (auto& d : n.details)
      details += "\n  " + d;
    EXPECT_EQ(total, n.attempts.load());
    EXPECT_EQ(n.false_cancellations.load(), 0u) << details;
    EXPECT_EQ(n.wrong_results.load(), 0u) << details;
    EXPECT_EQ(n.unexpected.load(), 0u) << details;
    EXPECT_EQ(n.double_completions.load(), 0u);
    EXPECT_EQ(n.ok.load() + n.ok_despite_cancel.load() + n.aborted_queued.load() + n.killed.load() +
                  n.collateral_poisoned.load() + n.collateral_destroyed.load(),
              n.attempts.load())
        << details;
    // The run exercised what it claims to: cancellations that won and that came too late.
    EXPECT_GT(n.ok_despite_cancel.load(), 0u);
    EXPECT_GT(n.aborted_queued.load() + n.killed.load(), 0u);
  }
};

TEST_F(cancel_stress, emitted_on_the_sandbox_worker) {
  run({.sandboxes = 100,
       .callers = 100,
       .calls_per_caller = scaled(500, 500),
       .window = 4,
       .where = emit_on::worker});
}

// Asio's own rule for cancellation slots: initiate and emit on the handler's executor (here
// each caller's io_context), never on the operation's internal threads.
TEST_F(cancel_stress, emitted_on_the_callers_executor) {
  run({.sandboxes = 100,
       .callers = 100,
       .calls_per_caller = scaled(500, 500),
       .window = 4,
       .where = emit_on::caller});
}

} // namespace
} // namespace kiln::test::stress
