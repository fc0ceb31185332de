// Host functions a guest may call: registered by name with a signature deduced from C++ types.
#pragma once

#include <kiln/guest/abi.h>
#include <kiln/runtime/value.hpp>
#include <kiln/support/result.hpp>

#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace kiln {

/// The outcome of a host function as the guest will see it.
struct host_call_outcome {
  kiln_status status = KILN_STATUS_OK;
  value result;        // when status is OK
  std::string message; // otherwise
};

/// A registered host function: name, signature and a type-erased body that receives arguments
/// already checked against the signature.
struct host_function {
  std::string name;
  std::vector<kiln_type> params;
  kiln_type returns = KILN_TYPE_VOID;
  std::function<result<value>(std::span<const value>)> body;
};

namespace detail {
template <class T> struct callable_traits : callable_traits<decltype(&T::operator())> {};
template <class R, class... A> struct callable_traits<R (*)(A...)> {
  using ret = R;
  using args = std::tuple<std::remove_cvref_t<A>...>;
};
template <class R, class C, class... A>
struct callable_traits<R (C::*)(A...)> : callable_traits<R (*)(A...)> {};
template <class R, class C, class... A>
struct callable_traits<R (C::*)(A...) const> : callable_traits<R (*)(A...)> {};
template <class R, class C, class... A>
struct callable_traits<R (C::*)(A...) noexcept> : callable_traits<R (*)(A...)> {};
template <class R, class C, class... A>
struct callable_traits<R (C::*)(A...) const noexcept> : callable_traits<R (*)(A...)> {};
template <class R, class... A>
struct callable_traits<R (*)(A...) noexcept> : callable_traits<R (*)(A...)> {};

template <class T> struct unwrap_result {
  using type = T;
  static constexpr bool is_result = false;
};
template <class T> struct unwrap_result<result<T>> {
  using type = T;
  static constexpr bool is_result = true;
};

template <class T> value to_value(T&& v) {
  return value{std::forward<T>(v)};
}
} // namespace detail

/// The set of host functions of a sandbox. Plain data: copy it to give several sandboxes the
/// same functions. Not thread-safe while being modified.
class host_functions {
public:
  /// Registers `f` under `name`. Parameters and the return type must be among int32_t, int64_t,
  /// uint64_t, double, bool, std::string, kiln::bytes (return: also void, or kiln::result<T>
  /// whose error reaches the guest as KILN_STATUS_FAILED with its message). A function that
  /// throws reaches the guest as KILN_STATUS_HOST_ERROR; the host carries on. Re-registering a
  /// name replaces the earlier function.
  template <class F> host_functions& add(std::string name, F f) {
    using traits = detail::callable_traits<std::decay_t<F>>;
    return add_typed(std::move(name), std::move(f), static_cast<typename traits::args*>(nullptr),
                     static_cast<typename traits::ret*>(nullptr));
  }

  /// Registers a function with an explicit signature and a type-erased body.
  host_functions& add_raw(host_function fn);

  const host_function* find(std::string_view name) const;
  std::size_t size() const noexcept { return functions_.size(); }

  /// Calls `name` with `args`: checks existence, arity and types, and turns exceptions and
  /// errors into the status the guest receives. Never throws.
  host_call_outcome invoke(std::string_view name, std::span<const value> args) const noexcept;

private:
  template <class F, class... A, class R>
  host_functions& add_typed(std::string name, F f, std::tuple<A...>*, R*) {
    using plain = typename detail::unwrap_result<R>::type;
    host_function h;
    h.name = name;
    h.params = {wire_type<A>::value...};
    h.returns = wire_type<plain>::value;
    h.body = [f = std::move(f)](std::span<const value> args) -> result<value> {
      return call_with(f, args, std::index_sequence_for<A...>{},
                       static_cast<std::tuple<A...>*>(nullptr), static_cast<R*>(nullptr));
    };
    return add_raw(std::move(h));
  }

  template <class F, std::size_t... I, class... A, class R>
  static result<value> call_with(const F& f, std::span<const value> args, std::index_sequence<I...>,
                                 std::tuple<A...>*, R*) {
    if constexpr (std::is_void_v<R>) {
      f(std::get<A>(args[I])...);
      return value{};
    } else if constexpr (detail::unwrap_result<R>::is_result) {
      auto r = f(std::get<A>(args[I])...);
      if (!r) return std::move(r).err();
      if constexpr (std::is_void_v<typename detail::unwrap_result<R>::type>)
        return value{};
      else
        return value{std::move(r).value()};
    } else {
      return value{f(std::get<A>(args[I])...)};
    }
  }

  std::map<std::string, host_function, std::less<>> functions_;
};

} // namespace kiln
