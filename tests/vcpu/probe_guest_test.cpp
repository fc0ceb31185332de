// The probe guest a backend must run before it is called usable, on one backend (built once per
// backend; the kvm build skips where KVM is unusable, or fails under KILN_REQUIRE_KVM=1).
#include "../e2e/backend_fixture.hpp"

#include <kiln/vcpu/vcpu.hpp>
#include <kiln/vcpu/vcpu_errc.hpp>
#include <kiln/vcpu/x86_64/probe_guest.hpp>

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <string_view>

namespace kiln::test {
namespace {

namespace kv = kiln::vcpu;

/// A real vCPU of the backend under test that starts the guest on its stack page instead of its
/// code: the first fetch faults (no execute right there), as a guest fails on a host whose
/// virtualisation cannot run it. Everything else is passed through untouched. (Clearing
/// CR4.OSFXSR would be closer to the PVM failure, but the emulator ignores it.)
class misdirected_vcpu final : public kv::vcpu {
public:
  explicit misdirected_vcpu(std::unique_ptr<kv::vcpu> inner) : inner_(std::move(inner)) {}
  kv::backend_kind kind() const noexcept override { return inner_->kind(); }
  std::uint64_t abi_features() const noexcept override { return inner_->abi_features(); }
  result<void> map_memory(const memory::guest_memory& mem) override {
    return inner_->map_memory(mem);
  }
  result<void> protect(memory::guest_phys_addr gpa, std::uint64_t size,
                       memory::protection p) override {
    return inner_->protect(gpa, size, p);
  }
  result<kv::registers> get_registers() override { return inner_->get_registers(); }
  result<void> set_registers(const kv::registers& r) override {
    auto elsewhere = r;
    elsewhere.rip = r.rsp - 0x1000; // the stack page, readable and writable, not executable
    return inner_->set_registers(elsewhere);
  }
  result<kv::special_registers> get_special_registers() override {
    return inner_->get_special_registers();
  }
  result<void> set_special_registers(const kv::special_registers& s) override {
    return inner_->set_special_registers(s);
  }
  result<kv::fpu_state> get_fpu() override { return inner_->get_fpu(); }
  result<void> set_fpu(const kv::fpu_state& f) override { return inner_->set_fpu(f); }
  kv::exit run() override { return inner_->run(); }
  void kick() noexcept override { inner_->kick(); }
  void invalidate_code(memory::guest_phys_addr gpa, std::uint64_t size) override {
    inner_->invalidate_code(gpa, size);
  }
  kv::vcpu_stats stats() const noexcept override { return inner_->stats(); }

private:
  std::unique_ptr<kv::vcpu> inner_;
};

// Skips where the backend is unusable (fails instead under KILN_REQUIRE_KVM=1).
class probe_guest : public backend_test {};

TEST_F(probe_guest, runs_to_its_port_write_on_a_usable_backend) {
  auto cpu = vcpu::create(backend_under_test());
  ASSERT_TRUE(cpu) << cpu.err().message();
  auto ran = vcpu::x86_64::run_probe_guest(std::move(*cpu));
  EXPECT_TRUE(ran) << ran.err().message();
}

TEST_F(probe_guest, a_guest_that_ends_elsewhere_is_refused_with_the_exit_named) {
  auto cpu = vcpu::create(backend_under_test());
  ASSERT_TRUE(cpu) << cpu.err().message();
  auto ran = vcpu::x86_64::run_probe_guest(std::make_unique<misdirected_vcpu>(std::move(*cpu)));
  ASSERT_FALSE(ran);
  EXPECT_EQ(ran.err().code, make_error_code(vcpu::vcpu_errc::backend_unavailable));
  const std::string& d = ran.err().detail;
  EXPECT_NE(d.find("cannot run kiln's guests"), std::string::npos) << d;
  EXPECT_NE(d.find("instead of a write of 0xd6d2d8dc to port 0x10"), std::string::npos) << d;
  EXPECT_NE(d.find("ended in "), std::string::npos) << d;
  EXPECT_EQ(d.find("ended in a write"), std::string::npos) << d;
}

} // namespace
} // namespace kiln::test
