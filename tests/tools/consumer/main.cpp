// Calls the calc guest through an installed kiln: proves the headers and package config work.
#include <kiln/runtime/sandbox.hpp>

#include <cstdio>

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  kiln::sandbox_config config;
  config.guest_path = argv[1];
  config.backend = kiln::vcpu::backend_choice::emulated;
  auto sb = kiln::sandbox::create(config);
  if (!sb) return 1;
  auto r = (*sb)->call("add_i32", 2, 3);
  if (!r) return 1;
  std::printf("%s\n", kiln::to_string(*r).c_str());
  return kiln::to_string(*r) == "5" ? 0 : 1;
}
