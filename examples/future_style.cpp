// Example: kiln::runtime with boost::asio::use_future: blocking calls from an ordinary thread.
//
// Each async_* call returns a std::future at once; several may be outstanding, and the sandbox
// runs them one at a time in submission order on its worker. A failed call makes get() throw
// boost::system::system_error; the sandbox's last_error() carries the detail.
#include <kiln/runtime/runtime.hpp>

#include <boost/asio/use_future.hpp>
#include <boost/system/system_error.hpp>

#include <fmt/format.h>

#include <cstdint>
#include <future>
#include <string>

namespace asio = boost::asio;

namespace {

template <class T> void expect(const kiln::value& v, T want, const char* what) {
  if (v != kiln::value{want})
    throw std::runtime_error(fmt::format("{} returned {}", what, kiln::to_string(v)));
  fmt::print("{} = {}\n", what, kiln::to_string(v));
}

} // namespace

int main(int argc, char** argv) {
  kiln::sandbox_config config;
  config.guest_path = argc > 1 ? argv[1] : KILN_GUEST_DIR "/calc.elf";
  kiln::host_functions host;
  host.add("host_add", [](std::int64_t a, std::int64_t b) { return a + b; });

  kiln::runtime rt({.workers = 2});
  try {
    kiln::async_sandbox sb = rt.async_create(config, host, asio::use_future).get();
    fmt::print("created a sandbox ({} backend) on worker {}\n", kiln::vcpu::to_string(sb.backend()),
               sb.worker());

    // Three calls in flight at once; get() waits for each.
    std::future<kiln::value> sum = sb.async_call("add_i32", {2, 3}, asio::use_future);
    std::future<kiln::value> via_host =
        sb.async_call("call_host", {std::string("host_add"), std::int64_t{40}, std::int64_t{2}},
                      asio::use_future);
    std::future<kiln::value> text =
        sb.async_call("concat", {std::string("micro"), std::string("-VM")}, asio::use_future);
    expect(sum.get(), std::int32_t{5}, "add_i32(2, 3)");
    expect(via_host.get(), std::int64_t{42}, "call_host(host_add, 40, 2)");
    expect(text.get(), std::string("micro-VM"), "concat(\"micro\", \"-VM\")");

    // A failing call: the future throws; the sandbox stays usable (a caller-side error).
    try {
      sb.async_call("no_such_function", {}, asio::use_future).get();
      throw std::runtime_error("calling an unknown function succeeded");
    } catch (const boost::system::system_error& e) {
      if (e.code() != kiln::errc::function_not_found) throw;
      fmt::print("no_such_function() failed as expected: {}\n", sb.last_error().message());
    }
    try {
      sb.async_call("add_i32", {std::string("two"), 3}, asio::use_future).get();
      throw std::runtime_error("calling add_i32 with a string succeeded");
    } catch (const boost::system::system_error& e) {
      if (e.code() != kiln::errc::bad_arguments) throw;
      fmt::print("add_i32(\"two\", 3) failed as expected: {}\n", sb.last_error().message());
    }
    if (sb.poisoned()) throw std::runtime_error("a caller-side error poisoned the sandbox");
    expect(sb.async_call("mul_i32", {6, 7}, asio::use_future).get(), std::int32_t{42},
           "mul_i32(6, 7) after the errors");

    sb.async_destroy(asio::use_future).get();
    fmt::print("destroyed; the sandbox ran {} calls\n", sb.stats().calls);
  } catch (const boost::system::system_error& e) {
    fmt::print(stderr, "future_style: {}\n", e.code().message());
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "future_style: {}\n", e.what());
    return 1;
  }
  return 0;
}
