// host_functions: registration and the noexcept trampoline that checks and calls them.
#include <kiln/runtime/errc.hpp>
#include <kiln/runtime/host_function.hpp>

#include <fmt/format.h>

#include <exception>

namespace kiln {

host_functions& host_functions::add_raw(host_function fn) {
  const char* why = fn.name.empty()                           ? "an empty name"
                    : fn.name.size() > KILN_MAX_NAME          ? "a name over 128 bytes"
                    : fn.params.size() > KILN_MAX_ARGS        ? "over 32 parameters"
                    : fn.name.find('\0') != std::string::npos ? "a NUL in its name"
                                                              : nullptr;
  if (why) {
    if (!refused_)
      refused_ =
          error(errc::bad_arguments, fmt::format("host function '{}' refused at registration: {}",
                                                 fn.name.substr(0, 64), why));
    return *this;
  }
  auto name = fn.name;
  functions_.insert_or_assign(std::move(name), std::move(fn));
  return *this;
}

const host_function* host_functions::find(std::string_view name) const {
  auto it = functions_.find(name);
  return it == functions_.end() ? nullptr : &it->second;
}

std::variant<const host_function*, host_call_outcome>
host_functions::check(std::string_view name, std::span<const value> args) const {
  const host_function* fn = find(name);
  if (!fn)
    return host_call_outcome{
        KILN_STATUS_NOT_FOUND, {}, "no host function named '" + std::string(name) + "'"};
  if (args.size() != fn->params.size())
    return host_call_outcome{KILN_STATUS_ARG_COUNT,
                             {},
                             fn->name + " takes " + std::to_string(fn->params.size()) +
                                 " arguments, got " + std::to_string(args.size())};
  for (std::size_t i = 0; i < args.size(); ++i)
    if (type_of(args[i]) != fn->params[i])
      return host_call_outcome{KILN_STATUS_ARG_TYPE,
                               {},
                               fn->name + " argument " + std::to_string(i) + " must be " +
                                   type_name(fn->params[i]) + ", got " +
                                   type_name(type_of(args[i]))};
  return fn;
}

host_call_outcome host_functions::invoke(std::string_view name,
                                         std::span<const value> args) const noexcept {
  host_call_outcome out;
  try {
    auto checked = check(name, args);
    if (auto* o = std::get_if<host_call_outcome>(&checked)) return std::move(*o);
    const host_function* fn = std::get<const host_function*>(checked);
    if (fn->is_async()) {
      out.status = KILN_STATUS_HOST_ERROR;
      out.message = fn->name + " is asynchronous: it needs a sandbox run by kiln::runtime";
      return out;
    }
    auto r = fn->body(args);
    if (!r) {
      out.status = KILN_STATUS_FAILED;
      out.message = r.err().message();
      return out;
    }
    out.result = std::move(r).value();
    if (type_of(out.result) != fn->returns) {
      out.status = KILN_STATUS_HOST_ERROR;
      out.message = fn->name + " returned the wrong type";
    }
    return out;
  } catch (const std::exception& e) {
    out.status = KILN_STATUS_HOST_ERROR;
    out.message = std::string("host function threw: ") + e.what();
  } catch (...) {
    out.status = KILN_STATUS_HOST_ERROR;
    out.message = "host function threw a non-standard exception";
  }
  out.result = value{};
  return out;
}

} // namespace kiln
