// Tests for the error enums (kiln::errc, vcpu_errc, memory_errc) and poisons() (STYLE rule 8).
#include <kiln/memory/memory_errc.hpp>
#include <kiln/runtime/errc.hpp>
#include <kiln/vcpu/vcpu_errc.hpp>

#include <gtest/gtest.h>

#include <set>
#include <string>
#include <system_error>

namespace kiln {
namespace {

/// Every enumerator of E from 1 to `last` has its own message, and `last` is really the last:
/// the value after it (and 0) fall back to "unknown error". A new enumerator fails here until
/// `last` is updated, which brings it under these checks.
template <class E> void expect_every_enumerator_has_a_message(E last) {
  const std::error_category& cat = make_error_code(last).category();
  std::set<std::string> seen;
  for (int v = 1; v <= static_cast<int>(last); ++v) {
    const std::error_code ec = make_error_code(static_cast<E>(v));
    EXPECT_EQ(&ec.category(), &cat);
    const std::string m = ec.message();
    EXPECT_FALSE(m.empty()) << cat.name() << " " << v;
    EXPECT_NE(m, "unknown error") << cat.name() << " " << v;
    EXPECT_TRUE(seen.insert(m).second) << cat.name() << " " << v << " repeats \"" << m << "\"";
  }
  EXPECT_EQ(cat.message(0), "unknown error");
  EXPECT_EQ(cat.message(static_cast<int>(last) + 1), "unknown error")
      << cat.name() << ": `last` is stale";
  EXPECT_EQ(cat.message(-1), "unknown error");
}

TEST(Errc, EveryKilnErrcHasAMessage) {
  expect_every_enumerator_has_a_message(errc::reentrant_call); // the last enumerator
}

TEST(Errc, EveryVcpuErrcHasAMessage) {
  expect_every_enumerator_has_a_message(vcpu::vcpu_errc::run_failed);
}

TEST(Errc, EveryMemoryErrcHasAMessage) {
  expect_every_enumerator_has_a_message(memory::memory_errc::file_not_allowed);
}

TEST(Errc, CategoriesHaveDistinctNames) {
  const std::error_category& k = make_error_code(errc::guest_fault).category();
  const std::error_category& v = make_error_code(vcpu::vcpu_errc::backend_unavailable).category();
  const std::error_category& m = make_error_code(memory::memory_errc::out_of_bounds).category();
  EXPECT_STREQ(k.name(), "kiln");
  EXPECT_STREQ(v.name(), "kiln.vcpu");
  EXPECT_STREQ(m.name(), "kiln.memory");
  EXPECT_NE(k, v);
  EXPECT_NE(v, m);
  EXPECT_NE(k, m);
}

TEST(Errc, CodesCompareByCategoryNotJustValue) {
  // All three enums start at 1: the category keeps them apart.
  const std::error_code a = errc::guest_fault, b = vcpu::vcpu_errc::backend_unavailable,
                        c = memory::memory_errc::out_of_bounds;
  EXPECT_EQ(a.value(), b.value());
  EXPECT_NE(a, b);
  EXPECT_NE(b, c);
  EXPECT_EQ(a, errc::guest_fault);
  EXPECT_NE(a, errc::stack_overflow);
  EXPECT_TRUE(a) << "a kiln error is never the zero 'success' code";
}

// errc.hpp lists the guest-caused errors (they poison) and the caller-side ones (they do not).
constexpr errc guest_caused[] = {
    errc::guest_fault,  errc::stack_overflow,    errc::memory_violation, errc::guest_aborted,
    errc::invalid_port, errc::malformed_message, errc::guest_halted,     errc::unexpected_exit,
    errc::cancelled,    errc::deadline_exceeded, errc::not_ready,        errc::backend_failure};
constexpr errc caller_side[] = {errc::poisoned,      errc::function_not_found, errc::bad_arguments,
                                errc::guest_error,   errc::result_too_large,   errc::queue_full,
                                errc::reentrant_call};

TEST(Poisons, ListsCoverEveryEnumeratorOnce) {
  std::set<int> all;
  for (errc e : guest_caused)
    EXPECT_TRUE(all.insert(static_cast<int>(e)).second);
  for (errc e : caller_side)
    EXPECT_TRUE(all.insert(static_cast<int>(e)).second);
  EXPECT_EQ(all.size(), static_cast<std::size_t>(errc::reentrant_call)); // the last one
}

TEST(Poisons, EveryGuestCausedErrorPoisons) {
  for (errc e : guest_caused)
    EXPECT_TRUE(poisons(e)) << make_error_code(e).message();
}

TEST(Poisons, CallerSideErrorsDoNotPoison) {
  for (errc e : {errc::poisoned, errc::function_not_found, errc::bad_arguments, errc::guest_error,
                 errc::result_too_large})
    EXPECT_FALSE(poisons(e)) << make_error_code(e).message();
}

TEST(Poisons, NotReadyAndBackendFailurePoisonAsTheHeaderSays) {
  // After a backend failure or a broken protocol state the guest cannot be trusted to resume.
  EXPECT_TRUE(poisons(errc::not_ready));
  EXPECT_TRUE(poisons(errc::backend_failure));
}

TEST(Poisons, UnknownValuesPoison) {
  // A value outside the enum (e.g. a corrupted code) errs on the side of poisoning.
  EXPECT_TRUE(poisons(static_cast<errc>(0)));
  EXPECT_TRUE(poisons(static_cast<errc>(1000)));
}

} // namespace
} // namespace kiln
