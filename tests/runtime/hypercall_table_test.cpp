// hypercall_table: a port finds what was registered for it, and nothing else.
#include <kiln/runtime/detail/hypercall_table.hpp>

#include <gtest/gtest.h>

namespace {

using kiln::detail::hypercall;
using kiln::detail::hypercall_table;

int ready(const hypercall& h) {
  return static_cast<int>(h.value) + 1;
}
int log_line(const hypercall& h) {
  return h.init ? -1 : static_cast<int>(h.value) * 2;
}

using fn = int (*)(const hypercall&);

TEST(HypercallTable, APortFindsItsHandler) {
  constexpr auto table = [] {
    hypercall_table<fn> t;
    t.add(KILN_PORT_READY, &ready).add(KILN_PORT_LOG, &log_line);
    return t;
  }();
  static_assert(hypercall_table<fn>::size == KILN_PORT_LAST - KILN_PORT_FIRST + 1);
  ASSERT_NE(table.find(KILN_PORT_READY), nullptr);
  EXPECT_EQ((*table.find(KILN_PORT_READY))({41, true}), 42);
  ASSERT_NE(table.find(KILN_PORT_LOG), nullptr);
  EXPECT_EQ((*table.find(KILN_PORT_LOG))({21, false}), 42);
  EXPECT_EQ((*table.find(KILN_PORT_LOG))({21, true}), -1);
}

TEST(HypercallTable, UnregisteredAndOutOfRangePortsFindNothing) {
  hypercall_table<fn> t;
  t.add(KILN_PORT_READY, &ready);
  EXPECT_EQ(t.find(KILN_PORT_RETURN), nullptr) << "in range, nothing registered";
  EXPECT_EQ(t.find(KILN_PORT_LAST), nullptr);
  EXPECT_EQ(t.find(KILN_PORT_FIRST - 1), nullptr);
  EXPECT_EQ(t.find(KILN_PORT_LAST + 1), nullptr);
  EXPECT_EQ(t.find(0), nullptr);
  EXPECT_EQ(t.find(0xffffffffu), nullptr);
}

} // namespace
