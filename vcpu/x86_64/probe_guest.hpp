// A few instructions of the kind every kiln guest runs, used to prove that a backend can run
// kiln's guests at all before it is chosen.
#pragma once

#include <kiln/support/result.hpp>

#include <memory>

namespace kiln::vcpu {
class vcpu;
}

namespace kiln::vcpu::x86_64 {

/// Takes a fresh vCPU (and drops it before the guest memory it mapped), maps a 4 MiB guest into it,
/// enters 64-bit long mode at ring 0 as every kiln guest does, and runs a short program that pushes
/// and pops on its stack, computes with an SSE register (as compilers do for memcpy and for
/// doubles) and writes the result to a port. Succeeds when the first exit is that port write with
/// the right value.
///
/// Why: a /dev/kvm can open, create VMs and still be unable to run kiln's guests. Seen here: a
/// host whose KVM runs the guest's kernel mode through the kernel's instruction emulator (PVM,
/// module kvm_pvm) fails every guest at its first SSE instruction with "instruction emulation
/// failed". The probe finds that once per process, so `automatic` falls back to the emulated
/// backend and an explicit choice of KVM fails with the reason, instead of every sandbox failing
/// at creation.
///
/// Errors: vcpu_errc::backend_unavailable, whose detail names the exit the program ended in; the
/// errors of guest_memory::create and vcpu::map_memory.
result<void> run_probe_guest(std::unique_ptr<vcpu> cpu);

} // namespace kiln::vcpu::x86_64
