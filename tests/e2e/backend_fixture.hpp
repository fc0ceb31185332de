// Shared fixture for end-to-end tests: the backend under test, guest paths, a ready sandbox.
#pragma once

#include "../test_env.hpp"

#include <kiln/runtime/sandbox.hpp>

#include <gtest/gtest.h>

#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <string>

namespace kiln::test {

/// Each end-to-end test binary is built once per backend (KILN_TEST_BACKEND is kvm or
/// emulated); the KVM build carries the CTest label `kvm` and skips without /dev/kvm.
inline vcpu::backend_kind backend_under_test() {
  return std::string(KILN_TEST_BACKEND) == "kvm" ? vcpu::backend_kind::kvm
                                                 : vcpu::backend_kind::emulated;
}

/// Whether this host's KVM has KVM_PRE_FAULT_MEMORY (Linux 6.10+; capability 236), so that the
/// lazy-load tests can require that kiln used it.
inline bool kvm_has_pre_fault_memory() {
  const int fd = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (fd < 0) return false;
  const bool has = ::ioctl(fd, KVM_CHECK_EXTENSION, 236) > 0;
  ::close(fd);
  return has;
}

/// The value of a call that must succeed with a T (a failure or another type fails the test
/// and gives T{}).
template <class T> T as(const result<value>& r) {
  EXPECT_TRUE(r) << (r ? "" : r.err().message());
  if (!r) return T{};
  EXPECT_TRUE(std::holds_alternative<T>(*r)) << to_string(*r);
  return std::holds_alternative<T>(*r) ? std::get<T>(*r) : T{};
}

inline std::string guest_path(const std::string& name) {
  return std::string(KILN_GUEST_DIR) + "/" + name + ".elf";
}

class backend_test : public ::testing::Test {
protected:
  void SetUp() override {
    const auto st = vcpu::probe(backend_under_test());
    if (!st.usable && backend_under_test() == vcpu::backend_kind::kvm && kvm_required())
      FAIL() << "KILN_REQUIRE_KVM=1, but the kvm backend is unusable: " << st.reason;
    if (!st.usable)
      GTEST_SKIP() << vcpu::to_string(backend_under_test())
                   << " backend unusable here: " << st.reason;
  }

  sandbox_config config_for(const std::string& guest) const {
    sandbox_config c;
    c.guest_path = guest_path(guest);
    c.backend = backend_under_test() == vcpu::backend_kind::kvm ? vcpu::backend_choice::kvm
                                                                : vcpu::backend_choice::emulated;
    c.log_sink = [this](std::string_view line) { log_.emplace_back(line); };
    return c;
  }

  std::unique_ptr<sandbox> make(const std::string& guest, host_functions fns = {}) {
    auto sb = sandbox::create(config_for(guest), std::move(fns));
    EXPECT_TRUE(sb) << (sb ? "" : sb.err().message());
    return sb ? std::move(*sb) : nullptr;
  }

  mutable std::vector<std::string> log_;
};

/// A backend test with a directory of its own for files (removed afterwards).
class file_backend_test : public backend_test {
protected:
  void SetUp() override {
    backend_test::SetUp();
    dir_ = std::filesystem::temp_directory_path() /
           ("kiln-e2e-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  std::string dir() const { return dir_.string(); }
  std::filesystem::path dir_;
};

} // namespace kiln::test
