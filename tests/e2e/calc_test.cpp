// End to end: the calc guest's functions, host calls in both directions, buffer limits.
#include "backend_fixture.hpp"

#include <numeric>

namespace kiln::test {
namespace {

class calc : public backend_test {
protected:
  void SetUp() override {
    backend_test::SetUp();
    if (IsSkipped()) return;
    host_functions fns;
    fns.add("host_add", [](std::int64_t a, std::int64_t b) { return a + b; });
    fns.add("host_throw",
            [](std::int64_t, std::int64_t) -> std::int64_t { throw std::runtime_error("boom"); });
    fns.add("host_fail", [](std::int64_t, std::int64_t) -> result<std::int64_t> {
      return error(errc::guest_error, "refused");
    });
    fns.add("host_nothing", [] {});
    sb_ = make("calc", std::move(fns));
    ASSERT_NE(sb_, nullptr);
  }
  std::unique_ptr<sandbox> sb_;
};

TEST_F(calc, integer_arithmetic) {
  EXPECT_EQ(std::get<std::int32_t>(*sb_->call("add_i32", 2, 3)), 5);
  EXPECT_EQ(std::get<std::int32_t>(*sb_->call("mul_i32", -7, 6)), -42);
  EXPECT_EQ(std::get<std::int64_t>(*sb_->call("add_i64", std::int64_t{1} << 40, std::int64_t{1})),
            (std::int64_t{1} << 40) + 1);
  EXPECT_EQ(
      std::get<std::int64_t>(*sb_->call("mul_i64", std::int64_t{123456789}, std::int64_t{1000})),
      123456789000);
}

TEST_F(calc, float_arithmetic_uses_sse) {
  EXPECT_DOUBLE_EQ(std::get<double>(*sb_->call("add_f64", 0.5, 2.25)), 2.75);
  EXPECT_DOUBLE_EQ(std::get<double>(*sb_->call("mul_f64", 1.5, -4.0)), -6.0);
}

TEST_F(calc, strings_bytes_bools_and_void) {
  EXPECT_EQ(
      std::get<std::string>(*sb_->call("concat", std::string("kiln"), std::string("-sandbox"))),
      "kiln-sandbox");
  bytes b{std::byte{1}, std::byte{0}, std::byte{255}};
  EXPECT_EQ(std::get<bytes>(*sb_->call("echo", b)), b);
  EXPECT_EQ(std::get<bool>(*sb_->call("negate", true)), false);
  EXPECT_TRUE(std::holds_alternative<std::monostate>(*sb_->call("nothing")));
}

TEST_F(calc, checksum_is_computed_in_the_guest) {
  bytes data(4096);
  for (std::size_t i = 0; i < data.size(); ++i)
    data[i] = static_cast<std::byte>(i * 7);
  std::uint64_t h = 0xcbf29ce484222325ull; // FNV-1a 64, computed here too
  for (std::byte c : data)
    h = (h ^ static_cast<std::uint64_t>(c)) * 0x100000001b3ull;
  EXPECT_EQ(std::get<std::uint64_t>(*sb_->call("checksum", data)), h);
}

TEST_F(calc, guest_calls_host_function) {
  EXPECT_EQ(std::get<std::int64_t>(*sb_->call("call_host", std::string("host_add"),
                                              std::int64_t{40}, std::int64_t{2})),
            42);
  EXPECT_EQ(sb_->stats().host_calls, 1u);
}

TEST_F(calc, host_errors_reach_the_guest_without_poisoning) {
  // Unknown host function and wrong arity come back into the guest as a status.
  EXPECT_EQ(std::get<std::int32_t>(*sb_->call("call_host_status", std::string("no_such_function"))),
            KILN_STATUS_NOT_FOUND);
  EXPECT_EQ(std::get<std::int32_t>(*sb_->call("call_host_status", std::string("host_add"))),
            KILN_STATUS_ARG_COUNT);
  // A host function that throws or fails: the guest reports failure; the host is fine.
  auto thrown = sb_->call("call_host", std::string("host_throw"), std::int64_t{1}, std::int64_t{2});
  ASSERT_FALSE(thrown);
  EXPECT_EQ(thrown.code(), errc::guest_error);
  auto failed = sb_->call("call_host", std::string("host_fail"), std::int64_t{1}, std::int64_t{2});
  ASSERT_FALSE(failed);
  EXPECT_EQ(failed.code(), errc::guest_error);
  EXPECT_FALSE(sb_->poisoned());
  EXPECT_EQ(std::get<std::int32_t>(*sb_->call("add_i32", 1, 1)), 2);
}

TEST_F(calc, caller_errors_do_not_poison) {
  EXPECT_EQ(sb_->call("no_such_function").code(), errc::function_not_found);
  EXPECT_EQ(sb_->call("add_i32", 1).code(), errc::bad_arguments);
  EXPECT_EQ(sb_->call("add_i32", 1, std::string("x")).code(), errc::bad_arguments);
  EXPECT_EQ(sb_->call("echo", bytes(200 << 10)).code(), errc::result_too_large);
  EXPECT_FALSE(sb_->poisoned());
  EXPECT_EQ(std::get<std::int32_t>(*sb_->call("add_i32", 20, 22)), 42);
}

TEST_F(calc, large_payload_round_trip) {
  bytes big(60000);
  std::iota(reinterpret_cast<unsigned char*>(big.data()),
            reinterpret_cast<unsigned char*>(big.data()) + big.size(), 0);
  EXPECT_EQ(std::get<bytes>(*sb_->call("echo", big)), big);
}

TEST_F(calc, many_calls_in_a_row) {
  for (int i = 0; i < 2000; ++i) {
    auto r = sb_->call("add_i32", i, 1);
    ASSERT_TRUE(r) << r.err().message();
    ASSERT_EQ(std::get<std::int32_t>(*r), i + 1);
  }
  EXPECT_EQ(sb_->stats().calls, 2000u);
}

} // namespace
} // namespace kiln::test
