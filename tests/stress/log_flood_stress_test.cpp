// Stress (ADVERSARIAL 8): a guest floods the log port with records of the largest size the port
// carries for 60 s (KILN_STRESS_SCALE=1; 3 s in CI): what reaches the sink is capped per call and
// over time, the dropped-bytes counter rises every second, and the host's RSS stays flat.
#include "stress_support.hpp"

#include <algorithm>

namespace kiln::test::stress {
namespace {

class log_flood_stress : public stress_test {};

TEST_F(log_flood_stress, a_minute_of_maximal_records) {
  const auto duration = std::chrono::seconds(scaled(60, 3));
  watchdog dog("log flood", duration + 120s);
  constexpr std::uint64_t record = 64 << 10, records_per_call = 16;
  sandbox_config c = config_for("faults");
  std::uint64_t in_this_call = 0, lines = 0;
  c.log_sink = [&](std::string_view line) {
    in_this_call += line.size();
    ++lines;
  };
  auto sb = sandbox::create(c);
  ASSERT_TRUE(sb) << sb.err().message();
  // The first calls set up what stays (the guest's record, the host's buffers): RSS from here.
  for (int i = 0; i < 3; ++i)
    ASSERT_TRUE((*sb)->call("log_flood_max"));
  const std::uint64_t dropped_before = (*sb)->stats().log_bytes_dropped;
  const long rss_start = read_proc().rss_kib;
  long rss_max = rss_start;

  std::uint64_t calls = 0, accepted = 0, most_in_a_call = 0;
  std::vector<std::uint64_t> dropped_each_second;
  const auto t0 = clock_type::now();
  auto next_sample = t0 + 1s;
  in_this_call = 0;
  while (clock_type::now() - t0 < duration) {
    auto r = (*sb)->call("log_flood_max");
    ASSERT_TRUE(r) << r.err().message();
    ASSERT_EQ(*r, value{static_cast<std::int32_t>(records_per_call)});
    ++calls;
    accepted += in_this_call;
    most_in_a_call = std::max(most_in_a_call, in_this_call);
    in_this_call = 0;
    if (clock_type::now() >= next_sample) {
      next_sample += 1s;
      dropped_each_second.push_back((*sb)->stats().log_bytes_dropped);
      rss_max = std::max(rss_max, read_proc().rss_kib);
    }
  }
  const double seconds = std::chrono::duration<double>(clock_type::now() - t0).count();
  const std::uint64_t written = calls * records_per_call * record;
  const std::uint64_t dropped = (*sb)->stats().log_bytes_dropped - dropped_before;
  std::printf("[ stress   ] %.1f s, %llu calls: %.1f MiB written, %.2f MiB reached the sink "
              "(%.0f KiB/s), %.1f MiB dropped; RSS %ld -> at most %ld MiB\n",
              seconds, static_cast<unsigned long long>(calls), written / 1048576.0,
              accepted / 1048576.0, accepted / 1024.0 / seconds, dropped / 1048576.0,
              rss_start / 1024, rss_max / 1024);

  // Per call: the call's budget, whatever the guest writes.
  EXPECT_LE(most_in_a_call, c.log_budget_per_call);
  // Over time: one second's worth at once (the warm-up calls took part of it), then the rate.
  const auto rate = c.log_bytes_per_second;
  EXPECT_LE(accepted, rate + static_cast<std::uint64_t>(seconds * static_cast<double>(rate)))
      << calls << " calls in " << seconds << " s";
  EXPECT_GE(accepted, static_cast<std::uint64_t>((seconds - 1) * static_cast<double>(rate)))
      << "the rate is a rate, not a wall";
  // Everything the guest wrote is either in the sink or counted, and the count rises each second.
  EXPECT_EQ(dropped, written - accepted);
  for (std::size_t i = 1; i < dropped_each_second.size(); ++i)
    EXPECT_GT(dropped_each_second[i], dropped_each_second[i - 1]) << "second " << i;
  // The host holds no backlog: RSS flat (8 MiB of slack for the allocator and the test). Not
  // under a sanitizer, whose allocator keeps freed memory (ASan's quarantine: 215 to 542 MiB).
  if (!under_sanitizer) {
    EXPECT_LE(rss_max, rss_start + (8l << 10));
  }
  // And the sandbox is as good as before.
  EXPECT_FALSE((*sb)->poisoned());
  in_this_call = 0;
  auto hello = (*sb)->call("log_hello");
  ASSERT_TRUE(hello) << hello.err().message();
  EXPECT_EQ(*hello, value{7});
  EXPECT_GT(lines, 0u);
}

} // namespace
} // namespace kiln::test::stress
