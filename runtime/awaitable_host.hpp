// Coroutine host functions: host_functions::add_awaitable spawns the function's
// boost::asio::awaitable on the worker of the sandbox that called it. Kept apart from
// host_function.hpp so that the synchronous API compiles without Asio.
#pragma once

#include <kiln/runtime/host_function.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>

#include <exception>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace kiln {

/// Where an asynchronous host function was called from: the worker of the calling sandbox.
class host_context {
public:
  explicit host_context(boost::asio::any_io_executor ex) : ex_(std::move(ex)) {}
  /// The worker's executor: a coroutine host function is spawned here.
  const boost::asio::any_io_executor& executor() const noexcept { return ex_; }

private:
  boost::asio::any_io_executor ex_;
};

namespace detail {

template <class T> struct unwrap_awaitable;
template <class T, class E> struct unwrap_awaitable<boost::asio::awaitable<T, E>> {
  using type = T;
};

template <class F, class Aw, class... A> struct awaitable_body {
  using result_type = typename unwrap_awaitable<Aw>::type;
  F fn;

  void operator()(std::vector<value> args, const host_context& where, host_completion done) const {
    auto co = [](F f, std::vector<value> a) -> Aw {
      co_return co_await std::apply([&](auto&&... v) { return f(std::move(v)...); },
                                    take(a, std::index_sequence_for<A...>{}));
    };
    boost::asio::co_spawn(where.executor(), co(fn, std::move(args)),
                          [done = std::move(done)](std::exception_ptr e, auto... r) {
                            host_call_outcome o;
                            if (e) {
                              o.status = KILN_STATUS_HOST_ERROR;
                              try {
                                std::rethrow_exception(e);
                              } catch (const std::exception& x) {
                                o.message = std::string("host function threw: ") + x.what();
                              } catch (...) {
                                o.message = "host function threw a non-standard exception";
                              }
                            } else if constexpr (sizeof...(r) == 1) {
                              o.result = value{std::move(r)...};
                            }
                            done(std::move(o));
                          });
  }

  template <std::size_t... I>
  static std::tuple<A...> take(std::vector<value>& a, std::index_sequence<I...>) {
    return std::tuple<A...>(std::move(std::get<A>(a[I]))...);
  }
};

} // namespace detail
} // namespace kiln
