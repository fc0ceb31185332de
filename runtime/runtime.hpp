// kiln::runtime: an Asio reactor of vCPU workers that runs sandboxes asynchronously.
//
// Threading model
//   A runtime owns N worker threads, each running its own io_context, and one service thread
//   (its own io_context) that keeps deadlines, preempts long guest runs and delivers kicks.
//   Each sandbox is bound to one worker for its whole life: its vCPU is created, run and
//   destroyed on that thread, and all its state is touched only there, so the call path takes
//   no locks. A call issued from code already running on the sandbox's worker crosses no
//   thread; from elsewhere it is posted to the worker once.
//
// Completion tokens
//   Every async_* function takes an Asio completion token: a callback, boost::asio::use_future,
//   boost::asio::use_awaitable, boost::asio::deferred, or anything else Asio accepts. The
//   completion runs on the handler's associated executor (by default the sandbox's worker) and
//   the handler's cancellation slot is honoured (see async_call).
#pragma once

#include <kiln/runtime/awaitable_host.hpp>
#include <kiln/runtime/sandbox.hpp>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/system/error_code.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace kiln {

using error_code = boost::system::error_code;

struct runtime_options {
  unsigned workers = 0; // 0: one per hardware thread
  /// A guest that computes longer than this is kicked and re-queued behind the other work of
  /// its worker, so a neighbour's call waits at most about one slice.
  std::chrono::microseconds time_slice{10'000};
  /// Calls waiting per sandbox (the running one excluded); beyond it errc::queue_full.
  std::size_t max_queued_calls = 1024;
  /// Once this many sandboxes were destroyed since the last time, the runtime hands the memory
  /// they freed back to the system (glibc's malloc_trim(0)), on a thread of its own, when
  /// destruction pauses for 100 ms, or every second while it goes on and once more after.
  /// Without it the C library keeps freed memory for reuse: 2,000 emulated sandboxes destroyed
  /// left 1.9 GiB resident, and the trim that gave it back took 167 ms. 0: never.
  std::uint32_t return_memory_after = 64;
};

struct call_options {
  /// Deadline measured from the call's submission (queueing included); zero: none.
  std::chrono::steady_clock::duration timeout{};
};

struct runtime_stats {
  std::uint64_t sandboxes = 0; // alive now
  std::uint64_t calls = 0;     // guest calls completed, successfully or not
  // Sandbox operations completed, successfully or not; each is queued in order with the calls.
  std::uint64_t maps = 0, unmaps = 0, snapshots = 0, restores = 0;
  std::uint64_t preemptions = 0;    // time slices that ended with a kick
  std::uint64_t stale_kicks = 0;    // kicks that arrived after their call had finished
  std::uint64_t memory_returns = 0; // trims done (runtime_options::return_memory_after)
};

namespace detail {
struct runtime_impl;
struct sandbox_core;
using call_handler = boost::asio::any_completion_handler<void(error_code, value)>;
using destroy_handler = boost::asio::any_completion_handler<void(error_code)>;
/// What a queued entry is: a guest call, or one of the sandbox operations that run on the
/// worker in queue order between calls.
enum class op_kind : std::uint8_t { call, map_file, unmap_file, snapshot, restore };
/// An operation's completion, before its result is attached (see deliver_as).
using op_handler = boost::asio::any_completion_handler<void(error_code)>;
} // namespace detail

class async_sandbox;

namespace detail {
/// Adapts an operation's handler of void(error_code, T) to the queue's void(error_code), keeping
/// its associated executor and cancellation slot; the T comes from `result`, which the
/// operation's body filled on success.
template <class T, class Handler>
op_handler deliver_as(Handler handler, std::shared_ptr<T> result) {
  auto ex = boost::asio::get_associated_executor(handler);
  auto slot = boost::asio::get_associated_cancellation_slot(handler);
  return op_handler(boost::asio::bind_cancellation_slot(
      slot, boost::asio::bind_executor(ex, [h = std::move(handler), result](error_code ec) mutable {
        std::move(h)(ec, ec ? T{} : std::move(*result));
      })));
}

using create_handler = boost::asio::any_completion_handler<void(error_code, async_sandbox)>;
void start_call(const std::shared_ptr<sandbox_core>& core, std::string name,
                std::vector<value> args, call_options options, call_handler handler);
/// Queues `body` to run on the sandbox's worker, in order with the calls, and completes
/// `handler` with its error (or none).
void start_operation(const std::shared_ptr<sandbox_core>& core, op_kind kind, op_handler handler,
                     std::function<result<void>(sandbox&)> body);
void start_destroy(const std::shared_ptr<sandbox_core>& core, destroy_handler handler);
void start_create(const std::shared_ptr<runtime_impl>& rt, sandbox_config config,
                  host_functions functions, create_handler handler);
void start_create_from(const std::shared_ptr<runtime_impl>& rt, snapshot snap,
                       sandbox_config config, host_functions functions, create_handler handler);
/// Runs `make` on the least loaded worker and completes `handler` with the sandbox it made.
void create_on_worker(const std::shared_ptr<runtime_impl>& rt, create_handler handler,
                      std::function<result<std::unique_ptr<sandbox>>(runtime_impl&)> make);
} // namespace detail

/// A handle to a sandbox running under a kiln::runtime. Copyable; copies name the same sandbox.
/// All members are thread-safe. The sandbox lives until async_destroy() completes, the runtime
/// stops, or nothing refers to it any more: once every handle is dropped and its last call has
/// completed, it is destroyed on the thread that let go last. async_destroy() is the way to
/// choose the moment (and the worker thread) yourself.
class async_sandbox {
public:
  async_sandbox() = default;

