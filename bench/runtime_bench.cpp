// Benchmark: kiln::runtime call latency (from the sandbox's own worker and from another thread),
// throughput across workers, and fairness beside a spinning guest; each figure is printed beside
// a baseline measured in the same run, with the ratio.
#include <kiln/runtime/runtime.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>
#include <boost/system/system_error.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <future>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace asio = boost::asio;
using clock_type = std::chrono::steady_clock;
using namespace std::chrono_literals;

struct options {
  int calls = 5000;         // sequential calls per latency measurement
  int repeat = 3;           // latency measurements per row (the median is printed)
  unsigned sandboxes = 32;  // throughput: sandboxes per runtime
  int tput_calls = 2000;    // throughput: sequential calls per sandbox
  unsigned workers_max = 0; // throughput: 0 = hardware threads
  int samples = 300;        // fairness: latency samples per configuration
  std::string only;         // latency, throughput or fairness; empty: all
};

struct row {
  std::string what;
  double kiln;
  std::string unit;
  std::string baseline_name;
  double baseline;
};

void print(const std::string& backend, const row& r) {
  fmt::print("{:<9} {:<44} {:>11.2f} {:<7} {:<34} {:>11.2f} {:<7} {:>7.2f}x\n", backend, r.what,
             r.kiln, r.unit, r.baseline_name, r.baseline, r.unit,
             r.baseline > 0 ? r.kiln / r.baseline : 0.0);
}

