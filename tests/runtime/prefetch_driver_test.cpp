// Tests for runtime/detail/prefetch_driver.hpp: a prefetch driven on an io_context run by a test
// thread and on the driver's own thread; on_done once; cancel and destruction from anywhere.
#include <kiln/memory/address.hpp>
#include <kiln/runtime/detail/prefetch_driver.hpp>
#include <kiln/support/unique_fd.hpp>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <memory>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

namespace kiln::detail {
namespace {

namespace asio = boost::asio;
namespace fs = std::filesystem;
using namespace std::chrono_literals;
using memory::page_size;

constexpr std::uint64_t mib = 1ull << 20;
constexpr std::uint64_t file_size = 16 * mib;

std::uint64_t file_word(std::uint64_t o) {
  return (o * 0x9E3779B97F4A7C15ull) ^ 0x7654321ull;
}

/// A 16 MiB file of known content, dropped from the page cache, mapped MAP_PRIVATE.
class mapped_file {
public:
  mapped_file() {
    std::string t = (fs::temp_directory_path() / "kiln-prefetch-driver-XXXXXX").string();
    fd_.reset(::mkstemp(t.data()));
    if (!fd_) throw std::system_error(errno, std::generic_category(), "mkstemp");
    path_ = t;
    std::vector<std::uint64_t> block(mib / 8);
    for (std::uint64_t off = 0; off < file_size; off += mib) {
      for (std::uint64_t i = 0; i < block.size(); ++i)
        block[i] = file_word(off + i * 8);
      if (::pwrite(fd_.get(), block.data(), mib, static_cast<off_t>(off)) != ssize_t(mib))
        throw std::system_error(errno, std::generic_category(), "pwrite");
    }
    ::fdatasync(fd_.get());
    ::posix_fadvise(fd_.get(), 0, 0, POSIX_FADV_DONTNEED);
    void* m = ::mmap(nullptr, file_size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd_.get(), 0);
    if (m == MAP_FAILED) throw std::system_error(errno, std::generic_category(), "mmap");
    host_ = static_cast<std::byte*>(m);
  }
  ~mapped_file() {
    ::munmap(host_, file_size);
    ::unlink(path_.c_str());
  }
  mapped_file(const mapped_file&) = delete;
  mapped_file& operator=(const mapped_file&) = delete;

