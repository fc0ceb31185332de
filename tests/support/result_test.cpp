// Tests for support/result.hpp: result<T>, result<void>, kiln::error, KILN_TRY and KILN_TRY_ASSIGN.
#include <kiln/memory/memory_errc.hpp>
#include <kiln/runtime/errc.hpp>
#include <kiln/support/result.hpp>

#include <gtest/gtest.h>

#include <cerrno>
#include <memory>
#include <string>
#include <system_error>
#include <utility>

namespace kiln {
namespace {

using memory::memory_errc;

TEST(Error, MessageIsCategoryMessageThenDetail) {
  const error e(errc::guest_aborted, "code 3: out of memory");
  EXPECT_EQ(e.code, errc::guest_aborted);
  EXPECT_EQ(e.detail, "code 3: out of memory");
  EXPECT_EQ(e.message(), "guest aborted: code 3: out of memory");
  EXPECT_EQ(error(errc::guest_aborted).message(), "guest aborted")
      << "no trailing separator without detail";
  EXPECT_EQ(error(std::make_error_code(std::errc::invalid_argument), "x").code,
            std::errc::invalid_argument);
}

TEST(Error, ErrnoErrorNamesTheCallAndKeepsErrno) {
  errno = ENOENT;
  const error e = errno_error("open /nope");
  EXPECT_EQ(e.code, std::errc::no_such_file_or_directory);
  EXPECT_EQ(&e.code.category(), &std::generic_category());
  EXPECT_EQ(e.detail, "open /nope");
}

TEST(Result, HoldsAValue) {
  result<int> r = 42;
  ASSERT_TRUE(r);
  EXPECT_TRUE(r.has_value());
  EXPECT_EQ(r.value(), 42);
  EXPECT_EQ(*r, 42);
  EXPECT_FALSE(r.code()) << "no error code when holding a value";
  *r = 7;
  EXPECT_EQ(r.value(), 7);
}

TEST(Result, HoldsAnError) {
  result<int> from_enum = memory_errc::bad_size;
  ASSERT_FALSE(from_enum);
  EXPECT_EQ(from_enum.code(), memory_errc::bad_size);
  EXPECT_TRUE(from_enum.err().detail.empty());

  result<int> from_error = error(memory_errc::unaligned, "region heap");
  ASSERT_FALSE(from_error.has_value());
  EXPECT_EQ(from_error.code(), memory_errc::unaligned);
  EXPECT_EQ(from_error.err().detail, "region heap");
  EXPECT_THROW(from_error.value(), std::bad_variant_access);
}

TEST(Result, ArrowAndMoveOut) {
  result<std::string> r = std::string("hello");
  EXPECT_EQ(r->size(), 5u);
  std::string taken = std::move(r).value();
  EXPECT_EQ(taken, "hello");

  result<std::unique_ptr<int>> owned = std::make_unique<int>(5);
  ASSERT_TRUE(owned);
  std::unique_ptr<int> p = *std::move(owned);
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(*p, 5);

  result<std::string> failed = error(errc::guest_error, "detail moves out");
  error e = std::move(failed).err();
  EXPECT_EQ(e.detail, "detail moves out");
}

TEST(ResultVoid, DefaultIsSuccess) {
  result<void> r;
  EXPECT_TRUE(r);
  EXPECT_FALSE(r.code());
  EXPECT_TRUE(ok());
}

TEST(ResultVoid, HoldsAnError) {
  result<void> r = errc::not_ready;
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), errc::not_ready);
  result<void> d = error(errc::poisoned, "earlier fault");
  EXPECT_EQ(d.err().message(), "sandbox poisoned by an earlier guest failure: earlier fault");
}

// ---- KILN_TRY / KILN_TRY_ASSIGN ----

result<int> parse_positive(int v) {
  if (v <= 0) return error(memory_errc::bad_size, "not positive: " + std::to_string(v));
  return v;
}

result<void> check_positive(int v) {
  KILN_TRY(parse_positive(v));
  return {};
}

int evaluations = 0;
result<int> counted(int v) {
  ++evaluations;
  return parse_positive(v);
}

result<int> sum_of_two(int a, int b, bool* reached_end) {
  KILN_TRY_ASSIGN(int x, counted(a));
  KILN_TRY_ASSIGN(const int y, counted(b)); // two on consecutive lines: distinct temporaries
  *reached_end = true;
  return x + y;
}

result<std::string> shout(result<std::string> in) {
  KILN_TRY_ASSIGN(auto s, std::move(in));
  return s + "!";
}

TEST(KilnTry, PassesSuccessThrough) {
  EXPECT_TRUE(check_positive(3));
  bool reached = false;
  evaluations = 0;
  auto r = sum_of_two(2, 3, &reached);
  ASSERT_TRUE(r);
  EXPECT_EQ(*r, 5);
  EXPECT_TRUE(reached);
  EXPECT_EQ(evaluations, 2) << "each expression is evaluated exactly once";
}

TEST(KilnTry, ReturnsTheFirstErrorUnchanged) {
  auto r = check_positive(-1);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), memory_errc::bad_size);
  EXPECT_EQ(r.err().detail, "not positive: -1");

  bool reached = false;
  evaluations = 0;
  auto s = sum_of_two(-4, -5, &reached);
  ASSERT_FALSE(s);
  EXPECT_EQ(s.err().detail, "not positive: -4") << "the first failure wins";
  EXPECT_FALSE(reached);
  EXPECT_EQ(evaluations, 1) << "nothing after a failed KILN_TRY_ASSIGN runs";
}

TEST(KilnTry, AssignMovesTheValue) {
  auto r = shout(std::string("hi"));
  ASSERT_TRUE(r);
  EXPECT_EQ(*r, "hi!");
  auto e = shout(error(errc::guest_error, "bad"));
  ASSERT_FALSE(e);
  EXPECT_EQ(e.err().detail, "bad");
}

TEST(KilnTry, WorksOnAnLvalueResult) {
  auto f = [](const result<int>& r) -> result<void> {
    KILN_TRY(r);
    return {};
  };
  EXPECT_TRUE(f(5));
  EXPECT_EQ(f(error(errc::cancelled, "kicked")).code(), errc::cancelled);
}

} // namespace
} // namespace kiln
