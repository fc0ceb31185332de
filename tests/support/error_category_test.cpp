// Tests for support/error_category.hpp: a category generated from errc_traits, via a test enum.
#include <kiln/support/error_category.hpp>
#include <kiln/support/result.hpp>

#include <gtest/gtest.h>

#include <string>
#include <system_error>

namespace kiln_test {
enum class sample_errc { first = 1, second, silent };
} // namespace kiln_test

template <> struct kiln::errc_traits<kiln_test::sample_errc> {
  static constexpr const char* name = "kiln.test";
  static const char* message(kiln_test::sample_errc e) noexcept {
    switch (e) {
    case kiln_test::sample_errc::first:
      return "first thing failed";
    case kiln_test::sample_errc::second:
      return "second thing failed";
    case kiln_test::sample_errc::silent:
      return nullptr; // a missing message
    }
    return nullptr;
  }
};
KILN_DECLARE_ERRC(kiln_test, sample_errc)

namespace kiln {
namespace {

using kiln_test::sample_errc;

TEST(ErrorCategory, RegistersTheEnumWithSystemError) {
  static_assert(std::is_error_code_enum_v<sample_errc>);
  const std::error_code ec = sample_errc::second; // implicit, through make_error_code
  EXPECT_EQ(ec.value(), 2);
  EXPECT_STREQ(ec.category().name(), "kiln.test");
  EXPECT_EQ(ec.message(), "second thing failed");
  EXPECT_EQ(ec, sample_errc::second);
  EXPECT_NE(ec, sample_errc::first);
}

TEST(ErrorCategory, OneCategoryInstancePerEnum) {
  EXPECT_EQ(&category_of<sample_errc>(), &category_of<sample_errc>());
  EXPECT_EQ(&make_error_code(sample_errc::first).category(), &category_of<sample_errc>());
}

TEST(ErrorCategory, MissingMessagesAndUnknownValuesSayUnknownError) {
  EXPECT_EQ(make_error_code(sample_errc::silent).message(), "unknown error");
  EXPECT_EQ(category_of<sample_errc>().message(0), "unknown error");
  EXPECT_EQ(category_of<sample_errc>().message(99), "unknown error");
}

TEST(ErrorCategory, WorksAsAKilnError) {
  const error e(sample_errc::first, "while testing");
  EXPECT_EQ(e.message(), "first thing failed: while testing");
  result<int> r = sample_errc::second;
  EXPECT_EQ(r.code(), sample_errc::second);
}

} // namespace
} // namespace kiln
