// Backend naming, probing and selection (automatic, KILN_BACKEND, explicit), and exit names.
#include <kiln/vcpu/emulated/emulated_vcpu.hpp>
#include <kiln/vcpu/kvm/kvm_vcpu.hpp>
#include <kiln/vcpu/vcpu.hpp>
#include <kiln/vcpu/vcpu_errc.hpp>

#include <cstdlib>

namespace kiln::vcpu {

const char* to_string(backend_kind k) noexcept {
  switch (k) {
  case backend_kind::kvm:
    return "kvm";
  case backend_kind::emulated:
    return "emulated";
  }
  return "?";
}

result<backend_choice> parse_backend_choice(std::string_view name) {
  if (name == "auto" || name == "automatic" || name.empty()) return backend_choice::automatic;
  if (name == "kvm") return backend_choice::kvm;
  if (name == "emulated" || name == "unicorn") return backend_choice::emulated;
  return error(vcpu_errc::unknown_backend, std::string(name) + " (expected auto, kvm or emulated)");
}

namespace {

/// Probing opens /dev/kvm and runs a probe guest, or starts an engine: done once per process
/// and backend, on first use.
const backend_status& probed(backend_kind kind) {
  static const backend_status kvm_status = kvm::probe();
  static const backend_status emulated_status = emulated::probe();
  static const backend_status unknown{kind, false, "unknown backend"};
  switch (kind) {
  case backend_kind::kvm:
    return kvm_status;
  case backend_kind::emulated:
    return emulated_status;
  }
  return unknown;
}

} // namespace

backend_status probe(backend_kind kind) {
  return probed(kind);
}

result<backend_kind> resolve(backend_choice choice) {
  if (choice == backend_choice::automatic) {
    if (const char* env = std::getenv("KILN_BACKEND"); env && *env) {
      KILN_TRY_ASSIGN(choice, parse_backend_choice(env));
    }
  }
  auto require = [](backend_kind k) -> result<backend_kind> {
    auto st = probe(k);
    if (!st.usable)
      return error(vcpu_errc::backend_unavailable, std::string(to_string(k)) + ": " + st.reason);
    return k;
  };
  switch (choice) {
  case backend_choice::kvm:
    return require(backend_kind::kvm);
  case backend_choice::emulated:
    return require(backend_kind::emulated);
  case backend_choice::automatic:
    if (probe(backend_kind::kvm).usable) return backend_kind::kvm;
    return require(backend_kind::emulated);
  }
  return error(vcpu_errc::unknown_backend);
}

result<std::unique_ptr<vcpu>> create(backend_kind kind) {
  switch (kind) {
  case backend_kind::kvm:
    // A /dev/kvm that opens but cannot run kiln's guests (the probe guest failed) is refused
    // here too, not at the first instruction of each sandbox.
    if (const auto& st = probed(kind); !st.usable)
      return error(vcpu_errc::backend_unavailable, std::string("kvm: ") + st.reason);
    return kvm::create();
  case backend_kind::emulated:
    return emulated::create();
  }
  return error(vcpu_errc::unknown_backend);
}

const char* exit_name(const exit& e) noexcept {
  struct namer {
    const char* operator()(const exits::io_out&) const { return "io_out"; }
    const char* operator()(const exits::io_in&) const { return "io_in"; }
    const char* operator()(const exits::halt&) const { return "halt"; }
    const char* operator()(const exits::mmio&) const { return "mmio"; }
    const char* operator()(const exits::exception&) const { return "exception"; }
    const char* operator()(const exits::memory_fault&) const { return "memory_fault"; }
    const char* operator()(const exits::backing_lost&) const { return "backing_lost"; }
    const char* operator()(const exits::shutdown&) const { return "shutdown"; }
    const char* operator()(const exits::fail_entry&) const { return "fail_entry"; }
    const char* operator()(const exits::cancelled&) const { return "cancelled"; }
    const char* operator()(const exits::internal_error&) const { return "internal_error"; }
  };
  return std::visit(namer{}, e);
}

} // namespace kiln::vcpu