  /// False for a default-constructed handle or one from a failed async_create.
  explicit operator bool() const noexcept { return core_ != nullptr; }

  /// Calls guest function `name`. Completion: void(error_code, kiln::value).
  ///
  /// Calls to one sandbox run one at a time in submission order; at most
  /// runtime_options::max_queued_calls wait, beyond that the call fails with errc::queue_full.
  /// Errors are kiln::errc values (compare with `ec == kiln::errc::...`), plus
  /// boost::asio::error::operation_aborted when the call was cancelled before it started or
  /// the runtime stopped. A call cancelled (through the handler's cancellation slot, any
  /// cancellation type) or timed out while the guest runs completes with errc::cancelled or
  /// errc::deadline_exceeded and poisons the sandbox, because the guest stopped mid-way. The
  /// same holds while the guest waits for an asynchronous or coroutine host function: the call
  /// completes at once, and the function's reply, if it ever comes, is dropped. A cancellation
  /// after completion does nothing. A coroutine host function that calls the sandbox it serves
  /// (with its own executor, the default) gets errc::reentrant_call: that call could only start
  /// after the function returned. last_error() gives the detail of the most recent failure.
  template <class Token>
  auto async_call(std::string name, std::vector<value> args, call_options options,
                  Token&& token) const {
    return boost::asio::async_initiate<Token, void(error_code, value)>(
        [core = core_](auto handler, std::string n, std::vector<value> a, call_options o) {
          detail::start_call(core, std::move(n), std::move(a), o,
                             detail::call_handler(std::move(handler)));
        },
        token, std::move(name), std::move(args), options);
  }
  template <class Token>
  auto async_call(std::string name, std::vector<value> args, Token&& token) const {
    return async_call(std::move(name), std::move(args), call_options{}, std::forward<Token>(token));
  }

  /// Maps a host file read-only into the sandbox (as sandbox::map_file), on its worker and in
  /// order with the calls queued before it, so the guest sees it from the next call on.
  /// Completion: void(error_code, kiln::mapped_file_info). Errors as sandbox::map_file, plus
  /// errc::queue_full for a full queue and bad_descriptor for a sandbox that is gone.
  /// Cancellation before it runs completes it with operation_aborted.
  template <class Token> auto async_map_file(file_mapping file, Token&& token) const {
    return boost::asio::async_initiate<Token, void(error_code, mapped_file_info)>(
        [core = core_](auto handler, file_mapping f) {
          auto info = std::make_shared<mapped_file_info>();
          detail::start_operation(core, detail::op_kind::map_file,
                                  detail::deliver_as(std::move(handler), info),
                                  [f = std::move(f), info](sandbox& sb) -> result<void> {
                                    KILN_TRY_ASSIGN(*info, sb.map_file(f));
                                    return {};
                                  });
        },
        token, std::move(file));
  }

  /// Unmaps the file mapped under `name`, in order with the calls queued before it.
  /// Completion: void(error_code).
  template <class Token> auto async_unmap_file(std::string name, Token&& token) const {
    return boost::asio::async_initiate<Token, void(error_code)>(
        [core = core_](auto handler, std::string n) {
          detail::start_operation(core, detail::op_kind::unmap_file,
                                  detail::op_handler(std::move(handler)),
                                  [n = std::move(n)](sandbox& sb) { return sb.unmap_file(n); });
        },
        token, std::move(name));
  }

