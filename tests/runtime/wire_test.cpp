// Tests for runtime/wire.hpp: exact round trips, and every way a guest-written message can lie.
#include <kiln/runtime/errc.hpp>
#include <kiln/runtime/wire.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <vector>

// Records the largest single allocation, to show that a lying length prefix allocates nothing.
namespace {
std::atomic<std::size_t> largest_allocation{0};
void* counted_alloc(std::size_t n) {
  std::size_t seen = largest_allocation.load(std::memory_order_relaxed);
  while (n > seen &&
         !largest_allocation.compare_exchange_weak(seen, n, std::memory_order_relaxed)) {
  }
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
} // namespace
void* operator new(std::size_t n) {
  return counted_alloc(n);
}
void* operator new[](std::size_t n) {
  return counted_alloc(n);
}
void operator delete(void* p) noexcept {
  std::free(p);
}
void operator delete[](void* p) noexcept {
  std::free(p);
}
void operator delete(void* p, std::size_t) noexcept {
  std::free(p);
}
void operator delete[](void* p, std::size_t) noexcept {
  std::free(p);
}

namespace kiln::wire {
namespace {

using buffer = std::vector<std::byte>;

// ---- building messages by hand, byte by byte, to say exactly what a guest could write ----

struct raw {
  buffer bytes;
  template <class T> raw& put(T v) {
    const auto* p = reinterpret_cast<const std::byte*>(&v);
    bytes.insert(bytes.end(), p, p + sizeof v);
    return *this;
  }
  raw& tag(kiln_type t) { return put(static_cast<std::uint8_t>(t)); }
  raw& str(std::string_view s, kiln_type t = KILN_TYPE_STRING) {
    tag(t).put(static_cast<std::uint32_t>(s.size()));
    const auto* p = reinterpret_cast<const std::byte*>(s.data());
    bytes.insert(bytes.end(), p, p + s.size());
    return *this;
  }
};

/// A header whose `size` matches `payload`, followed by the payload.
buffer message_of(std::uint16_t kind, const raw& payload, std::uint16_t count = 0,
                  std::uint32_t status = 0, std::uint32_t magic = KILN_MSG_MAGIC) {
  kiln_msg_header h{magic, kind, count, status, static_cast<std::uint32_t>(payload.bytes.size())};
  raw out;
  out.put(h);
  out.bytes.insert(out.bytes.end(), payload.bytes.begin(), payload.bytes.end());
  return out.bytes;
}

kiln_msg_header header_of(const buffer& b) {
  kiln_msg_header h;
  std::memcpy(&h, b.data(), sizeof h);
  return h;
}
void set_header(buffer& b, const kiln_msg_header& h) {
  std::memcpy(b.data(), &h, sizeof h);
}

buffer encoded_call(kiln_msg_kind kind, std::string_view name, std::vector<value> args) {
  buffer out(1 << 16);
  auto n = encode_call(out, kind, name, args);
  EXPECT_TRUE(n) << n.err().message();
  out.resize(n ? *n : 0);
  return out;
}
buffer encoded_result(kiln_msg_kind kind, const value& v) {
  buffer out(1 << 16);
  auto n = encode_result(out, kind, v);
  EXPECT_TRUE(n) << n.err().message();
  out.resize(n ? *n : 0);
  return out;
}

void expect_malformed(const result<message>& r, std::string_view why_contains = {}) {
  ASSERT_FALSE(r) << "decoded a malformed message";
  EXPECT_EQ(r.code(), errc::malformed_message);
  if (!why_contains.empty()) {
    EXPECT_NE(r.err().detail.find(why_contains), std::string::npos) << r.err().detail;
  }
}

/// Values equal including the bits of a double (NaN == NaN, -0.0 != 0.0).
bool same(const value& a, const value& b) {
  if (a.index() != b.index()) return false;
  if (std::holds_alternative<double>(a))
    return std::bit_cast<std::uint64_t>(std::get<double>(a)) ==
           std::bit_cast<std::uint64_t>(std::get<double>(b));
  return a == b;
}

bytes every_byte() {
  bytes b(256);
  for (int i = 0; i < 256; ++i)
    b[i] = static_cast<std::byte>(i);
  return b;
}

std::vector<value> samples() {
  using lim32 = std::numeric_limits<std::int32_t>;
  using lim64 = std::numeric_limits<std::int64_t>;
  return {value{},
          value{std::int32_t{0}},
          value{lim32::min()},
          value{lim32::max()},
          value{std::int32_t{-1}},
          value{std::int64_t{0}},
          value{lim64::min()},
          value{lim64::max()},
          value{std::uint64_t{0}},
          value{std::numeric_limits<std::uint64_t>::max()},
          value{0.0},
          value{-0.0},
          value{2.5},
          value{std::numeric_limits<double>::infinity()},
          value{std::numeric_limits<double>::quiet_NaN()},
          value{std::numeric_limits<double>::denorm_min()},
          value{true},
          value{false},
          value{std::string{}},
          value{std::string("hello")},
          value{std::string("nul\0inside", 10)},
          value{std::string("\xc3\xa9t\xc3\xa9 \xe2\x82\xac")},
          value{std::string(5000, 'x')},
          value{bytes{}},
          value{every_byte()}};
}

// ---- round trips ----

TEST(WireRoundTrip, EveryValueAsAResult) {
  for (auto kind : {KILN_MSG_RESULT, KILN_MSG_HOST_RESULT}) {
    for (const auto& v : samples()) {
      const auto b = encoded_result(kind, v);
      auto m = decode(b, kind);
      ASSERT_TRUE(m) << to_string(v) << ": " << m.err().message();
      EXPECT_EQ(m->kind, kind);
      EXPECT_EQ(m->status, KILN_STATUS_OK);
      ASSERT_EQ(m->values.size(), 1u);
      EXPECT_TRUE(same(m->values[0], v)) << type_name(type_of(v)) << " " << to_string(v);
      EXPECT_TRUE(m->name.empty());
      EXPECT_TRUE(m->error_message.empty());
    }
  }
}

TEST(WireRoundTrip, EveryValueAsCallArguments) {
  auto all = samples();
  all.resize(KILN_MAX_ARGS);
  all[KILN_MAX_ARGS - 1] = value{std::string("last")};
  for (auto kind : {KILN_MSG_CALL, KILN_MSG_HOST_CALL}) {
    const auto b = encoded_call(kind, "some_function", all);
    auto m = decode(b, kind);
    ASSERT_TRUE(m) << m.err().message();
    EXPECT_EQ(m->kind, kind);
    EXPECT_EQ(m->name, "some_function");
    ASSERT_EQ(m->values.size(), all.size());
    for (std::size_t i = 0; i < all.size(); ++i)
      EXPECT_TRUE(same(m->values[i], all[i])) << "argument " << i;
  }
}

TEST(WireRoundTrip, CallWithNoArgumentsAndLongestName) {
  const std::string name(KILN_MAX_NAME, 'n');
  auto m = decode(encoded_call(KILN_MSG_CALL, name, {}), KILN_MSG_CALL);
  ASSERT_TRUE(m) << m.err().message();
  EXPECT_EQ(m->name, name);
  EXPECT_TRUE(m->values.empty());
}

TEST(WireRoundTrip, ErrorStatusAndMessage) {
  for (auto status :
       {KILN_STATUS_NOT_FOUND, KILN_STATUS_ARG_COUNT, KILN_STATUS_ARG_TYPE, KILN_STATUS_FAILED,
        KILN_STATUS_MALFORMED, KILN_STATUS_TOO_LARGE, KILN_STATUS_HOST_ERROR}) {
    buffer out(256);
    auto n = encode_error(out, KILN_MSG_HOST_RESULT, status, "it went wrong");
    ASSERT_TRUE(n);
    out.resize(*n);
    auto m = decode(out, KILN_MSG_HOST_RESULT);
    ASSERT_TRUE(m) << m.err().message();
    EXPECT_EQ(m->status, status);
    EXPECT_EQ(m->error_message, "it went wrong");
    EXPECT_TRUE(m->values.empty());
  }
}

TEST(WireEncode, WritesTheDocumentedBytes) {
  const auto b = encoded_call(KILN_MSG_CALL, "add", {value{std::int32_t{2}}, value{true}});
  const auto payload = raw{}
                           .str("add")
                           .tag(KILN_TYPE_I32)
                           .put(std::int32_t{2})
                           .tag(KILN_TYPE_BOOL)
                           .put(std::uint8_t{1});
  EXPECT_EQ(b, message_of(KILN_MSG_CALL, payload, /*count=*/2));
  EXPECT_EQ(b.size(), 16u + (1 + 4 + 3) + (1 + 4) + (1 + 1));
  // "KMSG" little-endian.
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(b.data()), 4), "KMSG");
}

// ---- decode rejections ----

TEST(WireDecode, RejectsAnythingShorterThanAHeader) {
  const auto good = encoded_result(KILN_MSG_RESULT, value{});
  for (std::size_t n = 0; n < sizeof(kiln_msg_header); ++n)
    expect_malformed(decode(std::span(good).first(n), KILN_MSG_RESULT),
                     "shorter than a message header");
}

TEST(WireDecode, RejectsEveryTruncation) {
  const auto good =
      encoded_call(KILN_MSG_CALL, "f", {value{std::int64_t{1}}, value{std::string("abc")}});
  for (std::size_t n = 0; n < good.size(); ++n) {
    expect_malformed(decode(std::span(good).first(n), KILN_MSG_CALL));
    // Also with the header's size made consistent with the cut: the values themselves run out.
    if (n < sizeof(kiln_msg_header)) continue;
    buffer cut(good.begin(), good.begin() + n);
    auto h = header_of(cut);
    h.size = static_cast<std::uint32_t>(n - sizeof h);
    set_header(cut, h);
    expect_malformed(decode(cut, KILN_MSG_CALL));
  }
}

TEST(WireDecode, RejectsBadMagic) {
  auto b = encoded_result(KILN_MSG_RESULT, value{std::int32_t{5}});
  auto h = header_of(b);
  for (std::uint32_t magic : {0u, KILN_MSG_MAGIC ^ 1u, KILN_ABI_MAGIC, ~0u}) {
    h.magic = magic;
    set_header(b, h);
    expect_malformed(decode(b, KILN_MSG_RESULT), "magic");
  }
}

TEST(WireDecode, RejectsTheWrongKind) {
  const auto call = encoded_call(KILN_MSG_CALL, "f", {});
  expect_malformed(decode(call, KILN_MSG_RESULT), "kind");
  expect_malformed(decode(call, KILN_MSG_HOST_CALL), "kind");
  const auto result = encoded_result(KILN_MSG_HOST_RESULT, value{});
  expect_malformed(decode(result, KILN_MSG_RESULT), "kind");
  auto odd = result;
  auto h = header_of(odd);
  h.kind = 0xffff;
  set_header(odd, h);
  expect_malformed(decode(odd, KILN_MSG_HOST_RESULT), "kind");
}

TEST(WireDecode, RejectsASizeThatDisagreesWithTheRecord) {
  const auto good = encoded_result(KILN_MSG_RESULT, value{std::int32_t{5}});
  auto bigger = good; // header claims more than there is
  auto h = header_of(bigger);
  h.size += 1;
  set_header(bigger, h);
  expect_malformed(decode(bigger, KILN_MSG_RESULT), "payload bytes");

  auto smaller = good; // header claims less than there is
  h = header_of(smaller);
  h.size -= 1;
  set_header(smaller, h);
  expect_malformed(decode(smaller, KILN_MSG_RESULT), "payload bytes");

  auto extra = good; // one byte appended, header unchanged
  extra.push_back(std::byte{0});
  expect_malformed(decode(extra, KILN_MSG_RESULT), "payload bytes");

  auto huge = good;
  h = header_of(huge);
  h.size = ~0u;
  set_header(huge, h);
  expect_malformed(decode(huge, KILN_MSG_RESULT), "payload bytes");
}

// ADVERSARIAL case 3: a corrupt length prefix is refused before any host allocation.
TEST(WireDecode, RejectsLengthPrefixesPastTheEnd) {
  for (kiln_type t : {KILN_TYPE_STRING, KILN_TYPE_BYTES}) {
    for (std::uint32_t len : {0xFFFFFFFBu, 0xFFFFFFFFu, 0x80000000u, 4u}) {
      // The prefix claims `len` bytes; only 3 follow.
      const auto b = message_of(KILN_MSG_RESULT,
                                raw{}.tag(t).put(len).put(std::uint8_t{'a'}).put(std::uint16_t{0}));
      expect_malformed(decode(b, KILN_MSG_RESULT), "past the end");
    }
  }
  // In a call: the name's prefix, and an argument's.
  expect_malformed(decode(message_of(KILN_MSG_CALL, raw{}.tag(KILN_TYPE_STRING).put(0xFFFFFFFBu)),
                          KILN_MSG_CALL),
                   "past the end");
  expect_malformed(
      decode(message_of(KILN_MSG_CALL, raw{}.str("f").tag(KILN_TYPE_BYTES).put(9u).put(0ull), 1),
             KILN_MSG_CALL),
      "past the end");
}

TEST(WireDecode, ALengthPrefixClaiming4GiBFailsWithoutAllocatingIt) {
  // A full 64 KiB I/O buffer whose only value claims 4 GiB - 1.
  raw payload;
  payload.tag(KILN_TYPE_BYTES).put(0xFFFFFFFFu);
  payload.bytes.resize((64u << 10) - sizeof(kiln_msg_header), std::byte{0x41});
  const auto b = message_of(KILN_MSG_RESULT, payload);
  ASSERT_EQ(b.size(), 64u << 10);

  largest_allocation = 0;
  auto r = decode(b, KILN_MSG_RESULT);
  const std::size_t largest = largest_allocation;
  expect_malformed(r, "past the end");
  EXPECT_LT(largest, 4096u) << "decode allocated " << largest << " bytes for a lying prefix";
}

TEST(WireDecode, AllocatesNoMoreThanTheMessageHolds) {
  // The allocation for a value is bounded by the bytes actually present.
  raw payload;
  payload.str(std::string(1000, 'z'), KILN_TYPE_BYTES);
  const auto b = message_of(KILN_MSG_RESULT, payload);
  largest_allocation = 0;
  auto r = decode(b, KILN_MSG_RESULT);
  ASSERT_TRUE(r) << r.err().message();
  EXPECT_LE(largest_allocation.load(), b.size());
}

TEST(WireDecode, RejectsUnknownTypeTags) {
  for (std::uint8_t tag :
       {std::uint8_t{KILN_TYPE_LAST + 1}, std::uint8_t{0x7f}, std::uint8_t{0xff}}) {
    expect_malformed(decode(message_of(KILN_MSG_RESULT, raw{}.put(tag)), KILN_MSG_RESULT),
                     "unknown type tag");
    expect_malformed(decode(message_of(KILN_MSG_CALL, raw{}.str("f").put(tag), 1), KILN_MSG_CALL),
                     "unknown type tag");
  }
}

TEST(WireDecode, RejectsABoolThatIsNeither0Nor1) {
  for (std::uint8_t b : {std::uint8_t{2}, std::uint8_t{0xff}})
    expect_malformed(
        decode(message_of(KILN_MSG_RESULT, raw{}.tag(KILN_TYPE_BOOL).put(b)), KILN_MSG_RESULT),
        "bool");
}

TEST(WireDecode, RejectsTruncatedScalars) {
  for (kiln_type t : {KILN_TYPE_I32, KILN_TYPE_I64, KILN_TYPE_U64, KILN_TYPE_F64, KILN_TYPE_BOOL})
    expect_malformed(decode(message_of(KILN_MSG_RESULT, raw{}.tag(t)), KILN_MSG_RESULT),
                     "truncated");
  expect_malformed(
      decode(message_of(KILN_MSG_RESULT, raw{}.tag(KILN_TYPE_I64).put(std::uint32_t{7})),
             KILN_MSG_RESULT),
      "truncated");
  expect_malformed(
      decode(message_of(KILN_MSG_RESULT, raw{}.tag(KILN_TYPE_STRING).put(std::uint16_t{0})),
             KILN_MSG_RESULT),
      "truncated length prefix");
  expect_malformed(decode(message_of(KILN_MSG_RESULT, raw{}), KILN_MSG_RESULT),
                   "truncated value tag");
}

TEST(WireDecode, RejectsMoreThan32Arguments) {
  raw payload;
  payload.str("f");
  for (unsigned i = 0; i < KILN_MAX_ARGS + 1; ++i)
    payload.tag(KILN_TYPE_VOID);
  expect_malformed(decode(message_of(KILN_MSG_CALL, payload, KILN_MAX_ARGS + 1), KILN_MSG_CALL),
                   "argument count");
  expect_malformed(decode(message_of(KILN_MSG_HOST_CALL, payload, 0xffff), KILN_MSG_HOST_CALL),
                   "argument count");
}

TEST(WireDecode, RejectsFewerArgumentsThanCounted) {
  expect_malformed(
      decode(message_of(KILN_MSG_CALL, raw{}.str("f").tag(KILN_TYPE_VOID), 2), KILN_MSG_CALL),
      "truncated");
}

TEST(WireDecode, RejectsBadFunctionNames) {
  const std::string too_long(KILN_MAX_NAME + 1, 'n');
  expect_malformed(decode(message_of(KILN_MSG_CALL, raw{}.str(too_long)), KILN_MSG_CALL),
                   "too long");
  expect_malformed(decode(message_of(KILN_MSG_HOST_CALL, raw{}.str("name", KILN_TYPE_BYTES)),
                          KILN_MSG_HOST_CALL),
                   "not a string");
  expect_malformed(decode(message_of(KILN_MSG_CALL, raw{}.tag(KILN_TYPE_I32).put(std::int32_t{1})),
                          KILN_MSG_CALL),
                   "not a string");
  expect_malformed(decode(message_of(KILN_MSG_CALL, raw{}), KILN_MSG_CALL), "truncated value tag");
}

TEST(WireDecode, RejectsTrailingBytes) {
  // Two values where one is expected; sizes are consistent, so only the value count is wrong.
  expect_malformed(
      decode(message_of(KILN_MSG_RESULT, raw{}.tag(KILN_TYPE_VOID).tag(KILN_TYPE_VOID)),
             KILN_MSG_RESULT),
      "trailing");
  expect_malformed(
      decode(message_of(KILN_MSG_CALL, raw{}.str("f").tag(KILN_TYPE_VOID).tag(KILN_TYPE_VOID), 1),
             KILN_MSG_CALL),
      "trailing");
  expect_malformed(
      decode(message_of(KILN_MSG_RESULT, raw{}.tag(KILN_TYPE_VOID).put(std::uint8_t{0}), 0,
                        KILN_STATUS_OK),
             KILN_MSG_RESULT),
      "trailing");
}

TEST(WireDecode, RejectsAnErrorStatusWithoutAStringMessage) {
  for (const auto& payload : {raw{}.tag(KILN_TYPE_I32).put(std::int32_t{3}),
                              raw{}.tag(KILN_TYPE_VOID), raw{}.str("msg", KILN_TYPE_BYTES)})
    expect_malformed(
        decode(message_of(KILN_MSG_RESULT, payload, 0, KILN_STATUS_FAILED), KILN_MSG_RESULT),
        "not a string");
}

TEST(WireDecode, RejectsUnknownStatus) {
  for (std::uint32_t status : {std::uint32_t{KILN_STATUS_LAST + 1}, 0x80000000u, ~0u})
    expect_malformed(
        decode(message_of(KILN_MSG_HOST_RESULT, raw{}.str("m"), 0, status), KILN_MSG_HOST_RESULT),
        "unknown status");
}

// ---- encode limits ----

TEST(WireEncode, RefusesBuffersTooSmallAndNeverWritesPastThem) {
  const std::vector<value> args = {value{std::string("payload")}, value{std::uint64_t{9}}};
  const auto call = encoded_call(KILN_MSG_CALL, "fn", args);
  const auto result = encoded_result(KILN_MSG_RESULT, value{std::string("payload")});
  for (std::size_t n = 0; n <= call.size(); ++n) {
    buffer backing(n + 64, std::byte{0xee});
    auto r = encode_call(std::span(backing).first(n), KILN_MSG_CALL, "fn", args);
    if (n < call.size()) {
      EXPECT_EQ(r.code(), errc::result_too_large) << "buffer of " << n;
    } else {
      ASSERT_TRUE(r);
      EXPECT_EQ(*r, call.size());
    }
    for (std::size_t i = n; i < backing.size(); ++i)
      ASSERT_EQ(backing[i], std::byte{0xee}) << n << ": byte " << i;
  }
  for (std::size_t n = 0; n <= result.size(); ++n) {
    buffer backing(n + 64, std::byte{0xee});
    auto r =
        encode_result(std::span(backing).first(n), KILN_MSG_RESULT, value{std::string("payload")});
    EXPECT_EQ(r.has_value(), n == result.size()) << "buffer of " << n;
    if (!r) {
      EXPECT_EQ(r.code(), errc::result_too_large);
    }
    for (std::size_t i = n; i < backing.size(); ++i)
      ASSERT_EQ(backing[i], std::byte{0xee}) << n << ": byte " << i;
  }
}

TEST(WireEncode, RefusesCallsBeyondTheAbiCaps) {
  buffer out(1 << 16);
  const std::vector<value> too_many(KILN_MAX_ARGS + 1, value{std::int32_t{1}});
  EXPECT_EQ(encode_call(out, KILN_MSG_CALL, "f", too_many).code(), errc::bad_arguments);
  EXPECT_EQ(encode_call(out, KILN_MSG_CALL, std::string(KILN_MAX_NAME + 1, 'n'), {}).code(),
            errc::bad_arguments);
}

TEST(WireEncode, ErrorMessagesAreTruncatedToFit) {
  const std::string message(1000, 'm');
  buffer out(64);
  auto n = encode_error(out, KILN_MSG_RESULT, KILN_STATUS_FAILED, message);
  ASSERT_TRUE(n) << n.err().message();
  EXPECT_EQ(*n, 64u);
  auto m = decode(out, KILN_MSG_RESULT);
  ASSERT_TRUE(m) << m.err().message();
  EXPECT_EQ(m->status, KILN_STATUS_FAILED);
  EXPECT_EQ(m->error_message, message.substr(0, 64 - sizeof(kiln_msg_header) - 5));

  buffer exact(sizeof(kiln_msg_header) + 5); // room for an empty message only
  auto e = encode_error(exact, KILN_MSG_RESULT, KILN_STATUS_FAILED, message);
  ASSERT_TRUE(e);
  auto em = decode(exact, KILN_MSG_RESULT);
  ASSERT_TRUE(em);
  EXPECT_EQ(em->error_message, "");

  for (std::size_t size = 0; size < sizeof(kiln_msg_header) + 5; ++size) {
    buffer tiny(size);
    EXPECT_EQ(encode_error(tiny, KILN_MSG_RESULT, KILN_STATUS_FAILED, message).code(),
              errc::result_too_large)
        << size;
  }

  buffer roomy(4096);
  auto whole = encode_error(roomy, KILN_MSG_RESULT, KILN_STATUS_FAILED, message);
  ASSERT_TRUE(whole);
  EXPECT_EQ(decode(std::span(roomy).first(*whole), KILN_MSG_RESULT)->error_message, message)
      << "not truncated";
}

} // namespace
} // namespace kiln::wire
