// Names and printable forms of kiln values.
#include <kiln/runtime/value.hpp>

#include <fmt/format.h>

#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstdlib>

namespace kiln {

const char* type_name(kiln_type t) noexcept {
  switch (t) {
  case KILN_TYPE_VOID:
    return "void";
  case KILN_TYPE_I32:
    return "i32";
  case KILN_TYPE_I64:
    return "i64";
  case KILN_TYPE_U64:
    return "u64";
  case KILN_TYPE_F64:
    return "f64";
  case KILN_TYPE_BOOL:
    return "bool";
  case KILN_TYPE_STRING:
    return "string";
  case KILN_TYPE_BYTES:
    return "bytes";
  }
  return "unknown";
}

std::string to_string(const value& v) {
  struct printer {
    std::string operator()(std::monostate) const { return "void"; }
    std::string operator()(std::int32_t x) const { return std::to_string(x); }
    std::string operator()(std::int64_t x) const { return std::to_string(x); }
    std::string operator()(std::uint64_t x) const { return std::to_string(x); }
    std::string operator()(double x) const { return fmt::format("{}", x); }
    std::string operator()(bool x) const { return x ? "true" : "false"; }
    std::string operator()(const std::string& s) const { return s; }
    std::string operator()(const bytes& b) const {
      std::string out = "0x";
      for (std::byte c : b)
        out += fmt::format("{:02x}", static_cast<unsigned>(c));
      return out;
    }
  };
  return std::visit(printer{}, v);
}

namespace {

error bad_value(std::string_view text, const char* why) {
  return error(std::make_error_code(std::errc::invalid_argument),
               fmt::format("'{}': {}", text, why));
}

template <class T> result<value> parse_int(std::string_view full, std::string_view digits) {
  T v{};
  auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), v, 10);
  if (ec == std::errc::result_out_of_range)
    return error(std::make_error_code(std::errc::result_out_of_range),
                 fmt::format("'{}': out of range", full));
  if (ec != std::errc{} || end != digits.data() + digits.size() || digits.empty())
    return bad_value(full, "not an integer");
  return value{v};
}

result<value> parse_f64(std::string_view full, std::string_view digits) {
  std::string s(digits);
  // strtod skips leading white space; integers do not, and neither do we.
  if (s.empty() || std::isspace(static_cast<unsigned char>(s.front())))
    return bad_value(full, "not a number");
  char* end = nullptr;
  errno = 0;
  const double d = std::strtod(s.c_str(), &end);
  if (end != s.c_str() + s.size()) return bad_value(full, "not a number");
  if (errno == ERANGE)
    return error(std::make_error_code(std::errc::result_out_of_range),
                 fmt::format("'{}': out of range", full));
  return value{d};
}

} // namespace

result<value> parse_value(std::string_view text) {
  if (text == "true") return value{true};
  if (text == "false") return value{false};
  if (text == "void") return value{};
  if (text.starts_with("str:")) return value{std::string(text.substr(4))};
  if (text.starts_with("hex:")) {
    const auto hex = text.substr(4);
    if (hex.size() % 2) return bad_value(text, "odd number of hex digits");
    bytes out(hex.size() / 2);
    for (std::size_t i = 0; i < out.size(); ++i) {
      unsigned b = 0;
      auto [end, ec] = std::from_chars(hex.data() + 2 * i, hex.data() + 2 * i + 2, b, 16);
      if (ec != std::errc{} || end != hex.data() + 2 * i + 2) return bad_value(text, "not hex");
      out[i] = static_cast<std::byte>(b);
    }
    return value{std::move(out)};
  }
  if (auto colon = text.rfind(':'); colon != std::string_view::npos) {
    const auto num = text.substr(0, colon), type = text.substr(colon + 1);
    if (type == "i32") return parse_int<std::int32_t>(text, num);
    if (type == "i64") return parse_int<std::int64_t>(text, num);
    if (type == "u64") return parse_int<std::uint64_t>(text, num);
    if (type == "f64") return parse_f64(text, num);
    return bad_value(text, "unknown type suffix (use i32, i64, u64, f64, or str:/hex: prefixes)");
  }
  if (text.find_first_of(".eE") != std::string_view::npos || text == "inf" || text == "-inf" ||
      text == "nan")
    return parse_f64(text, text);
  return parse_int<std::int32_t>(text, text);
}

} // namespace kiln
