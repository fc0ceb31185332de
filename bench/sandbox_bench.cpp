// Benchmark: sandbox create time and call round trip per backend, each beside a raw baseline
// (no kiln code) measured in the same run, printed with the ratio.
#include "baselines/emulated_baseline.hpp"
#include "baselines/kvm_baseline.hpp"

#include <kiln/runtime/sandbox.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

using clock_type = std::chrono::steady_clock;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

struct row {
  std::string what;
  double kiln_us;
  std::string baseline_name;
  double baseline_us;
};

void print(const std::string& backend, const std::vector<row>& rows) {
  for (const auto& r : rows)
    fmt::print("{:<9} {:<24} {:>10.2f} us   {:<34} {:>10.2f} us   {:>6.2f}x\n", backend, r.what,
               r.kiln_us, r.baseline_name, r.baseline_us,
               r.baseline_us > 0 ? r.kiln_us / r.baseline_us : 0.0);
}

int bench_backend(kiln::vcpu::backend_kind kind, int creates, int calls) {
  const auto st = kiln::vcpu::probe(kind);
  if (!st.usable) {
    fmt::print("{:<9} skipped: {}\n", kiln::vcpu::to_string(kind), st.reason);
    return 0;
  }
  kiln::sandbox_config cfg;
  cfg.guest_path = std::string(KILN_GUEST_DIR) + "/calc.elf";
  cfg.backend = kind == kiln::vcpu::backend_kind::kvm ? kiln::vcpu::backend_choice::kvm
                                                      : kiln::vcpu::backend_choice::emulated;
  kiln::host_functions fns;
  fns.add("host_add", [](std::int64_t a, std::int64_t b) { return a + b; });

  std::vector<double> create_us;
  for (int i = 0; i < creates; ++i) {
    auto sb = kiln::sandbox::create(cfg, fns);
    if (!sb) {
      fmt::print(stderr, "create failed: {}\n", sb.err().message());
      return 1;
    }
    create_us.push_back((*sb)->stats().create_time.count() / 1e3);
  }
  auto sb = kiln::sandbox::create(cfg, fns);
  if (!sb) return 1;
  auto time_calls = [&](auto&& fn) {
    for (int i = 0; i < 100; ++i)
      fn(); // warm up translations and caches
    const auto t0 = clock_type::now();
    for (int i = 0; i < calls; ++i)
      fn();
    return std::chrono::duration<double, std::micro>(clock_type::now() - t0).count() / calls;
  };
  const double call_void = time_calls([&] { (void)(*sb)->call("nothing"); });
  const double call_add = time_calls([&] { (void)(*sb)->call("add_i32", 2, 3); });
  const double call_host = time_calls([&] {
    (void)(*sb)->call("call_host", std::string("host_add"), std::int64_t{1}, std::int64_t{2});
  });

  kiln::result<double> raw_create = 0.0, raw_io = 0.0;
  std::string create_name, io_name;
  if (kind == kiln::vcpu::backend_kind::kvm) {
    raw_create = kiln::vcpu::kvm::raw_create_vm_us(creates);
    raw_io = kiln::vcpu::kvm::raw_port_io_roundtrip_us(calls);
    create_name = "raw KVM_CREATE_VM + vCPU";
    io_name = "raw KVM port-IO exit round trip";
  } else {
    raw_create = kiln::vcpu::emulated::raw_create_us(creates, cfg.memory_size);
    raw_io = kiln::vcpu::emulated::raw_port_io_roundtrip_us(calls);
    create_name = "raw Unicorn open+map+first out";
    io_name = "raw Unicorn out round trip";
  }
  if (!raw_create || !raw_io) {
    fmt::print(stderr, "baseline failed: {}\n",
               (!raw_create ? raw_create.err() : raw_io.err()).message());
    return 1;
  }
  const std::string b = kiln::vcpu::to_string(kind);
  print(b, {
               {"create (median)", median(create_us), create_name, *raw_create},
               {"call nothing()", call_void, io_name, *raw_io},
               {"call add_i32(2,3)", call_add, io_name, *raw_io},
               {"call + 1 host call", call_host, io_name, 2 * *raw_io},
           });
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  int creates = 20, calls = 2000;
  std::string only;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--creates") && i + 1 < argc)
      creates = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--calls") && i + 1 < argc)
      calls = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--backend") && i + 1 < argc)
      only = argv[++i];
    else {
      fmt::print(stderr,
                 "usage: sandbox_bench [--creates N] [--calls N] [--backend kvm|emulated]\n");
      return 2;
    }
  }
  if (creates < 1 || calls < 1) return 2;
  fmt::print("{:<9} {:<24} {:>13}   {:<34} {:>13}   {:>7}\n", "backend", "measure", "kiln",
             "baseline (same run)", "baseline", "ratio");
  int rc = 0;
  for (auto k : {kiln::vcpu::backend_kind::kvm, kiln::vcpu::backend_kind::emulated})
    if (only.empty() || only == kiln::vcpu::to_string(k)) rc |= bench_backend(k, creates, calls);
  return rc;
}
