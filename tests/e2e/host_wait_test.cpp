// End to end: a guest call parked on an asynchronous or coroutine host function under
// kiln::runtime. Deadlines and cancellation reach it, a host function that calls its own
// sandbox is refused instead of waiting for itself, and runtime::stop() returns while such a
// function is still pending.
#include "backend_fixture.hpp"

#include <kiln/runtime/awaitable_host.hpp>
#include <kiln/runtime/runtime.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>

#include <chrono>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

namespace kiln::test {
namespace {
namespace asio = boost::asio;
using namespace std::chrono_literals;

class host_wait_test : public backend_test {
protected:
  async_sandbox create(runtime& rt, host_functions fns) {
    auto sb = rt.async_create(config_for("calc"), std::move(fns), asio::use_future).get();
    EXPECT_TRUE(sb) << sb.last_error().message();
    return sb;
  }
  // Calls the guest's call_host, which calls host function `fn` with (a, b).
  static std::future<value> call_host(const async_sandbox& sb, const char* fn, call_options o = {},
                                      std::int64_t a = 4, std::int64_t b = 2) {
    return sb.async_call("call_host", {std::string(fn), a, b}, o, asio::use_future);
  }
  static error_code code_of(std::future<value>& f) {
    try {
      f.get();
      return {};
    } catch (const boost::system::system_error& e) {
      return e.code();
    }
  }
};

// An async host function that keeps its reply and never sends it (the test sends it late).
struct held_replies {
  std::mutex mu;
  std::vector<host_reply<std::int64_t>> replies;
  void add_to(host_functions& fns) {
    fns.add_async<std::int64_t(std::int64_t, std::int64_t)>(
        "host_add", [this](std::int64_t, std::int64_t, host_reply<std::int64_t> reply) {
          std::lock_guard lock(mu);
          replies.push_back(std::move(reply));
        });
  }
  void reply_all(std::int64_t v) {
    std::lock_guard lock(mu);
    for (auto& r : replies)
      r(v);
    replies.clear();
  }
};

// Before, the deadline was looked at only when the host function replied: a call parked on one
// that never replied stayed pending for ever, deadline or not.
TEST_F(host_wait_test, a_deadline_ends_a_call_parked_on_a_host_function_that_never_replies) {
  runtime rt({.workers = 1});
  held_replies held;
  host_functions fns;
  held.add_to(fns);
  auto sb = create(rt, std::move(fns));
  ASSERT_TRUE(sb);
  auto snap = sb.async_snapshot(asio::use_future).get();
  ASSERT_TRUE(snap);
  auto f = call_host(sb, "host_add", {.timeout = 50ms});
  ASSERT_EQ(f.wait_for(scaled_budget(3s)), std::future_status::ready);
  EXPECT_EQ(code_of(f), errc::deadline_exceeded);
  EXPECT_TRUE(sb.poisoned()) << "the guest stopped mid-call";
  // The late reply is dropped: nothing runs, nothing breaks, and a restore heals the sandbox.
  held.reply_all(42);
  sb.async_restore(snap, asio::use_future).get();
  EXPECT_EQ(std::get<std::int32_t>(sb.async_call("add_i32", {2, 3}, asio::use_future).get()), 5);
  EXPECT_EQ(sb.stats().calls, 2u);
}

TEST_F(host_wait_test, cancellation_ends_a_call_parked_on_a_coroutine_host_function) {
  runtime rt({.workers = 1});
  host_functions fns;
  fns.add_awaitable("host_add", [](std::int64_t, std::int64_t) -> asio::awaitable<std::int64_t> {
    asio::steady_timer never(co_await asio::this_coro::executor, 24h);
    co_await never.async_wait(asio::use_awaitable);
    co_return 0;
  });
  auto sb = create(rt, std::move(fns));
  ASSERT_TRUE(sb);
  asio::cancellation_signal sig;
  std::promise<error_code> done;
  asio::post(sb.get_executor(), [&] {
    sb.async_call("call_host", {std::string("host_add"), std::int64_t{1}, std::int64_t{2}},
                  asio::bind_cancellation_slot(sig.slot(),
                                               [&](error_code ec, value) { done.set_value(ec); }));
  });
  std::this_thread::sleep_for(20ms); // parked by now, or still queued: both must end
  asio::post(sb.get_executor(), [&] { sig.emit(asio::cancellation_type::terminal); });
  auto fut = done.get_future();
  ASSERT_EQ(fut.wait_for(scaled_budget(3s)), std::future_status::ready);
  const error_code ec = fut.get();
  EXPECT_TRUE(ec == errc::cancelled || ec == asio::error::operation_aborted) << ec.message();
}

// Calls add_i32(1, 2) on `target` and tells how it went: 1 it went through, 2 it was refused
// with reentrant_call, 3 another error, 4 a wrong result.
asio::awaitable<std::int64_t> call_and_tell(std::shared_ptr<async_sandbox> target) {
  error_code ec;
  std::optional<value> v;
  // Built outside the co_await: GCC 12 miscompiles an initializer list inside one.
  std::vector<value> args{value{1}, value{2}};
  try {
    v = co_await target->async_call("add_i32", std::move(args), asio::use_awaitable);
  } catch (const boost::system::system_error& e) {
    ec = e.code();
  }
  if (v) co_return std::get<std::int32_t>(*v) == 3 ? 1 : 4;
  co_return ec == errc::reentrant_call ? 2 : 3;
}

// A coroutine host function that awaited a call on its own sandbox waited for itself for ever:
// that call queues behind the call the function serves.
TEST_F(host_wait_test, a_coroutine_host_function_calling_its_own_sandbox_is_refused) {
  runtime rt({.workers = 1});
  auto self = std::make_shared<async_sandbox>();
  auto other = std::make_shared<async_sandbox>();
  host_functions fns;
  fns.add_awaitable("host_add", [=](std::int64_t, std::int64_t) { return call_and_tell(self); });
  fns.add_awaitable("host_mul", [=](std::int64_t, std::int64_t) { return call_and_tell(other); });
  *self = create(rt, fns);
  *other = create(rt, {});
  ASSERT_TRUE(*self && *other);
  auto f = call_host(*self, "host_add", {.timeout = 5s});
  ASSERT_EQ(f.wait_for(scaled_budget(3s)), std::future_status::ready);
  EXPECT_EQ(std::get<std::int64_t>(f.get()), 2);
  EXPECT_FALSE(self->poisoned());
  // Calling another sandbox (on the same worker) from a host function is not refused.
  auto g = call_host(*self, "host_mul", {.timeout = 5s});
  ASSERT_EQ(g.wait_for(scaled_budget(3s)), std::future_status::ready);
  EXPECT_EQ(std::get<std::int64_t>(g.get()), 1);
  *self = {}; // the host functions hold handles to the sandboxes: let go of them
  *other = {};
}

// runtime::stop() used to wait for every handler on the workers, and a coroutine host function
// awaiting something that never completes is one that never ends.
TEST_F(host_wait_test, stop_returns_while_a_coroutine_host_function_is_pending) {
  auto rt = std::make_unique<runtime>(runtime_options{.workers = 2});
  host_functions fns;
  fns.add_awaitable("host_add", [](std::int64_t, std::int64_t) -> asio::awaitable<std::int64_t> {
    asio::steady_timer never(co_await asio::this_coro::executor, 24h);
    co_await never.async_wait(asio::use_awaitable);
    co_return 0;
  });
  held_replies held;
  host_functions async_fns;
  held.add_to(async_fns);
  auto a = create(*rt, std::move(fns));
  auto b = create(*rt, std::move(async_fns));
  ASSERT_TRUE(a && b);
  auto fa = call_host(a, "host_add");
  auto fb = call_host(b, "host_add");
  std::this_thread::sleep_for(20ms);
  auto stopped = std::async(std::launch::async, [&] { rt->stop(); });
  ASSERT_EQ(stopped.wait_for(scaled_budget(5s)), std::future_status::ready)
      << "stop() waits for a host function that never ends";
  EXPECT_EQ(code_of(fa), asio::error::operation_aborted);
  EXPECT_EQ(code_of(fb), asio::error::operation_aborted);
  held.reply_all(1); // after the runtime stopped: dropped
  rt.reset();
}

} // namespace
} // namespace kiln::test
