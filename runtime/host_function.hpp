// Host functions a guest may call: registered by name with a signature deduced from C++ types.
// Asio-free: coroutine host functions are completed by <kiln/runtime/awaitable_host.hpp>.
#pragma once

#include <kiln/guest/abi.h>
#include <kiln/runtime/value.hpp>
#include <kiln/support/result.hpp>

#include <atomic>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

namespace kiln {

/// The outcome of a host function as the guest will see it.
struct host_call_outcome {
  kiln_status status = KILN_STATUS_OK;
  value result;        // when status is OK
  std::string message; // otherwise
};

/// Delivers an asynchronous host function's outcome. Call it exactly once, from any thread.
using host_completion = std::function<void(host_call_outcome)>;

/// Where an asynchronous host function was called from: the worker of the sandbox whose guest
/// called it. Defined, with the worker's executor, in <kiln/runtime/awaitable_host.hpp>.
class host_context;

/// A registered host function: name, signature and a type-erased body that receives arguments
/// already checked against the signature. Exactly one of `body` (synchronous: runs on the
/// sandbox's thread while the guest waits) and `async_body` is set.
struct host_function {
  std::string name;
  std::vector<kiln_type> params;
  kiln_type returns = KILN_TYPE_VOID;
  std::function<result<value>(std::span<const value>)> body;
  /// Asynchronous form: starts the work and returns; `done` is called later, from any thread.
  /// `where` names the sandbox's worker (where an awaitable body is spawned). The sandbox is
  /// parked meanwhile and its worker serves others. Only kiln::runtime calls these.
  std::function<void(std::vector<value> args, const host_context& where, host_completion done)>
      async_body;
  bool is_async() const noexcept { return static_cast<bool>(async_body); }
};

/// The reply handle an asynchronous host function receives as its last argument. Copyable; the
/// first call of reply(v) or fail(msg) wins, from any thread. If every copy is destroyed
/// without a reply, the guest receives KILN_STATUS_HOST_ERROR ("dropped its reply").
template <class R> class host_reply {
public:
  explicit host_reply(host_completion done) : state_(std::make_shared<state>(std::move(done))) {}

  template <class V = R>
  requires(!std::is_void_v<R>) void operator()(V v) const {
    deliver({KILN_STATUS_OK, value{R(std::move(v))}, {}});
  }
  void operator()() const requires std::is_void_v<R> { deliver({KILN_STATUS_OK, value{}, {}}); }
  /// The guest sees KILN_STATUS_FAILED with `message`.
  void fail(std::string message) const {
    deliver({KILN_STATUS_FAILED, value{}, std::move(message)});
  }

private:
  struct state {
    explicit state(host_completion d) : done(std::move(d)) {}
    ~state() {
      if (!used.exchange(true))
        done({KILN_STATUS_HOST_ERROR, value{}, "asynchronous host function dropped its reply"});
    }
    host_completion done;
    std::atomic<bool> used{false};
  };
  void deliver(host_call_outcome o) const {
    if (!state_->used.exchange(true)) state_->done(std::move(o));
  }
  std::shared_ptr<state> state_;
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

/// The async_body of a coroutine host function F(A...) returning the awaitable Aw, with its
/// `result_type`. Defined in <kiln/runtime/awaitable_host.hpp> (which kiln/runtime/runtime.hpp
/// includes): host_functions::add_awaitable needs it complete.
template <class F, class Aw, class... A> struct awaitable_body;
template <class Sig> struct signature;
template <class R, class... A> struct signature<R(A...)> {
  using ret = R;
  using args = std::tuple<A...>;
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

  /// Registers an asynchronous host function with the signature `Sig`, e.g.
  /// `add_async<std::int64_t(std::int64_t)>("lookup", [](std::int64_t key, host_reply<std::int64_t>
  /// reply) {...})`. `f` receives the arguments and a host_reply<R> and returns at once; the reply
  /// may come later from any thread. While it is outstanding the sandbox is parked and its worker
  /// serves other sandboxes. A synchronous sandbox::call() answers such a function with
  /// KILN_STATUS_HOST_ERROR: asynchronous host functions need kiln::runtime.
  template <class Sig, class F> host_functions& add_async(std::string name, F f) {
    using sig = detail::signature<Sig>;
    return add_async_typed(std::move(name), std::move(f), static_cast<typename sig::args*>(nullptr),
                           static_cast<typename sig::ret*>(nullptr));
  }

  /// Registers a coroutine host function: `f(args...)` returns boost::asio::awaitable<R>; it is
  /// spawned on the sandbox's worker, which serves others while it is suspended. An exception
  /// reaches the guest as KILN_STATUS_HOST_ERROR. Needs <kiln/runtime/awaitable_host.hpp>
  /// (included by kiln/runtime/runtime.hpp).
  template <class F> host_functions& add_awaitable(std::string name, F f) {
    using traits = detail::callable_traits<std::decay_t<F>>;
    return add_awaitable_typed(std::move(name), std::move(f),
                               static_cast<typename traits::args*>(nullptr),
                               static_cast<typename traits::ret*>(nullptr));
  }

  /// Registers a function with an explicit signature and a type-erased body.
  ///
  /// Every add refuses a function the guest could never call and a snapshot could never
  /// record: an empty name, a name over KILN_MAX_NAME bytes, over KILN_MAX_ARGS parameters
  /// (the typed adds check the count when they compile). A refused function is not registered;
  /// the first refusal is kept (refused()), and creating a sandbox with these functions fails
  /// with errc::bad_arguments naming it, so a mistake cannot go unnoticed.
  host_functions& add_raw(host_function fn);

  /// The first registration refused, if any (errc::bad_arguments, naming the function).
  const std::optional<error>& refused() const noexcept { return refused_; }

  /// Checks that `name` exists and `args` fit its signature. Returns the function, or the
  /// outcome to send back to the guest (NOT_FOUND, ARG_COUNT, ARG_TYPE).
  std::variant<const host_function*, host_call_outcome> check(std::string_view name,
                                                              std::span<const value> args) const;

  const host_function* find(std::string_view name) const;
  std::size_t size() const noexcept { return functions_.size(); }
  /// Calls `f(const host_function&)` for every registered function, in name order.
  template <class F> void for_each(F&& f) const {
    for (const auto& [name, fn] : functions_)
      f(fn);
  }

  /// Calls `name` with `args`: checks existence, arity and types, and turns exceptions and
  /// errors into the status the guest receives. Never throws.
  host_call_outcome invoke(std::string_view name, std::span<const value> args) const noexcept;

private:
  template <class F, class... A, class R>
  host_functions& add_typed(std::string name, F f, std::tuple<A...>*, R*) {
    check_arity<A...>();
    using plain = typename detail::unwrap_result<R>::type;
    host_function h;
    h.name = std::move(name);
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

  template <class F, class... A, class R>
  host_functions& add_async_typed(std::string name, F f, std::tuple<A...>*, R*) {
    check_arity<A...>();
    host_function h;
    h.name = std::move(name);
    h.params = {wire_type<A>::value...};
    h.returns = wire_type<R>::value;
    h.async_body = [f = std::move(f)](std::vector<value> args, const host_context&,
                                      host_completion done) {
      host_reply<R> reply(std::move(done));
      try {
        start_with(f, args, reply, std::index_sequence_for<A...>{},
                   static_cast<std::tuple<A...>*>(nullptr));
      } catch (const std::exception& e) {
        reply.fail(std::string("host function threw: ") + e.what());
      } catch (...) {
        reply.fail("host function threw a non-standard exception");
      }
    };
    return add_raw(std::move(h));
  }

  template <class F, std::size_t... I, class... A, class R>
  static void start_with(const F& f, std::vector<value>& args, const host_reply<R>& reply,
                         std::index_sequence<I...>, std::tuple<A...>*) {
    f(std::move(std::get<A>(args[I]))..., reply);
  }

  template <class F, class... A, class Aw>
  host_functions& add_awaitable_typed(std::string name, F f, std::tuple<A...>*, Aw*) {
    check_arity<A...>();
    using body = detail::awaitable_body<F, Aw, A...>;
    host_function h;
    h.name = std::move(name);
    h.params = {wire_type<A>::value...};
    h.returns = wire_type<typename body::result_type>::value;
    h.async_body = body{std::move(f)};
    return add_raw(std::move(h));
  }

  template <class... A> static constexpr void check_arity() {
    static_assert(sizeof...(A) <= KILN_MAX_ARGS, "a host function takes at most 32 parameters");
  }

  std::map<std::string, host_function, std::less<>> functions_;
  std::optional<error> refused_;
};

} // namespace kiln
