// The result type every fallible kiln operation returns: a value or a kiln::error.
#pragma once

#include <cassert>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <variant>

namespace kiln {

/// An error: a typed code (one of the kiln `*_errc` enums, or a `std::errc` from a syscall)
/// plus a human-readable detail that names what failed ("vector 14 at rip 0x1234, cr2 0x0").
struct error {
  std::error_code code;
  std::string detail;

  error() = default;
  error(std::error_code c, std::string d = {}) : code(c), detail(std::move(d)) {}
  template <class E>
  requires std::is_error_code_enum_v<E> error(E e, std::string d = {})
      : code(make_error_code(e)), detail(std::move(d)) {}

  /// "<category message>: <detail>", or just the message when there is no detail.
  std::string message() const {
    std::string m = code.message();
    if (!detail.empty()) {
      m += ": ";
      m += detail;
    }
    return m;
  }
};

/// An error from the current `errno`, naming the call that failed.
error errno_error(const char* what);

template <class T> class [[nodiscard]] result {
public:
  result(T value) : v_(std::in_place_index<0>, std::move(value)) {}
  result(error e) : v_(std::in_place_index<1>, std::move(e)) {}
  template <class E>
  requires std::is_error_code_enum_v<E> result(E e) : v_(std::in_place_index<1>, error(e)) {}

  bool has_value() const noexcept { return v_.index() == 0; }
  explicit operator bool() const noexcept { return has_value(); }

  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T* operator->() { return &std::get<0>(v_); }
  const T* operator->() const { return &std::get<0>(v_); }
  T& operator*() & { return std::get<0>(v_); }
  const T& operator*() const& { return std::get<0>(v_); }
  T&& operator*() && { return std::get<0>(std::move(v_)); }

  const error& err() const& { return std::get<1>(v_); }
  error&& err() && { return std::get<1>(std::move(v_)); }
  std::error_code code() const { return has_value() ? std::error_code{} : err().code; }

private:
  std::variant<T, error> v_;
};

template <> class [[nodiscard]] result<void> {
public:
  result() = default;
  result(error e) : e_(std::move(e)), failed_(true) {}
  template <class E>
  requires std::is_error_code_enum_v<E> result(E e) : e_(error(e)), failed_(true) {}

  bool has_value() const noexcept { return !failed_; }
  explicit operator bool() const noexcept { return !failed_; }
  void value() const {}
  const error& err() const& { return e_; }
  error&& err() && { return std::move(e_); }
  std::error_code code() const { return failed_ ? e_.code : std::error_code{}; }

private:
  error e_;
  bool failed_ = false;
};

inline result<void> ok() {
  return {};
}

} // namespace kiln

/// Evaluates `expr` (a result); on error, returns the error from the enclosing function.
#define KILN_TRY(expr)                                                                             \
  do {                                                                                             \
    if (auto&& kiln_try_r_ = (expr); !kiln_try_r_) return std::move(kiln_try_r_).err();            \
  } while (0)

/// `KILN_TRY_ASSIGN(auto x, expr);` declares x from a result's value or returns its error.
#define KILN_TRY_ASSIGN_IMPL(tmp, decl, expr)                                                      \
  auto tmp = (expr);                                                                               \
  if (!tmp) return std::move(tmp).err();                                                           \
  decl = std::move(tmp).value()
#define KILN_CONCAT2(a, b) a##b
#define KILN_CONCAT(a, b) KILN_CONCAT2(a, b)
#define KILN_TRY_ASSIGN(decl, expr)                                                                \
  KILN_TRY_ASSIGN_IMPL(KILN_CONCAT(kiln_try_, __LINE__), decl, expr)
