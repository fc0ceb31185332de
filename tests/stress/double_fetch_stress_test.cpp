// Stress (ADVERSARIAL 6, double fetch): a harness thread rewrites the guest's output buffer
// without pause while the guest writes requests and results there and the host reads them, as
// a second vCPU or another process sharing the memory could. The host copies each record once and
// parses only the copy (sandbox::impl::copy_out), so whatever the bytes are at any moment, each
// call ends with a value or a typed error, and the host neither crashes nor reads out of bounds
// (run it under scripts/sanitize.sh address). Under ThreadSanitizer the harness's writes race
// with the copy by design, so it skips there.
#include "stress_support.hpp"

#include <kiln/memory/layout.hpp>
#include <kiln/runtime/detail/sandbox_impl.hpp>

#include <map>
#include <random>

namespace kiln::test::stress {
namespace {

class double_fetch_stress : public stress_test {};

TEST_F(double_fetch_stress, the_output_buffer_rewritten_during_every_call) {
  if (under_tsan) GTEST_SKIP() << "the harness races with the host's copy on purpose";
  const std::size_t calls = scaled(200'000, 4'000);
  watchdog dog("double fetch", 300s + std::chrono::seconds(calls / 1000));
  host_functions fns;
  fns.add("host_add", [](std::int64_t a, std::int64_t b) { return a + b; });
  const sandbox_config c = quiet_config("calc");
  auto make = [&]() -> std::unique_ptr<sandbox> {
    auto sb = sandbox::create(c, fns);
    EXPECT_TRUE(sb) << sb.err().message();
    return sb ? std::move(*sb) : nullptr;
  };

  std::map<std::string, std::uint64_t> outcomes; // "ok", or the error's message without detail
  std::uint64_t created = 0;
  std::atomic<std::uint64_t> rewrites{0};
  std::unique_ptr<sandbox> sb = make();
  ASSERT_NE(sb, nullptr);
  ++created;
  std::atomic<std::byte*> target{
      detail::sandbox_access::of(*sb).space.ram().host_address_for_mapping(memory::fixed::io_out)};
  std::atomic<bool> done{false};
  std::jthread harness([&] {
    std::mt19937_64 rng(6);
    while (!done.load(std::memory_order_relaxed)) {
      std::byte* p = target.load();
      // Rewrite a random span near the start, where headers and lengths sit, then anywhere.
      const std::size_t at = (rng() & 1) ? rng() % 64 : rng() % (memory::fixed::io_buffer_size - 8);
      const std::uint64_t v = rng();
      std::memcpy(p + at, &v, sizeof v);
      rewrites.fetch_add(1, std::memory_order_relaxed);
    }
  });
  for (std::size_t i = 0; i < calls; ++i) {
    const auto n = static_cast<std::int64_t>(i);
    auto r = (i % 2) ? sb->call("call_host", std::string("host_add"), n, std::int64_t{1})
                     : sb->call("echo", bytes(64 + i % 512, std::byte{7}));
    outcomes[r ? std::string("ok") : std::string(r.err().code.message())]++;
    if (sb->poisoned()) { // a malformed record poisons the sandbox: a fresh one goes on
      // The harness keeps writing into the old memory until it sees the new one: keep the old
      // sandbox alive until then.
      auto fresh = make();
      ASSERT_NE(fresh, nullptr);
      ++created;
      const std::uint64_t seen = rewrites.load();
      target.store(detail::sandbox_access::of(*fresh).space.ram().host_address_for_mapping(
          memory::fixed::io_out));
      while (rewrites.load() < seen + 2)
        std::this_thread::yield();
      sb = std::move(fresh);
    }
  }
  done.store(true);
  harness.join();
  std::string summary;
  for (const auto& [what, n] : outcomes)
    summary += "  " + what + ": " + std::to_string(n) + "\n";
  std::printf("[ stress   ] %zu calls, %llu rewrites of the buffer, %llu sandboxes:\n%s", calls,
              static_cast<unsigned long long>(rewrites.load()),
              static_cast<unsigned long long>(created), summary.c_str());
  EXPECT_GT(rewrites.load(), calls) << "the harness must have run throughout";
  // The last sandbox still answers once the harness has stopped (or is poisoned, named).
  if (!sb->poisoned()) {
    auto r = sb->call("call_host", std::string("host_add"), std::int64_t{40}, std::int64_t{2});
    ASSERT_TRUE(r) << r.err().message();
    EXPECT_EQ(*r, value{std::int64_t{42}});
  }
}

} // namespace
} // namespace kiln::test::stress
