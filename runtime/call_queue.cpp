// The call queue: each sandbox's calls and operations, one at a time in submission order, run
// inline on the sandbox's worker; kicks, cancellation and deadlines from any thread.
#include <kiln/runtime/detail/runtime_impl.hpp>

#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/prefer.hpp>

#include <algorithm>
#include <type_traits>

namespace kiln::detail {

// Completes `op` on its handler's executor. The deadline timer, if any, is cancelled on the
// service thread (its only thread), which also releases the timer's reference to the op.
// `immediate`: completing inside the initiating function, so post rather than dispatch.
void complete_call(const std::shared_ptr<call_op>& op_ptr, error_code ec, value v, bool immediate) {
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
  if (op->done) return;
  if (op->started) {
    // Running: the kick acts. Parked on a host function that may never reply: the call ends
    // now, mid-way, and the function's late reply finds it done and is dropped.
    if (op->parked) {
      op->parked = false;
      stop_started(op, op->stop.load());
    }
    return;
  }
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
  if (op->from_own_host && current && current->parked) {
    op->done = true;
    complete_call(op, std::error_code(errc::reentrant_call), value{});
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
      // A reply may come after the sandbox and even the runtime are gone: the weak reference
      // is checked before the worker's io_context (owned by the runtime) is touched.
      host_completion done = [weak, op](host_call_outcome o) {
        auto self = weak.lock();
        if (!self) return;
        asio::post(self->executor(), [weak, op, o = std::move(o)] {
          if (auto s = weak.lock()) s->on_host_reply(op, o);
        });
      };
      try {
        fn->async_body(std::move(st.host.args), host_context(asio::any_io_executor(host_strand)),
                       done);
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

void sandbox_core::on_host_reply(const std::shared_ptr<call_op>& op,
                                 const host_call_outcome& outcome) {
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

// Every handle was dropped without async_destroy(), and nothing else holds the sandbox: it is
// unreachable and ends here, on whichever thread let go last. It is not running (a run holds a
// reference), and it must leave the counts that runtime::stop() waits on.
sandbox_core::~sandbox_core() {
  if (destroyed) return;
  w->sandboxes.fetch_sub(1);
  rt->alive.fetch_sub(1);
  rt->sandbox_freed(); // just after this body, with `sb`
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
  rt->sandbox_freed();
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

namespace {

// True when `ex`, a handler's executor, is `core`'s host strand: the handler belongs to one of
// its coroutine host functions. Looked for through Asio's type erasure (an
// any_completion_executor holding the coroutine's any_io_executor holding the strand).
template <class Executor> bool is_host_strand_of(const Executor& ex, const sandbox_core& core) {
  if (const auto* s = ex.template target<sandbox_core::host_strand_type>())
    return *s == core.host_strand;
  if constexpr (!std::is_same_v<Executor, asio::any_io_executor>)
    if (const auto* io = ex.template target<asio::any_io_executor>())
      return is_host_strand_of(*io, core);
  return false;
}

// Takes the executor (with outstanding work tracked) and the cancellation slot of a queued
// entry's handler, and whether the handler is one of the sandbox's own coroutine host
// functions.
template <class Handler>
void bind_handler(call_op& op, const Handler& handler, const std::shared_ptr<sandbox_core>& core) {
  op.slot = asio::get_associated_cancellation_slot(handler);
  if (core) op.from_own_host = is_host_strand_of(asio::get_associated_executor(handler), *core);
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

} // namespace kiln::detail
