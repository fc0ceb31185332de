// Tests for the CLI's text values (tools/cli_values.hpp): what each parser takes, and the typed
// error it gives for what it refuses.
#include "cli_values.hpp"

#include <gtest/gtest.h>

#include <string>
#include <system_error>
#include <vector>

namespace kiln::cli {
namespace {

TEST(cli_values, sizes_take_digits_and_a_binary_unit) {
  struct {
    const char* text;
    std::uint64_t want;
  } const cases[] = {
      {"0", 0},
      {"4096", 4096},
      {"4096B", 4096},
      {"256K", 256ull << 10},
      {"256k", 256ull << 10},
      {"16M", 16ull << 20},
      {"64MiB", 64ull << 20},
      {"64MB", 64ull << 20},
      {"1G", 1ull << 30},
      {"2gib", 2ull << 30},
      {"16b", 16},
      {"16Mb", 16ull << 20},
      {"007", 7},
      {"18446744073709551615", ~0ull},
      {"17179869183G", 17179869183ull << 30}, // the largest count of GiB in 64 bits
  };
  for (const auto& c : cases) {
    auto r = parse_size(c.text);
    ASSERT_TRUE(r) << c.text << ": " << r.err().message();
    EXPECT_EQ(*r, c.want) << c.text;
  }
}

TEST(cli_values, sizes_refuse_other_text_as_invalid_argument) {
  for (const char* bad : {"", "M", "lots", "16Q", "16 M", " 16M", "16M ", "-1", "+1", "0x10",
                          "1.5G", "16MiBB", "16iB", "16Mib b", "16BB", "1T", "16M\n"}) {
    auto r = parse_size(bad);
    ASSERT_FALSE(r) << '"' << bad << '"';
    EXPECT_EQ(r.code(), std::errc::invalid_argument) << '"' << bad << '"';
    EXPECT_NE(r.err().detail.find(std::string("'") + bad + "'"), std::string::npos)
        << r.err().detail;
  }
}

TEST(cli_values, sizes_past_64_bits_are_out_of_range) {
  for (const char* big :
       {"18446744073709551616", "99999999999999999999999", "17179869184G", "18014398509481984K"}) {
    auto r = parse_size(big);
    ASSERT_FALSE(r) << big;
    EXPECT_EQ(r.code(), std::errc::result_out_of_range) << big;
  }
}

TEST(cli_values, load_modes) {
  EXPECT_EQ(parse_load_mode("prefetch").value(), load_mode::prefetch);
  EXPECT_EQ(parse_load_mode("demand").value(), load_mode::demand);
  EXPECT_EQ(parse_load_mode("eager").value(), load_mode::eager);
  for (const char* bad : {"", "lazy", "Prefetch", "eager "}) {
    auto r = parse_load_mode(bad);
    ASSERT_FALSE(r) << '"' << bad << '"';
    EXPECT_EQ(r.code(), std::errc::invalid_argument);
    EXPECT_NE(r.err().detail.find("prefetch, demand or eager"), std::string::npos);
  }
}

TEST(cli_values, file_mappings_are_a_path_and_an_optional_name) {
  auto plain = parse_file_mapping("/data/table.bin");
  ASSERT_TRUE(plain);
  EXPECT_EQ(plain->path, "/data/table.bin");
  EXPECT_EQ(plain->name, "");
  EXPECT_EQ(plain->guest_address, 0u);
  auto named = parse_file_mapping("/data/table.bin=table");
  ASSERT_TRUE(named);
  EXPECT_EQ(named->path, "/data/table.bin");
  EXPECT_EQ(named->name, "table");
  // The last '=' splits: a path may hold one.
  auto eq = parse_file_mapping("/data/a=b=c");
  ASSERT_TRUE(eq);
  EXPECT_EQ(eq->path, "/data/a=b");
  EXPECT_EQ(eq->name, "c");
}

TEST(cli_values, file_mappings_refuse_an_empty_part_or_a_nul) {
  using namespace std::string_literals;
  for (const std::string& bad : {""s, "=name"s, "/data/x="s, "="s, "/da\0ta"s, "/data=na\0me"s}) {
    auto r = parse_file_mapping(bad);
    ASSERT_FALSE(r) << bad;
    EXPECT_EQ(r.code(), std::errc::invalid_argument) << bad;
  }
}

TEST(cli_values, call_args_are_values) {
  const std::vector<std::string> args = {"5", "5:i64", "2.5", "true", "str:a=b", "hex:0a0b"};
  auto r = parse_call_args(args);
  ASSERT_TRUE(r) << r.err().message();
  ASSERT_EQ(r->size(), args.size());
  EXPECT_EQ((*r)[0], value{std::int32_t{5}});
  EXPECT_EQ((*r)[1], value{std::int64_t{5}});
  EXPECT_EQ((*r)[2], value{2.5});
  EXPECT_EQ((*r)[3], value{true});
  EXPECT_EQ((*r)[4], value{std::string("a=b")});
  EXPECT_EQ((*r)[5], (value{bytes{std::byte{0x0a}, std::byte{0x0b}}}));
  auto none = parse_call_args({});
  ASSERT_TRUE(none);
  EXPECT_TRUE(none->empty());
}

TEST(cli_values, a_bad_call_arg_is_named_by_position_with_its_error) {
  const std::vector<std::string> bad = {"1", "2", "zzz", "99999999999:i32"};
  auto r = parse_call_args(bad);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), std::errc::invalid_argument);
  EXPECT_NE(r.err().detail.find("argument 3"), std::string::npos) << r.err().detail;
  EXPECT_NE(r.err().detail.find("zzz"), std::string::npos) << r.err().detail;
  auto range = parse_call_args(std::vector<std::string>{"99999999999:i32"});
  ASSERT_FALSE(range);
  EXPECT_EQ(range.code(), std::errc::result_out_of_range);
  EXPECT_NE(range.err().detail.find("argument 1"), std::string::npos) << range.err().detail;
}

} // namespace
} // namespace kiln::cli
