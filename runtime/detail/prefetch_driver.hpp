// prefetch_driver: runs a memory::prefetch in the background, on an Asio executor (the runtime's
// service io_context) or on a thread of its own, and reports its end once.
#pragma once

#include <kiln/memory/prefetch.hpp>
#include <kiln/support/result.hpp>

#include <boost/asio/any_io_executor.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace kiln::detail {

/// Drives one prefetch to its end in the background.
///
/// On an executor: a stream_descriptor over a dup() of the prefetch's eventfd waits for it to
/// become readable (async_wait), then poll() reaps and submits, and the wait is re-armed until
/// the prefetch ends. Every handler holds the driver's shared state, never the driver, so
/// destroying the driver with a wait pending is safe: the wait is woken, sees the cancellation
/// and lets go. The executor's execution context must outlive the driver (Asio's usual rule for
/// an I/O object). With a default-constructed executor, a thread of the driver's own runs the
/// same loop with ::poll.
///
/// Thread-safety: every member may be called from any thread; the prefetch itself is only
/// touched under the driver's mutex, so cancel() from another thread waits for a poll() in
/// progress (which never blocks) and then for the reads in flight.
class prefetch_driver {
public:
  using done_handler = std::function<void(const memory::prefetch_stats&)>;

  /// Starts `plan` (see memory::prefetch::start for the errors). `on_done` runs once, on the
  /// executor or the driver's thread, when the prefetch ends by itself (done or failed), with its
  /// final stats; never after cancel() has returned, and never at all for a cancelled prefetch.
  /// It must not throw, and must not call wait(); it may call cancel() or drop the driver.
  static result<std::shared_ptr<prefetch_driver>> start(boost::asio::any_io_executor ex,
                                                        std::vector<memory::prefetch_extent> plan,
                                                        memory::prefetch_options options,
                                                        done_handler on_done = {});
  /// The same for a prefetch already started (nothing submitted yet: memory::prefetch::start).
  static result<std::shared_ptr<prefetch_driver>> drive(boost::asio::any_io_executor ex,
                                                        std::unique_ptr<memory::prefetch> pf,
                                                        done_handler on_done = {});
  ~prefetch_driver(); // cancel()
  prefetch_driver(const prefetch_driver&) = delete;
  prefetch_driver& operator=(const prefetch_driver&) = delete;

  /// Stops the prefetch and waits for its reads in flight; afterwards no callback runs (one
  /// already running on another thread is waited for). Idempotent; safe from any thread,
  /// on_done included. Joins the driver's thread (detaches it when called from that thread).
  void cancel() noexcept;
  /// Blocks until the prefetch has ended (on_done, if any, has returned) or been cancelled.
  /// Not from the executor's own thread (nothing would drive the prefetch) nor from on_done.
  void wait();
  /// How many milestones the prefetch has reached: the working set resident, the end (done,
  /// failed or cancelled). It changes only then, so an owner that remembers the last value it
  /// saw hears of each with one atomic load, and asks for stats() only when it changed.
  /// Thread-safe, lock-free.
  std::uint32_t news() const noexcept;
  /// A copy of the prefetch's statistics so far. Thread-safe.
  memory::prefetch_stats stats() const;

  struct state;

private:
  prefetch_driver() = default;
  std::shared_ptr<state> state_;
  std::mutex thread_mutex_; // guards thread_ against concurrent cancel() calls
  std::thread thread_;
};

} // namespace kiln::detail
