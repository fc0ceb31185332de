// End to end (ADVERSARIAL 24): creating sandboxes until the host runs out of something (address
// space, descriptors, mappings). Each case runs in a forked child under a lowered limit, since the
// limit is the process's: the creation that no longer fits fails with a typed error naming what ran
// out, the process carries on, and the sandboxes made before still answer calls and can be
// destroyed.
#include "../child_process.hpp"
#include "backend_fixture.hpp"

#include <cstdio>
#include <dirent.h>
#include <memory>
#include <optional>
#include <system_error>
#include <vector>

namespace kiln::test {
namespace {

constexpr int max_sandboxes = 64;

// Exit statuses of the child, for the parent's message.
enum child_status : int {
  ok = 0,
  limit_refused = 10,
  first_failed = 11,
  never_ran_out = 12,
  wrong_error = 13,
  survivor_failed = 14,
  leaked_descriptors = 15,
};

std::uint64_t open_descriptors() {
  std::uint64_t n = 0;
  if (DIR* d = ::opendir("/proc/self/fd")) {
    while (::readdir(d) != nullptr)
      ++n;
    ::closedir(d);
  }
  return n > 3 ? n - 3 : 0; // ".", ".." and the directory's own descriptor
}

class resource_limits_test : public backend_test {
protected:
  // In the child: makes sandboxes until one fails, checks the failure is `want`, then that
  // every sandbox made still adds. `limit` lowers the limit once the first sandbox runs.
  int fill_until_refused(std::errc want, const std::function<bool()>& limit) {
    std::vector<std::unique_ptr<sandbox>> made;
    auto first = sandbox::create(config_for("calc"));
    if (!first || as<std::int32_t>((*first)->call("add_i32", 1, 2)) != 3) return first_failed;
    made.push_back(std::move(*first));
    if (!limit()) return limit_refused;
    std::optional<error> refused;
    std::uint64_t fds_before = 0;
    for (int i = 1; i < max_sandboxes && !refused; ++i) {
      fds_before = open_descriptors();
      auto sb = sandbox::create(config_for("calc"));
      if (sb)
        made.push_back(std::move(*sb));
      else
        refused = sb.err();
    }
    if (!refused) return never_ran_out;
    std::fprintf(stderr, "after %zu sandboxes: %s\n", made.size(), refused->message().c_str());
    if (refused->code != want) return wrong_error;
    if (open_descriptors() != fds_before) return leaked_descriptors; // a failed creation keeps none
    for (std::size_t i = 0; i < made.size(); ++i) {
      auto r = made[i]->call("add_i32", static_cast<std::int32_t>(i), 1);
      if (!r || !std::holds_alternative<std::int32_t>(*r) ||
          std::get<std::int32_t>(*r) != static_cast<std::int32_t>(i) + 1) {
        std::fprintf(stderr, "sandbox %zu: %s\n", i,
                     r ? to_string(*r).c_str() : r.err().message().c_str());
        return survivor_failed;
      }
    }
    made.clear(); // destruction under the limit must not fail either
    return ok;
  }
};

// Before, on the emulated backend, the creation that did not fit ended the whole process
// (Unicorn's exit(1) on its translation buffer). A few GiB of address space hold a handful of
// sandboxes on either backend, not 64.
TEST_F(resource_limits_test, running_out_of_address_space_is_a_typed_error_and_the_rest_carry_on) {
  const child_end end = run_in_child([this] {
    return fill_until_refused(std::errc::not_enough_memory, [] {
      return limit_address_space(address_space_bytes() + (5ull << 30));
    });
  });
  EXPECT_TRUE(end.exited && end.status == ok) << end.describe();
}

// The lowest descriptor number free now: RLIMIT_NOFILE bounds descriptor numbers, and a new
// descriptor takes the lowest free one.
int lowest_free_descriptor() {
  const int fd = ::dup(0);
  if (fd >= 0) ::close(fd);
  return fd;
}

// Creation opens the guest's ELF file; on KVM each sandbox also keeps its VM and vCPU open. The
// limit leaves no descriptor to spare on the emulated backend and two on KVM, so that there a
// creation runs out part-way, after the VM was made.
TEST_F(resource_limits_test, running_out_of_descriptors_is_a_typed_error_and_the_rest_carry_on) {
  const std::uint64_t spare = backend_under_test() == vcpu::backend_kind::kvm ? 2 : 0;
  const child_end end = run_in_child([this, spare] {
    return fill_until_refused(std::errc::too_many_files_open, [spare] {
      return limit_open_files(lowest_free_descriptor() + spare);
    });
  });
  EXPECT_TRUE(end.exited && end.status == ok) << end.describe();
}

// vm.max_map_count is system-wide, so the child uses up its own mappings instead, leaving 64:
// a creation needs more than that in all (guest memory, guard pages, the emulator's buffers), so
// one runs out part-way through its mappings.
TEST_F(resource_limits_test, running_out_of_mappings_is_a_typed_error_and_the_rest_carry_on) {
  if (under_sanitizer)
    GTEST_SKIP() << "a sanitizer maps its shadow memory as the process grows, and aborts when "
                    "it cannot: there is no room to use the mappings up under it";
  const child_end end = run_in_child([this] {
    return fill_until_refused(std::errc::not_enough_memory, [] { return limit_mappings(64); });
  });
  EXPECT_TRUE(end.exited && end.status == ok) << end.describe();
}

} // namespace
} // namespace kiln::test
