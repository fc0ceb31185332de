// cli_values: the CLI's text values, each parsed whole or refused with a typed error.
#include "cli_values.hpp"

#include <fmt/format.h>

#include <system_error>

namespace kiln::cli {
namespace {

error invalid(std::string_view text, const char* why) {
  return error(std::make_error_code(std::errc::invalid_argument),
               fmt::format("'{}': {}", text, why));
}

/// Whether `s` is `lower` in any case.
bool equals_any_case(std::string_view s, std::string_view lower) {
  if (s.size() != lower.size()) return false;
  for (std::size_t i = 0; i < s.size(); ++i)
    if (s[i] != lower[i] && s[i] != lower[i] - ('a' - 'A')) return false;
  return true;
}

/// The multiplier a size's unit names, or 0 for none kiln knows.
std::uint64_t unit_multiplier(std::string_view unit) {
  if (unit.empty() || equals_any_case(unit, "b")) return 1;
  std::uint64_t mult = 0;
  switch (unit.front()) {
  case 'k':
  case 'K':
    mult = 1ull << 10;
    break;
  case 'm':
  case 'M':
    mult = 1ull << 20;
    break;
  case 'g':
  case 'G':
    mult = 1ull << 30;
    break;
  default:
    return 0;
  }
  const auto rest = unit.substr(1);
  return rest.empty() || equals_any_case(rest, "b") || equals_any_case(rest, "ib") ? mult : 0;
}

} // namespace

result<std::uint64_t> parse_size(std::string_view text) {
  const auto digits_end = text.find_first_not_of("0123456789");
  const auto digits = text.substr(0, digits_end);
  const auto unit =
      digits_end == std::string_view::npos ? std::string_view{} : text.substr(digits_end);
  if (digits.empty()) return invalid(text, "a size starts with decimal digits (e.g. 16M, 1G)");
  const std::uint64_t mult = unit_multiplier(unit);
  if (mult == 0) return invalid(text, "unknown unit (use B, K, M or G, optionally with B or iB)");
  std::uint64_t v = 0;
  for (const char c : digits)
    if (__builtin_mul_overflow(v, 10, &v) || __builtin_add_overflow(v, c - '0', &v))
      return error(std::make_error_code(std::errc::result_out_of_range),
                   fmt::format("'{}': more than 64 bits of bytes", text));
  if (__builtin_mul_overflow(v, mult, &v))
    return error(std::make_error_code(std::errc::result_out_of_range),
                 fmt::format("'{}': more than 64 bits of bytes", text));
  return v;
}

result<load_mode> parse_load_mode(std::string_view text) {
  if (text == "prefetch") return load_mode::prefetch;
  if (text == "demand") return load_mode::demand;
  if (text == "eager") return load_mode::eager;
  return invalid(text, "the load mode is prefetch, demand or eager");
}

result<file_mapping> parse_file_mapping(std::string_view text) {
  if (text.find('\0') != std::string_view::npos) return invalid(text, "a NUL byte in the path");
  file_mapping f;
  const auto eq = text.rfind('=');
  f.path = std::string(text.substr(0, eq));
  if (eq != std::string_view::npos) {
    f.name = std::string(text.substr(eq + 1));
    if (f.name.empty()) return invalid(text, "an empty name after '=' (use PATH or PATH=NAME)");
  }
  if (f.path.empty()) return invalid(text, "an empty path (use PATH or PATH=NAME)");
  return f;
}

result<std::vector<value>> parse_call_args(std::span<const std::string> args) {
  std::vector<value> out;
  out.reserve(args.size());
  for (std::size_t i = 0; i < args.size(); ++i) {
    auto v = parse_value(args[i]);
    if (!v) return error(v.err().code, fmt::format("argument {}: {}", i + 1, v.err().detail));
    out.push_back(std::move(*v));
  }
  return out;
}

} // namespace kiln::cli
