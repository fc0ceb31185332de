// End to end: every guest fault class gives a named error, poisons the sandbox, spares the host.
#include "backend_fixture.hpp"

#include <chrono>
#include <thread>

namespace kiln::test {
namespace {

struct fault_case {
  const char* function;
  std::vector<errc> accepted;  // backends may name the same fault differently (see each case)
  const char* detail_contains; // "" for no check
};

void PrintTo(const fault_case& c, std::ostream* os) {
  *os << c.function;
}

class faults : public backend_test, public ::testing::WithParamInterface<fault_case> {};

TEST_P(faults, poisons_with_a_named_error) {
  const auto& c = GetParam();
  auto sb = make("faults");
  ASSERT_NE(sb, nullptr);
  auto r = sb->call(c.function);
  ASSERT_FALSE(r) << c.function << " returned " << to_string(*r);
  bool accepted = false;
  for (errc e : c.accepted)
    accepted |= r.code() == e;
  EXPECT_TRUE(accepted) << c.function << ": " << r.err().message();
  EXPECT_NE(r.err().message().find(c.detail_contains), std::string::npos) << r.err().message();
  EXPECT_TRUE(sb->poisoned());
  auto again = sb->call("log_hello");
  EXPECT_EQ(again.code(), errc::poisoned);
  // The host and other sandboxes are unaffected.
  auto other = make("faults");
  ASSERT_NE(other, nullptr);
  EXPECT_EQ(std::get<std::int32_t>(*other->call("log_hello")), 7);
}

// On KVM a write to read-only code or a fetch from NX memory is a #PF from the page tables; the
// emulated backend (no NX, per-region rights) reports the refused access itself.
const fault_case cases[] = {
    // KVM: #PF from the page tables; emulated: the engine refuses the unmapped page first.
    {"null_read", {errc::guest_fault, errc::memory_violation}, "address 0x0"},
    {"write_code", {errc::guest_fault, errc::memory_violation}, ""},
    {"exec_heap", {errc::guest_fault, errc::memory_violation}, ""},
    {"div_zero", {errc::guest_fault}, "#DE"},
    {"ud2", {errc::guest_fault}, "#UD"},
    // A non-canonical load: #GP on hardware; the emulator reports the unmapped address itself.
    {"gp", {errc::guest_fault, errc::memory_violation}, ""},
    {"breakpoint", {errc::guest_fault}, "#BP"},
    {"stack_overflow", {errc::stack_overflow}, ""},
    {"big_stack_array", {errc::stack_overflow, errc::guest_fault}, ""},
    {"abort_msg", {errc::guest_aborted}, "code 42: guest gave up"},
    {"abort_long", {errc::guest_aborted}, "[truncated]"},
    {"bad_port", {errc::invalid_port}, "0x1234"},
    {"wrong_size_port", {errc::invalid_port}, "1-byte"},
    {"in_port", {errc::invalid_port}, "in from port"},
    {"malformed_host_call", {errc::malformed_message}, ""},
    {"corrupt_len", {errc::malformed_message}, "exceeds"},
    {"lying_len", {errc::malformed_message}, ""},
    {"cli_hlt", {errc::guest_halted}, ""},
    {"triple_fault", {errc::guest_halted, errc::guest_fault}, ""},
};

INSTANTIATE_TEST_SUITE_P(all, faults, ::testing::ValuesIn(cases),
                         [](const auto& info) { return std::string(info.param.function); });

class fault_guest : public backend_test {};

TEST_F(fault_guest, unregistered_host_call_returns_into_the_guest) {
  auto sb = make("faults");
  ASSERT_NE(sb, nullptr);
  EXPECT_EQ(std::get<std::int32_t>(*sb->call("unregistered_host_call")), KILN_STATUS_NOT_FOUND);
  EXPECT_FALSE(sb->poisoned());
}

TEST_F(fault_guest, heap_exhaustion_is_clean) {
  auto sb = make("faults");
  ASSERT_NE(sb, nullptr);
  auto r = sb->call("malloc_until_fail");
  ASSERT_TRUE(r) << r.err().message();
  // 16 MiB of guest memory: a handful of 1 MiB blocks fit, then malloc returns NULL.
  EXPECT_GT(std::get<std::int32_t>(*r), 4);
  EXPECT_LT(std::get<std::int32_t>(*r), 16);
  EXPECT_FALSE(sb->poisoned());
}

TEST_F(fault_guest, log_reaches_the_sink) {
  auto sb = make("faults");
  ASSERT_NE(sb, nullptr);
  EXPECT_EQ(std::get<std::int32_t>(*sb->call("log_hello")), 7);
  ASSERT_FALSE(log_.empty());
  EXPECT_EQ(log_.back(), "hello from guest");
}

TEST_F(fault_guest, kick_stops_a_spinning_guest) {
  auto sb = make("faults");
  ASSERT_NE(sb, nullptr);
  std::thread killer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    sb->kick();
  });
  auto r = sb->call("spin");
  killer.join();
  EXPECT_EQ(r.code(), errc::cancelled);
  EXPECT_TRUE(sb->poisoned());
}

} // namespace
} // namespace kiln::test
