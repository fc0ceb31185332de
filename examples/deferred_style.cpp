// Example: kiln::runtime with boost::asio::deferred: calls described first, launched later with
// any completion token, and two calls composed into one operation.
#include <kiln/runtime/runtime.hpp>

#include <boost/asio/deferred.hpp>
#include <boost/asio/use_future.hpp>
#include <boost/system/system_error.hpp>

#include <fmt/format.h>

#include <chrono>
#include <cstdint>
#include <future>
#include <stdexcept>
#include <string>
#include <thread>

namespace asio = boost::asio;

namespace {

void expect(const kiln::value& got, const kiln::value& want, const std::string& what) {
  if (got != want) throw std::runtime_error(what + " returned " + kiln::to_string(got));
  fmt::print("{} = {}\n", what, kiln::to_string(got));
}

// (a + b) * 10 as one deferred operation: add_i64, then, only if it succeeded, mul_i64 on its
// result. Either way the composed operation completes with void(error_code, kiln::value).
auto add_then_scale(const kiln::async_sandbox& sb, kiln::value a, kiln::value b) {
  return sb.async_call("add_i64", {std::move(a), std::move(b)},
                       asio::deferred([sb](kiln::error_code ec, kiln::value sum) {
                         const std::int64_t s = ec ? 0 : std::get<std::int64_t>(sum);
                         return asio::deferred.when(!ec)
                             .then(sb.async_call("mul_i64", {s, std::int64_t{10}}, asio::deferred))
                             .otherwise(asio::deferred.values(ec, kiln::value{}));
                       }));
}

} // namespace

int main(int argc, char** argv) {
  kiln::sandbox_config config;
  config.guest_path = argc > 1 ? argv[1] : KILN_GUEST_DIR "/calc.elf";

  kiln::runtime rt({.workers = 1});
  try {
    kiln::async_sandbox sb = rt.async_create(config, {}, asio::use_future).get();

    // 1. A deferred call is only a description: nothing runs until it is launched.
    // (The sandbox's own counters are published before a call completes; the runtime's total
    // may lag a completion slightly, so the checks below read the sandbox's.)
    const auto before = sb.stats().calls;
    auto mul = sb.async_call("mul_i32", {6, 7}, asio::deferred);
    std::this_thread::sleep_for(std::chrono::milliseconds(20)); // time enough to run, were it
    if (sb.stats().calls != before) throw std::runtime_error("a deferred call ran early");
    // Launched twice (an lvalue launches a copy), with two different tokens.
    expect(mul(asio::use_future).get(), std::int32_t{42}, "mul_i32(6, 7), first launch");
    std::promise<kiln::value> second;
    mul([&](kiln::error_code ec, kiln::value v) {
      if (ec)
        second.set_exception(std::make_exception_ptr(boost::system::system_error(ec)));
      else
        second.set_value(std::move(v));
    });
    expect(second.get_future().get(), std::int32_t{42}, "mul_i32(6, 7), second launch");
    if (sb.stats().calls != before + 2) throw std::runtime_error("expected exactly two calls");

    // 2. Two calls composed into one operation, launched with a future.
    auto op = add_then_scale(sb, std::int64_t{40}, std::int64_t{2});
    expect(std::move(op)(asio::use_future).get(), std::int64_t{420}, "(40 + 2) * 10");

    // 3. The same composition whose first call fails: the second never runs.
    const auto calls = sb.stats().calls;
    try {
      add_then_scale(sb, std::string("forty"), std::int64_t{2})(asio::use_future).get();
      throw std::runtime_error("add_i64 with a string succeeded");
    } catch (const boost::system::system_error& e) {
      if (e.code() != kiln::errc::bad_arguments) throw;
      fmt::print("(\"forty\" + 2) * 10 failed at its first step: {}\n", sb.last_error().message());
    }
    if (sb.stats().calls != calls + 1)
      throw std::runtime_error("the second step ran after the first failed");

    sb.async_destroy(asio::use_future).get();
    fmt::print("destroyed; the sandbox ran {} calls\n", sb.stats().calls);
  } catch (const boost::system::system_error& e) {
    fmt::print(stderr, "deferred_style: {}\n", e.code().message());
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "deferred_style: {}\n", e.what());
    return 1;
  }
  return 0;
}
