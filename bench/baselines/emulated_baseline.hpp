// Raw Unicorn measurements, no kiln code: the baselines the benchmark prints beside kiln's.
#pragma once

#include <kiln/support/result.hpp>

namespace kiln::vcpu::emulated {

/// Average microseconds to open an engine, map `memory_bytes` of host memory and run a trivial
/// 64-bit guest to its first `out` (the emulated counterpart of KVM_CREATE_VM + vCPU + entry).
result<double> raw_create_us(int iterations, std::uint64_t memory_bytes);

/// Average microseconds of one `out` exit round trip on a two-instruction loop guest
/// (hook, stop, return from uc_emu_start, start again).
result<double> raw_port_io_roundtrip_us(int iterations);

} // namespace kiln::vcpu::emulated
