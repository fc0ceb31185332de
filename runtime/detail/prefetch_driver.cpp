// prefetch_driver: an eventfd wait re-armed on an Asio executor, or a ::poll loop on a thread,
// around memory::prefetch::poll(), with cancellation from any thread.
#include <kiln/runtime/detail/prefetch_driver.hpp>

#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <optional>
#include <system_error>

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

namespace kiln::detail {
namespace asio = boost::asio;

struct prefetch_driver::state {
  std::mutex m;
  std::condition_variable cv;
  std::unique_ptr<memory::prefetch> pf; // set before any handler runs; poll/cancel under m
  done_handler on_done;                 // under m
  bool ended = false;                   // under m: poll() said the prefetch ended
  bool cancelled = false;               // under m
  bool in_callback = false;             // under m: on_done is running on callback_thread
  bool ws_heard = false;                // under m: the working-set milestone is counted
  std::atomic<std::uint32_t> news{0};   // milestones reached (see prefetch_driver::news)
  std::thread::id callback_thread;
  // Executor mode only: touched on the executor (or, with no operation pending, where the
  // state dies). Owns a dup() of the prefetch's eventfd.
  std::optional<asio::posix::stream_descriptor> desc;
};

namespace {

using state_ptr = std::shared_ptr<prefetch_driver::state>;

void wake(int fd) noexcept {
  const std::uint64_t one = 1;
  while (::write(fd, &one, sizeof one) < 0 && errno == EINTR) {
  }
}

/// Called under st->m once poll() has said the prefetch ended: runs on_done without the lock.
void finish(const state_ptr& st, std::unique_lock<std::mutex>& lk) {
  st->ended = true;
  prefetch_driver::done_handler fn = std::exchange(st->on_done, nullptr);
  if (!fn) {
    st->cv.notify_all();
    return;
  }
  const memory::prefetch_stats stats = st->pf->stats();
  st->in_callback = true;
  st->callback_thread = std::this_thread::get_id();
  lk.unlock();
  struct reset { // also when fn throws; fn itself is destroyed after this, without the lock
    const state_ptr& st;
    ~reset() {
      std::lock_guard g(st->m);
      st->in_callback = false;
      st->cv.notify_all();
    }
  };
  {
    reset r{st};
    fn(stats);
  }
}

void step(const state_ptr& st);

/// Under st->m, after a poll(): counts the milestones reached, so that the owner hears of them
/// with one atomic load instead of asking for the stats.
void count_milestones(prefetch_driver::state& st, bool ended) {
  if (!st.ws_heard && (ended || st.pf->stats().working_set_done)) {
    st.ws_heard = true;
    st.news.fetch_add(1, std::memory_order_release);
  }
  if (ended) st.news.fetch_add(1, std::memory_order_release);
}

/// On the executor, under st->m: waits for the eventfd to become readable again.
void arm(const state_ptr& st) {
  st->desc->async_wait(asio::posix::descriptor_base::wait_read,
                       [st](const boost::system::error_code& ec) {
                         // Aborted: the descriptor is going away with the io_context.
                         if (ec != asio::error::operation_aborted) step(st);
                       });
}

void step(const state_ptr& st) {
  std::unique_lock lk(st->m);
  if (st->cancelled || st->ended) return; // cancel() woke the wait: let go of the state
  const bool ended = st->pf->poll();
  count_milestones(*st, ended);
  if (!ended) return arm(st);
  finish(st, lk);
}

void run_thread(const state_ptr& st) {
  for (;;) {
    int fd = -1;
    {
      std::unique_lock lk(st->m);
      if (st->cancelled || st->ended) return;
      const bool ended = st->pf->poll();
      count_milestones(*st, ended);
      if (ended) return finish(st, lk);
      fd = st->pf->notify_fd(); // the prefetch lives as long as the state
    }
    // cancel() sets `cancelled` under the lock and then signals the eventfd, so this wakes.
    pollfd p{fd, POLLIN, 0};
    ::poll(&p, 1, -1); // EINTR (io_uring task work, signals): poll again
  }
}

} // namespace

result<std::shared_ptr<prefetch_driver>>
prefetch_driver::start(asio::any_io_executor ex, std::vector<memory::prefetch_extent> plan,
                       memory::prefetch_options options, done_handler on_done) {
  KILN_TRY_ASSIGN(auto pf, memory::prefetch::start(std::move(plan), std::move(options)));
  return drive(std::move(ex), std::move(pf), std::move(on_done));
}

result<std::shared_ptr<prefetch_driver>>
prefetch_driver::drive(asio::any_io_executor ex, std::unique_ptr<memory::prefetch> pf,
                       done_handler on_done) {
  auto st = std::make_shared<state>();
  st->pf = std::move(pf);
  st->on_done = std::move(on_done);
  std::shared_ptr<prefetch_driver> d(new prefetch_driver());
  d->state_ = st; // from here an error return cancels the prefetch through ~prefetch_driver

  if (!ex) {
    try {
      d->thread_ = std::thread([st] { run_thread(st); });
    } catch (const std::system_error& e) {
      return error(e.code(), "prefetch driver thread");
    }
    return d;
  }
  const int dup = ::fcntl(st->pf->notify_fd(), F_DUPFD_CLOEXEC, 0);
  if (dup < 0) return errno_error("prefetch driver: dup eventfd");
  boost::system::error_code ec;
  st->desc.emplace(ex);
  st->desc->assign(dup, ec);
  if (ec) {
    ::close(dup);
    return error(std::error_code(ec), "prefetch driver: assign eventfd");
  }
  asio::post(ex, [st] { step(st); }); // the first poll() submits, on the executor
  return d;
}

prefetch_driver::~prefetch_driver() {
  cancel();
}

void prefetch_driver::cancel() noexcept {
  if (state_) {
    state& st = *state_;
    done_handler dropped; // destroyed after the lock is released: it may own this driver
    std::unique_lock lk(st.m);
    if (!st.cancelled) {
      st.cancelled = true;
      dropped = std::exchange(st.on_done, nullptr);
      if (!st.ended) {
        st.pf->cancel();                                 // waits for the reads in flight
        st.news.fetch_add(1, std::memory_order_release); // the end, by cancellation
      }
      wake(st.pf->notify_fd()); // a pending wait or the thread's ::poll lets go
    }
    st.cv.wait(lk,
               [&] { return !st.in_callback || st.callback_thread == std::this_thread::get_id(); });
    st.cv.notify_all();
    lk.unlock();
  }
  std::lock_guard g(thread_mutex_);
  if (thread_.joinable()) {
    if (thread_.get_id() == std::this_thread::get_id())
      thread_.detach(); // from on_done on the driver's thread: it ends right after
    else
      thread_.join();
  }
}

void prefetch_driver::wait() {
  state& st = *state_;
  std::unique_lock lk(st.m);
  st.cv.wait(lk, [&] { return (st.ended || st.cancelled) && !st.in_callback; });
}

std::uint32_t prefetch_driver::news() const noexcept {
  return state_->news.load(std::memory_order_acquire);
}

memory::prefetch_stats prefetch_driver::stats() const {
  return state_->pf->stats();
}

} // namespace kiln::detail
