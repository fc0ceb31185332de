// libFuzzer target: wire::decode on arbitrary bytes as every message kind (ADVERSARIAL case 5).
#include <kiln/runtime/errc.hpp>
#include <kiln/runtime/wire.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

namespace {

using namespace kiln;

constexpr kiln_msg_kind kinds[] = {KILN_MSG_CALL, KILN_MSG_RESULT, KILN_MSG_HOST_CALL,
                                   KILN_MSG_HOST_RESULT};

[[noreturn]] void fail() {
  __builtin_trap();
}

result<std::size_t> encode(std::span<std::byte> out, kiln_msg_kind kind, const wire::message& m) {
  if (kind == KILN_MSG_CALL || kind == KILN_MSG_HOST_CALL)
    return wire::encode_call(out, kind, m.name, m.values);
  if (m.status == KILN_STATUS_OK) return wire::encode_result(out, kind, m.values.at(0));
  return wire::encode_error(out, kind, m.status, m.error_message);
}

// The decoder accepts only canonical values and consumes every byte, so re-encoding what it
// returned must fill a buffer of exactly the input's size with the same payload bytes. (The
// header's count of a result and status of a call are not checked by the decoder.)
void check_round_trip(std::span<const std::byte> in, kiln_msg_kind kind, const wire::message& m) {
  std::vector<std::byte> out(in.size());
  auto n = encode(out, kind, m);
  if (!n || *n != in.size()) fail();
  if (std::memcmp(out.data() + sizeof(kiln_msg_header), in.data() + sizeof(kiln_msg_header),
                  in.size() - sizeof(kiln_msg_header)) != 0)
    fail();
  kiln_msg_header a, b;
  std::memcpy(&a, in.data(), sizeof a);
  std::memcpy(&b, out.data(), sizeof b);
  if (a.magic != b.magic || a.kind != b.kind || a.size != b.size) fail();
  auto again = wire::decode(out, kind);
  if (!again || again->name != m.name || again->values.size() != m.values.size() ||
      again->status != m.status || again->error_message != m.error_message)
    fail();
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // libFuzzer hands over an exactly-sized heap copy: ASan flags any read past its end.
  const std::span<const std::byte> in(reinterpret_cast<const std::byte*>(data), size);
  for (kiln_msg_kind kind : kinds) {
    auto m = wire::decode(in, kind);
    if (!m) {
      if (m.code() != errc::malformed_message) fail();
      continue;
    }
    if (m->kind != kind) fail();
    if ((kind == KILN_MSG_CALL || kind == KILN_MSG_HOST_CALL) &&
        (m->values.size() > KILN_MAX_ARGS || m->name.size() > KILN_MAX_NAME))
      fail();
    check_round_trip(in, kind, *m);
  }
  return 0;
}
