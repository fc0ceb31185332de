// Errors of the vcpu layer: backend availability, creation and register access.
#pragma once

#include <kiln/support/error_category.hpp>

namespace kiln::vcpu {

enum class vcpu_errc {
  backend_unavailable = 1, // the chosen backend cannot run on this host (reason in detail)
  unknown_backend,         // a backend name that is not kvm, emulated or auto
  kvm_api_mismatch,        // /dev/kvm speaks another API version or lacks a needed capability
  create_failed,           // VM, vCPU or engine creation failed
  map_failed,              // a memory region could not be mapped into the VM or engine
  register_access,         // reading or writing registers failed
  run_failed,              // the run ioctl or engine failed in a way that is not a guest exit
};

} // namespace kiln::vcpu

template <> struct kiln::errc_traits<kiln::vcpu::vcpu_errc> {
  static constexpr const char* name = "kiln.vcpu";
  static const char* message(kiln::vcpu::vcpu_errc e) noexcept {
    using enum kiln::vcpu::vcpu_errc;
    switch (e) {
    case backend_unavailable:
      return "backend unavailable";
    case unknown_backend:
      return "unknown backend";
    case kvm_api_mismatch:
      return "KVM API mismatch";
    case create_failed:
      return "vCPU creation failed";
    case map_failed:
      return "memory mapping into the vCPU failed";
    case register_access:
      return "register access failed";
    case run_failed:
      return "vCPU run failed";
    }
    return nullptr;
  }
};
KILN_DECLARE_ERRC(kiln::vcpu, vcpu_errc)
