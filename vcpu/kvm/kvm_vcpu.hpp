// The KVM backend: one VM and one vCPU per sandbox over /dev/kvm.
#pragma once

#include <kiln/vcpu/vcpu.hpp>

namespace kiln::vcpu::kvm {

backend_status probe();
result<std::unique_ptr<vcpu>> create();

} // namespace kiln::vcpu::kvm
