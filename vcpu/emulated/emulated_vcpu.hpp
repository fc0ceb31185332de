// The emulated backend: Unicorn 2.0.1 runs the guest over the same host memory as KVM would.
#pragma once

#include <kiln/vcpu/vcpu.hpp>

namespace kiln::vcpu::emulated {

backend_status probe();
result<std::unique_ptr<vcpu>> create();

} // namespace kiln::vcpu::emulated
