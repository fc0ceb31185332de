// End to end: a guest linked against Debian's musl libc.a (snprintf, strtod, errno via FS base).
#include "backend_fixture.hpp"

namespace kiln::test {
namespace {

class musl : public backend_test {};

TEST_F(musl, snprintf_formats_a_double) {
  auto sb = make("musl_demo");
  ASSERT_NE(sb, nullptr);
  auto r = sb->call("format_f64", 3.14159);
  ASSERT_TRUE(r) << r.err().message();
  EXPECT_EQ(std::get<std::string>(*r), "3.142");
}

TEST_F(musl, strtod_parses) {
  auto sb = make("musl_demo");
  ASSERT_NE(sb, nullptr);
  auto r = sb->call("parse_f64", std::string("-2.5e3"));
  ASSERT_TRUE(r) << r.err().message();
  EXPECT_DOUBLE_EQ(std::get<double>(*r), -2500.0);
}

TEST_F(musl, errno_lives_in_the_thread_block) {
  auto sb = make("musl_demo");
  ASSERT_NE(sb, nullptr);
  auto r = sb->call("errno_check");
  ASSERT_TRUE(r) << r.err().message();
  EXPECT_EQ(std::get<std::int32_t>(*r), 34); // ERANGE
}

} // namespace
} // namespace kiln::test
