// Writes the fuzz seed corpora: valid wire messages of every kind and type, and valid ELF images.
// Usage: kiln_fuzz_seeds <wire-dir> <elf-dir>
#include <kiln/memory/layout.hpp>
#include <kiln/runtime/wire.hpp>

#include "memory/elf_builder.hpp"

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

namespace {

using namespace kiln;

int written = 0;

bool save(const std::string& dir, const std::string& name, std::span<const std::byte> bytes) {
  std::ofstream out(dir + "/" + name, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  if (!out) {
    std::fprintf(stderr, "cannot write %s/%s\n", dir.c_str(), name.c_str());
    return false;
  }
  ++written;
  return true;
}

bool save_message(const std::string& dir, const std::string& name, const result<std::size_t>& n,
                  const std::vector<std::byte>& buf) {
  if (!n) {
    std::fprintf(stderr, "%s: %s\n", name.c_str(), n.err().message().c_str());
    return false;
  }
  return save(dir, name, std::span(buf).first(*n));
}

bool wire_seeds(const std::string& dir) {
  const std::vector<value> every_type = {value{},
                                         value{std::int32_t{-7}},
                                         value{std::int64_t{1} << 40},
                                         value{std::uint64_t{~0ull}},
                                         value{2.5},
                                         value{true},
                                         value{std::string("text")},
                                         value{bytes{std::byte{0}, std::byte{0xff}}}};
  std::vector<std::byte> buf(64 << 10);
  bool ok = true;
  ok &= save_message(dir, "call_empty", wire::encode_call(buf, KILN_MSG_CALL, "f", {}), buf);
  ok &= save_message(dir, "call_every_type",
                     wire::encode_call(buf, KILN_MSG_CALL, "every_type", every_type), buf);
  ok &= save_message(dir, "host_call",
                     wire::encode_call(buf, KILN_MSG_HOST_CALL, "host.log", every_type), buf);
  for (const value& v : every_type) {
    const std::string t = type_name(type_of(v));
    ok &= save_message(dir, "result_" + t, wire::encode_result(buf, KILN_MSG_RESULT, v), buf);
    ok &= save_message(dir, "host_result_" + t, wire::encode_result(buf, KILN_MSG_HOST_RESULT, v),
                       buf);
  }
  ok &= save_message(
      dir, "result_error",
      wire::encode_error(buf, KILN_MSG_RESULT, KILN_STATUS_FAILED, "something failed"), buf);
  ok &= save_message(
      dir, "host_result_error",
      wire::encode_error(buf, KILN_MSG_HOST_RESULT, KILN_STATUS_NOT_FOUND, "no such function"),
      buf);
  return ok;
}

bool elf_seeds(const std::string& dir) {
  using test::elf_spec;
  using test::pattern;
  const std::uint64_t base = memory::fixed::image_base.value;
  elf_spec three;
  three.entry = base + 0x10;
  three.segments = {{PT_LOAD, PF_R | PF_X, base, 0, pattern(300, 1)},
                    {PT_LOAD, PF_R | PF_W, base + 0x1000, 0x1800, pattern(40, 2)},
                    {PT_LOAD, PF_R, base + 0x3010, 0, pattern(16, 3)}};
  elf_spec one;
  one.entry = base;
  one.segments = {{PT_LOAD, PF_R | PF_X, base, 0, pattern(64)}};
  elf_spec extras = three;
  extras.segments.push_back({PT_NOTE, PF_R, 0, 0, pattern(24)});
  extras.segments.push_back({PT_GNU_STACK, PF_R | PF_W, 0, 0, {}});
  return save(dir, "three_segments", test::build_elf(three)) &&
         save(dir, "one_segment", test::build_elf(one)) &&
         save(dir, "with_notes", test::build_elf(extras));
}

} // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <wire-dir> <elf-dir>\n", argv[0]);
    return 2;
  }
  const bool ok = wire_seeds(argv[1]) && elf_seeds(argv[2]);
  std::printf("wrote %d seeds\n", written);
  return ok ? 0 : 1;
}
