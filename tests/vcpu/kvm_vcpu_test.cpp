// Tests of the KVM backend's entry points where /dev/kvm is unusable: probe and create fail
// cleanly.
#include <kiln/vcpu/kvm/kvm_vcpu.hpp>
#include <kiln/vcpu/vcpu_errc.hpp>

#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include <unistd.h>

namespace kiln::vcpu::kvm {
namespace {

std::size_t open_fds() {
  std::size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/fd"))
    ++n;
  return n;
}

class kvm_unusable_test : public ::testing::Test {
protected:
  void SetUp() override {
    if (::access("/dev/kvm", F_OK) == 0)
      GTEST_SKIP() << "/dev/kvm exists here; these tests cover hosts without it";
  }
};

TEST_F(kvm_unusable_test, probe_says_unusable_and_names_dev_kvm) {
  const auto st = probe();
  EXPECT_EQ(st.kind, backend_kind::kvm);
  EXPECT_FALSE(st.usable);
  EXPECT_NE(st.reason.find("/dev/kvm"), std::string::npos) << st.reason;
}

TEST_F(kvm_unusable_test, create_fails_with_backend_unavailable) {
  auto v = create();
  ASSERT_FALSE(v);
  EXPECT_EQ(v.code(), vcpu_errc::backend_unavailable) << v.err().message();
  EXPECT_NE(v.err().detail.find("/dev/kvm"), std::string::npos) << v.err().detail;
}

TEST_F(kvm_unusable_test, repeated_failures_leak_no_descriptors) {
  // The failure is not cached (/dev/kvm may appear later), so each create() tries again.
  const std::size_t before = open_fds();
  for (int i = 0; i < 100; ++i) {
    auto v = create();
    ASSERT_FALSE(v);
    EXPECT_FALSE(probe().usable);
  }
  EXPECT_EQ(open_fds(), before);
}

} // namespace
} // namespace kiln::vcpu::kvm
