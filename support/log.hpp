// The library's own messages (never the guest's): one hook the embedding program can redirect.
#pragma once

#include <functional>
#include <string_view>

namespace kiln {

enum class log_level { info, warning };

const char* to_string(log_level l) noexcept;

/// Receives kiln's own messages: a fallback taken (io_uring refused, so the prefetch uses a
/// thread), a resource running short, anything the embedding server's operators should see.
/// Guest output goes elsewhere (sandbox_config::log_sink).
///
/// Called from whichever thread noticed (a worker, the service thread, a prefetch thread), so
/// it must be thread-safe; it should return promptly. An exception it throws is swallowed.
using log_hook = std::function<void(log_level, std::string_view message)>;

/// Sets the hook for the whole process and returns the previous one; an empty hook restores the
/// default, which writes "kiln: MESSAGE" to stderr. Thread-safe; a message being delivered
/// while the hook changes reaches the old hook or the new one.
log_hook set_log_hook(log_hook hook);

/// Delivers `message` to the hook. Thread-safe; never throws.
void log_message(log_level level, std::string_view message) noexcept;

} // namespace kiln
