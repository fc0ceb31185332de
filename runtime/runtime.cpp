// runtime: workers with their own io_context, a service thread for deadlines, time slices and
// kicks, and the per-sandbox call queue that runs guests inline on their worker.
#include <kiln/runtime/detail/sandbox_impl.hpp>
#include <kiln/runtime/runtime.hpp>
#include <kiln/support/seqlock.hpp>

#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/prefer.hpp>
#include <boost/asio/steady_timer.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

namespace kiln {
namespace asio = boost::asio;
using clock_type = std::chrono::steady_clock;

namespace detail {
namespace {

// Why a running guest is kicked. Several may be pending for one call; the strongest wins.
enum stop_reason : unsigned { none = 0, preempt = 1, cancel = 2, deadline = 4, shutdown = 8 };

// errno-style codes go back to Boost's own categories, so that they compare equal to
// boost::asio::error values; kiln's codes keep their std category (ec == kiln::errc::... works).
error_code to_error_code(const std::error_code& c) {
  if (c.category() == std::system_category()) return {c.value(), boost::system::system_category()};
  if (c.category() == std::generic_category())
    return {c.value(), boost::system::generic_category()};
  return error_code(c);
}
error_code to_error_code(const error& e) {
  return to_error_code(e.code);
}
std::error_code aborted() {
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

} // namespace

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

  void count(op_kind k) noexcept { completed[static_cast<std::size_t>(k)].fetch_add(1); }

