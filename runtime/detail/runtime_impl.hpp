// The runtime's internals, shared by runtime.cpp (workers, the service thread, creation,
// stopping) and call_queue.cpp (each sandbox's queue of calls and operations, run on its worker).
// Internal to runtime/.
#pragma once

#include <kiln/runtime/detail/sandbox_impl.hpp>
#include <kiln/runtime/runtime.hpp>
#include <kiln/support/seqlock.hpp>

#include <boost/asio/error.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>

#include <array>
#include <atomic>
#include <chrono>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace kiln::detail {
namespace asio = boost::asio;
using clock_type = std::chrono::steady_clock;

// Why a running guest is kicked. Several may be pending for one call; the strongest wins.
enum stop_reason : unsigned { none = 0, preempt = 1, cancel = 2, deadline = 4, shutdown = 8 };

// errno-style codes go back to Boost's own categories, so that they compare equal to
// boost::asio::error values; kiln's codes keep their std category (ec == kiln::errc::... works).
inline error_code to_error_code(const std::error_code& c) {
  if (c.category() == std::system_category()) return {c.value(), boost::system::system_category()};
  if (c.category() == std::generic_category())
    return {c.value(), boost::system::generic_category()};
  return error_code(c);
}
inline error_code to_error_code(const error& e) {
  return to_error_code(e.code);
}
inline std::error_code aborted() {
  return error_code(asio::error::operation_aborted);
}

struct worker {
  asio::io_context ctx{1};
  asio::executor_work_guard<asio::io_context::executor_type> guard{ctx.get_executor()};
  std::thread thread;
  unsigned index = 0;
  std::atomic<std::size_t> sandboxes{0};
  // The sandbox whose guest runs on this worker now, for the service thread's slice check,
  // without a lock: one hazard slot. The service thread raises `checking` before it reads
  // `running` and lowers it once it is done with that sandbox; the worker, after it clears
  // `running`, waits while `checking` is raised. All seq_cst, so either the check saw the slot
  // cleared, or the worker sees `checking` and waits for the check to let go: a sandbox that
  // stops running is never touched by a check afterwards, and may then be destroyed.
  std::atomic<sandbox_core*> running{nullptr};
  std::atomic<clock_type::rep> slice_start{0}; // written before `running` is set
  std::atomic<bool> checking{false};
};

// One queued entry, a guest call or a sandbox operation, from submission to completion. Fields
// marked (W) are touched on the sandbox's worker only; the atomics may be touched from any
// thread.
struct call_op {
  // Built with its handler: any_completion_handler's move assignment recurses forever in
  // Boost 1.81 (it re-wraps itself), so it is only ever move-constructed.
  explicit call_op(call_handler h) : handler(std::move(h)) {}
  call_op(op_kind k, op_handler h, std::function<result<void>(sandbox&)> b)
      : kind(k), body(std::move(b)), op_done(std::move(h)) {}
  op_kind kind = op_kind::call;
  std::string name;        // calls: the guest function
  std::vector<value> args; // calls
  /// Operations (map a file...): run on the worker in queue order, between guest calls.
  std::function<result<void>(sandbox&)> body;
  call_handler handler;             // (W) until completion: a call's
  op_handler op_done;               // (W) until completion: an operation's
  asio::any_completion_executor ex; // the handler's executor, with outstanding work tracked
  asio::cancellation_slot slot;
  std::atomic<std::uint64_t> gen{0};            // set when the call starts in the guest
  std::atomic<unsigned> stop{none};             // cancel / deadline / shutdown, first one wins
  std::unique_ptr<asio::steady_timer> deadline; // service thread only
  asio::io_context* service = nullptr;          // set when the call has a deadline
  bool started = false;                         // (W)
  bool parked = false;                          // (W) waiting for an async host function
  bool done = false;                            // (W)
  bool from_own_host = false; // submitted from a coroutine host function of the same sandbox
};

struct runtime_impl : std::enable_shared_from_this<runtime_impl> {
  runtime_options options;
  std::vector<std::unique_ptr<worker>> workers;
  asio::io_context service{1};
  asio::executor_work_guard<asio::io_context::executor_type> service_guard{service.get_executor()};
  std::thread service_thread;
  asio::steady_timer slice_timer{service};
  std::atomic<bool> stopping{false};
  std::mutex cores_mu;
  std::vector<std::weak_ptr<sandbox_core>> cores;        // for stop()
  std::array<std::atomic<std::uint64_t>, 5> completed{}; // by op_kind
  std::atomic<std::uint64_t> preemptions{0}, stale_kicks{0}, alive{0};

