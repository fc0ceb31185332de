// The values the kiln CLI takes as text (sizes, load modes, mapped files, call arguments),
// parsed without I/O so the CLI, its tests and a fuzzer share one parser.
#pragma once

#include <kiln/runtime/sandbox.hpp>
#include <kiln/runtime/value.hpp>
#include <kiln/support/result.hpp>

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace kiln::cli {

/// A size in bytes: decimal digits, then an optional unit, in any case: `B`, or `K`, `M` or `G`
/// (powers of 1024: sizes are bytes, never bits) alone or followed by `B` or `iB`. "4096",
/// "256K", "16M", "64MiB", "1gb". Errors: std::errc::invalid_argument (no digits, an unknown unit,
/// anything else in the text), std::errc::result_out_of_range (more than 64 bits of bytes); the
/// detail quotes `text`.
result<std::uint64_t> parse_size(std::string_view text);

/// --load: `prefetch`, `demand` or `eager`. Errors: std::errc::invalid_argument.
result<load_mode> parse_load_mode(std::string_view text);

/// --map-file: `PATH`, or `PATH=NAME` to name the file for the guest (the last `=` splits, so
/// a path may hold one). A plain PATH leaves the name empty: the guest finds the file under its
/// file name. Errors: std::errc::invalid_argument for an empty path or name, or a NUL byte.
result<file_mapping> parse_file_mapping(std::string_view text);

/// A call's arguments, each as parse_value takes it (5, 5:i64, 2.5, true, str:text, hex:0a0b).
/// Errors: parse_value's, the detail naming the argument by position (from 1).
result<std::vector<value>> parse_call_args(std::span<const std::string> args);

} // namespace kiln::cli