  void start();
  void tick_slices();
  worker& pick_worker();
};

struct sandbox_core : std::enable_shared_from_this<sandbox_core> {
  std::shared_ptr<runtime_impl> rt;
  worker* w = nullptr;
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
  void on_host_reply(const std::shared_ptr<call_op>& op, host_call_outcome outcome);
  void on_stop_request(const std::shared_ptr<call_op>& op);
  void stop_started(const std::shared_ptr<call_op>& op, unsigned reasons);
  void finish(const std::shared_ptr<call_op>& op, error_code ec, value v, const error* detail);
  void request_kick(std::uint64_t gen, unsigned reason);
  void request_stop(const std::shared_ptr<call_op>& op, unsigned reason);
  void maybe_destroy();
  void publish();
};

namespace {

// Completes `op` on its handler's executor. The deadline timer, if any, is cancelled on the
// service thread (its only thread), which also releases the timer's reference to the op.
// `immediate`: completing inside the initiating function, so post rather than dispatch.
void complete_call(const std::shared_ptr<call_op>& op_ptr, error_code ec, value v,
                   bool immediate = false) {
  call_op& op = *op_ptr;
  op.done = true;
  if (op.service)
    asio::post(*op.service, [op_ptr] {
      if (op_ptr->deadline) op_ptr->deadline->cancel();
    });
  // Moved out, so that an op kept alive elsewhere (by a held host reply) tracks no work on the
  // handler's executor any more.
  auto h = std::move(op.handler);
  auto oh = std::move(op.op_done);
  auto ex = std::move(op.ex);
  // The slot is cleared on the handler's executor, where Asio lets cancellation be emitted.
  auto finish = [h = std::move(h), oh = std::move(oh), slot = op.slot, ec,
                 v = std::move(v)]() mutable {
    slot.clear();
    if (h)
      std::move(h)(ec, std::move(v));
    else
      std::move(oh)(ec);
  };
  if (immediate) { // any_completion_executor cannot post: hop through the system executor
    asio::post(asio::system_executor(),
               [ex, f = std::move(finish)]() mutable { asio::dispatch(ex, std::move(f)); });
    return;
  }
  // Dispatch: a handler whose executor is this worker's runs inline, crossing no thread.
  asio::dispatch(ex, std::move(finish));
}

} // namespace

void sandbox_core::publish() {
  if (!sb) return;
  stats.store(sb->stats());
  if (const bool p = sb->poisoned(); p != poisoned.load(std::memory_order_relaxed)) {
    std::lock_guard lock(info_mu);
    poison = p ? sb->poison_reason() : error{};
    poisoned.store(p);
  }
}

void sandbox_core::request_kick(std::uint64_t gen, unsigned reason) {
  std::uint64_t cur = kick_request.load();
  for (;;) {
    const std::uint64_t next = (cur >> 8) == gen ? (cur | reason) : ((gen << 8) | reason);
    if (kick_request.compare_exchange_weak(cur, next)) break;
  }
  std::lock_guard lock(kick_mu);
  if (sb) sb->kick();
}

// Any thread. The stop is recorded on the op first; then, if its guest is running now, the
// vCPU is kicked; the worker handles a queued or parked op. The worker publishes running_gen
// before it reads `stop`, and we publish `stop` before we read running_gen, so one of the two
// sides always sees the other (both may: the kick is then stale and ignored).
void sandbox_core::request_stop(const std::shared_ptr<call_op>& op, unsigned reason) {
  unsigned expected = none;
  if (!op->stop.compare_exchange_strong(expected, reason)) return;
  const std::uint64_t g = op->gen.load();
  if (g != 0 && running_gen.load() == g) request_kick(g, reason);
  asio::post(executor(), [self = shared_from_this(), op] { self->on_stop_request(op); });
}

void sandbox_core::on_stop_request(const std::shared_ptr<call_op>& op) {
  if (op->done || op->started) return; // running: the kick acts; parked: acts on the reply
  auto it = std::find(queue.begin(), queue.end(), op);
  if (it == queue.end()) return;
  queue.erase(it);
  op->done = true;
  const unsigned r = op->stop.load();
  rt->count(op->kind);
  complete_call(op,
                r == deadline ? error_code(std::error_code(errc::deadline_exceeded))
                              : error_code(asio::error::operation_aborted),
                value{});
}

void sandbox_core::enqueue(std::shared_ptr<call_op> op) {
  if (destroying || destroyed || rt->stopping.load()) {
    op->done = true;
    complete_call(
        op, destroyed || destroying ? asio::error::bad_descriptor : asio::error::operation_aborted,
        value{});
    return;
  }
  if (queue.size() >= rt->options.max_queued_calls) {
    op->done = true;
    complete_call(op, std::error_code(errc::queue_full), value{});
    return;
  }
  queue.push_back(std::move(op));
  pump();
}

void sandbox_core::pump() {
  while (!current && !queue.empty()) {
    auto op = std::move(queue.front());
    queue.pop_front();
    current = op;
    if (rt->stopping.load()) op->stop.store(shutdown);
    if (const unsigned r = op->stop.load()) { // stopped before it started: no poison
      finish(op,
             r == deadline ? error_code(std::error_code(errc::deadline_exceeded))
                           : error_code(asio::error::operation_aborted),
             value{}, nullptr);
      continue;
    }
    if (op->kind != op_kind::call) {
      if (auto r = op->body(*sb); r)
        finish(op, error_code{}, value{}, nullptr);
      else
        finish(op, to_error_code(r.err()), value{}, &r.err());
      continue;
    }
    if (auto b = sb->begin_call(op->name, op->args); !b) {
      finish(op, to_error_code(b.err()), value{}, &b.err());
      continue;
    }
    op->started = true;
    op->gen.store(++next_gen);
    run_slice(op);
    return; // run_slice finishes, re-queues or parks; finish() pumps again
  }
  maybe_destroy();
}

void sandbox_core::run_slice(const std::shared_ptr<call_op>& op) {
  for (;;) {
    running_gen.store(op->gen.load());
    // stop() sets `stopping` and then reads running_gen: one of the two sides sees the other.
    if (rt->stopping.load()) op->stop.store(shutdown);
    if (const unsigned r = op->stop.load()) {
      running_gen.store(0);
      return stop_started(op, r);
    }
    w->slice_start.store(clock_type::now().time_since_epoch().count(), std::memory_order_relaxed);
    w->running.store(this);
    sandbox::run_state st = sb->resume();
    w->running.store(nullptr);
    while (w->checking.load()) // a slice check holds this sandbox: at most one kick long
      std::this_thread::yield();
    running_gen.store(0);
    switch (st.kind) {
    case sandbox::run_state::done:
      return finish(op, {}, std::move(st.result), nullptr);
    case sandbox::run_state::failed:
      return finish(op, to_error_code(st.err), value{}, &st.err);
    case sandbox::run_state::interrupted: {
      const std::uint64_t req = kick_request.exchange(0);
      unsigned reasons = (req >> 8) == op->gen.load() ? unsigned(req & 0xff) : 0u;
      reasons |= op->stop.load();
      if (reasons & (cancel | deadline | shutdown)) return stop_started(op, reasons);
      if (reasons & preempt) {
        // End of a time slice: let the worker's other handlers run, then continue.
        rt->preemptions.fetch_add(1);
        asio::post(executor(), [self = shared_from_this(), op] {
          if (!op->done) self->run_slice(op);
        });
        return;
      }
      rt->stale_kicks.fetch_add(1); // a kick meant for an earlier call: carry on
      continue;
    }
    case sandbox::run_state::host_call: {
      op->parked = true;
      const host_function* fn = st.host.function;
      std::weak_ptr<sandbox_core> weak = shared_from_this();
      auto ex = executor();
      // A reply may come after the sandbox and even the runtime are gone: the weak reference
      // is checked before the worker's io_context (owned by the runtime) is touched.
      host_completion done = [weak, op](host_call_outcome o) {
        auto self = weak.lock();
        if (!self) return;
        asio::post(self->executor(), [weak, op, o = std::move(o)]() mutable {
          if (auto s = weak.lock()) s->on_host_reply(op, std::move(o));
        });
      };
      try {
        fn->async_body(std::move(st.host.args), host_context(asio::any_io_executor(ex)), done);
      } catch (const std::exception& e) {
        done({KILN_STATUS_HOST_ERROR, value{}, std::string("host function threw: ") + e.what()});
      } catch (...) {
        done({KILN_STATUS_HOST_ERROR, value{}, "host function threw a non-standard exception"});
      }
      return;
    }
    }
  }
}

void sandbox_core::on_host_reply(const std::shared_ptr<call_op>& op, host_call_outcome outcome) {
  if (!op->parked || op->done || !sb) return;
  op->parked = false;
  if (const unsigned r = op->stop.load()) return stop_started(op, r);
  if (auto w = sb->finish_host_call(outcome); !w) {
    sb->poison_with(w.err());
    return finish(op, to_error_code(w.err()), value{}, &w.err());
  }
  run_slice(op);
}

// The guest stopped mid-call: it cannot be trusted to continue, so the sandbox is poisoned.
void sandbox_core::stop_started(const std::shared_ptr<call_op>& op, unsigned reasons) {
  error e = (reasons & shutdown) ? error(aborted(), "runtime stopped")
            : (reasons & cancel)
                ? error(errc::cancelled, "cancelled while the guest ran")
                : error(errc::deadline_exceeded, "deadline passed while the guest ran");
  sb->poison_with(e);
  finish(op, to_error_code(e), value{}, &e);
}

void sandbox_core::finish(const std::shared_ptr<call_op>& op, error_code ec, value v,
                          const error* detail) {
  op->done = true;
  op->parked = false;
  if (current == op) current.reset();
  if (detail) { // errors are rare: their strings are copied under the lock only here
    std::lock_guard lock(info_mu);
    last_error = *detail;
  }
  publish();
  // Before completing, so a caller that saw the result sees the count.
  rt->count(op->kind);
  complete_call(op, ec, std::move(v));
  if (!current && !queue.empty())
    asio::post(executor(), [self = shared_from_this()] { self->pump(); });
  else
    maybe_destroy();
}

void sandbox_core::maybe_destroy() {
  if (!destroying || destroyed || current || !queue.empty()) return;
  destroyed = true;
  {
    std::lock_guard lock(kick_mu);
    publish();
    sb.reset(); // the vCPU dies on the thread it ran on
  }
  w->sandboxes.fetch_sub(1);
  rt->alive.fetch_sub(1);
  {
    std::lock_guard lock(rt->cores_mu);
    std::erase_if(rt->cores, [this](const std::weak_ptr<sandbox_core>& c) {
      auto p = c.lock();
      return !p || p.get() == this;
    });
  }
  while (!destroy_waiters.empty()) {
    auto h = std::move(destroy_waiters.front());
    destroy_waiters.pop_front();
    auto ex = asio::get_associated_executor(h, executor());
    asio::dispatch(ex, [h = std::move(h)]() mutable { std::move(h)(error_code{}); });
  }
}

// ---- runtime ----------------------------------------------------------------------------------

void runtime_impl::start() {
  unsigned n =
      options.workers ? options.workers : std::max(1u, std::thread::hardware_concurrency());
  for (unsigned i = 0; i < n; ++i) {
    auto w = std::make_unique<worker>();
    w->index = i;
    workers.push_back(std::move(w));
  }
  for (auto& w : workers)
    w->thread = std::thread([&ctx = w->ctx] { ctx.run(); });
  service_thread = std::thread([this] { service.run(); });
  // Weak: a handler left in the service's queue must not keep the runtime alive (a strong one
  // would be a cycle through the io_context it sits in, leaking its descriptors).
  asio::post(service, [weak = weak_from_this()] {
    if (auto self = weak.lock()) self->tick_slices();
  });
}

// Every half slice: kick a guest that has run a whole slice. Guests run inline on their worker,
// so this is what lets a worker's other sandboxes, sockets and timers have their turn.
void runtime_impl::tick_slices() {
  if (stopping.load()) return;
  const auto now = clock_type::now();
  for (auto& w : workers) {
    w->checking.store(true);
    if (sandbox_core* victim = w->running.load()) {
      const clock_type::time_point started(
          clock_type::duration(w->slice_start.load(std::memory_order_relaxed)));
      if (now - started >= options.time_slice)
        if (const std::uint64_t g = victim->running_gen.load()) victim->request_kick(g, preempt);
    }
    w->checking.store(false);
  }
  slice_timer.expires_after(
      std::max<std::chrono::microseconds>(options.time_slice / 2, std::chrono::microseconds(200)));
  slice_timer.async_wait([weak = weak_from_this()](error_code ec) {
    if (auto self = weak.lock(); self && !ec) self->tick_slices();
  });
}

worker& runtime_impl::pick_worker() {
  worker* best = workers.front().get();
  for (auto& w : workers)
    if (w->sandboxes.load() < best->sandboxes.load()) best = w.get();
  return *best;
}

void create_on_worker(const std::shared_ptr<runtime_impl>& rt, create_handler handler,
                      std::function<result<std::unique_ptr<sandbox>>(runtime_impl&)> make) {
  auto ex = asio::prefer(asio::get_associated_executor(handler, asio::system_executor()),
                         asio::execution::outstanding_work.tracked);
  auto fail = [&](error e) {
    async_sandbox empty;
    empty.create_error_ = std::make_shared<const error>(e);
    // Inside the initiating function: never inline; then on the handler's own executor.
    asio::post(asio::system_executor(), [ex, h = std::move(handler), ec = to_error_code(e),
                                         empty]() mutable {
      asio::dispatch(asio::any_completion_executor(ex),
                     [h = std::move(h), ec, empty]() mutable { std::move(h)(ec, empty); });
    });
  };
  if (!rt || rt->stopping.load()) return fail(error(aborted(), "runtime stopped"));
  worker& w = rt->pick_worker();
  w.sandboxes.fetch_add(1);
  rt->alive.fetch_add(1);
  asio::post(w.ctx, [rt, &w, make = std::move(make), handler = std::move(handler), ex]() mutable {
    auto sb = make(*rt);
    async_sandbox result;
    error_code ec;
    if (sb && !rt->stopping.load()) {
      auto core = std::make_shared<sandbox_core>();
      core->rt = rt;
      core->w = &w;
      core->backend = (*sb)->backend();
      core->sb = std::move(*sb);
      core->publish();
      {
        std::lock_guard lock(rt->cores_mu);
        rt->cores.push_back(core);
      }
      result = async_sandbox(core);
    } else {
      w.sandboxes.fetch_sub(1);
      rt->alive.fetch_sub(1);
      error e = sb ? error(aborted(), "runtime stopped") : std::move(sb).err();
      ec = to_error_code(e);
      result.create_error_ = std::make_shared<const error>(std::move(e));
    }
    asio::dispatch(asio::any_completion_executor(ex),
                   [h = std::move(handler), ec, result]() mutable { std::move(h)(ec, result); });
  });
}

void start_create(const std::shared_ptr<runtime_impl>& rt, sandbox_config config,
                  host_functions functions, create_handler handler) {
  create_on_worker(
      rt, std::move(handler),
      [config = std::move(config), functions = std::move(functions)](runtime_impl&) mutable {
        return sandbox::create(config, std::move(functions));
      });
}

void start_create_from(const std::shared_ptr<runtime_impl>& rt, snapshot snap,
                       sandbox_config config, host_functions functions, create_handler handler) {
  create_on_worker(rt, std::move(handler),
                   [snap = std::move(snap), config = std::move(config),
                    functions = std::move(functions)](runtime_impl& r) mutable {
                     return sandbox_access::create_from_snapshot(snap, std::move(functions), config,
                                                                 r.service.get_executor());
                   });
}

namespace {

// Takes the executor (with outstanding work tracked) and the cancellation slot of a queued
// entry's handler.
template <class Handler>
void bind_handler(call_op& op, const Handler& handler, const std::shared_ptr<sandbox_core>& core) {
  op.slot = asio::get_associated_cancellation_slot(handler);
  op.ex = core ? asio::prefer(asio::get_associated_executor(handler, core->executor()),
                              asio::execution::outstanding_work.tracked)
               : asio::prefer(asio::get_associated_executor(handler, asio::system_executor()),
                              asio::execution::outstanding_work.tracked);
}

void submit(const std::shared_ptr<sandbox_core>& core, std::shared_ptr<call_op> op,
            call_options options);

} // namespace

void start_call(const std::shared_ptr<sandbox_core>& core, std::string name,
                std::vector<value> args, call_options options, call_handler handler) {
  auto op = std::make_shared<call_op>(std::move(handler));
  bind_handler(*op, op->handler, core);
  op->name = std::move(name);
  op->args = std::move(args);
  submit(core, std::move(op), options);
}

void start_operation(const std::shared_ptr<sandbox_core>& core, op_kind kind, op_handler handler,
                     std::function<result<void>(sandbox&)> body) {
  auto op = std::make_shared<call_op>(kind, std::move(handler), std::move(body));
  bind_handler(*op, op->op_done, core);
  submit(core, std::move(op), {});
}

namespace {

void submit(const std::shared_ptr<sandbox_core>& core, std::shared_ptr<call_op> op,
            call_options options) {
  if (!core) {
    op->done = true;
    return complete_call(op, asio::error::bad_descriptor, value{}, /*immediate=*/true);
  }
  if (op->slot.is_connected()) {
    std::weak_ptr<sandbox_core> weak = core;
    std::weak_ptr<call_op> weak_op = op;
    op->slot.assign([weak, weak_op](asio::cancellation_type_t) {
      auto c = weak.lock();
      auto o = weak_op.lock();
      if (c && o) c->request_stop(o, cancel);
    });
  }
  if (options.timeout > clock_type::duration::zero()) {
    op->service = &core->rt->service;
    asio::post(core->rt->service, [core, op, timeout = options.timeout] {
      op->deadline = std::make_unique<asio::steady_timer>(core->rt->service, timeout);
      op->deadline->async_wait([core, op](error_code ec) {
        if (!ec) core->request_stop(op, deadline);
      });
    });
  }
  if (core->rt->stopping.load()) {
    op->done = true;
    return complete_call(op, asio::error::operation_aborted, value{}, /*immediate=*/true);
  }
  // Always posted, never run inline: the handler must not run inside this initiating function
  // (Asio's rule). From the sandbox's own worker the post crosses no thread.
  asio::post(core->executor(),
             [core, op = std::move(op)]() mutable { core->enqueue(std::move(op)); });
}

} // namespace

void start_destroy(const std::shared_ptr<sandbox_core>& core, destroy_handler handler) {
  if (!core) {
    auto ex = asio::get_associated_executor(handler, asio::system_executor());
    // Inside the initiating function: never inline.
    return asio::post(asio::system_executor(), [ex, h = std::move(handler)]() mutable {
      asio::dispatch(ex,
                     [h = std::move(h)]() mutable { std::move(h)(asio::error::bad_descriptor); });
    });
  }
  asio::post(core->executor(), [core, handler = std::move(handler)]() mutable {
    if (core->destroyed) {
      auto ex = asio::get_associated_executor(handler, core->executor());
      return asio::dispatch(ex, [h = std::move(handler)]() mutable { std::move(h)(error_code{}); });
    }
    core->destroying = true;
    core->destroy_waiters.push_back(std::move(handler));
    core->maybe_destroy();
  });
}

} // namespace detail

// ---- public surface -------------------------------------------------------------------------

asio::io_context::executor_type async_sandbox::get_executor() const {
  return core_->executor();
}

error async_sandbox::last_error() const {
  if (!core_)
    return create_error_ ? *create_error_
                         : error(std::error_code(error_code(asio::error::bad_descriptor)));
  std::lock_guard lock(core_->info_mu);
  return core_->last_error;
}

bool async_sandbox::poisoned() const {
  return core_ && core_->poisoned.load();
}

error async_sandbox::poison_reason() const {
  if (!core_) return {};
  std::lock_guard lock(core_->info_mu);
  return core_->poison;
}

sandbox_stats async_sandbox::stats() const {
  return core_ ? core_->stats.load() : sandbox_stats{};
}

vcpu::backend_kind async_sandbox::backend() const {
  return core_ ? core_->backend : vcpu::backend_kind::emulated;
}
unsigned async_sandbox::worker() const {
  return core_ ? core_->w->index : 0;
}

runtime::runtime(runtime_options options) : impl_(std::make_shared<detail::runtime_impl>()) {
  impl_->options = options;
  if (impl_->options.time_slice <= std::chrono::microseconds::zero())
    impl_->options.time_slice = std::chrono::microseconds(10'000);
  impl_->start();
}

runtime::~runtime() {
  stop();
}

void runtime::stop() {
  auto& rt = *impl_;
  if (rt.stopping.exchange(true)) return;
  // 1. Abort every call (running guests are kicked) and destroy every sandbox, on its worker.
  std::vector<std::shared_ptr<detail::sandbox_core>> cores;
  {
    std::lock_guard lock(rt.cores_mu);
    for (auto& weak : rt.cores)
      if (auto c = weak.lock()) cores.push_back(std::move(c));
    rt.cores.clear();
  }
  for (auto& core : cores) {
    std::uint64_t g = core->running_gen.load();
    if (g) core->request_kick(g, detail::shutdown);
    asio::post(core->executor(), [core] {
      for (auto& op : core->queue) {
        op->stop.store(detail::shutdown);
      }
      if (core->current) {
        core->current->stop.store(detail::shutdown);
        // A copy: finish() resets `current` while stop_started() still uses the op.
        if (auto op = core->current; op->parked) core->stop_started(op, detail::shutdown);
      }
      core->destroying = true;
      core->pump(); // completes the queued calls with operation_aborted, then destroys
    });
  }
  // 2. Let the workers drain what was posted, then join.
  asio::post(rt.service, [&rt] { rt.slice_timer.cancel(); });
  for (auto& w : rt.workers)
    w->guard.reset();
  for (auto& w : rt.workers)
    if (w->thread.joinable()) w->thread.join();
  rt.service_guard.reset();
  rt.service.stop();
  if (rt.service_thread.joinable()) rt.service_thread.join();
  // The service may have stopped before it ran the timer cancellations posted above (its stop()
  // does not wait for them): run them here, so no pending timer handler keeps a sandbox, or
  // through it this runtime, alive.
  rt.service.restart();
  rt.slice_timer.cancel();
  while (rt.service.poll() > 0) {
  }
}

unsigned runtime::worker_count() const noexcept {
  return static_cast<unsigned>(impl_->workers.size());
}

runtime_stats runtime::stats() const noexcept {
  runtime_stats s;
  s.sandboxes = impl_->alive.load();
  auto completed = [&](detail::op_kind k) {
    return impl_->completed[static_cast<std::size_t>(k)].load();
  };
  s.calls = completed(detail::op_kind::call);
  s.maps = completed(detail::op_kind::map_file);
  s.unmaps = completed(detail::op_kind::unmap_file);
  s.snapshots = completed(detail::op_kind::snapshot);
  s.restores = completed(detail::op_kind::restore);
  s.preemptions = impl_->preemptions.load();
  s.stale_kicks = impl_->stale_kicks.load();
  return s;
}

} // namespace kiln
