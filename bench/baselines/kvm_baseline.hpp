// Raw KVM costs, measured without kiln's code, for the benchmarks to print beside kiln's numbers.
#pragma once

#include <kiln/support/result.hpp>

namespace kiln::vcpu::kvm {

/// Average microseconds of one bare VM lifecycle: KVM_CREATE_VM, KVM_CREATE_VCPU, mmap of the
/// run area, then munmap and close of both fds. /dev/kvm is opened once, outside the timing;
/// one untimed round warms up first. Errors: backend_unavailable, create_failed; invalid_argument
/// (std::errc) for iterations < 1. Blocking; call from any thread.
result<double> raw_create_vm_us(int iterations);

/// Average microseconds of one KVM_RUN round trip through a port-I/O exit: a VM with one 4 KiB
/// memslot at 0x1000 running, in 16-bit real mode, `out %al,$0x10; jmp back`. Setup and 1,000
/// warm-up exits are not timed. Errors: as raw_create_vm_us, plus run_failed when KVM_RUN fails
/// or exits for another reason. Blocking; call from any thread (not one kiln runs a vCPU on).
result<double> raw_port_io_roundtrip_us(int iterations);

} // namespace kiln::vcpu::kvm
