// Raw KVM baselines: a bare VM create/destroy, and a bare port-I/O exit round trip.
#include "kvm_baseline.hpp"

#include <kiln/vcpu/kvm/detail/unique_fd.hpp>
#include <kiln/vcpu/vcpu_errc.hpp>

#include <fmt/format.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <system_error>

#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

// Deliberately independent of kiln's KVM backend (only the fd/mapping owners, which compile to
// the same close/munmap calls), so that the numbers are what KVM itself costs on this host.

namespace kiln::vcpu::kvm {

namespace {

using detail::ioctl_retry;
using detail::unique_fd;
using detail::unique_mapping;
using clock_type = std::chrono::steady_clock;

error sys_fail(vcpu_errc code, std::string_view what, int err) {
  return error(code, fmt::format("{}: {}", what, std::generic_category().message(err)));
}

struct raw_kvm {
  unique_fd kvm;
  std::size_t run_size = 0;
};

result<raw_kvm> open_raw_kvm() {
  raw_kvm k;
  int fd;
  do {
    fd = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  } while (fd == -1 && errno == EINTR);
  if (fd == -1) return sys_fail(vcpu_errc::backend_unavailable, "/dev/kvm", errno);
  k.kvm.reset(fd);
  const int size = ioctl_retry(k.kvm.get(), KVM_GET_VCPU_MMAP_SIZE, 0);
  if (size <= 0) return sys_fail(vcpu_errc::backend_unavailable, "KVM_GET_VCPU_MMAP_SIZE", errno);
  k.run_size = static_cast<std::size_t>(size);
  return k;
}

// One bare lifecycle; returns an error or nothing. Everything is released before returning.
result<void> create_destroy_once(const raw_kvm& k) {
  unique_fd vm(ioctl_retry(k.kvm.get(), KVM_CREATE_VM, 0));
  if (!vm) return sys_fail(vcpu_errc::create_failed, "KVM_CREATE_VM", errno);
  unique_fd vcpu(ioctl_retry(vm.get(), KVM_CREATE_VCPU, 0ul));
  if (!vcpu) return sys_fail(vcpu_errc::create_failed, "KVM_CREATE_VCPU", errno);
  void* run = ::mmap(nullptr, k.run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu.get(), 0);
  if (run == MAP_FAILED)
    return sys_fail(vcpu_errc::create_failed, "mmap of the vCPU run area", errno);
  ::munmap(run, k.run_size);
  vcpu.reset();
  vm.reset();
  return ok();
}

double average_us(clock_type::duration d, int iterations) {
  return std::chrono::duration<double, std::micro>(d).count() / iterations;
}

} // namespace

result<double> raw_create_vm_us(int iterations) {
  if (iterations < 1)
    return error(std::make_error_code(std::errc::invalid_argument), "iterations must be >= 1");
  KILN_TRY_ASSIGN(raw_kvm k, open_raw_kvm());
  KILN_TRY(create_destroy_once(k)); // warm-up: first-use costs (module paths, caches)
  const auto start = clock_type::now();
  for (int i = 0; i < iterations; ++i)
    KILN_TRY(create_destroy_once(k));
  return average_us(clock_type::now() - start, iterations);
}

result<double> raw_port_io_roundtrip_us(int iterations) {
  if (iterations < 1)
    return error(std::make_error_code(std::errc::invalid_argument), "iterations must be >= 1");
  KILN_TRY_ASSIGN(raw_kvm k, open_raw_kvm());

  constexpr std::uint64_t code_gpa = 0x1000;
  constexpr std::size_t code_size = 0x1000;
  constexpr std::uint16_t port = 0x10;
  // out %al, $0x10 ; jmp -4 (back to the out)
  constexpr std::uint8_t code[] = {0xe6, 0x10, 0xeb, 0xfc};

  // Declared before the fds: unmapped only after the VM that maps it is gone.
  void* mem_raw =
      ::mmap(nullptr, code_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem_raw == MAP_FAILED)
    return sys_fail(vcpu_errc::create_failed, "mmap of guest memory", errno);
  unique_mapping mem(mem_raw, code_size);
  std::memcpy(mem.get(), code, sizeof code);

  unique_fd vm(ioctl_retry(k.kvm.get(), KVM_CREATE_VM, 0));
  if (!vm) return sys_fail(vcpu_errc::create_failed, "KVM_CREATE_VM", errno);
  // Real mode on Intel without unrestricted guest needs the TSS pages (as in kiln's backend).
  if (ioctl_retry(vm.get(), KVM_SET_TSS_ADDR, 0xfffbd000ul) == -1)
    return sys_fail(vcpu_errc::create_failed, "KVM_SET_TSS_ADDR", errno);

  kvm_userspace_memory_region region{};
  region.slot = 0;
  region.guest_phys_addr = code_gpa;
  region.memory_size = code_size;
  region.userspace_addr = reinterpret_cast<std::uintptr_t>(mem.get());
  if (ioctl_retry(vm.get(), KVM_SET_USER_MEMORY_REGION, &region) == -1)
    return sys_fail(vcpu_errc::create_failed, "KVM_SET_USER_MEMORY_REGION", errno);

  unique_fd vcpu(ioctl_retry(vm.get(), KVM_CREATE_VCPU, 0ul));
  if (!vcpu) return sys_fail(vcpu_errc::create_failed, "KVM_CREATE_VCPU", errno);
  void* run_raw = ::mmap(nullptr, k.run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu.get(), 0);
  if (run_raw == MAP_FAILED)
    return sys_fail(vcpu_errc::create_failed, "mmap of the vCPU run area", errno);
  unique_mapping run_map(run_raw, k.run_size); // declared after vcpu: unmapped first
  auto* run = static_cast<kvm_run*>(run_map.get());

  // Reset state is real mode with CS base 0xffff0000; point CS at 0 and start at the code.
  kvm_sregs sregs{};
  if (ioctl_retry(vcpu.get(), KVM_GET_SREGS, &sregs) == -1)
    return sys_fail(vcpu_errc::create_failed, "KVM_GET_SREGS", errno);
  sregs.cs.base = 0;
  sregs.cs.selector = 0;
  if (ioctl_retry(vcpu.get(), KVM_SET_SREGS, &sregs) == -1)
    return sys_fail(vcpu_errc::create_failed, "KVM_SET_SREGS", errno);
  kvm_regs regs{};
  regs.rip = code_gpa;
  regs.rflags = 0x2;
  if (ioctl_retry(vcpu.get(), KVM_SET_REGS, &regs) == -1)
    return sys_fail(vcpu_errc::create_failed, "KVM_SET_REGS", errno);

  auto one_exit = [&]() -> result<void> {
    // Nothing kicks this vCPU, so an EINTR (a stray signal) is simply retried.
    if (ioctl_retry(vcpu.get(), KVM_RUN, 0) == -1)
      return sys_fail(vcpu_errc::run_failed, "KVM_RUN", errno);
    if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_OUT ||
        run->io.port != port)
      return error(vcpu_errc::run_failed, fmt::format("unexpected exit: reason {}, port {:#x}",
                                                      run->exit_reason, run->io.port));
    return ok();
  };

  constexpr int warm_up = 1000;
  for (int i = 0; i < warm_up; ++i)
    KILN_TRY(one_exit());
  const auto start = clock_type::now();
  for (int i = 0; i < iterations; ++i)
    KILN_TRY(one_exit());
  return average_us(clock_type::now() - start, iterations);
}

} // namespace kiln::vcpu::kvm
