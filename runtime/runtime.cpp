// runtime: workers with their own io_context, a service thread for deadlines, time slices and
// kicks, sandbox creation on the least loaded worker, handing freed memory back, and stopping. The
// per-sandbox call queue is in call_queue.cpp.
#include <kiln/runtime/detail/runtime_impl.hpp>

#include <boost/asio/associated_executor.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/prefer.hpp>

#include <algorithm>
#include <system_error>

#include <malloc.h>

namespace kiln {
namespace asio = boost::asio;

namespace detail {

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

void runtime_impl::sandbox_freed() noexcept {
  destroyed_total.fetch_add(1);
  const std::uint32_t every = options.return_memory_after;
  if (every == 0 || destroyed_since_trim.fetch_add(1) + 1 != every) return;
  // Weak, as for the slice timer. Posting allocates; a failure only skips this trim.
  try {
    asio::post(service, [weak = weak_from_this()] {
      if (auto self = weak.lock()) self->request_trim();
    });
  } catch (...) {
  }
}

// Freed memory goes back once destruction pauses (nothing destroyed for 100 ms), or after a
// second of it, and then once more when it pauses: a trim walks every free page of the heap
// (167 ms for 1.9 GiB), so it runs on a thread of its own, never here on the service thread
// whose slice checks and deadlines must not wait.
void runtime_impl::request_trim() {
  if (trim_pending || stopping.load()) return;
  trim_since = clock_type::now();
  wait_for_pause();
}

// 100 ms more of the same wait: check_trim() then sees whether anything was destroyed meanwhile.
void runtime_impl::wait_for_pause() {
  trim_pending = true;
  trim_seen = destroyed_total.load();
  trim_timer.expires_after(std::chrono::milliseconds(100));
  trim_timer.async_wait([weak = weak_from_this()](error_code ec) {
    if (auto self = weak.lock(); self && !ec) self->check_trim();
  });
}

void runtime_impl::check_trim() {
  trim_pending = false;
  if (stopping.load()) return;
  const bool paused = destroyed_total.load() == trim_seen;
  if (trimming.load() || (!paused && clock_type::now() - trim_since < std::chrono::seconds(1)))
    return wait_for_pause();
  trim_owed = !paused;
  if (trimmer.joinable()) trimmer.join(); // finished: `trimming` is false
  destroyed_since_trim.store(0);
  trimming.store(true);
  try {
    trimmer = std::thread([this] {
      ::malloc_trim(0);
      memory_returns.fetch_add(1);
      trimming.store(false);
      // stop() joins this thread before the runtime can go; otherwise the service does, at
      // once, so that no finished thread keeps its stack mapped.
      asio::post(service, [this] {
        if (trimmer.joinable()) trimmer.join();
        if (trim_owed) request_trim();
      });
    });
  } catch (const std::system_error&) { // no thread to be had: the next request tries again
    trimming.store(false);
  }
}

worker& runtime_impl::pick_worker() {
  worker* best = workers.front().get();
  for (auto& w : workers)
    if (w->sandboxes.load() < best->sandboxes.load()) best = w.get();
  return *best;
}

// Stops a worker's io_context once it serves no sandbox, creations in flight included (they
// are counted before they are posted). Whatever is still queued then would never end by
// itself (a coroutine host function awaiting what never comes, a user's timer on the worker):
// it must not keep runtime::stop() waiting, and is destroyed with the runtime.
namespace {
void stop_when_empty(worker& w) {
  if (w.sandboxes.load() == 0) return w.ctx.stop();
  auto t = std::make_shared<asio::steady_timer>(w.ctx, std::chrono::milliseconds(1));
  t->async_wait([&w, t](error_code) { stop_when_empty(w); });
}
} // namespace

void create_on_worker(const std::shared_ptr<runtime_impl>& rt, create_handler handler,
                      std::function<result<std::unique_ptr<sandbox>>(runtime_impl&)> make) {
  auto ex = asio::prefer(asio::get_associated_executor(handler, asio::system_executor()),
                         asio::execution::outstanding_work.tracked);
  auto fail = [&](const error& e) {
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
  // Counted before `stopping` is read again, so that stop() either sees this creation in the
  // worker's count (and waits for it) or this side sees `stopping`.
  w.sandboxes.fetch_add(1);
  rt->alive.fetch_add(1);
  if (rt->stopping.load()) {
    w.sandboxes.fetch_sub(1);
    rt->alive.fetch_sub(1);
    return fail(error(aborted(), "runtime stopped"));
  }
  asio::post(w.ctx, [rt, &w, make = std::move(make), handler = std::move(handler), ex]() mutable {
    auto sb = make(*rt);
    async_sandbox result;
    error_code ec;
    if (sb && !rt->stopping.load()) {
      auto core = std::make_shared<sandbox_core>(rt, w);
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
  // 2. Let each worker run what was posted until its sandboxes are gone, then stop it and join.
  asio::post(rt.service, [&rt] {
    rt.slice_timer.cancel();
    rt.trim_timer.cancel();
  });
  for (auto& w : rt.workers) {
    w->guard.reset();
    asio::post(w->ctx, [&w = *w] { detail::stop_when_empty(w); });
  }
  for (auto& w : rt.workers)
    if (w->thread.joinable()) w->thread.join();
  // A worker stops once it serves no sandbox, but what its last sandbox posted on the way out
  // (a pump, a completion) may still be queued, holding that sandbox and through it this
  // runtime: a cycle that leaked both (LeakSanitizer found it after stop() with calls
  // outstanding). Run what is ready here, on this thread (no sandbox is left to run a guest),
  // with a bound, so that a handler that re-posts itself cannot hold stop() for ever.
  for (auto& w : rt.workers) {
    w->ctx.restart();
    for (int i = 0; i < 10'000 && w->ctx.poll_one() > 0; ++i) {
    }
  }
  rt.service_guard.reset();
  rt.service.stop();
  if (rt.service_thread.joinable()) rt.service_thread.join();
  // The service may have stopped before it ran the timer cancellations posted above (its stop()
  // does not wait for them): run them here, so no pending timer handler keeps a sandbox, or
  // through it this runtime, alive.
  rt.service.restart();
  rt.slice_timer.cancel();
  rt.trim_timer.cancel();
  if (rt.trimmer.joinable()) rt.trimmer.join();
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
  s.memory_returns = impl_->memory_returns.load();
  return s;
}

} // namespace kiln
