// Example: one kiln::runtime serving many sandboxes at once. N sandboxes are spread over the
// workers; several threads fire M concurrent calls at each; half the calls go through an
// asynchronous host function that replies from a thread pool. Every result is verified.
#include <kiln/runtime/runtime.hpp>

#include <boost/asio/post.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_future.hpp>
#include <boost/system/system_error.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <future>
#include <iterator>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace asio = boost::asio;

namespace {

struct tally {
  std::atomic<std::uint64_t> ok{0}, wrong{0}, failed{0}, pending{0};
  std::mutex mu;
  std::string first_problem;
  std::promise<void> all_done;

  void record(bool good, const std::string& problem) {
    (good ? ok : problem.empty() ? wrong : failed).fetch_add(1);
    if (!good) {
      std::lock_guard lock(mu);
      if (first_problem.empty()) first_problem = problem.empty() ? "wrong result" : problem;
    }
    if (pending.fetch_sub(1) == 1) all_done.set_value();
  }
};

struct options {
  unsigned sandboxes = 64, calls = 200, threads = 4, workers = 0, pool_threads = 2;
  std::string guest = KILN_GUEST_DIR "/calc.elf";
};

/// The command line, or nothing after printing the usage.
std::optional<options> parse_options(int argc, char** argv) {
  options o;
  bool usage = false;
  const std::pair<const char*, unsigned*> opts[] = {{"--sandboxes", &o.sandboxes},
                                                    {"--calls", &o.calls},
                                                    {"--threads", &o.threads},
                                                    {"--workers", &o.workers},
                                                    {"--pool", &o.pool_threads}};
  for (int i = 1; i < argc; ++i) {
    auto it = std::find_if(std::begin(opts), std::end(opts),
                           [&](const auto& p) { return !std::strcmp(argv[i], p.first); });
    if (it != std::end(opts) && i + 1 < argc)
      *it->second = unsigned(std::atoi(argv[++i]));
    else if (argv[i][0] != '-')
      o.guest = argv[i];
    else
      usage = true;
  }
  if (usage || !o.sandboxes || !o.calls || !o.threads || !o.pool_threads) {
    fmt::print(stderr, "usage: many_sandboxes [--sandboxes N] [--calls M] [--threads T] "
                       "[--workers W] [--pool P] [guest.elf]\n");
    return std::nullopt;
  }
  return o;
}

/// Thread k submits calls k, k + threads, ... to every sandbox: even ones add in the guest, odd
/// ones go out to pool_add and back. Returns once every call is submitted; `t` hears the results.
void fire_calls(const std::vector<kiln::async_sandbox>& sbs, const options& o, tally& t) {
  std::vector<std::thread> submitters;
  for (unsigned k = 0; k < o.threads; ++k)
    submitters.emplace_back([&, k] {
      for (unsigned s = 0; s < sbs.size(); ++s)
        for (unsigned i = k; i < o.calls; i += o.threads) {
          const kiln::async_sandbox& sb = sbs[s];
          auto check = [&t, sb, want = std::int64_t(s) + i](kiln::error_code ec, kiln::value v) {
            if (ec) return t.record(false, sb.last_error().message());
            const auto* i32 = std::get_if<std::int32_t>(&v);
            const auto* i64 = std::get_if<std::int64_t>(&v);
            const std::int64_t got = i32 ? *i32 : i64 ? *i64 : -1;
            t.record(got == want, {});
          };
          if (i % 2 == 0)
            sb.async_call("add_i32", {std::int32_t(i), std::int32_t(s)}, check);
          else
            sb.async_call("call_host", {std::string("pool_add"), std::int64_t(s), std::int64_t(i)},
                          check);
        }
    });
  for (auto& th : submitters)
    th.join();
}

} // namespace

int main(int argc, char** argv) {
  const auto opt = parse_options(argc, argv);
  if (!opt) return 2;
  const auto [sandboxes, calls, threads, workers, pool_threads, guest] = *opt;

  // Every call may wait in its sandbox's queue at once, so the queue must hold them all.
  kiln::runtime rt({.workers = workers, .max_queued_calls = std::max<std::size_t>(1024, calls)});
  asio::thread_pool pool(pool_threads); // after rt: joined first, while the workers still run
  kiln::host_functions host;
  host.add_async<std::int64_t(std::int64_t, std::int64_t)>(
      "pool_add", [&pool](std::int64_t a, std::int64_t b, kiln::host_reply<std::int64_t> reply) {
        asio::post(pool, [a, b, reply = std::move(reply)] {
          reply(a + b);
        }); // the guest stays parked meanwhile
      });

  kiln::sandbox_config config;
  config.guest_path = guest;
  std::vector<std::future<kiln::async_sandbox>> creating;
  for (unsigned s = 0; s < sandboxes; ++s)
    creating.push_back(rt.async_create(config, host, asio::use_future));
  std::vector<kiln::async_sandbox> sbs;
  try {
    for (auto& f : creating)
      sbs.push_back(f.get());
  } catch (const boost::system::system_error& e) {
    fmt::print(stderr, "many_sandboxes: create {}: {}\n", guest, e.code().message());
    return 1;
  }

  tally t;
  const std::uint64_t total = std::uint64_t(sandboxes) * calls;
  t.pending = total;
  const auto t0 = std::chrono::steady_clock::now();
  fire_calls(sbs, *opt, t);
  t.all_done.get_future().get();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  std::vector<unsigned> per_worker(rt.worker_count());
  std::uint64_t host_calls = 0;
  for (const auto& sb : sbs) {
    ++per_worker[sb.worker()];
    host_calls += sb.stats().host_calls;
  }
  for (const auto& sb : sbs)
    sb.async_destroy(asio::use_future).get();
  pool.join();

  fmt::print("{} sandboxes x {} calls from {} threads on {} workers ({} backend)\n", sandboxes,
             calls, threads, rt.worker_count(), kiln::vcpu::to_string(sbs[0].backend()));
  fmt::print("{} calls in {:.3f} s: {:.0f} calls/s; {} correct, {} wrong, {} failed\n", total, secs,
             double(total) / secs, t.ok.load(), t.wrong.load(), t.failed.load());
  fmt::print("async host calls answered by the pool: {} (expected {})\n", host_calls,
             std::uint64_t(sandboxes) * (calls / 2));
  for (unsigned w = 0; w < per_worker.size(); ++w)
    fmt::print("worker {}: {} sandboxes\n", w, per_worker[w]);
  const auto st = rt.stats();
  fmt::print("runtime: {} calls completed, {} preemptions, {} stale kicks, {} sandboxes alive\n",
             st.calls, st.preemptions, st.stale_kicks, st.sandboxes);

  if (t.ok != total || host_calls != std::uint64_t(sandboxes) * (calls / 2)) {
    fmt::print(stderr, "many_sandboxes: FAILED: {}\n", t.first_problem);
    return 1;
  }
  return 0;
}
