// Example: kiln::runtime with C++20 coroutines (boost::asio::co_spawn + use_awaitable): an
// awaitable host function the guest calls back into, calls issued from the sandbox's own
// worker, and a deadline that stops a guest which never returns.
// Argument: the folder holding calc.elf and faults.elf (default: this build's guests).
#include <kiln/runtime/runtime.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/system/system_error.hpp>

#include <fmt/format.h>

#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;

namespace {

// Arguments and results are kept in named variables around each co_await: GCC 12 mishandles
// some temporaries that live across a co_await (an initializer list holding a std::string).
asio::awaitable<kiln::value> call(const kiln::async_sandbox& sb, std::string name,
                                  std::vector<kiln::value> args, kiln::call_options o = {}) {
  co_return co_await sb.async_call(std::move(name), std::move(args), o, asio::use_awaitable);
}

void expect(const kiln::value& got, const kiln::value& want, const std::string& what) {
  if (got != want) throw std::runtime_error(what + " returned " + kiln::to_string(got));
  fmt::print("{} = {}\n", what, kiln::to_string(got));
}

asio::awaitable<void> demo(kiln::runtime& rt, kiln::sandbox_config calc,
                           kiln::sandbox_config faults) {
  // A host function that is itself a coroutine: it waits on a timer (it could as well read a
  // socket); meanwhile the guest is parked and its worker serves others.
  kiln::host_functions host;
  host.add_awaitable("slow_add",
                     [](std::int64_t a, std::int64_t b) -> asio::awaitable<std::int64_t> {
                       asio::steady_timer t(co_await asio::this_coro::executor, 10ms);
                       co_await t.async_wait(asio::use_awaitable);
                       co_return a + b;
                     });
  kiln::async_sandbox sb = co_await rt.async_create(calc, host, asio::use_awaitable);

  // From main's io_context: each call is posted to the worker, and resumes us here.
  std::vector<kiln::value> add_args{20, 22};
  kiln::value sum = co_await call(sb, "add_i32", add_args);
  expect(sum, std::int32_t{42}, "add_i32(20, 22)");
  std::vector<kiln::value> host_args{std::string("slow_add"), std::int64_t{40}, std::int64_t{2}};
  kiln::value via_host = co_await call(sb, "call_host", host_args);
  expect(via_host, std::int64_t{42}, "call_host(slow_add, 40, 2)");

  // From the sandbox's own worker: a coroutine spawned on its executor calls without crossing
  // a thread; we await the whole batch. (The lambda is named before the co_await: GCC 12 at -O2
  // mis-destroys a capturing lambda temporary inside a co_await expression: a use-after-free.)
  auto batch = [sb]() -> asio::awaitable<std::int64_t> {
    std::int64_t sum = 0;
    for (std::int64_t i = 1; i <= 100; ++i) {
      std::vector<kiln::value> args{sum, i};
      sum = std::get<std::int64_t>(co_await call(sb, "add_i64", args));
    }
    co_return sum;
  };
  const std::int64_t total = co_await asio::co_spawn(sb.get_executor(), batch, asio::use_awaitable);
  expect(total, std::int64_t{5050}, "sum of 1..100 by 100 add_i64 calls on the worker");

  // A guest that never returns: the deadline kicks it, and the sandbox is poisoned.
  kiln::async_sandbox spinner = co_await rt.async_create(faults, {}, asio::use_awaitable);
  const auto t0 = std::chrono::steady_clock::now();
  try {
    co_await call(spinner, "spin", {}, {.timeout = 100ms});
    throw std::runtime_error("spin() returned");
  } catch (const boost::system::system_error& e) {
    if (e.code() != kiln::errc::deadline_exceeded) throw;
  }
  const auto ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0);
  fmt::print("spin() with a 100 ms deadline ended after {:.0f} ms: {}; poisoned: {}\n", ms.count(),
             spinner.last_error().message(), spinner.poisoned());
  if (!spinner.poisoned()) throw std::runtime_error("the expired sandbox is not poisoned");

  co_await spinner.async_destroy(asio::use_awaitable);
  co_await sb.async_destroy(asio::use_awaitable);
  fmt::print("destroyed both; runtime: {} calls, {} preemptions\n", rt.stats().calls,
             rt.stats().preemptions);
}

} // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : KILN_GUEST_DIR;
  kiln::sandbox_config calc, faults;
  calc.guest_path = dir + "/calc.elf";
  faults.guest_path = dir + "/faults.elf";

  // main's own event loop, where the coroutine resumes. Declared before the runtime so that it
  // outlives the workers, which post completions to it.
  asio::io_context ctx;
  kiln::runtime rt({.workers = 2});
  int rc = 1;
  asio::co_spawn(ctx, demo(rt, calc, faults), [&](std::exception_ptr e) {
    try {
      if (e) std::rethrow_exception(e);
      rc = 0;
    } catch (const boost::system::system_error& x) {
      fmt::print(stderr, "coroutine_style: {}\n", x.code().message());
    } catch (const std::exception& x) {
      fmt::print(stderr, "coroutine_style: {}\n", x.what());
    }
  });
  ctx.run();
  return rc;
}
