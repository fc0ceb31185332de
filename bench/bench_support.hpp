// Helpers shared by the benchmarks: a guest call that must succeed with a value of one type.
#pragma once

#include <kiln/runtime/sandbox.hpp>

#include <fmt/format.h>

#include <cstdlib>
#include <string_view>
#include <variant>

namespace kiln::bench {

/// Calls `fn` and returns its result as a T; a failure ends the benchmark with a message.
template <class T> T call(kiln::sandbox& sb, std::string_view fn, auto... args) {
  auto r = sb.call(fn, args...);
  if (!r || !std::holds_alternative<T>(*r)) {
    fmt::print(stderr, "{} failed: {}\n", fn, r ? kiln::to_string(*r) : r.err().message());
    std::exit(1);
  }
  return std::get<T>(*r);
}

/// Runs `body(kind)` for each backend usable here, printing a heading per backend and the
/// reason a backend is skipped.
template <class F> void for_each_backend(F&& body) {
  for (auto kind : {kiln::vcpu::backend_kind::kvm, kiln::vcpu::backend_kind::emulated}) {
    const auto st = kiln::vcpu::probe(kind);
    fmt::print("=== {} backend ===\n", kiln::vcpu::to_string(kind));
    if (!st.usable) {
      fmt::print("skipped: {}\n", st.reason);
      continue;
    }
    body(kind);
  }
}

} // namespace kiln::bench
