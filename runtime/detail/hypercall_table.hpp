// hypercall_table: the ports of kiln's guest ABI, each with the handler registered for it.
#pragma once

#include <kiln/guest/abi.h>

#include <array>
#include <cstddef>
#include <cstdint>

namespace kiln::detail {

/// One hypercall as the guest made it: `out` of a 32-bit value to a port of the ABI.
struct hypercall {
  std::uint32_t value = 0; // eax: a record length, a code, or 0
  bool init = false;       // during the guest's init (before it signalled ready)
};

/// A table indexed by port (KILN_PORT_FIRST..KILN_PORT_LAST) that handlers register into, in
/// the shape of Solo5's hypercall table: the exit path looks the port up and calls what it
/// finds, so a new hypercall is a new entry, not a new case in the exit loop. A port outside
/// the range, or one nothing registered, is not found.
template <class Handler> class hypercall_table {
public:
  static constexpr std::size_t size = KILN_PORT_LAST - KILN_PORT_FIRST + 1;

  constexpr hypercall_table& add(kiln_port port, Handler h) noexcept {
    slots_[static_cast<std::size_t>(port) - KILN_PORT_FIRST] = h;
    return *this;
  }
  /// The handler for `port`, or nullptr.
  constexpr const Handler* find(std::uint32_t port) const noexcept {
    if (port < KILN_PORT_FIRST || port > KILN_PORT_LAST) return nullptr;
    const Handler& h = slots_[port - KILN_PORT_FIRST];
    return h ? &h : nullptr;
  }

private:
  std::array<Handler, size> slots_{};
};

} // namespace kiln::detail