  // Handing freed memory back (runtime_options::return_memory_after). The counters are written
  // by whichever thread destroys a sandbox; the rest belongs to the service thread (S) or to
  // the trim thread while `trimming`.
  std::atomic<std::uint32_t> destroyed_since_trim{0};
  std::atomic<std::uint64_t> destroyed_total{0}, memory_returns{0};
  std::atomic<bool> trimming{false};
  asio::steady_timer trim_timer{service}; // (S)
  bool trim_pending = false;              // (S) the timer is armed
  bool trim_owed = false;                 // (S) a trim ran while destruction went on
  std::uint64_t trim_seen = 0;            // (S) destroyed_total when the timer was armed
  clock_type::time_point trim_since;      // (S) when this wait for a pause began
  std::thread trimmer;                    // (S) joined before the next one, and by stop()

  void count(op_kind k) noexcept { completed[static_cast<std::size_t>(k)].fetch_add(1); }

  void start();
  void tick_slices();
  worker& pick_worker();
  /// A sandbox's memory was freed (any thread).
  void sandbox_freed() noexcept;
  void request_trim();   // (S)
  void wait_for_pause(); // (S)
  void check_trim();     // (S)
};

struct sandbox_core : std::enable_shared_from_this<sandbox_core> {
  using host_strand_type = asio::strand<asio::io_context::executor_type>;
  sandbox_core(std::shared_ptr<runtime_impl> r, worker& wk)
      : rt(std::move(r)), w(&wk), host_strand(asio::make_strand(wk.ctx)) {}
  ~sandbox_core();
  sandbox_core(const sandbox_core&) = delete;
  sandbox_core& operator=(const sandbox_core&) = delete;

  std::shared_ptr<runtime_impl> rt;
  worker* w = nullptr;
  // Coroutine host functions of this sandbox run here (on its worker): a call submitted with
  // this executor comes from one of them, and is refused while the sandbox waits on a host
  // function, since it could only run after that function returned.
  host_strand_type host_strand;
  std::unique_ptr<sandbox> sb;                 // (W); reset on destroy, under kick_mu
  std::deque<std::shared_ptr<call_op>> queue;  // (W)
  std::shared_ptr<call_op> current;            // (W)
  std::deque<destroy_handler> destroy_waiters; // (W)
  bool destroying = false, destroyed = false;  // (W)
  std::uint64_t next_gen = 0;                  // (W)
  std::atomic<std::uint64_t> running_gen{0};   // gen of the call whose guest runs now
  std::atomic<std::uint64_t> kick_request{0};  // (gen << 8) | stop_reason bits
  std::mutex kick_mu;                          // kicks vs destruction of the sandbox
  // Readable from any thread. The stats are published after every call without a lock; the
  // errors, which change only when a call fails or a restore heals, under info_mu.
  seqlock<sandbox_stats> stats;
  std::atomic<bool> poisoned{false};
  mutable std::mutex info_mu;
  error last_error; // under info_mu
  error poison;     // under info_mu
  vcpu::backend_kind backend{};

  asio::io_context::executor_type executor() const { return w->ctx.get_executor(); }

  void enqueue(std::shared_ptr<call_op> op);
  void pump();
  void run_slice(const std::shared_ptr<call_op>& op);
  void on_host_reply(const std::shared_ptr<call_op>& op, const host_call_outcome& outcome);
  void on_stop_request(const std::shared_ptr<call_op>& op);
  void stop_started(const std::shared_ptr<call_op>& op, unsigned reasons);
  void finish(const std::shared_ptr<call_op>& op, error_code ec, value v, const error* detail);
  void request_kick(std::uint64_t gen, unsigned reason);
  void request_stop(const std::shared_ptr<call_op>& op, unsigned reason);
  void maybe_destroy();
  void publish();
};

/// Completes `op` on its handler's executor (call_queue.cpp).
void complete_call(const std::shared_ptr<call_op>& op_ptr, error_code ec, value v,
                   bool immediate = false);

} // namespace kiln::detail
