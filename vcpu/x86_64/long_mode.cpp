// long_mode_state: flat 64-bit segments, paging and SSE enabled, TR pointing at the TSS.
#include <kiln/guest/abi.h>
#include <kiln/vcpu/x86_64/long_mode.hpp>

namespace kiln::vcpu::x86_64 {

special_registers long_mode_state(const long_mode_params& p) {
  using namespace x86;
  special_registers s;
  segment code;
  code.selector = KILN_GDT_CODE64;
  code.limit = 0xffffffff;
  code.type = 0xb; // execute/read, accessed
  code.present = true;
  code.s = true;
  code.l = true;
  code.g = true;
  segment data;
  data.selector = KILN_GDT_DATA;
  data.limit = 0xffffffff;
  data.type = 0x3; // read/write, accessed
  data.present = true;
  data.s = true;
  data.db = true;
  data.g = true;
  s.cs = code;
  s.ds = s.es = s.fs = s.gs = s.ss = data;

  s.tr.selector = KILN_GDT_TSS;
  s.tr.base = p.tss_base;
  s.tr.limit = p.tss_limit;
  s.tr.type = 0xb; // 64-bit TSS, busy
  s.tr.present = true;
  s.ldt.unusable = true;
  s.ldt.type = 0x2;

  s.gdt = {p.gdt_base, p.gdt_limit};
  s.idt = {0, 0}; // the guest library installs its IDT
  s.cr3 = p.cr3;
  s.cr4 = cr4_pae | cr4_osfxsr | cr4_osxmmexcpt;
  s.cr0 = cr0_pe | cr0_mp | cr0_et | cr0_ne | cr0_wp | cr0_pg;
  s.efer = efer_lme | efer_lma | (p.nx ? efer_nxe : 0);
  return s;
}

special_registers long_mode_state(memory::guest_phys_addr cr3,
                                  const memory::x86_64::system_tables& sys, bool nx) {
  return long_mode_state({
      .cr3 = cr3.value,
      .gdt_base = sys.gdt_base.value,
      .gdt_limit = sys.gdt_limit,
      .tss_base = sys.tss_base.value,
      .tss_limit = sys.tss_limit,
      .nx = nx,
  });
}

} // namespace kiln::vcpu::x86_64
