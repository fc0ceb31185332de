// Stress (ADVERSARIAL 17): host functions that reply late from other threads, throw, drop or
// repeat their reply: every call completes once, as expected, and no sandbox is poisoned.
#include "stress_support.hpp"

#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <deque>
#include <optional>
#include <random>

namespace kiln::test::stress {
namespace {
namespace asio = boost::asio;

// A host function and what the guest's call_host(name, a, b) must end with.
struct host_case {
  const char* name;
  bool ok;            // true: the call returns a + b; false: errc::guest_error
  const char* status; // for a failure: the status the guest reports ("" for either)
};

// clang-format off
constexpr host_case cases[] = {
    {"reply_later",      true,  ""},           // from another thread, 0-1 ms later
    {"reply_inline",     true,  ""},           // before the body returns
    {"reply_twice",      true,  ""},           // a + b, then a wrong value and a fail(): ignored
    {"reply_race",       true,  ""},           // two threads reply at once
    {"reply_then_throw", true,  ""},           // the throw's fail() comes second: ignored
    {"throw_std",        false, ""},           // std::runtime_error from the body
    {"throw_other",      false, ""},           // a non-standard exception
    {"drop_inline",      false, "HOST_ERROR"}, // never replies; the reply dies with the body
    {"drop_later",       false, "HOST_ERROR"}, // the reply dies on another thread, later
    {"fail_later",       false, "FAILED"},     // reply.fail() from another thread
    {"await_ok",         true,  ""},           // coroutine on the worker
    {"await_throw",      false, "HOST_ERROR"}, // coroutine that throws after a suspension
    {"sync_ok",          true,  ""},
    {"sync_throw",       false, "HOST_ERROR"},
};
// clang-format on

class host_function_stress : public stress_test {
protected:
  static std::chrono::microseconds jitter(unsigned max_us) {
    thread_local std::minstd_rand r(std::random_device{}());
    return std::chrono::microseconds(r() % max_us);
  }
  // Runs `f` on the reply pool after `d`.
  template <class F> void later(std::chrono::microseconds d, F f) {
    auto t = std::make_shared<asio::steady_timer>(replies_.get_executor(), d);
    t->async_wait([t, f = std::move(f)](error_code) mutable { f(); });
  }

  host_functions functions() {
    using R = host_reply<std::int64_t>;
    using sig = std::int64_t(std::int64_t, std::int64_t);
    host_functions fns;
    fns.add_async<sig>("reply_later", [this](std::int64_t a, std::int64_t b, R r) {
      later(jitter(1000), [r, a, b] { r(a + b); });
    });
    fns.add_async<sig>("reply_inline", [](std::int64_t a, std::int64_t b, R r) { r(a + b); });
    fns.add_async<sig>("reply_twice", [this](std::int64_t a, std::int64_t b, R r) {
      later(jitter(500), [this, r, a, b] {
        r(a + b);
        later(jitter(500), [r, a, b] {
          r(a + b + 1000);
          r.fail("a third reply");
        });
      });
    });
    fns.add_async<sig>("reply_race", [this](std::int64_t a, std::int64_t b, R r) {
      for (int i = 0; i < 2; ++i)
        asio::post(replies_.get_executor(), [r, a, b] { r(a + b); });
    });
    fns.add_async<sig>("reply_then_throw", [](std::int64_t a, std::int64_t b, R r) {
      r(a + b);
      throw std::runtime_error("thrown after the reply");
    });
    fns.add_async<sig>("throw_std",
                       [](std::int64_t, std::int64_t, R) { throw std::runtime_error("boom"); });
    fns.add_async<sig>("throw_other", [](std::int64_t, std::int64_t, R) { throw 42; });
    fns.add_async<sig>("drop_inline", [](std::int64_t, std::int64_t, R) {});
    fns.add_async<sig>("drop_later", [this](std::int64_t, std::int64_t, R r) {
      later(jitter(1000), [r] {}); // the last copy dies with this handler, on the pool
    });
    fns.add_async<sig>("fail_later", [this](std::int64_t, std::int64_t, R r) {
      later(jitter(1000), [r] { r.fail("nope"); });
    });
    fns.add_awaitable("await_ok",
                      [](std::int64_t a, std::int64_t b) -> asio::awaitable<std::int64_t> {
                        asio::steady_timer t(co_await asio::this_coro::executor, jitter(500));
                        co_await t.async_wait(asio::use_awaitable);
                        co_return a + b;
                      });
    fns.add_awaitable("await_throw",
                      [](std::int64_t, std::int64_t) -> asio::awaitable<std::int64_t> {
                        asio::steady_timer t(co_await asio::this_coro::executor, jitter(500));
                        co_await t.async_wait(asio::use_awaitable);
                        throw std::runtime_error("await boom");
                      });
    fns.add("sync_ok", [](std::int64_t a, std::int64_t b) { return a + b; });
    fns.add("sync_throw", [](std::int64_t, std::int64_t) -> std::int64_t {
      throw std::runtime_error("sync boom");
    });
    return fns;
  }