double us_since(clock_type::time_point t0) {
  return std::chrono::duration<double, std::micro>(clock_type::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// Fails loudly: a benchmark of wrong answers measures nothing.
void check(const kiln::value& got, const kiln::value& want, const char* what) {
  if (got != want)
    throw std::runtime_error(fmt::format("{} returned {}, expected {}", what, kiln::to_string(got),
                                         kiln::to_string(want)));
}

kiln::async_sandbox create(kiln::runtime& rt, const kiln::sandbox_config& cfg,
                           const kiln::host_functions& fns = {}) {
  return rt.async_create(cfg, fns, asio::use_future).get();
}

struct call_case {
  const char* label;
  std::string name;
  std::vector<kiln::value> args;
  kiln::value want;
};

// Mean microseconds per call of `calls` sequential calls, issued by a coroutine running on the
// sandbox's own worker (no thread crossing on either side).
asio::awaitable<double> own_worker_calls(kiln::async_sandbox sb, call_case c, int calls) {
  // Each call's name and arguments are copied into named variables (as every other caller
  // here copies them), and the result is named before it is checked: GCC 12 mishandles some
  // temporaries that live across a co_await.
  auto one = [&]() -> asio::awaitable<void> {
    std::string name = c.name;
    std::vector<kiln::value> args = c.args;
    kiln::value v = co_await sb.async_call(std::move(name), std::move(args), asio::use_awaitable);
    check(v, c.want, c.label);
  };
  for (int i = 0; i < 100; ++i) // warm up translations and caches
    co_await one();
  const auto t0 = clock_type::now();
  for (int i = 0; i < calls; ++i)
    co_await one();
  co_return us_since(t0) / calls;
}

void bench_latency(const std::string& b, const kiln::sandbox_config& cfg, const options& o) {
  kiln::host_functions fns;
  fns.add("host_add", [](std::int64_t x, std::int64_t y) { return x + y; });
  const std::vector<call_case> cases = {
      {"nothing()", "nothing", {}, kiln::value{}},
      {"add_i32(2,3)", "add_i32", {2, 3}, std::int32_t{5}},
      {"call_host(host_add,1,2)",
       "call_host",
       {std::string("host_add"), std::int64_t{1}, std::int64_t{2}},
       std::int64_t{3}},
  };
  auto sync_sb = kiln::sandbox::create(cfg, fns);
  if (!sync_sb) throw std::runtime_error("create: " + sync_sb.err().message());
  kiln::runtime rt({.workers = 1});
  auto sb = create(rt, cfg, fns);

  // The floor of the other-thread rows: the same round trip through plain Asio, no guest.
  std::vector<double> hop_us;
  {
    asio::io_context ctx(1);
    auto guard = asio::make_work_guard(ctx);
    std::thread t([&] { ctx.run(); });
    for (int r = 0; r < o.repeat; ++r) {
      for (int i = 0; i < 100; ++i)
        asio::post(ctx, asio::use_future).get();
      const auto t0 = clock_type::now();
      for (int i = 0; i < o.calls; ++i)
        asio::post(ctx, asio::use_future).get();
      hop_us.push_back(us_since(t0) / o.calls);
    }
    guard.reset();
    t.join();
  }
  fmt::print("{:<9} floor of the other-thread rows: asio::post + use_future round trip to another "
             "thread, no guest: {:.2f} us\n",
             b, median(hop_us));

  for (const auto& c : cases) {
    std::vector<double> sync_us, worker_us, thread_us;
    for (int r = 0; r < o.repeat; ++r) {
      // Baseline: the synchronous sandbox::call of the same function on this thread.
      for (int i = 0; i < 100; ++i)
        (void)(*sync_sb)->call(c.name, c.args);
      auto t0 = clock_type::now();
      for (int i = 0; i < o.calls; ++i) {
        auto v = (*sync_sb)->call(c.name, c.args);
        if (!v) throw std::runtime_error(v.err().message());
        check(*v, c.want, c.label);
      }
      sync_us.push_back(us_since(t0) / o.calls);

      worker_us.push_back(
          asio::co_spawn(sb.get_executor(), own_worker_calls(sb, c, o.calls), asio::use_future)
              .get());

      for (int i = 0; i < 100; ++i)
        (void)sb.async_call(c.name, c.args, asio::use_future).get();
      t0 = clock_type::now();
      for (int i = 0; i < o.calls; ++i)
        check(sb.async_call(c.name, c.args, asio::use_future).get(), c.want, c.label);
      thread_us.push_back(us_since(t0) / o.calls);
    }
    const double base = median(sync_us);
    print(b, {fmt::format("{} own worker, awaitable", c.label), median(worker_us), "us",
              "sandbox::call, same thread", base});
    print(b, {fmt::format("{} other thread, future", c.label), median(thread_us), "us",
              "sandbox::call, same thread", base});
  }
}

asio::awaitable<void> add_loop(kiln::async_sandbox sb, int calls) {
  for (std::int32_t i = 0; i < calls; ++i) {
    std::string name = "add_i32";
    std::vector<kiln::value> args{i, std::int32_t{1}};
    kiln::error_code ec;
    kiln::value v = co_await sb.async_call(std::move(name), std::move(args),
                                           asio::redirect_error(asio::use_awaitable, ec));
    if (ec)
      throw std::runtime_error(fmt::format("add_i32({}, 1) on worker {}, call {}: {}", i,
                                           sb.worker(), sb.stats().calls,
                                           sb.last_error().message()));
    check(v, std::int32_t{i + 1}, "add_i32");
  }
}

// Calls per second of `sandboxes` sandboxes each running `calls` sequential calls from a
// coroutine on its own worker, all at once.
// Also reports how many calls were preempted: a call outlives its time slice only when the OS
// took the worker's core away (more workers than free cores), and each preemption kicks a guest.
// A failed or wrong call leaves its message in `failure` (the other sandboxes run on).
double throughput(const kiln::sandbox_config& cfg, unsigned workers, const options& o,
                  std::uint64_t& preemptions, std::string& failure) {
  kiln::runtime rt({.workers = workers});
  std::vector<kiln::async_sandbox> sbs;
  for (unsigned i = 0; i < o.sandboxes; ++i)
    sbs.push_back(create(rt, cfg));
  auto run_all = [&](int calls) {
    std::vector<std::future<void>> done;
    const auto t0 = clock_type::now();
    for (const auto& sb : sbs)
      done.push_back(asio::co_spawn(sb.get_executor(), add_loop(sb, calls), asio::use_future));
    for (auto& f : done) {
      try {
        f.get();
      } catch (const std::exception& e) {
        if (failure.empty()) failure = e.what();
      }
    }
    return us_since(t0);
  };
  (void)run_all(20); // warm up: each sandbox has its own engine and translations
  const double us = run_all(o.tput_calls);
  preemptions = rt.stats().preemptions;
  return double(o.sandboxes) * o.tput_calls / (us / 1e6);
}

// Returns false if a call failed or returned a wrong value.
bool bench_throughput(const std::string& b, const kiln::sandbox_config& cfg, const options& o) {
  auto sync_sb = kiln::sandbox::create(cfg);
  if (!sync_sb) throw std::runtime_error("create: " + sync_sb.err().message());
  const long total = long(o.sandboxes) * o.tput_calls;
  for (int i = 0; i < 100; ++i)
    (void)(*sync_sb)->call("add_i32", 1, 1);
  auto t0 = clock_type::now();
  for (long i = 0; i < total; ++i) {
    auto v = (*sync_sb)->call("add_i32", std::int32_t(i % 1000), std::int32_t{1});
    if (!v) throw std::runtime_error(v.err().message());
    check(*v, std::int32_t(i % 1000 + 1), "add_i32");
  }
  const double base = double(total) / (us_since(t0) / 1e6);

  // Not the baseline, but what explains part of the gap: the same synchronous calls spread
  // round robin over as many sandboxes (each has its own engine, memory and translations).
  std::vector<std::unique_ptr<kiln::sandbox>> many;
  for (unsigned i = 0; i < o.sandboxes; ++i) {
    auto s = kiln::sandbox::create(cfg);
    if (!s) throw std::runtime_error("create: " + s.err().message());
    for (int k = 0; k < 20; ++k)
      (void)(*s)->call("add_i32", 1, 1);
    many.push_back(std::move(*s));
  }
  t0 = clock_type::now();
  for (long i = 0; i < total; ++i) {
    auto v = many[std::size_t(i) % many.size()]->call("add_i32", std::int32_t(i % 1000), 1);
    if (!v) throw std::runtime_error(v.err().message());
  }
  fmt::print("{:<9} for reference: sandbox::call round robin over {} sandboxes, 1 thread: {:.0f} "
             "calls/s\n",
             b, o.sandboxes, double(total) / (us_since(t0) / 1e6));
  many.clear();

  const unsigned n =
      o.workers_max ? o.workers_max : std::max(1u, std::thread::hardware_concurrency());
  std::vector<unsigned> counts;
  for (unsigned w = 1; w < n; w *= 2)
    counts.push_back(w);
  counts.push_back(n);
  counts.push_back(n + 1);
  std::string scaling, preempted, failures;
  double one = 0;
  for (unsigned w : counts) {
    std::uint64_t preemptions = 0;
    std::string failure;
    const double cps = throughput(cfg, w, o, preemptions, failure);
    if (!failure.empty()) {
      failures += fmt::format("{:<9} {} workers: FAILED ({} preemptions): {}\n", b, w, preemptions,
                              failure);
      continue;
    }
    if (w == 1) one = cps;
    print(b, {fmt::format("{} sandboxes, {} worker{}", o.sandboxes, w, w > 1 ? "s" : ""), cps,
              "calls/s", "sandbox::call, 1 thread, same total", base});
    scaling += fmt::format("  {}w {:.2f}x", w, one > 0 ? cps / one : 0.0);
    preempted += fmt::format("  {}w {}", w, preemptions);
  }
  fmt::print("{:<9} scaling vs 1 worker ({} hardware threads):{}\n", b,
             std::thread::hardware_concurrency(), scaling);
  fmt::print("{:<9} calls preempted by the time slice:{}\n", b, preempted);
  fmt::print("{}", failures);
  return failures.empty();
}

struct percentiles {
  double p50, p99, max;
};
percentiles summarize(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v[v.size() / 2], v[std::min(v.size() - 1, v.size() * 99 / 100)], v.back()};
}

std::vector<double> sample_latency(const kiln::async_sandbox& sb, int samples) {
  std::vector<double> us;
  for (int i = 0; i < samples; ++i) {
    const auto t0 = clock_type::now();
    check(sb.async_call("add_i32", {2, 3}, asio::use_future).get(), std::int32_t{5}, "add_i32");
    us.push_back(us_since(t0));
  }
  return us;
}

void bench_fairness(const std::string& b, const kiln::sandbox_config& calc,
                    const kiln::sandbox_config& faults, const options& o) {
  for (auto slice : {1ms, 5ms, 20ms}) {
    // Declared before the runtime, which may still complete the spinner on an error path.
    asio::cancellation_signal cancel_spin;
    std::promise<kiln::error_code> spin_done;
    kiln::runtime rt({.workers = 1, .time_slice = slice});
    auto sb = create(rt, calc);
    auto spinner = create(rt, faults);
    (void)sample_latency(sb, 50); // warm up
    const auto alone = summarize(sample_latency(sb, o.samples));

    // The spinner runs under a deadline that outlasts the measurement, and is then cancelled
    // through its handler's cancellation slot. (The call is started and cancelled on the
    // spinner's worker, as Asio wants a slot used from one thread.)
    const auto deadline = 2s + o.samples * slice * 4;
    asio::post(spinner.get_executor(), [&] {
      spinner.async_call("spin", {}, {.timeout = deadline},
                         asio::bind_cancellation_slot(cancel_spin.slot(),
                                                      [&](kiln::error_code ec, const kiln::value&) {
                                                        spin_done.set_value(ec);
                                                      }));
    });
    auto spin = spin_done.get_future();
    std::this_thread::sleep_for(2 * slice); // the spinner is in the guest now
    const auto before = rt.stats().preemptions;
    const auto shared = summarize(sample_latency(sb, o.samples));
    const auto preempted = rt.stats().preemptions - before;
    if (spin.wait_for(0s) == std::future_status::ready)
      throw std::runtime_error("the spinner ended during the measurement");
    asio::post(spinner.get_executor(),
               [&] { cancel_spin.emit(asio::cancellation_type::terminal); });
    if (const auto ec = spin.get(); ec != kiln::errc::cancelled)
      throw std::runtime_error("spin() ended with " + ec.message() + ", expected cancelled");

    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(slice).count();
    const std::string base = "same call, no spinner";
    print(b, {fmt::format("add_i32 beside spin, slice {:>2} ms p50", ms), shared.p50, "us",
              base + " p50", alone.p50});
    print(b, {fmt::format("add_i32 beside spin, slice {:>2} ms p99", ms), shared.p99, "us",
              base + " p99", alone.p99});
    print(b, {fmt::format("add_i32 beside spin, slice {:>2} ms max", ms), shared.max, "us",
              base + " max", alone.max});
    fmt::print("{:<9} slice {} ms: {} preemptions during {} samples\n", b, ms, preempted,
               o.samples);
  }
}

int bench_backend(kiln::vcpu::backend_kind kind, const options& o) {
  const auto st = kiln::vcpu::probe(kind);
  if (!st.usable) {
    fmt::print("{:<9} skipped: {}\n", kiln::vcpu::to_string(kind), st.reason);
    return 0;
  }
  kiln::sandbox_config calc, faults;
  calc.guest_path = std::string(KILN_GUEST_DIR) + "/calc.elf";
  faults.guest_path = std::string(KILN_GUEST_DIR) + "/faults.elf";
  calc.backend = faults.backend = kind == kiln::vcpu::backend_kind::kvm
                                      ? kiln::vcpu::backend_choice::kvm
                                      : kiln::vcpu::backend_choice::emulated;
  const std::string b = kiln::vcpu::to_string(kind);
  int rc = 0;
  try {
    if (o.only.empty() || o.only == "latency") bench_latency(b, calc, o);
    if ((o.only.empty() || o.only == "throughput") && !bench_throughput(b, calc, o)) rc = 1;
    if (o.only.empty() || o.only == "fairness") bench_fairness(b, calc, faults, o);
  } catch (const boost::system::system_error& e) {
    fmt::print(stderr, "{}: {}\n", b, e.code().message());
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "{}: {}\n", b, e.what());
    return 1;
  }
  return rc;
}

} // namespace

