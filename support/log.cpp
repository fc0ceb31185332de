// The process-wide hook for kiln's own messages, stderr by default.
#include <kiln/support/log.hpp>

#include <cstdio>
#include <memory>
#include <mutex>
#include <utility>

namespace kiln {

namespace {

// Messages are rare (fallbacks, warnings), so a mutex is fine. The hook is copied out under it
// and called outside, so a hook may itself log or replace the hook without deadlocking.
std::mutex hook_mutex;
std::shared_ptr<const log_hook> current_hook; // null: stderr

void to_stderr(log_level level, std::string_view message) noexcept {
  std::fprintf(stderr, "kiln: %s%.*s\n", level == log_level::warning ? "warning: " : "",
               static_cast<int>(message.size()), message.data());
}

} // namespace

const char* to_string(log_level l) noexcept {
  switch (l) {
  case log_level::info:
    return "info";
  case log_level::warning:
    return "warning";
  }
  return "unknown";
}

log_hook set_log_hook(log_hook hook) {
  auto next = hook ? std::make_shared<const log_hook>(std::move(hook)) : nullptr;
  std::lock_guard lock(hook_mutex);
  auto previous = std::exchange(current_hook, std::move(next));
  return previous ? *previous : log_hook{};
}

void log_message(log_level level, std::string_view message) noexcept {
  std::shared_ptr<const log_hook> hook;
  {
    std::lock_guard lock(hook_mutex);
    hook = current_hook;
  }
  if (!hook) return to_stderr(level, message);
  try {
    (*hook)(level, message);
  } catch (...) {
    // The hook's own failure must not take down the thread that noticed something.
  }
}

} // namespace kiln
