// Example: create a sandbox from the calc guest, call it, and let it call back into the host.
#include <kiln/runtime/sandbox.hpp>

#include <fmt/format.h>

int main(int argc, char** argv) {
  kiln::sandbox_config config;
  config.guest_path = argc > 1 ? argv[1] : KILN_GUEST_DIR "/calc.elf";

  kiln::host_functions host;
  host.add("host_add", [](std::int64_t a, std::int64_t b) { return a + b; });

  auto sb = kiln::sandbox::create(config, host);
  if (!sb) {
    fmt::print(stderr, "create: {}\n", sb.err().message());
    return 1;
  }
  auto sum = (*sb)->call("add_i32", 2, 3);
  auto via_host =
      (*sb)->call("call_host", std::string("host_add"), std::int64_t{40}, std::int64_t{2});
  if (!sum || !via_host) {
    fmt::print(stderr, "call: {}\n", (!sum ? sum.err() : via_host.err()).message());
    return 1;
  }
  fmt::print("backend {}: add_i32(2, 3) = {}, call_host(host_add, 40, 2) = {}\n",
             kiln::vcpu::to_string((*sb)->backend()), kiln::to_string(*sum),
             kiln::to_string(*via_host));
  return 0;
}
