// Raw Unicorn baselines: engine creation and an `out` round trip, without kiln in the way.
#include "emulated_baseline.hpp"

#include <kiln/vcpu/vcpu_errc.hpp>

#include <unicorn/unicorn.h>

#include <sys/mman.h>

#include <chrono>
#include <cstring>

namespace kiln::vcpu::emulated {
namespace {

// loop: out %eax,%dx ; jmp next ; next: jmp loop
constexpr unsigned char loop_code[] = {0xef, 0xeb, 0x00, 0xeb, 0xfb};
constexpr std::uint64_t code_addr = 0x100000;

void stop_on_out(uc_engine* uc, std::uint32_t, int, std::uint32_t, void*) {
  uc_emu_stop(uc);
}

struct raw_engine {
  uc_engine* uc = nullptr;
  void* mem = MAP_FAILED;
  std::uint64_t size = 0;
  ~raw_engine() {
    if (uc) uc_close(uc);
    if (mem != MAP_FAILED) munmap(mem, size);
  }
};

result<void> open_engine(raw_engine& e, std::uint64_t bytes) {
  e.size = bytes;
  e.mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
               -1, 0);
  if (e.mem == MAP_FAILED) return errno_error("mmap");
  std::memcpy(static_cast<char*>(e.mem) + code_addr, loop_code, sizeof loop_code);
  uc_hook h{};
  if (uc_open(UC_ARCH_X86, UC_MODE_64, &e.uc) != UC_ERR_OK ||
      uc_mem_map_ptr(e.uc, 0, bytes, UC_PROT_ALL, e.mem) != UC_ERR_OK ||
      uc_hook_add(e.uc, &h, UC_HOOK_INSN, reinterpret_cast<void*>(&stop_on_out), nullptr, 1, 0,
                  UC_X86_INS_OUT) != UC_ERR_OK)
    return error(vcpu_errc::create_failed, "raw unicorn engine");
  return {};
}

result<void> run_once(raw_engine& e, std::uint64_t& rip) {
  if (uc_emu_start(e.uc, rip, 0, 0, 0) != UC_ERR_OK) return error(vcpu_errc::run_failed, "raw run");
  uc_reg_read(e.uc, UC_X86_REG_RIP, &rip);
  return {};
}

} // namespace

result<double> raw_create_us(int iterations, std::uint64_t memory_bytes) {
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iterations; ++i) {
    raw_engine e;
    KILN_TRY(open_engine(e, memory_bytes));
    std::uint64_t rip = code_addr;
    KILN_TRY(run_once(e, rip));
  }
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
         iterations;
}

result<double> raw_port_io_roundtrip_us(int iterations) {
  raw_engine e;
  KILN_TRY(open_engine(e, 4ull << 20));
  std::uint64_t rip = code_addr;
  KILN_TRY(run_once(e, rip)); // translate once before timing
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iterations; ++i)
    KILN_TRY(run_once(e, rip));
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
         iterations;
}

} // namespace kiln::vcpu::emulated
