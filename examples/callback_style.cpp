// Example: kiln::runtime with plain callbacks, chained create -> call -> call -> destroy.
//
// Each callback runs on the sandbox's worker thread (the default executor of a completion
// handler that has none of its own), so the next call it issues crosses no thread. main()
// only waits for the chain to report its outcome through a std::promise.
#include <kiln/runtime/runtime.hpp>

#include <fmt/format.h>

#include <cstdint>
#include <future>
#include <string>
#include <utility>

int main(int argc, char** argv) {
  kiln::sandbox_config config;
  config.guest_path = argc > 1 ? argv[1] : KILN_GUEST_DIR "/calc.elf";

  // Empty on success, else what failed. Set exactly once, by the last link of the chain.
  // Declared before the runtime, so it outlives every callback the runtime may still run.
  std::promise<std::string> outcome;
  kiln::runtime rt({.workers = 2});
  auto fail = [&outcome](const char* what, const std::string& why) {
    outcome.set_value(fmt::format("{}: {}", what, why));
  };

  rt.async_create(config, {}, [&](kiln::error_code ec, const kiln::async_sandbox& sb) {
    if (ec) return fail("create", sb.last_error().message());
    fmt::print("created a sandbox ({} backend) on worker {} of {}\n",
               kiln::vcpu::to_string(sb.backend()), sb.worker(), rt.worker_count());

    sb.async_call("add_i32", {2, 3}, [&, sb](kiln::error_code ec, kiln::value sum) {
      if (ec) return fail("add_i32", sb.last_error().message());
      if (sum != kiln::value{std::int32_t{5}})
        return fail("add_i32", "wrong result " + kiln::to_string(sum));
      fmt::print("add_i32(2, 3) = {} (callback on the sandbox's worker: {})\n",
                 kiln::to_string(sum), sb.get_executor().running_in_this_thread());

      // Chained from inside the first callback, which runs on the sandbox's worker: the call
      // is queued on that same worker and crosses no thread.
      const std::int64_t x = std::get<std::int32_t>(sum);
      sb.async_call("mul_i64", {x, std::int64_t{1'000'000'007}},
                    [&, sb, x](kiln::error_code ec, const kiln::value& product) {
                      if (ec) return fail("mul_i64", sb.last_error().message());
                      if (product != kiln::value{x * 1'000'000'007})
                        return fail("mul_i64", "wrong result " + kiln::to_string(product));
                      fmt::print("mul_i64({}, 1000000007) = {}\n", x, kiln::to_string(product));

                      sb.async_destroy([&, sb](kiln::error_code ec) {
                        if (ec) return fail("destroy", ec.message());
                        fmt::print("destroyed; runtime counted {} calls, {} sandboxes alive\n",
                                   rt.stats().calls, rt.stats().sandboxes);
                        outcome.set_value({});
                      });
                    });
    });
  });

  // On an error the chain stops early; the runtime's destructor then destroys what is left.
  const std::string error = outcome.get_future().get();
  if (!error.empty()) {
    fmt::print(stderr, "callback_style: {}\n", error);
    return 1;
  }
  return 0;
}
