// Host side of the call wire format (guest/abi.h): encode into a buffer, decode from a copy.
#pragma once

#include <kiln/guest/abi.h>
#include <kiln/runtime/value.hpp>
#include <kiln/support/result.hpp>

#include <cstddef>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace kiln::wire {

/// A decoded message. For CALL/HOST_CALL `name` and `values` (the arguments) are set; for
/// RESULT/HOST_RESULT, `status` and either one value (OK) or `error_message`.
struct message {
  kiln_msg_kind kind{};
  kiln_status status = KILN_STATUS_OK;
  std::string name;
  std::vector<value> values;
  std::string error_message;
};

/// Encodes a CALL or HOST_CALL. Returns the bytes written, or errc::result_too_large.
result<std::size_t> encode_call(std::span<std::byte> out, kiln_msg_kind kind, std::string_view name,
                                std::span<const value> args);

/// Encodes a RESULT or HOST_RESULT carrying a value (status OK).
result<std::size_t> encode_result(std::span<std::byte> out, kiln_msg_kind kind, const value& v);

/// Encodes a RESULT or HOST_RESULT carrying an error status and message (truncated to fit).
result<std::size_t> encode_error(std::span<std::byte> out, kiln_msg_kind kind, kiln_status status,
                                 std::string_view message);

/// Decodes a message of kind `expected` from `in`, which the caller copied out of guest memory.
/// Every length is checked against what remains before anything is allocated; the payload size
/// must match the header exactly. Errors are errc::malformed_message with what was wrong.
result<message> decode(std::span<const std::byte> in, kiln_msg_kind expected);

} // namespace kiln::wire
