// libFuzzer target: the runtime state of a snapshot (its .ksnap sections) through decode_state,
// which load and verify use, without a file around it (ADVERSARIAL cases 5 and 19).
//
// The input is what the memory layer hands the runtime once it has checked a file's framing:
//
//   input   := u64 memory_size, u32 guest_abi_major, section...
//   section := u32 tag, u32 length, length bytes    (to the end of the input)
//
// Inputs the memory layer would never pass on are skipped: a memory size that is 0, unaligned
// or past the cap, tags out of order or repeated, or one of memory/'s own tags.
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/snapshot_file.hpp>
#include <kiln/runtime/detail/snapshot_codec.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

namespace {

using namespace kiln;
namespace ksnap = memory::ksnap;

[[noreturn]] void fail() {
  __builtin_trap();
}

template <class T> bool take(std::span<const std::uint8_t>& in, T& v) {
  if (in.size() < sizeof v) return false;
  std::memcpy(&v, in.data(), sizeof v);
  in = in.subspan(sizeof v);
  return true;
}

/// The file info memory/ would produce from `in`, or false for an input it never would.
bool parse_input(std::span<const std::uint8_t> in, memory::snapshot_file_info& info) {
  if (!take(in, info.memory_size) || !take(in, info.guest_abi_major)) return false;
  if (info.memory_size == 0 || info.memory_size > ksnap::max_memory ||
      info.memory_size % memory::page_size != 0)
    return false;
  std::uint32_t prev = static_cast<std::uint32_t>(ksnap::tag::parent);
  while (!in.empty()) {
    std::uint32_t tag = 0, len = 0;
    if (!take(in, tag) || !take(in, len) || len > in.size() || tag <= prev) return false;
    const auto* p = reinterpret_cast<const std::byte*>(in.data());
    info.sections.push_back({static_cast<ksnap::tag>(tag), std::vector<std::byte>(p, p + len)});
    in = in.subspan(len);
    prev = tag;
  }
  return true;
}

bool same_sections(const std::vector<memory::snapshot_section>& a,
                   const std::vector<memory::snapshot_section>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a[i].tag != b[i].tag || a[i].payload != b[i].payload) return false;
  return true;
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  memory::snapshot_file_info info;
  if (!parse_input({data, size}, info)) return 0;
  detail::snapshot_state s;
  if (auto r = detail::decode_state(info, s); !r) {
    using enum memory::memory_errc;
    if (r.code() != snapshot_corrupt && r.code() != snapshot_unsupported) fail();
    return 0;
  }
  if (s.memory_size != info.memory_size) fail();
  // What kiln reads it can write, and what it writes it reads back to the same state: encoding
  // the decoded state and decoding that again gives the same bytes.
  const auto once = detail::encode_sections(s);
  detail::snapshot_state again;
  if (auto r = detail::decode_sections(once, info.memory_size, again); !r) fail();
  if (!same_sections(detail::encode_sections(again), once)) fail();
  return 0;
}
