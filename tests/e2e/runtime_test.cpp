// End to end: kiln::runtime with every completion style, async host functions, deadlines,
// cancellation, time slicing, queue limits and graceful stop.
#include "backend_fixture.hpp"

#include <kiln/memory/memory_errc.hpp>
#include <kiln/runtime/runtime.hpp>

#include <stdexcept>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>

#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <thread>

namespace kiln::test {
namespace {
namespace asio = boost::asio;
using namespace std::chrono_literals;

class runtime_test : public backend_test {
protected:
  async_sandbox create(runtime& rt, const std::string& guest, host_functions fns = {}) {
    auto f = rt.async_create(config_for(guest), std::move(fns), asio::use_future);
    auto sb = f.get();
    EXPECT_TRUE(sb) << sb.last_error().message();
    return sb;
  }
  static host_functions adders() {
    host_functions fns;
    fns.add("host_add", [](std::int64_t a, std::int64_t b) { return a + b; });
    return fns;
  }
};

// Under the runtime a throwing log sink used to end the process (an exception out of a worker).
TEST_F(runtime_test, a_log_sink_that_throws_does_not_end_the_process) {
  runtime rt({.workers = 1});
  auto c = config_for("faults");
  c.log_sink = [](std::string_view) { throw std::runtime_error("sink refused"); };
  auto sb = rt.async_create(c, {}, asio::use_future).get();
  ASSERT_TRUE(sb) << sb.last_error().message();
  for (int i = 0; i < 3; ++i)
    EXPECT_EQ(std::get<std::int32_t>(sb.async_call("log_hello", {}, asio::use_future).get()), 7);
  EXPECT_EQ(sb.stats().log_sink_errors, 3u);
}

// Before, a sandbox whose handles were all dropped was destroyed without leaving the count of
// live sandboxes, which then never reached zero: stats() lied and stop() waited for ever.
TEST_F(runtime_test, dropping_every_handle_destroys_the_sandbox_and_stop_returns) {
  runtime rt({.workers = 1});
  {
    auto sb = create(rt, "calc");
    ASSERT_TRUE(sb);
    EXPECT_EQ(std::get<std::int32_t>(sb.async_call("add_i32", {2, 3}, asio::use_future).get()), 5);
    EXPECT_EQ(rt.stats().sandboxes, 1u);
  }
  const auto until = std::chrono::steady_clock::now() + scaled_budget(2s);
  while (rt.stats().sandboxes != 0 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(1ms);
  EXPECT_EQ(rt.stats().sandboxes, 0u);
  rt.stop(); // returns: nothing is left on the worker
}

TEST_F(runtime_test, future_style) {
  runtime rt({.workers = 2});
  auto sb = create(rt, "calc");
  ASSERT_TRUE(sb);
  auto v = sb.async_call("add_i32", {2, 3}, asio::use_future).get();
  EXPECT_EQ(std::get<std::int32_t>(v), 5);
}

TEST_F(runtime_test, files_are_mapped_and_unmapped_in_order_with_calls) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("kiln-runtime-map-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto path = (dir / "data").string();
  std::ofstream(path, std::ios::binary).write("\x05\x06\x07", 3);
  runtime rt(runtime_options{.workers = 2});
  auto sb = create(rt, "memory_test");
  ASSERT_TRUE(sb);
  // Queued together: the map runs after the first call and before the second.
  auto before = sb.async_call("file_size", {value{std::string("data")}}, asio::use_future);
  auto mapped = sb.async_map_file({path, "data", 0}, asio::use_future);
  auto sum = sb.async_call("file_sum", {value{std::string("data")}}, asio::use_future);
  EXPECT_EQ(std::get<std::int64_t>(before.get()), -1);
  const mapped_file_info info = mapped.get();
  EXPECT_EQ(info.name, "data");
  EXPECT_EQ(info.path, path);
  EXPECT_EQ(info.size, 3u);
  EXPECT_NE(info.guest_address, 0u);
  EXPECT_EQ(std::get<std::uint64_t>(sum.get()), 18u);
  EXPECT_EQ(sb.stats().memory.files_mapped, 1u);
  // Errors come back typed; the sandbox is unharmed.
  auto again = sb.async_map_file({path, "data", 0}, asio::use_future);
  try {
    again.get();
    ADD_FAILURE() << "a duplicate name was accepted";
  } catch (const boost::system::system_error& e) {
    EXPECT_EQ(e.code(), std::error_code(memory::memory_errc::file_name_invalid));
  }
  sb.async_unmap_file("data", asio::use_future).get();
  EXPECT_EQ(std::get<std::int64_t>(
                sb.async_call("file_size", {value{std::string("data")}}, asio::use_future).get()),
            -1);
  EXPECT_FALSE(sb.poisoned());
  // Counted apart from the calls: three calls, two maps (one refused), one unmap.
  EXPECT_EQ(rt.stats().calls, 3u);
  EXPECT_EQ(rt.stats().maps, 2u);
  EXPECT_EQ(rt.stats().unmaps, 1u);
  std::filesystem::remove_all(dir);
}

TEST_F(runtime_test, snapshot_and_restore_run_in_order_with_calls) {
  runtime rt(runtime_options{.workers = 2});
  auto sb = create(rt, "memory_test");
  ASSERT_TRUE(sb);
  auto one = sb.async_call("bump", {}, asio::use_future);
  auto snap_f = sb.async_snapshot(asio::use_future);
  auto two = sb.async_call("bump", {}, asio::use_future);
  EXPECT_EQ(std::get<std::int64_t>(one.get()), 1);
  snapshot snap = snap_f.get();
  ASSERT_TRUE(snap);
  EXPECT_EQ(std::get<std::int64_t>(two.get()), 2);
  // A poisoning failure, then a restore from a coroutine: usable again, counter back to 1.
  EXPECT_THROW(sb.async_call("peek", {value{std::uint64_t{0}}}, asio::use_future).get(),
               boost::system::system_error);
  EXPECT_TRUE(sb.poisoned());
  std::promise<std::int64_t> after;
  asio::co_spawn(
      sb.get_executor(),
      [&]() -> asio::awaitable<void> {
        co_await sb.async_restore(snap, asio::use_awaitable);
        auto v = co_await sb.async_call("bump", {}, asio::use_awaitable);
        after.set_value(std::get<std::int64_t>(v));
      },
      asio::detached);
  EXPECT_EQ(after.get_future().get(), 2);
  EXPECT_FALSE(sb.poisoned());
  EXPECT_EQ(sb.stats().restores, 1u);
  // Four guest calls (the failed one included); the snapshot and the restore count apart.
  EXPECT_EQ(rt.stats().calls, 4u);
  EXPECT_EQ(rt.stats().snapshots, 1u);
  EXPECT_EQ(rt.stats().restores, 1u);
  EXPECT_EQ(rt.stats().maps + rt.stats().unmaps, 0u);
}

TEST_F(runtime_test, future_style_reports_errors_as_system_error) {
  runtime rt({.workers = 1});
  auto sb = create(rt, "calc");
  ASSERT_TRUE(sb);
  auto f = sb.async_call("no_such_function", {}, asio::use_future);
  try {
    f.get();
    FAIL() << "expected an exception";
  } catch (const boost::system::system_error& e) {
    EXPECT_EQ(e.code(), errc::function_not_found);
  }
  EXPECT_EQ(sb.last_error().code, errc::function_not_found);
}

TEST_F(runtime_test, callback_style_completes_on_the_worker) {
  runtime rt({.workers = 2});
  auto sb = create(rt, "calc");
  ASSERT_TRUE(sb);
  std::promise<std::pair<error_code, value>> p;
  std::atomic<bool> on_worker{false};
  sb.async_call("mul_i32", {6, 7}, [&](error_code ec, value v) {
    on_worker = sb.get_executor().running_in_this_thread();
    p.set_value({ec, std::move(v)});
  });
  auto [ec, v] = p.get_future().get();
  EXPECT_FALSE(ec);
  EXPECT_EQ(std::get<std::int32_t>(v), 42);
  EXPECT_TRUE(on_worker);
}

TEST_F(runtime_test, completion_runs_on_the_handlers_executor_never_inside_the_call) {
  runtime rt({.workers = 1});
  auto sb = create(rt, "calc");
  ASSERT_TRUE(sb);
  asio::io_context mine;
  bool ran_on_mine = false, inline_call = false;
  std::atomic<bool> returned{false};
  sb.async_call("add_i32", {1, 2}, asio::bind_executor(mine, [&](error_code ec, value v) {
                  inline_call = !returned;
                  ran_on_mine = mine.get_executor().running_in_this_thread() && !ec &&
                                std::get<std::int32_t>(v) == 3;
                }));
  returned = true;
  mine.run(); // returns once the call completed: it tracked work on `mine` until then
  EXPECT_TRUE(ran_on_mine);
  EXPECT_FALSE(inline_call);
  // A call on a destroyed sandbox fails at once, still not inside the initiating function.
  sb.async_destroy(asio::use_future).get();
  returned = false;
  std::atomic<bool> failed_inline{false};
  std::promise<error_code> p;
  const auto caller = std::this_thread::get_id();
  sb.async_call("add_i32", {1, 2}, [&](error_code ec, value) {
    // Inline means: on this thread, before async_call returned (another thread may well run
    // the handler before we get to set `returned`).
    failed_inline = std::this_thread::get_id() == caller && !returned;
    p.set_value(ec);
  });
  returned = true;
  EXPECT_EQ(p.get_future().get(), asio::error::bad_descriptor);
  EXPECT_FALSE(failed_inline);
}

TEST_F(runtime_test, coroutine_style_and_same_worker_calls) {
  runtime rt({.workers = 1});
  auto sb = create(rt, "calc", adders());
  ASSERT_TRUE(sb);
  auto f = asio::co_spawn(
      sb.get_executor(),
      [sb]() -> asio::awaitable<std::int64_t> {
        std::int64_t sum = 0;
        for (int i = 0; i < 100; ++i) {
          // (GCC 12 miscompiles a string literal argument inside co_await: name it first.)
          std::vector<value> args{std::string("host_add"), std::int64_t{i}, std::int64_t{1}};
          value v = co_await sb.async_call(std::string("call_host"), std::move(args),
                                           asio::use_awaitable);
          sum += std::get<std::int64_t>(v);
        }
        co_return sum;
      },
      asio::use_future);
  EXPECT_EQ(f.get(), 5050);
}

TEST_F(runtime_test, deferred_style) {
  runtime rt({.workers = 1});
  auto sb = create(rt, "calc");
  ASSERT_TRUE(sb);
  auto op = sb.async_call("add_i64", {std::int64_t{40}, std::int64_t{2}}, asio::deferred);
  // Nothing runs until the deferred operation is launched.
  auto v = std::move(op)(asio::use_future).get();
  EXPECT_EQ(std::get<std::int64_t>(v), 42);
}

TEST_F(runtime_test, async_host_function_parks_the_guest) {
  runtime rt({.workers = 1});
  host_functions fns;
  std::thread replier;
  fns.add_async<std::int64_t(std::int64_t, std::int64_t)>(
      "host_add", [&](std::int64_t a, std::int64_t b, host_reply<std::int64_t> reply) {
        // Reply from another thread, later: the worker must stay free meanwhile.
        replier = std::thread([=] {
          std::this_thread::sleep_for(20ms);
          reply(a + b);
        });
      });
  auto sb = create(rt, "calc", std::move(fns));
  auto other = create(rt, "calc");
  ASSERT_TRUE(sb && other);
  auto slow = sb.async_call(
      "call_host", {std::string("host_add"), std::int64_t{40}, std::int64_t{2}}, asio::use_future);
  // While the first guest waits on its host function, the same worker serves another sandbox.
  auto fast = other.async_call("add_i32", {1, 1}, asio::use_future);
  EXPECT_EQ(fast.wait_for(scaled_budget(2s)), std::future_status::ready);
  EXPECT_EQ(std::get<std::int32_t>(fast.get()), 2);
  EXPECT_EQ(std::get<std::int64_t>(slow.get()), 42);
  replier.join();
}

TEST_F(runtime_test, awaitable_host_function) {
  runtime rt({.workers = 1});
  host_functions fns;
  fns.add_awaitable("host_add",
                    [](std::int64_t a, std::int64_t b) -> asio::awaitable<std::int64_t> {
                      asio::steady_timer t(co_await asio::this_coro::executor, 5ms);
                      co_await t.async_wait(asio::use_awaitable);
                      co_return a * 100 + b;
                    });
  fns.add_awaitable("host_throw", [](std::int64_t, std::int64_t) -> asio::awaitable<std::int64_t> {
    throw std::runtime_error("nope");
    co_return 0;
  });
  auto sb = create(rt, "calc", std::move(fns));
  ASSERT_TRUE(sb);
  auto v = sb.async_call("call_host", {std::string("host_add"), std::int64_t{4}, std::int64_t{2}},
                         asio::use_future)
               .get();
  EXPECT_EQ(std::get<std::int64_t>(v), 402);
  auto f = sb.async_call("call_host", {std::string("host_throw"), std::int64_t{4}, std::int64_t{2}},
                         asio::use_future);
  EXPECT_THROW(f.get(), boost::system::system_error); // guest reports the host error
  EXPECT_FALSE(sb.poisoned());
}

TEST_F(runtime_test, deadline_kills_a_spinning_guest_and_poisons) {
  runtime rt({.workers = 1});
  auto sb = create(rt, "faults");
  ASSERT_TRUE(sb);
  const auto t0 = std::chrono::steady_clock::now();
  auto f = sb.async_call("spin", {}, call_options{.timeout = 50ms}, asio::use_future);
  try {
    f.get();
    FAIL();
  } catch (const boost::system::system_error& e) {
    EXPECT_EQ(e.code(), errc::deadline_exceeded);
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
  EXPECT_TRUE(sb.poisoned());
  auto again = sb.async_call("log_hello", {}, asio::use_future);
  try {
    again.get();
    FAIL();
  } catch (const boost::system::system_error& e) {
    EXPECT_EQ(e.code(), errc::poisoned);
  }
}

TEST_F(runtime_test, cancellation_slot_cancels_a_running_guest) {
  runtime rt({.workers = 1});
  auto sb = create(rt, "faults");
  ASSERT_TRUE(sb);
  asio::cancellation_signal sig;
  std::promise<error_code> p;
  asio::post(sb.get_executor(), [&] {
    sb.async_call("spin", {}, asio::bind_cancellation_slot(sig.slot(), [&](error_code ec, value) {
                    p.set_value(ec);
                  }));
  });
  std::this_thread::sleep_for(30ms);
  // Emit on the worker, as Asio requires for a cancellation slot.
  asio::post(sb.get_executor(), [&] { sig.emit(asio::cancellation_type::terminal); });
  auto fut = p.get_future();
  ASSERT_EQ(fut.wait_for(scaled_budget(5s)), std::future_status::ready);
  EXPECT_EQ(fut.get(), errc::cancelled);
  EXPECT_TRUE(sb.poisoned());
}

TEST_F(runtime_test, cancelling_a_queued_call_does_not_poison) {
  runtime rt({.workers = 1});
  auto sb = create(rt, "faults");
  ASSERT_TRUE(sb);
  auto spin = sb.async_call("spin", {}, call_options{.timeout = 200ms}, asio::use_future);
  asio::cancellation_signal sig;
  std::promise<error_code> p;
  asio::post(sb.get_executor(), [&] {
    sb.async_call(
        "log_hello", {},
        asio::bind_cancellation_slot(sig.slot(), [&](error_code ec, value) { p.set_value(ec); }));
    sig.emit(asio::cancellation_type::terminal); // still queued behind the spinning call
  });
  EXPECT_EQ(p.get_future().get(), asio::error::operation_aborted);
  EXPECT_THROW(spin.get(), boost::system::system_error);
}

// Operations have typed completions and are cancelled like calls while they wait in the queue.
TEST_F(runtime_test, a_queued_operation_is_cancelled_with_its_typed_handler) {
  runtime rt({.workers = 1});
  auto sb = create(rt, "faults");
  ASSERT_TRUE(sb);
  auto spin = sb.async_call("spin", {}, call_options{.timeout = 200ms}, asio::use_future);
  asio::cancellation_signal sig;
  std::promise<std::pair<error_code, bool>> p;
  asio::post(sb.get_executor(), [&] {
    sb.async_snapshot(asio::bind_cancellation_slot(sig.slot(), [&](error_code ec, snapshot s) {
      p.set_value({ec, static_cast<bool>(s)});
    }));
    sig.emit(asio::cancellation_type::terminal); // still queued behind the spinning call
  });
  auto [ec, taken] = p.get_future().get();
  EXPECT_EQ(ec, asio::error::operation_aborted);
  EXPECT_FALSE(taken) << "a cancelled snapshot hands back an empty snapshot";
  EXPECT_THROW(spin.get(), boost::system::system_error);
  EXPECT_EQ(rt.stats().snapshots, 1u);
  EXPECT_EQ(rt.stats().calls, 1u);
}

TEST_F(runtime_test, time_slicing_lets_a_neighbour_run) {
  runtime rt({.workers = 1, .time_slice = 5ms});
  auto spinner = create(rt, "faults");
  auto neighbour = create(rt, "calc");
  ASSERT_TRUE(spinner && neighbour);
  ASSERT_EQ(spinner.worker(), neighbour.worker());
  auto spin = spinner.async_call("spin", {}, call_options{.timeout = 600ms}, asio::use_future);
  std::this_thread::sleep_for(20ms); // the spinner is in the guest now
  const auto t0 = std::chrono::steady_clock::now();
  auto v = neighbour.async_call("add_i32", {2, 2}, asio::use_future).get();
  const auto waited = std::chrono::steady_clock::now() - t0;
  EXPECT_EQ(std::get<std::int32_t>(v), 4);
  EXPECT_LT(waited, 1s) << "the neighbour waited for the whole spin";
  EXPECT_GT(rt.stats().preemptions, 0u);
  EXPECT_THROW(spin.get(), boost::system::system_error); // deadline
}

TEST_F(runtime_test, queue_is_bounded) {
  runtime rt({.workers = 1, .max_queued_calls = 4});
  auto sb = create(rt, "faults");
  ASSERT_TRUE(sb);
  std::vector<std::future<value>> fs;
  std::promise<void> gate;
  // Fill the queue from the worker itself so that nothing runs in between.
  asio::post(sb.get_executor(), [&] {
    fs.push_back(sb.async_call("spin", {}, call_options{.timeout = 100ms}, asio::use_future));
    for (int i = 0; i < 6; ++i)
      fs.push_back(sb.async_call("log_hello", {}, asio::use_future));
    gate.set_value();
  });
  gate.get_future().get();
  int full = 0;
  for (auto& f : fs) {
    try {
      f.get();
    } catch (const boost::system::system_error& e) {
      if (e.code() == errc::queue_full) ++full;
    }
  }
  EXPECT_EQ(full, 2); // 1 running + 4 queued accepted, 2 refused
}

TEST_F(runtime_test, stop_aborts_outstanding_calls) {
  auto rt = std::make_unique<runtime>(runtime_options{.workers = 1});
  auto sb = create(*rt, "faults");
  ASSERT_TRUE(sb);
  auto spin = sb.async_call("spin", {}, asio::use_future);
  auto queued = sb.async_call("log_hello", {}, asio::use_future);
  std::this_thread::sleep_for(20ms);
  rt->stop();
  for (auto* f : {&spin, &queued}) {
    try {
      f->get();
      ADD_FAILURE() << "expected operation_aborted";
    } catch (const boost::system::system_error& e) {
      EXPECT_EQ(e.code(), asio::error::operation_aborted);
    }
  }
  auto late = sb.async_call("log_hello", {}, asio::use_future);
  EXPECT_THROW(late.get(), boost::system::system_error);
}

std::size_t count_entries(const char* dir) {
  std::size_t n = 0;
  for ([[maybe_unused]] auto& e : std::filesystem::directory_iterator(dir))
    ++n;
  return n;
}
std::size_t count_lines(const char* file) {
  std::ifstream in(file);
  std::size_t n = 0;
  for (std::string line; std::getline(in, line);)
    ++n;
  return n;
}

TEST_F(runtime_test, stop_leaks_no_threads_fds_or_mappings) {
  auto round = [&] {
    runtime rt({.workers = 3});
    std::vector<async_sandbox> all;
    for (int i = 0; i < 6; ++i)
      all.push_back(create(rt, "calc"));
    for (auto& sb : all)
      sb.async_call("add_i32", {1, 2}, asio::use_future).get();
    auto spin = create(rt, "faults");
    auto f = spin.async_call("spin", {}, asio::use_future);
    std::this_thread::sleep_for(10ms);
    rt.stop();
    EXPECT_THROW(f.get(), boost::system::system_error);
    EXPECT_EQ(rt.stats().sandboxes, 0u);
  };
  // The first round creates process-wide state that stays by design (probe results, the KVM
  // system fd, glibc's per-thread malloc arenas); later rounds must not add to it.
  const long before = thread_count();
  round();
  // Joined threads leave /proc/self/task a moment late: count them once gone.
  const auto threads = thread_count_settled(before);
  const auto fds = count_entries("/proc/self/fd");
  const auto maps = count_lines("/proc/self/maps");
  for (int i = 0; i < 3; ++i)
    round();
  EXPECT_EQ(thread_count_settled(threads), threads);
  EXPECT_EQ(count_entries("/proc/self/fd"), fds) << [] {
    std::string links;
    for (const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) {
      std::error_code ec;
      links += e.path().filename().string() + " -> " +
               std::filesystem::read_symlink(e.path(), ec).string() + "\n";
    }
    return links;
  }();
  // A sanitizer's allocator maps memory of its own as it goes (seen: one more mapping under
  // ASan): the mapping count means something only without one.
  if (!under_sanitizer) {
    EXPECT_LE(count_lines("/proc/self/maps"), maps + 2);
  }
}

TEST_F(runtime_test, destroy_then_call_fails_cleanly) {
  runtime rt({.workers = 1});
  auto sb = create(rt, "calc");
  ASSERT_TRUE(sb);
  sb.async_destroy(asio::use_future).get();
  EXPECT_EQ(rt.stats().sandboxes, 0u);
  auto f = sb.async_call("add_i32", {1, 2}, asio::use_future);
  EXPECT_THROW(f.get(), boost::system::system_error);
}

TEST_F(runtime_test, create_failure_carries_the_detail) {
  runtime rt({.workers = 1});
  auto c = config_for("init_abort");
  auto f = rt.async_create(c, {}, asio::use_future);
  try {
    f.get();
    FAIL();
  } catch (const boost::system::system_error& e) {
    EXPECT_EQ(e.code(), errc::guest_aborted);
  }
  std::promise<async_sandbox> p;
  rt.async_create(c, {}, [&](error_code, async_sandbox sb) { p.set_value(sb); });
  auto sb = p.get_future().get();
  EXPECT_FALSE(sb);
  EXPECT_NE(sb.last_error().message().find("during guest init"), std::string::npos);
}

} // namespace
} // namespace kiln::test