  /// Captures the sandbox (sandbox::take_snapshot) on its worker, after the calls queued before
  /// it. Completion: void(error_code, kiln::snapshot).
  template <class Token> auto async_snapshot(Token&& token) const {
    return boost::asio::async_initiate<Token, void(error_code, snapshot)>(
        [core = core_](auto handler) {
          auto taken = std::make_shared<snapshot>();
          detail::start_operation(core, detail::op_kind::snapshot,
                                  detail::deliver_as(std::move(handler), taken),
                                  [taken](sandbox& sb) -> result<void> {
                                    KILN_TRY_ASSIGN(*taken, sb.take_snapshot());
                                    return {};
                                  });
        },
        token);
  }

  /// Restores the sandbox to `snap` (sandbox::restore) on its worker, after the calls queued
  /// before it; a poisoned sandbox accepts it and is usable again. Completion: void(error_code).
  template <class Token> auto async_restore(snapshot snap, Token&& token) const {
    return boost::asio::async_initiate<Token, void(error_code)>(
        [core = core_](auto handler, snapshot sn) {
          detail::start_operation(core, detail::op_kind::restore,
                                  detail::op_handler(std::move(handler)),
                                  [sn = std::move(sn)](sandbox& sb) { return sb.restore(sn); });
        },
        token, std::move(snap));
  }

  /// Destroys the sandbox on its worker after the calls already queued have completed (they
  /// run first). Later calls fail with boost::asio::error::bad_descriptor.
  /// Completion: void(error_code).
  template <class Token> auto async_destroy(Token&& token) const {
    return boost::asio::async_initiate<Token, void(error_code)>(
        [core = core_](auto handler) {
          detail::start_destroy(core, detail::destroy_handler(std::move(handler)));
        },
        token);
  }

  /// The worker's executor: code posted here runs on the sandbox's own thread.
  boost::asio::io_context::executor_type get_executor() const;

  /// Detail of the most recent failed call (or of the failed creation).
  error last_error() const;
  bool poisoned() const;
  error poison_reason() const;
  sandbox_stats stats() const;
  vcpu::backend_kind backend() const;
  /// Index of the worker the sandbox is bound to.
  unsigned worker() const;

private:
  friend struct detail::sandbox_core;
  friend void
  detail::create_on_worker(const std::shared_ptr<detail::runtime_impl>&, detail::create_handler,
                           std::function<result<std::unique_ptr<sandbox>>(detail::runtime_impl&)>);
  explicit async_sandbox(std::shared_ptr<detail::sandbox_core> core) : core_(std::move(core)) {}
  std::shared_ptr<detail::sandbox_core> core_;
  std::shared_ptr<const error> create_error_;
};

/// The runtime: workers, a service thread, and the sandboxes bound to them.
class runtime {
public:
  explicit runtime(runtime_options options = {});
  /// Stops (see stop()) and joins every thread.
  ~runtime();
  runtime(const runtime&) = delete;
  runtime& operator=(const runtime&) = delete;

  /// Creates a sandbox on the least loaded worker (its vCPU is created and initialised there).
  /// Completion: void(error_code, async_sandbox); on failure the handle is empty and its
  /// last_error() has the detail.
  template <class Token>
  auto async_create(sandbox_config config, host_functions functions, Token&& token) {
    return boost::asio::async_initiate<Token, void(error_code, async_sandbox)>(
        [rt = impl_](auto handler, sandbox_config c, host_functions f) {
          detail::start_create(rt, std::move(c), std::move(f),
                               detail::create_handler(std::move(handler)));
        },
        token, std::move(config), std::move(functions));
  }

  /// Creates a sandbox from a snapshot (sandbox::create(snap, functions, config)) on the least
  /// loaded worker. For a snapshot loaded from a file, the load's prefetch (config.load) is
  /// reaped on the runtime's service thread. Completion: void(error_code, async_sandbox).
  template <class Token>
  auto async_create(snapshot snap, host_functions functions, sandbox_config config, Token&& token) {
    return boost::asio::async_initiate<Token, void(error_code, async_sandbox)>(
        [rt = impl_](auto handler, snapshot s, sandbox_config c, host_functions f) {
          detail::start_create_from(rt, std::move(s), std::move(c), std::move(f),
                                    detail::create_handler(std::move(handler)));
        },
        token, std::move(snap), std::move(config), std::move(functions));
  }

  /// Graceful stop: every queued or running call completes with operation_aborted (a running
  /// guest is kicked), every sandbox is destroyed on its worker, then all threads are joined.
  /// Work still pending on a worker after its sandboxes are gone (a coroutine host function
  /// awaiting something that never completes, a timer of the caller's) does not hold stop()
  /// up: it never runs, and is destroyed with the runtime. Idempotent; must not be called from
  /// a worker or service thread.
  void stop();

  unsigned worker_count() const noexcept;
  runtime_stats stats() const noexcept;

private:
  std::shared_ptr<detail::runtime_impl> impl_;
};

} // namespace kiln
