// Tests for runtime/host_function.hpp: deduced signatures and the noexcept invoke trampoline.
#include <kiln/runtime/errc.hpp>
#include <kiln/runtime/host_function.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

namespace kiln {
namespace {

std::int64_t free_function(std::int32_t a, std::int64_t b) {
  return a + b;
}
void noexcept_function(bool) noexcept {}

using params = std::vector<kiln_type>;

const host_function& registered(const host_functions& fns, std::string_view name) {
  const host_function* f = fns.find(name);
  if (!f) throw std::logic_error("not registered: " + std::string(name));
  return *f;
}

TEST(HostFunctionSignature, DeducedFromLambdasAndFunctions) {
  host_functions fns;
  fns.add("lambda", [](std::int32_t, const std::string&, bytes) -> std::uint64_t { return 0; })
      .add("free", free_function)
      .add("pointer", &free_function)
      .add("noexcept", noexcept_function)
      .add("nothing", [] {})
      .add("all", [](std::int32_t, std::int64_t, std::uint64_t, double, bool, std::string,
                     bytes) { return 0.5; })
      .add("function", std::function<bool(double)>([](double d) { return d > 0; }))
      .add("noexcept_lambda", [](const bytes& b) noexcept { return b; });
  EXPECT_EQ(fns.size(), 8u);

  EXPECT_EQ(registered(fns, "lambda").params,
            (params{KILN_TYPE_I32, KILN_TYPE_STRING, KILN_TYPE_BYTES}));
  EXPECT_EQ(registered(fns, "lambda").returns, KILN_TYPE_U64);
  EXPECT_EQ(registered(fns, "free").params, (params{KILN_TYPE_I32, KILN_TYPE_I64}));
  EXPECT_EQ(registered(fns, "free").returns, KILN_TYPE_I64);
  EXPECT_EQ(registered(fns, "pointer").params, registered(fns, "free").params);
  EXPECT_EQ(registered(fns, "noexcept").params, (params{KILN_TYPE_BOOL}));
  EXPECT_EQ(registered(fns, "noexcept").returns, KILN_TYPE_VOID);
  EXPECT_EQ(registered(fns, "nothing").params, params{});
  EXPECT_EQ(registered(fns, "nothing").returns, KILN_TYPE_VOID);
  EXPECT_EQ(registered(fns, "all").params,
            (params{KILN_TYPE_I32, KILN_TYPE_I64, KILN_TYPE_U64, KILN_TYPE_F64, KILN_TYPE_BOOL,
                    KILN_TYPE_STRING, KILN_TYPE_BYTES}));
  EXPECT_EQ(registered(fns, "all").returns, KILN_TYPE_F64);
  EXPECT_EQ(registered(fns, "function").params, (params{KILN_TYPE_F64}));
  EXPECT_EQ(registered(fns, "function").returns, KILN_TYPE_BOOL);
  EXPECT_EQ(registered(fns, "noexcept_lambda").returns, KILN_TYPE_BYTES);
  EXPECT_EQ(registered(fns, "lambda").name, "lambda");
}

TEST(HostFunctionSignature, ResultReturnTypesUnwrap) {
  host_functions fns;
  fns.add("r_double", [](double d) -> result<double> { return d; })
      .add("r_void", []() -> result<void> { return ok(); })
      .add("r_string", [](std::string s) -> result<std::string> { return s; });
  EXPECT_EQ(registered(fns, "r_double").returns, KILN_TYPE_F64);
  EXPECT_EQ(registered(fns, "r_void").returns, KILN_TYPE_VOID);
  EXPECT_EQ(registered(fns, "r_string").returns, KILN_TYPE_STRING);
}

TEST(HostFunctions, FindAndReplace) {
  host_functions fns;
  EXPECT_EQ(fns.find("f"), nullptr);
  fns.add("f", [] { return std::int32_t{1}; });
  fns.add("f", [](std::int64_t x) { return x; });
  EXPECT_EQ(fns.size(), 1u) << "re-registering replaces";
  EXPECT_EQ(registered(fns, "f").params, (params{KILN_TYPE_I64}));
  EXPECT_EQ(fns.find("F"), nullptr);
  EXPECT_EQ(fns.find(""), nullptr);
}

// A function the guest could never call, and a snapshot never record, is refused where it is
// registered; the first refusal is kept so that creating a sandbox with the set fails.
TEST(HostFunctions, NamesAndArityTheAbiCannotCarryAreRefused) {
  host_functions fns;
  fns.add("", [] {});
  ASSERT_TRUE(fns.refused());
  EXPECT_EQ(fns.refused()->code, errc::bad_arguments);
  EXPECT_NE(fns.refused()->message().find("an empty name"), std::string::npos)
      << fns.refused()->message();
  EXPECT_EQ(fns.size(), 0u);

  host_functions names;
  names.add(std::string(KILN_MAX_NAME, 'n'), [] {});
  EXPECT_FALSE(names.refused()) << "128 bytes is the limit, not over it";
  names.add(std::string(KILN_MAX_NAME + 1, 'n'), [] {});
  names.add(std::string("a\0b", 3), [] {});
  ASSERT_TRUE(names.refused());
  EXPECT_NE(names.refused()->message().find("a name over 128 bytes"), std::string::npos);
  EXPECT_EQ(names.size(), 1u);

  host_functions many;
  host_function h;
  h.name = "wide";
  h.params.assign(KILN_MAX_ARGS + 1, KILN_TYPE_I64);
  h.body = [](std::span<const value>) -> result<value> { return value{}; };
  many.add_raw(h);
  ASSERT_TRUE(many.refused());
  EXPECT_NE(many.refused()->message().find("over 32 parameters"), std::string::npos);
  h.params.pop_back();
  host_functions enough;
  enough.add_raw(h);
  EXPECT_FALSE(enough.refused());
  EXPECT_NE(enough.find("wide"), nullptr);
}

TEST(HostFunctions, CopiesShareNothingMutable) {
  host_functions a;
  a.add("f", [] {});
  host_functions b = a;
  b.add("g", [] {});
  EXPECT_EQ(a.size(), 1u);
  EXPECT_EQ(b.size(), 2u);
}

class Invoke : public ::testing::Test {
protected:
  Invoke() {
    fns_.add("add", [](std::int32_t a, std::int32_t b) { return a + b; })
        .add("concat", [](const std::string& a, std::string b) { return a + b; })
        .add("reverse", [](bytes b) { return bytes(b.rbegin(), b.rend()); })
        .add("record", [this](std::uint64_t v) { recorded_.push_back(v); })
        .add("throws", [](std::int32_t) -> std::int32_t { throw std::runtime_error("boom"); })
        .add("throws_int", []() -> bool { throw 42; })
        .add("fails",
             [](bool fail) -> result<std::int64_t> {
               if (fail)
                 return error(std::make_error_code(std::errc::permission_denied),
                              "no access to /x");
               return std::int64_t{7};
             })
        .add("fails_void",
             []() -> result<void> {
               return error(std::make_error_code(std::errc::io_error), "disk");
             })
        .add("ok_void", []() -> result<void> { return ok(); });
  }
  host_call_outcome call(std::string_view name, std::vector<value> args) {
    return fns_.invoke(name, args);
  }

