// Tests for runtime/value.hpp: parse_value's accepted forms and rejections, to_string, type names.
#include <kiln/runtime/value.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <system_error>

namespace kiln {
namespace {

value parsed(std::string_view text) {
  auto r = parse_value(text);
  EXPECT_TRUE(r) << "'" << text << "': " << r.err().message();
  return r ? *r : value{};
}

template <class T> void expect_parses(std::string_view text, T expected) {
  const value v = parsed(text);
  ASSERT_TRUE(std::holds_alternative<T>(v))
      << "'" << text << "' parsed as " << type_name(type_of(v));
  EXPECT_EQ(std::get<T>(v), expected) << "'" << text << "'";
}

void expect_rejected(std::string_view text, std::errc expected = std::errc::invalid_argument) {
  auto r = parse_value(text);
  ASSERT_FALSE(r) << "'" << text << "' parsed as " << to_string(*r);
  EXPECT_EQ(r.code(), expected) << "'" << text << "': " << r.err().message();
  EXPECT_NE(r.err().detail.find(std::string(text)), std::string::npos) << "detail names the input";
}

TEST(ParseValue, PlainIntegersAreI32) {
  expect_parses<std::int32_t>("5", 5);
  expect_parses<std::int32_t>("0", 0);
  expect_parses<std::int32_t>("-5", -5);
  expect_parses<std::int32_t>("2147483647", std::numeric_limits<std::int32_t>::max());
  expect_parses<std::int32_t>("-2147483648", std::numeric_limits<std::int32_t>::min());
  expect_parses<std::int32_t>("7:i32", 7);
}

TEST(ParseValue, SuffixedIntegers) {
  expect_parses<std::int64_t>("5:i64", 5);
  expect_parses<std::int64_t>("-9223372036854775808:i64", std::numeric_limits<std::int64_t>::min());
  expect_parses<std::int64_t>("9223372036854775807:i64", std::numeric_limits<std::int64_t>::max());
  expect_parses<std::uint64_t>("5:u64", 5);
  expect_parses<std::uint64_t>("18446744073709551615:u64",
                               std::numeric_limits<std::uint64_t>::max());
}

TEST(ParseValue, FloatingPoint) {
  expect_parses<double>("2.5", 2.5);
  expect_parses<double>("-0.25", -0.25);
  expect_parses<double>("2:f64", 2.0);
  expect_parses<double>("1e3", 1000.0);
  expect_parses<double>("1E-3", 0.001);
  expect_parses<double>("0.5:f64", 0.5);
  expect_parses<double>("inf", std::numeric_limits<double>::infinity());
  const value nan = parsed("nan");
  ASSERT_TRUE(std::holds_alternative<double>(nan));
  EXPECT_TRUE(std::isnan(std::get<double>(nan)));
}

TEST(ParseValue, BoolsVoidStringsAndBytes) {
  expect_parses<bool>("true", true);
  expect_parses<bool>("false", false);
  EXPECT_TRUE(std::holds_alternative<std::monostate>(parsed("void")));
  expect_parses<std::string>("str:text", "text");
  expect_parses<std::string>("str:", "");
  expect_parses<std::string>("str:a:b:i32", "a:b:i32");
  expect_parses<std::string>("str:5", "5");
  expect_parses<bytes>("hex:0a0b", bytes{std::byte{0x0a}, std::byte{0x0b}});
  expect_parses<bytes>("hex:FFfe00", bytes{std::byte{0xff}, std::byte{0xfe}, std::byte{0x00}});
  expect_parses<bytes>("hex:", bytes{});
}

TEST(ParseValue, RejectsMalformedText) {
  for (const char* text : {"", "abc", "True", "VOID", " 5", "5 ", "+5", "0x10", "5a", "--5", "1.5x",
                           ".", "e", "2.5.1", "1e", "str", "hex"})
    expect_rejected(text);
}

TEST(ParseValue, RejectsBadSuffixes) {
  for (const char* text : {"5:i8", "5:I32", "5:", ":i32", "5:f32", "true:bool", "1.5:i32",
                           "1.5:i64", "-1:u64", "x:f64", ":f64", "5:u64:i32"})
    expect_rejected(text);
}

TEST(ParseValue, RejectsBadHex) {
  for (const char* text :
       {"hex:abc", "hex:0", "hex:zz", "hex:0g", "hex:-1", "hex:+1", "hex: 1", "hex:0x"})
    expect_rejected(text);
}

TEST(ParseValue, ReportsOutOfRangeNumbers) {
  for (const char* text : {"2147483648", "-2147483649", "99999999999999999999", "2147483648:i32",
                           "9223372036854775808:i64", "-9223372036854775809:i64",
                           "18446744073709551616:u64", "1e400", "-1e400:f64"})
    expect_rejected(text, std::errc::result_out_of_range);
}

TEST(ToString, FormatsEveryType) {
  EXPECT_EQ(to_string(value{}), "void");
  EXPECT_EQ(to_string(value{std::int32_t{-5}}), "-5");
  EXPECT_EQ(to_string(value{std::numeric_limits<std::int64_t>::min()}), "-9223372036854775808");
  EXPECT_EQ(to_string(value{std::numeric_limits<std::uint64_t>::max()}), "18446744073709551615");
  EXPECT_EQ(to_string(value{2.5}), "2.5");
  EXPECT_EQ(to_string(value{0.1}), "0.1") << "shortest representation that round-trips";
  EXPECT_EQ(to_string(value{1e300}), "1e+300");
  EXPECT_EQ(to_string(value{std::numeric_limits<double>::infinity()}), "inf");
  EXPECT_EQ(to_string(value{true}), "true");
  EXPECT_EQ(to_string(value{false}), "false");
  EXPECT_EQ(to_string(value{std::string("text")}), "text");
  EXPECT_EQ(to_string(value{bytes{std::byte{0x0a}, std::byte{0x0b}, std::byte{0xff}}}), "0x0a0bff");
  EXPECT_EQ(to_string(value{bytes{}}), "0x");
}

TEST(ToString, PrintsWhatParseValueReadsBack) {
  for (const char* text : {"5", "-2147483648", "2.5", "1e+300", "true", "false", "void"})
    EXPECT_EQ(to_string(parsed(text)), text);
}

TEST(TypeNames, EveryTagHasItsName) {
  const std::pair<kiln_type, const char*> names[] = {
      {KILN_TYPE_VOID, "void"},     {KILN_TYPE_I32, "i32"},    {KILN_TYPE_I64, "i64"},
      {KILN_TYPE_U64, "u64"},       {KILN_TYPE_F64, "f64"},    {KILN_TYPE_BOOL, "bool"},
      {KILN_TYPE_STRING, "string"}, {KILN_TYPE_BYTES, "bytes"}};
  for (auto [t, name] : names)
    EXPECT_STREQ(type_name(t), name);
  EXPECT_STREQ(type_name(static_cast<kiln_type>(KILN_TYPE_LAST + 1)), "unknown");
}

TEST(TypeNames, TypeOfFollowsTheWireTags) {
  EXPECT_EQ(type_of(value{}), KILN_TYPE_VOID);
  EXPECT_EQ(type_of(value{std::int32_t{1}}), KILN_TYPE_I32);
  EXPECT_EQ(type_of(value{std::int64_t{1}}), KILN_TYPE_I64);
  EXPECT_EQ(type_of(value{std::uint64_t{1}}), KILN_TYPE_U64);
  EXPECT_EQ(type_of(value{1.0}), KILN_TYPE_F64);
  EXPECT_EQ(type_of(value{true}), KILN_TYPE_BOOL);
  EXPECT_EQ(type_of(value{std::string()}), KILN_TYPE_STRING);
  EXPECT_EQ(type_of(value{bytes()}), KILN_TYPE_BYTES);
  static_assert(wire_type<void>::value == KILN_TYPE_VOID);
  static_assert(wire_type<std::int32_t>::value == KILN_TYPE_I32);
  static_assert(wire_type<std::int64_t>::value == KILN_TYPE_I64);
  static_assert(wire_type<std::uint64_t>::value == KILN_TYPE_U64);
  static_assert(wire_type<double>::value == KILN_TYPE_F64);
  static_assert(wire_type<bool>::value == KILN_TYPE_BOOL);
  static_assert(wire_type<std::string>::value == KILN_TYPE_STRING);
  static_assert(wire_type<bytes>::value == KILN_TYPE_BYTES);
}

} // namespace
} // namespace kiln
