// kiln::snapshot: a sandbox's state at a quiescent point, to restore or to start sandboxes from.
#pragma once

#include <kiln/support/result.hpp>

#include <cstdint>
#include <memory>

namespace kiln {

namespace detail {
struct snapshot_state;
} // namespace detail

/// A sandbox's memory, vCPU state (general, special and FPU/SSE registers), layout, page-table
/// and protection bookkeeping and mapped-file references, captured between calls. Immutable and
/// cheap to copy (copies share it). Its memory is an image that sandboxes map copy-on-write:
/// every sandbox restored to it or created from it shares the image's unmodified pages, and a
/// restore drops only the pages the guest dirtied since. Mapped files are referred to (path and
/// identity), never copied.
///
/// Thread-safety: immutable; any thread may use a snapshot concurrently.
class snapshot {
public:
  snapshot() = default;
  explicit operator bool() const noexcept { return state_ != nullptr; }

  /// Unique in this process; a sandbox created from or restored to a snapshot descends from it.
  std::uint64_t id() const noexcept;
  /// Guest RAM size.
  std::uint64_t memory_size() const noexcept;
  /// Bytes of RAM the image stores as data (zero pages are holes and cost nothing).
  result<std::uint64_t> stored_bytes() const;

private:
  friend class sandbox;
  explicit snapshot(std::shared_ptr<const detail::snapshot_state> s) : state_(std::move(s)) {}
  std::shared_ptr<const detail::snapshot_state> state_;
};

} // namespace kiln