  host_functions fns_;
  std::vector<std::uint64_t> recorded_;
};

TEST_F(Invoke, NeverThrows) {
  static_assert(noexcept(std::declval<const host_functions&>().invoke("", {})));
}

TEST_F(Invoke, CallsWithCheckedArguments) {
  auto out = call("add", {value{std::int32_t{2}}, value{std::int32_t{40}}});
  EXPECT_EQ(out.status, KILN_STATUS_OK) << out.message;
  EXPECT_EQ(out.result, value{std::int32_t{42}});
  EXPECT_TRUE(out.message.empty());

  out = call("concat", {value{std::string("ab")}, value{std::string("cd")}});
  EXPECT_EQ(out.result, value{std::string("abcd")});

  out = call("reverse", {value{bytes{std::byte{1}, std::byte{2}, std::byte{3}}}});
  EXPECT_EQ(out.result, (value{bytes{std::byte{3}, std::byte{2}, std::byte{1}}}));
}

TEST_F(Invoke, VoidFunctionsReturnVoid) {
  auto out = call("record", {value{std::uint64_t{9}}});
  EXPECT_EQ(out.status, KILN_STATUS_OK) << out.message;
  EXPECT_TRUE(std::holds_alternative<std::monostate>(out.result));
  EXPECT_EQ(recorded_, (std::vector<std::uint64_t>{9}));

  out = call("ok_void", {});
  EXPECT_EQ(out.status, KILN_STATUS_OK) << out.message;
  EXPECT_TRUE(std::holds_alternative<std::monostate>(out.result));
}

TEST_F(Invoke, UnknownNameIsNotFound) {
  using namespace std::literals;
  for (std::string_view name : {"missing"sv, ""sv, "ADD"sv, "add "sv, "add\0"sv}) {
    auto out = call(name, {});
    EXPECT_EQ(out.status, KILN_STATUS_NOT_FOUND) << name;
    EXPECT_TRUE(std::holds_alternative<std::monostate>(out.result));
  }
  EXPECT_NE(call("missing", {}).message.find("missing"), std::string::npos);
}

TEST_F(Invoke, WrongArgumentCount) {
  for (std::size_t n : {0u, 1u, 3u, 32u}) {
    auto out = call("add", std::vector<value>(n, value{std::int32_t{1}}));
    EXPECT_EQ(out.status, KILN_STATUS_ARG_COUNT) << n;
    EXPECT_TRUE(std::holds_alternative<std::monostate>(out.result));
  }
  EXPECT_EQ(call("add", {}).message, "add takes 2 arguments, got 0");
  EXPECT_EQ(call("record", {}).status, KILN_STATUS_ARG_COUNT);
  EXPECT_TRUE(recorded_.empty()) << "the body never ran";
}

TEST_F(Invoke, WrongArgumentType) {
  // Every wrong type in the second position; an i64 is not an i32 even when the value fits.
  for (const value& wrong : {value{}, value{std::int64_t{1}}, value{std::uint64_t{1}}, value{1.0},
                             value{true}, value{std::string("1")}, value{bytes{}}}) {
    auto out = call("add", {value{std::int32_t{1}}, wrong});
    EXPECT_EQ(out.status, KILN_STATUS_ARG_TYPE) << type_name(type_of(wrong));
    EXPECT_TRUE(std::holds_alternative<std::monostate>(out.result));
  }
  EXPECT_EQ(call("add", {value{std::int32_t{1}}, value{true}}).message,
            "add argument 1 must be i32, got bool");
  EXPECT_EQ(call("record", {value{std::int32_t{1}}}).status, KILN_STATUS_ARG_TYPE);
  EXPECT_TRUE(recorded_.empty()) << "the body never ran";
}

TEST_F(Invoke, ExceptionsBecomeHostErrors) {
  host_call_outcome out;
  EXPECT_NO_THROW(out = call("throws", {value{std::int32_t{1}}}));
  EXPECT_EQ(out.status, KILN_STATUS_HOST_ERROR);
  EXPECT_NE(out.message.find("boom"), std::string::npos) << out.message;
  EXPECT_TRUE(std::holds_alternative<std::monostate>(out.result));

  EXPECT_NO_THROW(out = call("throws_int", {}));
  EXPECT_EQ(out.status, KILN_STATUS_HOST_ERROR);
  EXPECT_FALSE(out.message.empty());

  // The set still works after a throw.
  EXPECT_EQ(call("add", {value{std::int32_t{1}}, value{std::int32_t{1}}}).status, KILN_STATUS_OK);
}

TEST_F(Invoke, ResultErrorsBecomeFailedWithTheirMessage) {
  auto out = call("fails", {value{true}});
  EXPECT_EQ(out.status, KILN_STATUS_FAILED);
  EXPECT_NE(out.message.find("no access to /x"), std::string::npos) << out.message;
  EXPECT_EQ(out.message,
            error(std::make_error_code(std::errc::permission_denied), "no access to /x").message());
  EXPECT_TRUE(std::holds_alternative<std::monostate>(out.result));

  out = call("fails", {value{false}});
  EXPECT_EQ(out.status, KILN_STATUS_OK);
  EXPECT_EQ(out.result, value{std::int64_t{7}});

  out = call("fails_void", {});
  EXPECT_EQ(out.status, KILN_STATUS_FAILED);
  EXPECT_NE(out.message.find("disk"), std::string::npos);
}

TEST_F(Invoke, RawFunctionsAreCheckedToo) {
  fns_.add_raw(
      {"raw_wrong_return",
       {KILN_TYPE_I32},
       KILN_TYPE_I32,
       [](std::span<const value>) -> result<value> { return value{std::string("not an i32")}; }});
  fns_.add_raw({"raw_sum",
                {KILN_TYPE_U64, KILN_TYPE_U64},
                KILN_TYPE_U64,
                [](std::span<const value> a) -> result<value> {
                  return value{std::get<std::uint64_t>(a[0]) + std::get<std::uint64_t>(a[1])};
                }});
  fns_.add_raw({"raw_bad_get",
                {KILN_TYPE_I32},
                KILN_TYPE_I32,
                [](std::span<const value> a) -> result<value> {
                  return value{std::get<std::int64_t>(a[0])};
                }});

  auto out = call("raw_wrong_return", {value{std::int32_t{1}}});
  EXPECT_EQ(out.status, KILN_STATUS_HOST_ERROR);
  EXPECT_EQ(out.message, "raw_wrong_return returned the wrong type");

  out = call("raw_sum", {value{std::uint64_t{2}}, value{std::uint64_t{3}}});
  EXPECT_EQ(out.status, KILN_STATUS_OK);
  EXPECT_EQ(out.result, value{std::uint64_t{5}});

  // std::bad_variant_access from inside the body is caught like any exception.
  EXPECT_EQ(call("raw_bad_get", {value{std::int32_t{1}}}).status, KILN_STATUS_HOST_ERROR);
}

} // namespace
} // namespace kiln
