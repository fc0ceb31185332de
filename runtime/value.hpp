// kiln::value: the typed values that cross the guest boundary (i32, i64, u64, f64, bool,
// string, bytes, void), in the order of the ABI's kiln_type tags.
#pragma once

#include <kiln/guest/abi.h>
#include <kiln/support/result.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <variant>
#include <vector>

namespace kiln {

using bytes = std::vector<std::byte>;

/// The variant's index equals the wire tag (enum kiln_type): monostate is VOID.
using value = std::variant<std::monostate, std::int32_t, std::int64_t, std::uint64_t, double, bool,
                           std::string, bytes>;

static_assert(std::variant_size_v<value> == KILN_TYPE_LAST + 1);
static_assert(std::is_same_v<std::variant_alternative_t<KILN_TYPE_I32, value>, std::int32_t>);
static_assert(std::is_same_v<std::variant_alternative_t<KILN_TYPE_BYTES, value>, bytes>);

inline kiln_type type_of(const value& v) noexcept {
  return static_cast<kiln_type>(v.index());
}

/// "i32", "string", ... for messages.
const char* type_name(kiln_type t) noexcept;

/// The value formatted for people: 5, 2.5, true, "text", 0x0a0b (bytes in hex), void.
std::string to_string(const value& v);

/// Parses a typed value from text, as the CLI takes it: `5` (i32), `5:i64`, `5:u64`, `2.5` or
/// `2:f64` (f64), `true`/`false` (bool), `str:text` (string), `hex:0a0b` (bytes), `void`.
/// Errors: std::errc::invalid_argument or std::errc::result_out_of_range, with a detail.
result<value> parse_value(std::string_view text);

/// Maps a C++ parameter or return type to its wire tag (for host function registration).
template <class T> struct wire_type;
template <> struct wire_type<void> : std::integral_constant<kiln_type, KILN_TYPE_VOID> {};
template <> struct wire_type<std::int32_t> : std::integral_constant<kiln_type, KILN_TYPE_I32> {};
template <> struct wire_type<std::int64_t> : std::integral_constant<kiln_type, KILN_TYPE_I64> {};
template <> struct wire_type<std::uint64_t> : std::integral_constant<kiln_type, KILN_TYPE_U64> {};
template <> struct wire_type<double> : std::integral_constant<kiln_type, KILN_TYPE_F64> {};
template <> struct wire_type<bool> : std::integral_constant<kiln_type, KILN_TYPE_BOOL> {};
template <> struct wire_type<std::string> : std::integral_constant<kiln_type, KILN_TYPE_STRING> {};
template <> struct wire_type<bytes> : std::integral_constant<kiln_type, KILN_TYPE_BYTES> {};

} // namespace kiln
