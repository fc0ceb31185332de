// Tests of the hook for kiln's own messages: default to stderr, redirect, restore, survive throws.
#include <kiln/support/log.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace kiln {
namespace {

struct captured {
  std::mutex mu;
  std::vector<std::pair<log_level, std::string>> lines;
};

TEST(log, the_default_writes_to_stderr) {
  ::testing::internal::CaptureStderr();
  log_message(log_level::warning, "disk on fire");
  log_message(log_level::info, "all well");
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(err, "kiln: warning: disk on fire\nkiln: all well\n");
}

TEST(log, a_hook_receives_every_message_and_the_empty_hook_restores_stderr) {
  auto c = std::make_shared<captured>();
  const log_hook before = set_log_hook([c](log_level l, std::string_view m) {
    std::lock_guard lock(c->mu);
    c->lines.emplace_back(l, std::string(m));
  });
  EXPECT_FALSE(before) << "the default is no hook (stderr)";
  ::testing::internal::CaptureStderr();
  log_message(log_level::warning, "one");
  log_message(log_level::info, "two");
  EXPECT_EQ(::testing::internal::GetCapturedStderr(), "") << "the hook replaced stderr";
  ASSERT_EQ(c->lines.size(), 2u);
  EXPECT_EQ(c->lines[0], (std::pair{log_level::warning, std::string("one")}));
  EXPECT_EQ(c->lines[1], (std::pair{log_level::info, std::string("two")}));

  const log_hook mine = set_log_hook({});
  EXPECT_TRUE(mine) << "the previous hook comes back";
  ::testing::internal::CaptureStderr();
  log_message(log_level::info, "three");
  EXPECT_EQ(::testing::internal::GetCapturedStderr(), "kiln: three\n");
  EXPECT_EQ(c->lines.size(), 2u);
}

TEST(log, a_throwing_hook_is_contained) {
  set_log_hook([](log_level, std::string_view) { throw std::runtime_error("sink is broken"); });
  EXPECT_NO_THROW(log_message(log_level::warning, "still fine"));
  set_log_hook({});
}

TEST(log, many_threads_log_while_the_hook_changes) {
  std::atomic<int> seen{0};
  std::atomic<bool> stop{false};
  auto counting = [&](log_level, std::string_view) { seen.fetch_add(1); };
  set_log_hook(counting);
  std::vector<std::jthread> loggers;
  for (int t = 0; t < 4; ++t)
    loggers.emplace_back([&] {
      for (int i = 0; i < 2000; ++i)
        log_message(log_level::info, "x");
    });
  std::jthread swapper([&] {
    while (!stop.load())
      set_log_hook(counting);
  });
  loggers.clear(); // joined
  stop.store(true);
  swapper.join();
  set_log_hook({});
  EXPECT_EQ(seen.load(), 4 * 2000) << "every message reached a hook";
}

TEST(log, levels_have_names) {
  EXPECT_STREQ(to_string(log_level::info), "info");
  EXPECT_STREQ(to_string(log_level::warning), "warning");
}

} // namespace
} // namespace kiln
