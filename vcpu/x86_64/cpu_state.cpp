// cpu_state: the vCPU's saved registers as fixed-width fields, in the one register order.
#include <kiln/vcpu/x86_64/cpu_state.hpp>

#include <array>

namespace kiln::vcpu::x86_64 {
namespace {

using xmm_bytes = std::array<std::uint8_t, 16>;

void put_segment(byte_writer& w, const segment& s) {
  w.put(s.base);
  w.put(s.limit);
  w.put(s.selector);
}

result<segment> get_segment(byte_reader& r) {
  segment s;
  KILN_TRY_ASSIGN(s.base, r.get<std::uint64_t>());
  KILN_TRY_ASSIGN(s.limit, r.get<std::uint32_t>());
  KILN_TRY_ASSIGN(s.selector, r.get<std::uint16_t>());
  return s;
}

void put_fpu(byte_writer& w, const fpu_state& f) {
  for (const auto& st : f.st)
    w.put(st);
  w.put(f.fcw);
  w.put(f.fsw);
  w.put(f.ftw);
  w.put(f.last_opcode);
  w.put(f.last_ip);
  w.put(f.last_dp);
  w.put(f.mxcsr);
  for (const auto& x : f.xmm)
    w.put(x);
}

result<fpu_state> get_fpu(byte_reader& r) {
  fpu_state f;
  for (auto& st : f.st) {
    KILN_TRY_ASSIGN(st, r.get<xmm_bytes>());
  }
  KILN_TRY_ASSIGN(f.fcw, r.get<std::uint16_t>());
  KILN_TRY_ASSIGN(f.fsw, r.get<std::uint16_t>());
  KILN_TRY_ASSIGN(f.ftw, r.get<std::uint8_t>());
  KILN_TRY_ASSIGN(f.last_opcode, r.get<std::uint16_t>());
  KILN_TRY_ASSIGN(f.last_ip, r.get<std::uint64_t>());
  KILN_TRY_ASSIGN(f.last_dp, r.get<std::uint64_t>());
  KILN_TRY_ASSIGN(f.mxcsr, r.get<std::uint32_t>());
  for (auto& x : f.xmm) {
    KILN_TRY_ASSIGN(x, r.get<xmm_bytes>());
  }
  // MXCSR's upper half is reserved: loading it with a bit set faults (KVM refuses it).
  if (f.mxcsr >> 16) return r.bad("mxcsr reserved bits");
  return f;
}

} // namespace

void cpu_state::encode(byte_writer& w) const {
  for (const auto& f : register_fields)
    w.put(regs.*f.field);
  put_segment(w, sregs.fs);
  put_segment(w, sregs.gs);
  w.put(sregs.idt.base);
  w.put(sregs.idt.limit);
  w.put(sregs.cr2);
  put_fpu(w, fpu);
}

result<cpu_state> cpu_state::decode(byte_reader& r, const special_registers& built,
                                    std::uint64_t memory_size) {
  cpu_state s;
  for (const auto& f : register_fields) {
    KILN_TRY_ASSIGN(s.regs.*f.field, r.get<std::uint64_t>());
  }
  KILN_TRY_ASSIGN(const segment fs, get_segment(r));
  KILN_TRY_ASSIGN(const segment gs, get_segment(r));
  KILN_TRY_ASSIGN(const auto idt_base, r.get<std::uint64_t>());
  KILN_TRY_ASSIGN(const auto idt_limit, r.get<std::uint16_t>());
  KILN_TRY_ASSIGN(const auto cr2, r.get<std::uint64_t>());
  KILN_TRY_ASSIGN(s.fpu, get_fpu(r));
  // RFLAGS bit 1 is always set and bits 22-63 are reserved (KVM refuses otherwise).
  if (!(s.regs.rflags & 2) || (s.regs.rflags >> 22) != 0) return r.bad("rflags");
  std::uint64_t idt_end = 0;
  if (__builtin_add_overflow(idt_base, std::uint64_t{idt_limit} + 1, &idt_end) ||
      idt_end > memory_size)
    return r.bad("IDT outside guest memory");
  // FS/GS selectors and limits are recorded but not used: the segments are kiln's, and only their
  // 64-bit bases (the guest's thread block) come from the bytes.
  s.sregs = built;
  s.sregs.fs.base = fs.base;
  s.sregs.gs.base = gs.base;
  s.sregs.idt = {idt_base, idt_limit};
  s.sregs.cr2 = cr2;
  return s;
}

} // namespace kiln::vcpu::x86_64
