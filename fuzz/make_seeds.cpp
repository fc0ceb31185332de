// Writes the fuzz seed corpora, one folder per target: valid wire messages of every kind and type,
// valid ELF images, .ksnap files (the golden ones, and a layered one with a working set) in the
// ksnap_file target's input format, their runtime sections, and CLI values. The output depends
// only on the sources and the golden files, so writing it again changes nothing.
// Usage: kiln_fuzz_seeds <corpus-root>
#include <kiln/memory/layout.hpp>
#include <kiln/memory/snapshot_file.hpp>
#include <kiln/memory/working_set.hpp>
#include <kiln/runtime/detail/snapshot_codec.hpp>
#include <kiln/runtime/wire.hpp>
#include <kiln/support/byte_codec.hpp>

#include "memory/elf_builder.hpp"

#include <stdlib.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
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

// ---- .ksnap files and their sections
// -------------------------------------------------------------

std::vector<std::byte> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> chars((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> out(chars.size());
  std::memcpy(out.data(), chars.data(), chars.size());
  return out;
}

template <class T> void put(std::vector<std::byte>& out, T v) {
  const auto* p = reinterpret_cast<const std::byte*>(&v);
  out.insert(out.end(), p, p + sizeof v);
}

/// `file` in ksnap_file_fuzz's input format: its size, then its runs of non-zero bytes (runs
/// closer than 64 zero bytes are joined), so a file of mostly holes stays small.
bool append_file(std::vector<std::byte>& out, std::span<const std::byte> file) {
  constexpr std::size_t gap = 64, max_piece = 0xffff;
  std::vector<std::pair<std::size_t, std::size_t>> pieces;
  for (std::size_t i = 0; i < file.size();) {
    if (file[i] == std::byte{0}) {
      ++i;
      continue;
    }
    std::size_t end = i, zeros = 0;
    while (end < file.size() && end - i < max_piece && zeros < gap) {
      zeros = file[end] == std::byte{0} ? zeros + 1 : 0;
      ++end;
    }
    pieces.emplace_back(i, end - zeros);
    i = end;
  }
  if (pieces.size() > 255) {
    std::fprintf(stderr, "a seed file of %zu runs (255 at most)\n", pieces.size());
    return false;
  }
  put<std::uint64_t>(out, file.size());
  put<std::uint8_t>(out, static_cast<std::uint8_t>(pieces.size()));
  for (const auto& [lo, hi] : pieces) {
    put<std::uint64_t>(out, lo);
    put<std::uint16_t>(out, static_cast<std::uint16_t>(hi - lo));
    out.insert(out.end(), file.begin() + static_cast<std::ptrdiff_t>(lo),
               file.begin() + static_cast<std::ptrdiff_t>(hi));
  }
  return true;
}

// ksnap_file_fuzz's flags.
constexpr std::uint8_t fix_checksums = 1 | 2, has_parent = 4;

bool save_ksnap(const std::string& dir, const std::string& name, std::uint8_t flags,
                std::span<const std::byte> top, std::span<const std::byte> parent = {}) {
  std::vector<std::byte> in{std::byte{flags}};
  if (!append_file(in, top) || ((flags & has_parent) && !append_file(in, parent))) return false;
  return save(dir, name, in);
}

/// A file's runtime sections in snapshot_state_fuzz's input format.
bool save_state(const std::string& dir, const std::string& name,
                const memory::snapshot_file_info& info) {
  std::vector<std::byte> in;
  put<std::uint64_t>(in, info.memory_size);
  put<std::uint32_t>(in, info.guest_abi_major);
  for (const auto& sec : info.sections) {
    put<std::uint32_t>(in, static_cast<std::uint32_t>(sec.tag));
    put<std::uint32_t>(in, static_cast<std::uint32_t>(sec.payload.size()));
    in.insert(in.end(), sec.payload.begin(), sec.payload.end());
  }
  return save(dir, name, in);
}

/// The golden child rewritten by the real writer to lie over "parent.ksnap" (where the fuzzer
/// puts a second file), with a working set; the golden parent is that parent as it is.
result<std::vector<std::byte>> layered_with_working_set(const std::string& golden,
                                                        const std::string& scratch) {
  KILN_TRY_ASSIGN(const auto chain,
                  memory::snapshot_chain::open(golden + "/calc-v1.1-child.ksnap"));
  KILN_TRY_ASSIGN(const auto image, chain.image());
  memory::snapshot_file_info info = chain.top().info();
  info.parent->path = "parent.ksnap";
  byte_writer w;
  const std::uint32_t pages[] = {0x107, 0x1, 0x3ff, 0x114, 0x10, 0x100};
  memory::encode_working_set(w, pages);
  info.sections.push_back({detail::section_tag::working_set, w.take()});
  const std::string path = scratch + "/top.ksnap";
  KILN_TRY(memory::write_snapshot_file(path, *image, info, 1));
  return read_file(path);
}

bool ksnap_seeds(const std::string& file_dir, const std::string& state_dir) {
  const std::string golden = KILN_GOLDEN_DIR;
  const auto v10 = read_file(golden + "/calc-v1.0.ksnap");
  const auto v11 = read_file(golden + "/calc-v1.1.ksnap");
  std::string scratch = (std::filesystem::temp_directory_path() / "kiln-seeds-XXXXXX").string();
  if (!::mkdtemp(scratch.data())) return false;
  auto top = layered_with_working_set(golden, scratch);
  bool ok = true;
  if (!top) {
    std::fprintf(stderr, "layered seed: %s\n", top.err().message().c_str());
    ok = false;
  } else {
    ok &= save_ksnap(file_dir, "calc_v1_1_layered_working_set", fix_checksums | has_parent, *top,
                     v11);
    ok &= save_ksnap(file_dir, "calc_v1_1_layered_no_parent", fix_checksums, *top);
    auto f = memory::snapshot_file::open(scratch + "/top.ksnap");
    ok &= f && save_state(state_dir, "calc_v1_1_working_set", f->info());
  }
  ok &= save_ksnap(file_dir, "calc_v1_0", fix_checksums, v10);
  ok &= save_ksnap(file_dir, "calc_v1_0_checksums_as_written", 0, v10);
  ok &= save_ksnap(file_dir, "calc_v1_1", fix_checksums, v11);
  for (const char* name : {"calc-v1.0", "calc-v1.1"}) {
    auto f = memory::snapshot_file::open(golden + "/" + name + ".ksnap");
    std::string seed = name;
    std::replace_if(
        seed.begin(), seed.end(), [](char c) { return c == '-' || c == '.'; }, '_');
    ok &= f && save_state(state_dir, seed, f->info());
  }
  std::error_code ec;
  std::filesystem::remove_all(scratch, ec);
  return ok;
}

// ---- CLI values: one argument a line
// ---------------------------------------------------------------

bool cli_seeds(const std::string& dir) {
  const char* const seeds[][2] = {
      {"sizes", "16M\n256K\n0\n64MiB\n1GB\n4096\n18446744073709551615\n16Q"},
      {"load_and_backend", "prefetch\ndemand\neager\nlazy\nauto\nkvm\nemulated\nunicorn"},
      {"files", "/tmp/data.bin\n/tmp/data.bin=data\na=b=c\n=x\nx="},
      {"values", "5\n5:i64\n18446744073709551615:u64\n2.5\n2:f64\ntrue\nvoid\nstr:text\nhex:0a0b"},
      {"bad_values", "zzz\n99999999999:i32\nhex:0\n1e999\n5:i128\n-:u64"},
  };
  bool ok = true;
  for (const auto& [name, text] : seeds)
    ok &= save(dir, name, std::as_bytes(std::span(text, std::strlen(text))));
  return ok;
}

} // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <corpus-root>\n", argv[0]);
    return 2;
  }
  const std::string root = argv[1];
  for (const char* t : {"wire_decode", "elf_parse", "ksnap_file", "snapshot_state", "cli_values"})
    std::filesystem::create_directories(root + "/" + t);
  const bool ok = wire_seeds(root + "/wire_decode") && elf_seeds(root + "/elf_parse") &&
                  ksnap_seeds(root + "/ksnap_file", root + "/snapshot_state") &&
                  cli_seeds(root + "/cli_values");
  std::printf("wrote %d seeds\n", written);
  return ok ? 0 : 1;
}
