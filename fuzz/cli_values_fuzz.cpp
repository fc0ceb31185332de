// libFuzzer target: the values the kiln CLI parses from its arguments (backend, sizes, load
// mode, mapped files, call arguments), each line of the input as one argument.
#include "cli_values.hpp"

#include <kiln/vcpu/vcpu.hpp>
#include <kiln/vcpu/vcpu_errc.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace {

using namespace kiln;

[[noreturn]] void fail() {
  __builtin_trap();
}

/// The text parsers refuse with std::errc::invalid_argument or result_out_of_range, and say
/// what they refused.
void check_text_error(const error& e) {
  if (e.code != std::errc::invalid_argument && e.code != std::errc::result_out_of_range) fail();
  if (e.detail.empty()) fail();
}

void check_size(std::string_view text) {
  auto v = cli::parse_size(text);
  if (!v) {
    check_text_error(v.err());
    return;
  }
  // The number alone, in bytes, reads back the same; so does the count of KiB for a multiple.
  auto plain = cli::parse_size(std::to_string(*v));
  if (!plain || *plain != *v) fail();
  if (*v % 1024 == 0) {
    auto kib = cli::parse_size(std::to_string(*v / 1024) + "KiB");
    if (!kib || *kib != *v) fail();
  }
}

void check_load_mode(std::string_view text) {
  auto m = cli::parse_load_mode(text);
  if (!m) {
    check_text_error(m.err());
    return;
  }
  if (text != "prefetch" && text != "demand" && text != "eager") fail();
}

void check_file_mapping(std::string_view text) {
  auto f = cli::parse_file_mapping(text);
  if (!f) {
    check_text_error(f.err());
    return;
  }
  // PATH or PATH=NAME, nothing lost or added; a name never holds '='.
  if (f->path.empty() || f->name.find('=') != std::string::npos) fail();
  if ((f->name.empty() ? f->path : f->path + "=" + f->name) != text) fail();
}

void check_backend(std::string_view text) {
  auto b = vcpu::parse_backend_choice(text);
  if (!b && b.code() != vcpu::vcpu_errc::unknown_backend) fail();
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  std::vector<std::string> args;
  for (std::size_t at = 0; at <= in.size();) {
    const auto nl = std::min(in.find('\n', at), in.size());
    args.emplace_back(in.substr(at, nl - at));
    at = nl + 1;
  }
  std::error_code first_bad;
  for (const auto& a : args) {
    check_size(a);
    check_load_mode(a);
    check_file_mapping(a);
    check_backend(a);
    auto v = parse_value(a);
    if (!v) check_text_error(v.err());
    if (!v && !first_bad) first_bad = v.code();
  }
  // The call's arguments are all taken or refused for the first bad one, by its error.
  auto all = cli::parse_call_args(args);
  if (all ? (first_bad || all->size() != args.size()) : all.code() != first_bad) fail();
  return 0;
}
