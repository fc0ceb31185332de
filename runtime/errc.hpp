// kiln::errc: the errors a sandbox reports to its caller, and which of them poison it.
#pragma once

#include <kiln/support/error_category.hpp>

namespace kiln {

enum class errc {
  // Guest-caused: the sandbox is poisoned (accepts only restore or destruction).
  guest_fault = 1,   // a CPU exception in the guest (vector, RIP, CR2 in the detail)
  stack_overflow,    // the guest ran into the guard page below its stack
  memory_violation,  // an access to unmapped memory or against a region's protection
  guest_aborted,     // the guest called abort (code and message in the detail)
  invalid_port,      // an unknown hypercall port, an `in`, or a wrong access size
  malformed_message, // a hypercall record that does not parse (bad length, prefix, tag...)
  guest_halted,      // the guest executed hlt or triple-faulted (shutdown)
  unexpected_exit,   // an exit the runtime has no meaning for (MMIO, failed entry...)
  cancelled,         // the call was cancelled while the guest ran
  deadline_exceeded, // the call's deadline passed while the guest ran
  not_ready,         // the guest never signalled ready, or the protocol state is inconsistent
  backend_failure,   // the vCPU backend failed; the guest's state can no longer be trusted
  // Caller-side: nothing in the sandbox changed.
  poisoned,           // the sandbox was poisoned by an earlier error
  function_not_found, // the guest has no function of that name
  bad_arguments,      // wrong argument count or types for the guest function
  guest_error,        // the guest function reported an error (its message in the detail)
  result_too_large,   // the call or its result does not fit the I/O buffer
  queue_full,         // too many calls already wait for this sandbox (kiln::runtime)
  reentrant_call,     // a host function called its own sandbox, which waits for that function
};

/// True for errors after which the sandbox is poisoned. One exhaustive switch decides.
bool poisons(errc e) noexcept;

} // namespace kiln

template <> struct kiln::errc_traits<kiln::errc> {
  static constexpr const char* name = "kiln";
  static const char* message(kiln::errc e) noexcept {
    using enum kiln::errc;
    switch (e) {
    case guest_fault:
      return "guest CPU exception";
    case stack_overflow:
      return "guest stack overflow";
    case memory_violation:
      return "guest memory access violation";
    case guest_aborted:
      return "guest aborted";
    case invalid_port:
      return "invalid hypercall port or access";
    case malformed_message:
      return "malformed hypercall message";
    case guest_halted:
      return "guest halted";
    case unexpected_exit:
      return "unexpected vCPU exit";
    case cancelled:
      return "call cancelled";
    case deadline_exceeded:
      return "call deadline exceeded";
    case poisoned:
      return "sandbox poisoned by an earlier guest failure";
    case function_not_found:
      return "guest function not found";
    case bad_arguments:
      return "bad arguments for guest function";
    case guest_error:
      return "guest function failed";
    case result_too_large:
      return "message too large for the I/O buffer";
    case queue_full:
      return "sandbox call queue full";
    case reentrant_call:
      return "a host function called the sandbox that waits for it";
    case not_ready:
      return "sandbox not ready";
    case backend_failure:
      return "vCPU backend failure";
    }
    return nullptr;
  }
};
KILN_DECLARE_ERRC(kiln, errc)
