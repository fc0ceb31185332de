// The sandbox's hypercalls: a table indexed by port (detail::hypercall_table), each port's
// handler, and the copies in and out of the I/O buffers they share. Every length and record
// comes from the guest and is checked before use.
#include <kiln/guest/abi.h>
#include <kiln/runtime/detail/hypercall_table.hpp>
#include <kiln/runtime/detail/sandbox_impl.hpp>
#include <kiln/runtime/wire.hpp>
#include <kiln/support/log.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <exception>
#include <string>

namespace kiln {

namespace fixed = memory::fixed;
using detail::hypercall;
using detail::step;

namespace {

constexpr std::uint64_t abort_message_cap = 4096;

const char* vector_name(std::uint64_t v) {
  static const char* const names[] = {"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM",
                                      "#DF", "CSO", "#TS", "#NP", "#SS", "#GP", "#PF", "(15)",
                                      "#MF", "#AC", "#MC", "#XM", "#VE", "#CP"};
  return v < sizeof names / sizeof names[0] ? names[v] : "(unknown)";
}

} // namespace

result<std::span<const std::byte>> sandbox::impl::copy_out(std::uint32_t len) {
  // The length comes from the guest: check it against the buffer before touching anything.
  if (len > fixed::io_buffer_size)
    return error(
        errc::malformed_message,
        fmt::format("record length {:#x} exceeds the {} byte buffer", len, fixed::io_buffer_size));
  auto dst = std::span<std::byte>(scratch).first(len);
  KILN_TRY(space.ram().read(fixed::io_out, dst)); // one copy; only the copy is parsed
  return std::span<const std::byte>(dst);
}

result<void> sandbox::impl::write_in(std::span<const std::byte> bytes) {
  return space.ram().write(fixed::io_in, bytes);
}

step sandbox::impl::on_exception(std::uint64_t vector, std::uint64_t error_code, std::uint64_t rip,
                                 std::uint64_t cr2) {
  // A page fault in the guard page below the stack is a stack overflow, named as such.
  if (vector == 14 && cr2 >= layout.stack_guard.value && cr2 < layout.stack_bottom.value)
    return step::failed(
        error(errc::stack_overflow, fmt::format("at rip {:#x}, cr2 {:#x}", rip, cr2)));
  // A page fault on a page the guest tightened, or in the file room, says what it hit.
  if (vector == 14)
    if (auto named = name_memory_fault(cr2, (error_code & 2) != 0, (error_code & 16) != 0, rip))
      return step::failed(std::move(*named));
  std::string detail = fmt::format("vector {} {} at rip {:#x}", vector, vector_name(vector), rip);
  if (vector == 14) detail += fmt::format(", address {:#x}", cr2);
  if (error_code) detail += fmt::format(", error code {:#x}", error_code);
  return step::failed(error(errc::guest_fault, std::move(detail)));
}

step sandbox::impl::on_log(const detail::hypercall& hc) {
  auto bytes = copy_out(hc.value);
  if (!bytes) return step::failed(std::move(bytes).err());
  std::string_view line(reinterpret_cast<const char*>(bytes->data()), bytes->size());
  const std::uint64_t keep = log_rate_allows(std::min<std::uint64_t>(line.size(), log_budget));
  stats.log_bytes_dropped += line.size() - keep;
  line = line.substr(0, keep);
  log_budget -= line.size();
  if (!line.empty()) emit_log(line);
  return step::resume_guest();
}

std::uint64_t sandbox::impl::log_rate_allows(std::uint64_t len) noexcept {
  const auto rate = static_cast<double>(config.log_bytes_per_second);
  if (rate == 0 || len == 0) return len;
  const auto now = std::chrono::steady_clock::now();
  const double seconds = std::chrono::duration<double>(now - log_refilled).count();
  log_tokens = std::min(rate, log_tokens + seconds * rate); // one second's worth at most
  log_refilled = now;
  const auto allowed = std::min(len, static_cast<std::uint64_t>(log_tokens));
  log_tokens -= static_cast<double>(allowed);
  return allowed;
}

void sandbox::impl::emit_log(std::string_view line) noexcept {
  ++stats.log_lines;
  if (!config.log_sink) {
    std::fprintf(stderr, "[guest] %.*s\n", static_cast<int>(line.size()), line.data());
    return;
  }
  const char* why = nullptr;
  std::string what;
  try {
    config.log_sink(line);
    return;
  } catch (const std::exception& e) {
    why = "threw";
    what = e.what();
  } catch (...) {
    why = "threw a non-standard exception";
  }
  stats.log_bytes_dropped += line.size();
  if (stats.log_sink_errors++ == 0)
    log_message(log_level::warning,
                fmt::format("the guest log sink {}{}{}; the line is dropped (reported once per "
                            "sandbox, counted in log_sink_errors)",
                            why, what.empty() ? "" : ": ", what));
}

step sandbox::impl::on_abort(const detail::hypercall& hc) {
  const std::uint32_t code = hc.value;
  kiln_abort_record rec{};
  if (auto r = space.ram().read(fixed::io_out, std::as_writable_bytes(std::span(&rec, 1))); !r)
    return step::failed(std::move(r).err());
  // Truncate to the cap and the buffer; a lying length costs nothing.
  std::uint64_t len = std::min<std::uint64_t>(rec.message_len, abort_message_cap);
  len = std::min<std::uint64_t>(len, fixed::io_buffer_size - sizeof rec);
  std::string msg(len, '\0');
  if (auto r = space.ram().read(fixed::io_out + sizeof rec, std::as_writable_bytes(std::span(msg)));
      !r)
    return step::failed(std::move(r).err());
  const bool truncated = rec.message_len > len;
  return step::failed(error(errc::guest_aborted, fmt::format("code {}: {}{}", code, msg,
                                                             truncated ? " [truncated]" : "")));
}

step sandbox::impl::on_host_call(const detail::hypercall& hc) {
  auto bytes = copy_out(hc.value);
  if (!bytes) return step::failed(std::move(bytes).err());
  auto msg = wire::decode(*bytes, KILN_MSG_HOST_CALL);
  if (!msg) return step::failed(std::move(msg).err());
  ++stats.host_calls;
  auto checked = functions.check(msg->name, msg->values);
  if (auto* fn = std::get_if<const host_function*>(&checked); fn && (*fn)->is_async())
    return step::parked({*fn, std::move(msg->values)});
  auto outcome = std::holds_alternative<host_call_outcome>(checked)
                     ? std::get<host_call_outcome>(std::move(checked))
                     : functions.invoke(msg->name, msg->values);
  if (auto w = write_host_result(outcome); !w) return step::failed(std::move(w).err());
  return step::resume_guest();
}

result<void> sandbox::impl::write_host_result(const host_call_outcome& outcome) {
  std::vector<std::byte>& out = scratch; // reuse: the request copy is no longer needed
  auto n = outcome.status == KILN_STATUS_OK
               ? wire::encode_result(out, KILN_MSG_HOST_RESULT, outcome.result)
               : wire::encode_error(out, KILN_MSG_HOST_RESULT, outcome.status, outcome.message);
  if (!n) // the host's result does not fit: tell the guest, which can carry on
    n = wire::encode_error(out, KILN_MSG_HOST_RESULT, KILN_STATUS_TOO_LARGE,
                           "host function result does not fit the I/O buffer");
  if (!n) return std::move(n).err();
  return write_in(std::span(out).first(*n));
}

step sandbox::impl::on_ready(const hypercall& hc) {
  if (!hc.init)
    return step::failed(error(errc::malformed_message, "ready signalled during a call"));
  return step::finished(value{});
}

step sandbox::impl::on_return(const hypercall& hc) {
  if (hc.init) return step::failed(error(errc::malformed_message, "return hypercall during init"));
  auto bytes = copy_out(hc.value);
  if (!bytes) return step::failed(std::move(bytes).err());
  auto msg = wire::decode(*bytes, KILN_MSG_RESULT);
  if (!msg) return step::failed(std::move(msg).err());
  switch (msg->status) {
  case KILN_STATUS_OK:
    return step::finished(std::move(msg->values.front()));
  case KILN_STATUS_NOT_FOUND:
    return step::failed(error(errc::function_not_found, msg->error_message));
  case KILN_STATUS_ARG_COUNT:
  case KILN_STATUS_ARG_TYPE:
    return step::failed(error(errc::bad_arguments, msg->error_message));
  case KILN_STATUS_TOO_LARGE:
    return step::failed(error(errc::result_too_large, msg->error_message));
  case KILN_STATUS_FAILED:
  case KILN_STATUS_MALFORMED:
  case KILN_STATUS_HOST_ERROR:
    return step::failed(error(errc::guest_error, msg->error_message));
  }
  return step::failed(error(errc::malformed_message, "unknown status"));
}

step sandbox::impl::on_exception_record(const hypercall&) {
  auto rec = space.ram().read_object<kiln_exception_record>(fixed::io_out);
  if (!rec) return step::failed(std::move(rec).err());
  return on_exception(rec->vector, rec->error_code, rec->rip, rec->cr2);
}

const detail::hypercall_table<sandbox::impl::hypercall_handler> sandbox::impl::hypercalls = [] {
  detail::hypercall_table<hypercall_handler> t;
  t.add(KILN_PORT_READY, &impl::on_ready)
      .add(KILN_PORT_RETURN, &impl::on_return)
      .add(KILN_PORT_HOST_CALL, &impl::on_host_call)
      .add(KILN_PORT_LOG, &impl::on_log)
      .add(KILN_PORT_ABORT, &impl::on_abort)
      .add(KILN_PORT_EXCEPTION, &impl::on_exception_record)
      .add(KILN_PORT_MEMORY, &impl::on_memory_request);
  return t;
}();

step sandbox::impl::on_hypercall(const vcpu::exits::io_out& io, bool init) {
  const hypercall_handler* h = hypercalls.find(io.port);
  if (!h)
    return step::failed(
        error(errc::invalid_port, fmt::format("out to unknown port {:#x}", io.port)));
  if (io.size != 4)
    return step::failed(
        error(errc::invalid_port,
              fmt::format("{}-byte out to port {:#x} (hypercalls are 4 bytes)", io.size, io.port)));
  return (this->**h)(hypercall{io.value, init});
}

} // namespace kiln