  std::vector<memory::prefetch_extent> plan() const {
    // The second half first (the "working set"), then the first.
    return {{fd_.get(), file_size / 2, file_size / 2, host_ + file_size / 2},
            {fd_.get(), 0, file_size / 2, host_}};
  }
  /// Pages of the mapping with a page-table entry (pagemap bit 63).
  std::uint64_t present() const {
    unique_fd pm(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
    std::vector<std::uint64_t> e(file_size / page_size);
    const auto first = reinterpret_cast<std::uintptr_t>(host_) / page_size;
    if (::pread(pm.get(), e.data(), e.size() * 8, static_cast<off_t>(first * 8)) !=
        static_cast<ssize_t>(e.size() * 8))
      return ~0ull;
    std::uint64_t n = 0;
    for (std::uint64_t v : e)
      n += v >> 63;
    return n;
  }
  bool content_ok() const {
    const auto* w = reinterpret_cast<const std::uint64_t*>(host_);
    for (std::uint64_t i = 0; i < file_size / 8; ++i)
      if (w[i] != file_word(i * 8)) return false;
    return true;
  }

private:
  unique_fd fd_;
  std::string path_;
  std::byte* host_ = nullptr;
};

memory::prefetch_options options() {
  memory::prefetch_options o;
  o.working_set_extents = 1;
  return o;
}

std::size_t open_fds() {
  std::size_t n = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator("/proc/self/fd"))
    ++n;
  return n;
}

/// An io_context run by a thread of the test, like the runtime's service thread.
class service {
public:
  service() : thread_([this] { ctx_.run(); }) {}
  ~service() {
    guard_.reset();
    thread_.join();
  }
  asio::any_io_executor executor() { return ctx_.get_executor(); }
  std::thread::id thread_id() const { return thread_.get_id(); }
  /// Returns once everything posted before it has run.
  void drain() {
    std::promise<void> done;
    asio::post(ctx_, [&] { done.set_value(); });
    done.get_future().wait();
  }

private:
  asio::io_context ctx_{1};
  asio::executor_work_guard<asio::io_context::executor_type> guard_{ctx_.get_executor()};
  std::thread thread_;
};

struct done_log {
  std::atomic<int> calls{0};
  std::atomic<std::thread::id> thread{};
  memory::prefetch_stats stats; // written by the one call, read after wait()
  prefetch_driver::done_handler handler() {
    return [this](const memory::prefetch_stats& s) {
      stats = s;
      thread = std::this_thread::get_id();
      ++calls;
    };
  }
};

void expect_complete(const memory::prefetch_stats& s) {
  EXPECT_TRUE(s.done);
  EXPECT_FALSE(s.cancelled);
  EXPECT_FALSE(s.failure.code) << s.failure.message();
  EXPECT_TRUE(s.working_set_done);
  EXPECT_LE(s.working_set_time, s.total_time);
  EXPECT_EQ(s.bytes_read, file_size);
  EXPECT_EQ(s.populate_failures, 0u);
}

TEST(PrefetchDriver, RunsOnAnIoContextAndReportsOnce) {
  mapped_file f;
  done_log log;
  {
    service svc;
    auto d = prefetch_driver::start(svc.executor(), f.plan(), options(), log.handler());
    ASSERT_TRUE(d) << d.err().message();
    (*d)->wait();
    EXPECT_EQ(log.calls.load(), 1) << "on_done has returned when wait() does";
    EXPECT_EQ(log.thread.load(), svc.thread_id()) << "on the executor";
    expect_complete(log.stats);
    expect_complete((*d)->stats());
    (*d)->cancel(); // after the end: nothing happens
    svc.drain();
  }
  EXPECT_EQ(log.calls.load(), 1);
  EXPECT_EQ(f.present(), file_size / page_size);
  EXPECT_TRUE(f.content_ok());
}

TEST(PrefetchDriver, NewsChangesAtTheMilestonesOnly) {
  // The working set resident, then the end: two pieces of news, each told once, on both ways of
  // driving; a cancel after the end tells nothing new.
  for (bool own_thread : {false, true}) {
    SCOPED_TRACE(own_thread);
    mapped_file f;
    service svc;
    auto d = prefetch_driver::start(own_thread ? asio::any_io_executor() : svc.executor(), f.plan(),
                                    options());
    ASSERT_TRUE(d) << d.err().message();
    (*d)->wait();
    EXPECT_EQ((*d)->news(), 2u);
    (*d)->cancel();
    EXPECT_EQ((*d)->news(), 2u);
    svc.drain();
  }
}

TEST(PrefetchDriver, ACancelledPrefetchIsNews) {
  // On an io_context that never runs, nothing is read: the cancel is the end.
  mapped_file f;
  asio::io_context ctx;
  auto d = prefetch_driver::start(ctx.get_executor(), f.plan(), options());
  ASSERT_TRUE(d);
  EXPECT_EQ((*d)->news(), 0u);
  (*d)->cancel();
  EXPECT_EQ((*d)->news(), 1u) << "an owner waiting for news hears that the load has ended";
}

TEST(PrefetchDriver, RunsOnItsOwnThreadAndReportsOnce) {
  for (bool force_thread : {false, true}) {
    SCOPED_TRACE(force_thread);
    mapped_file f;
    done_log log;
    auto o = options();
    o.force_thread = force_thread;
    auto d = prefetch_driver::start({}, f.plan(), o, log.handler());
    ASSERT_TRUE(d) << d.err().message();
    (*d)->wait();
    EXPECT_EQ(log.calls.load(), 1);
    EXPECT_NE(log.thread.load(), std::this_thread::get_id());
    expect_complete(log.stats);
    if (force_thread) {
      EXPECT_FALSE(log.stats.used_io_uring);
    }
    d->reset(); // joins
    EXPECT_EQ(log.calls.load(), 1);
    EXPECT_EQ(f.present(), file_size / page_size);
    EXPECT_TRUE(f.content_ok());
  }
}

TEST(PrefetchDriver, CancelFromAnotherThreadEndsCallbacks) {
  for (bool own_thread : {false, true}) {
    for (int round = 0; round < 4; ++round) {
      SCOPED_TRACE(testing::Message() << own_thread << " " << round);
      mapped_file f;
      done_log log;
      service svc;
      auto d = prefetch_driver::start(own_thread ? asio::any_io_executor() : svc.executor(),
                                      f.plan(), options(), log.handler());
      ASSERT_TRUE(d) << d.err().message();
      if (round > 0) { // let it get going; how far does not matter
        const auto deadline = std::chrono::steady_clock::now() + 30s;
        while ((*d)->stats().bytes_read < round * mib && !(*d)->stats().done &&
               std::chrono::steady_clock::now() < deadline)
          std::this_thread::yield();
      }
      std::thread other([&] { (*d)->cancel(); });
      other.join();
      const auto s = (*d)->stats();
      // It either ended first (and reported it once) or was cancelled (and reports nothing).
      EXPECT_NE(s.done, s.cancelled);
      const int calls = log.calls.load();
      EXPECT_LE(calls, s.done ? 1 : 0);
      if (!s.done) {
        EXPECT_EQ(calls, 0);
      }
      (*d)->wait(); // returns at once
      (*d)->cancel();
      svc.drain();
      EXPECT_EQ(log.calls.load(), calls) << "no callback after cancel()";
      EXPECT_EQ((*d)->stats().bytes_read, s.bytes_read) << "no read after cancel()";
    }
  }
}

TEST(PrefetchDriver, DestroyingItWithAWaitPendingIsSafe) {
  mapped_file f;
  const std::size_t outside = open_fds();
  {
    service svc;
    { // a first driver run to its end brings up the io_context's reactor (its own descriptors)
      auto d = prefetch_driver::start(svc.executor(), f.plan(), options());
      ASSERT_TRUE(d) << d.err().message();
      (*d)->wait();
      d->reset();
      svc.drain();
    }
    const std::size_t fds = open_fds();
    for (int round = 0; round < 4; ++round) {
      done_log log;
      auto d = prefetch_driver::start(svc.executor(), f.plan(), options(), log.handler());
      ASSERT_TRUE(d) << d.err().message();
      if (round % 2) svc.drain(); // the first poll ran: a wait is pending
      d->reset();
      svc.drain();
      EXPECT_LE(log.calls.load(), 1);
    }
    // The woken waits let go of the descriptors on the executor.
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    while (open_fds() != fds && std::chrono::steady_clock::now() < deadline) {
      svc.drain();
      std::this_thread::sleep_for(1ms);
    }
    EXPECT_EQ(open_fds(), fds) << "ring, eventfd and its dup closed";
  }
  EXPECT_EQ(open_fds(), outside);
}

TEST(PrefetchDriver, AnIoContextThatNeverRunsIsTornDownCleanly) {
  mapped_file f;
  const std::size_t fds = open_fds();
  {
    asio::io_context ctx;
    done_log log;
    auto d = prefetch_driver::start(ctx.get_executor(), f.plan(), options(), log.handler());
    ASSERT_TRUE(d) << d.err().message();
    d->reset(); // the posted first step still holds the state
    EXPECT_EQ(log.calls.load(), 0);
  } // destroys the handler, then the state and its descriptor
  EXPECT_EQ(open_fds(), fds);
}

TEST(PrefetchDriver, OnDoneMayCancelAndDropTheLastReference) {
  for (bool own_thread : {false, true}) {
    SCOPED_TRACE(own_thread);
    mapped_file f;
    service svc;
    // Shared with the callback, which may still be returning when the test goes on.
    struct shared {
      std::shared_ptr<prefetch_driver> holder;
      std::promise<void> held, dropped;
      std::shared_future<void> held_f;
      std::atomic<int> calls{0};
    };
    auto sh = std::make_shared<shared>();
    sh->held_f = sh->held.get_future().share();
    auto dropped = sh->dropped.get_future();
    auto d = prefetch_driver::start(own_thread ? asio::any_io_executor() : svc.executor(), f.plan(),
                                    options(), [sh](const memory::prefetch_stats& s) {
                                      EXPECT_TRUE(s.done);
                                      ++sh->calls;
                                      sh->held_f.wait();
                                      sh->holder->cancel(); // from inside: no deadlock
                                      sh->holder.reset();   // the driver dies here
                                      sh->dropped.set_value();
                                    });
    ASSERT_TRUE(d) << d.err().message();
    sh->holder = std::move(*d);
    sh->held.set_value();
    ASSERT_EQ(dropped.wait_for(60s), std::future_status::ready);
    EXPECT_EQ(sh->calls.load(), 1);
    svc.drain();
  }
}

TEST(PrefetchDriver, StartReportsAnInvalidPlan) {
  auto d = prefetch_driver::start({}, {{-1, 0, page_size, nullptr}}, {});
  ASSERT_FALSE(d);
  EXPECT_EQ(d.code(), std::errc::invalid_argument);
}

} // namespace
} // namespace kiln::detail