  void random_cases(std::chrono::microseconds time_slice);
  void stop_with_a_held_reply(bool plain_callback);

  // The "other threads" host functions reply from. A member: it outlives each test's runtime
  // (a local of the test body), so a reply still queued here when the test ends, on any path,
  // runs after that runtime stopped and is dropped.
  io_pool replies_{2};
};

// Each failing case once, alone: the guest reports the documented status.
TEST_F(host_function_stress, each_case_reaches_the_guest_as_documented) {
  runtime rt({.workers = 1});
  watchdog dog("host function cases", 60s);
  auto sb = create_or_trip(rt, quiet_config("calc"), functions(), dog);
  ASSERT_TRUE(sb);
  for (const host_case& c : cases) {
    std::promise<std::pair<error_code, value>> p;
    sb.async_call("call_host", {std::string(c.name), std::int64_t{40}, std::int64_t{2}},
                  [&p](error_code ec, value v) {
                    p.set_value({ec, std::move(v)});
                  });
    auto f = p.get_future();
    auto [ec, v] = get_or_trip(f, dog, c.name);
    if (c.ok) {
      EXPECT_FALSE(ec) << c.name << ": " << ec.message() << " " << sb.last_error().message();
      EXPECT_EQ(v, value{std::int64_t{42}}) << c.name;
    } else {
      EXPECT_EQ(ec, errc::guest_error) << c.name << ": " << ec.message();
      EXPECT_NE(sb.last_error().detail.find(c.status), std::string::npos)
          << c.name << ": " << sb.last_error().message();
    }
    EXPECT_FALSE(sb.poisoned()) << c.name << ": " << sb.poison_reason().message();
  }
}

// Many callers, every case at random over a few sandboxes, replies from a pool of threads.
void host_function_stress::random_cases(std::chrono::microseconds time_slice) {
  const std::size_t sandboxes = 8, callers = 16, calls = scaled(2000, 1000), window = 4;
  runtime rt({.time_slice = time_slice});
  std::atomic<std::uint64_t> settled{0}, wrong{0}, doubles{0}, ok{0}, failed{0};
  std::mutex mu;
  std::vector<std::string> details;
  watchdog dog("host function stress", 240s + std::chrono::seconds(callers * calls / 100), [&] {
    return "settled " + std::to_string(settled.load()) + " of " + std::to_string(callers * calls) +
           "; runtime calls " + std::to_string(rt.stats().calls);
  });
  std::vector<async_sandbox> sbs;
  for (std::size_t i = 0; i < sandboxes; ++i) {
    sbs.push_back(create_or_trip(rt, quiet_config("calc"), functions(), dog));
    ASSERT_TRUE(sbs.back());
  }
  struct call {
    const host_case* c;
    std::int64_t a, b;
    std::promise<std::pair<error_code, value>> p;
    std::atomic<int> invocations{0};
  };
  auto caller = [&](std::size_t id) {
    std::mt19937_64 rng(0xc0ffee + id);
    std::deque<std::shared_ptr<call>> inflight;
    std::vector<std::shared_ptr<call>> mine;
    auto settle = [&] {
      auto k = inflight.front();
      inflight.pop_front();
      auto f = k->p.get_future();
      auto [ec, v] = get_or_trip(f, dog, std::string("call_host ") + k->c->name);
      settled.fetch_add(1);
      std::string bad;
      if (k->c->ok) {
        if (ec)
          bad = std::string(k->c->name) + " failed: " + ec.message();
        else if (v != value{k->a + k->b})
          bad = std::string(k->c->name) + " returned " + to_string(v);
        else
          ok.fetch_add(1);
      } else if (ec != errc::guest_error) {
        bad = std::string(k->c->name) + " ended with " + (ec ? ec.message() : to_string(v));
      } else {
        failed.fetch_add(1);
      }
      if (!bad.empty()) {
        wrong.fetch_add(1);
        std::lock_guard lock(mu);
        if (details.size() < 20) details.push_back(bad);
      }
    };
    for (std::size_t i = 0; i < calls; ++i) {
      auto k = std::make_shared<call>();
      k->c = &cases[rng() % std::size(cases)];
      k->a = static_cast<std::int64_t>(id << 32 | i);
      k->b = static_cast<std::int64_t>(rng() % 1000);
      mine.push_back(k);
      while (inflight.size() >= window)
        settle();
      inflight.push_back(k);
      sbs[rng() % sandboxes].async_call("call_host", {std::string(k->c->name), k->a, k->b},
                                        [k, &doubles](error_code ec, value v) {
                                          if (k->invocations.fetch_add(1) == 0)
                                            k->p.set_value({ec, std::move(v)});
                                          else
                                            doubles.fetch_add(1);
                                        });
    }
    while (!inflight.empty())
      settle();
    for (auto& k : mine)
      if (k->invocations.load() != 1) doubles.fetch_add(1);
  };
  {
    std::vector<std::jthread> ts;
    for (std::size_t c = 0; c < callers; ++c)
      ts.emplace_back(caller, c);
  } // joined
  for (auto& sb : sbs) {
    EXPECT_FALSE(sb.poisoned()) << sb.poison_reason().message();
    // Still usable after everything the host functions did.
    auto [ec, v] = call_or_trip(sb, "add_i32", {20, 22}, dog);
    EXPECT_FALSE(ec) << ec.message();
    EXPECT_EQ(v, value{std::int32_t{42}});
  }
  std::printf("[ stress   ] %zu callers x %zu host calls over %zu sandboxes: %llu ok, %llu failed "
              "as expected\n",
              callers, calls, sandboxes, (unsigned long long)ok, (unsigned long long)failed);
  std::string d;
  for (auto& x : details)
    d += "\n  " + x;
  EXPECT_EQ(wrong.load(), 0u) << d;
  EXPECT_EQ(doubles.load(), 0u);
  EXPECT_EQ(ok.load() + failed.load(), callers * calls);
  std::printf("[ stress   ]   time slice %lld us: %llu preemptions, %llu stale kicks\n",
              (long long)time_slice.count(), (unsigned long long)rt.stats().preemptions,
              (unsigned long long)rt.stats().stale_kicks);
}

TEST_F(host_function_stress, random_cases_from_many_callers) {
  random_cases(std::chrono::microseconds(10'000)); // the default slice
}

// runtime::stop() while a call waits for an asynchronous host function that holds its reply:
// stop completes every outstanding call with operation_aborted (runtime.hpp) and joins its
// threads, whatever the host function does with its reply later.
void host_function_stress::stop_with_a_held_reply(bool plain_callback) {
  watchdog dog("stop with a held reply", 60s);
  std::mutex mu;
  std::optional<host_reply<std::int64_t>> held;
  host_functions fns;
  fns.add_async<std::int64_t(std::int64_t, std::int64_t)>(
      "hold", [&](std::int64_t, std::int64_t, host_reply<std::int64_t> r) {
        std::lock_guard lock(mu);
        held.emplace(std::move(r));
      });
  // Waits on use_future's future. Declared before the runtime, whose stop() (or destructor, on
  // an early return) completes the call, so that it is joined after that.
  std::jthread waiter;
  auto rt = std::make_unique<runtime>(runtime_options{.workers = 1});
  auto sb = create_or_trip(*rt, quiet_config("calc"), fns, dog);
  ASSERT_TRUE(sb);
  auto p = std::make_shared<std::promise<error_code>>();
  const std::vector<value> args{std::string("hold"), std::int64_t{1}, std::int64_t{2}};
  if (plain_callback) { // the handler's executor is the worker's
    sb.async_call("call_host", args, [p](error_code ec, value) { p->set_value(ec); });
  } else { // use_future's executor is not
    auto f =
        std::make_shared<std::future<value>>(sb.async_call("call_host", args, asio::use_future));
    waiter = std::jthread([f, p] {
      try {
        f->get();
        p->set_value({});
      } catch (const boost::system::system_error& e) {
        p->set_value(e.code());
      }
    });
  }
  for (int i = 0; i < 5000; ++i) {
    {
      std::lock_guard lock(mu);
      if (held) break;
    }
    std::this_thread::sleep_for(1ms);
  }
  std::promise<void> stopped;
  std::jthread stopper([&] {
    rt->stop();
    stopped.set_value();
  });
  auto s = stopped.get_future();
  EXPECT_EQ(s.wait_for(scaled_budget(5s)), std::future_status::ready)
      << "runtime::stop() still blocked 5 s later by a held host reply";
  auto f = p->get_future();
  EXPECT_EQ(get_or_trip(f, dog, "the parked call"), asio::error::operation_aborted);
  {
    std::lock_guard lock(mu);
    held.reset(); // the late drop must be harmless (and unblocks a stop() that waited for it)
  }
  stopper.join();
}

TEST_F(host_function_stress, stop_with_a_call_parked_in_a_host_function) {
  stop_with_a_held_reply(/*plain_callback=*/false);
}

TEST_F(host_function_stress, stop_does_not_wait_for_a_held_reply) {
  stop_with_a_held_reply(/*plain_callback=*/true);
}

// A reply that arrives after the runtime and every handle are gone must be dropped safely.
TEST_F(host_function_stress, late_reply_after_the_runtime_is_gone) {
  watchdog dog("late reply", 60s);
  std::mutex mu;
  std::optional<host_reply<std::int64_t>> held;
  host_functions fns;
  fns.add_async<std::int64_t(std::int64_t, std::int64_t)>(
      "hold", [&](std::int64_t, std::int64_t, host_reply<std::int64_t> r) {
        std::lock_guard lock(mu);
        held.emplace(std::move(r));
      });
  {
    runtime rt({.workers = 1});
    auto sb = create_or_trip(rt, quiet_config("calc"), fns, dog);
    ASSERT_TRUE(sb);
    // use_future: the handler's executor is not the worker's, so stop() is not held up.
    auto f = sb.async_call("call_host", {std::string("hold"), std::int64_t{1}, std::int64_t{2}},
                           asio::use_future);
    for (int i = 0; i < 5000; ++i) {
      {
        std::lock_guard lock(mu);
        if (held) break;
      }
      std::this_thread::sleep_for(1ms);
    }
    rt.stop();
    try {
      f.get();
      ADD_FAILURE() << "the parked call succeeded after stop()";
    } catch (const boost::system::system_error& e) {
      EXPECT_EQ(e.code(), asio::error::operation_aborted);
    }
  } // the runtime and the last handle are gone; the host function still holds its reply
  std::jthread late([&] {
    std::lock_guard lock(mu);
    ASSERT_TRUE(held); // returns from this lambda only: the join below still runs
    (*held)(3);
    held.reset();
  });
  late.join();
}

} // namespace
} // namespace kiln::test::stress