int main(int argc, char** argv) {
  options o;
  std::string only;
  bool usage = false;
  for (int i = 1; i < argc; ++i) {
    const bool has = i + 1 < argc;
    if (!std::strcmp(argv[i], "--backend") && has)
      only = argv[++i];
    else if (!std::strcmp(argv[i], "--calls") && has)
      o.calls = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--repeat") && has)
      o.repeat = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--sandboxes") && has)
      o.sandboxes = unsigned(std::atoi(argv[++i]));
    else if (!std::strcmp(argv[i], "--tput-calls") && has)
      o.tput_calls = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--workers-max") && has)
      o.workers_max = unsigned(std::atoi(argv[++i]));
    else if (!std::strcmp(argv[i], "--samples") && has)
      o.samples = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--only") && has)
      o.only = argv[++i];
    else
      usage = true;
  }
  if (usage || o.calls < 1 || o.repeat < 1 || o.sandboxes < 1 || o.tput_calls < 1 ||
      o.samples < 1 ||
      (!o.only.empty() && o.only != "latency" && o.only != "throughput" && o.only != "fairness")) {
    fmt::print(stderr, "usage: runtime_bench [--backend kvm|emulated] [--calls N] [--repeat N]\n"
                       "         [--sandboxes N] [--tput-calls N] [--workers-max N] [--samples N]\n"
                       "         [--only latency|throughput|fairness]\n");
    return 2;
  }
  fmt::print("{:<9} {:<44} {:>19}   {:<34} {:>19}   {:>7}\n", "backend", "measure", "kiln",
             "baseline (same run)", "baseline", "ratio");
  int rc = 0;
  for (auto k : {kiln::vcpu::backend_kind::kvm, kiln::vcpu::backend_kind::emulated})
    if (only.empty() || only == kiln::vcpu::to_string(k)) rc |= bench_backend(k, o);
  return rc;
}
