// Tests for vcpu/x86_64/cpu_state.hpp: the saved vCPU state round-trips field by field in the one
// register order, special registers come from what kiln builds, and reserved bits, an IDT past
// memory or damaged bytes are errors of the reader's code naming the field.
#include <kiln/vcpu/x86_64/cpu_state.hpp>

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <system_error>
#include <vector>

namespace kiln::vcpu::x86_64 {
namespace {

constexpr std::uint64_t memory_size = 16ull << 20;
const std::error_code malformed = std::make_error_code(std::errc::bad_message);
// Offsets in the encoding: 18 registers, FS and GS (14 bytes each), IDT (10), CR2, then x87.
constexpr std::size_t rflags_at = 17 * 8;
constexpr std::size_t idt_at = 18 * 8 + 2 * 14;
constexpr std::size_t fpu_at = idt_at + 10 + 8;
constexpr std::size_t mxcsr_at = fpu_at + 8 * 16 + 2 + 2 + 1 + 2 + 8 + 8;
constexpr std::size_t encoded_size = mxcsr_at + 4 + 16 * 16;

cpu_state plausible() {
  cpu_state s;
  std::uint64_t v = 0x1000;
  for (const auto& f : register_fields) {
    s.regs.*f.field = v;
    v += 0x10;
  }
  s.regs.rflags = 0x202;
  s.sregs.fs = {0x300000, 0xfffff, 0x10};
  s.sregs.gs = {0x301000, 0xffff, 0x18};
  s.sregs.idt = {0x200000, 0xfff};
  s.sregs.cr2 = 0x1234;
  s.fpu.st[2][9] = 0x3f;
  s.fpu.fcw = 0x27f;
  s.fpu.ftw = 0x80;
  s.fpu.last_ip = 0x100100;
  s.fpu.mxcsr = 0x1fa0;
  s.fpu.xmm[15][0] = 0x5a;
  return s;
}

/// What kiln builds: distinct from anything in the bytes, so a test can tell where a field came
/// from.
special_registers built() {
  special_registers b;
  b.cs = {0, 0xffffffff, 0x08, 11, true, 0, false, true, true, true};
  b.fs = {0, 0xffffffff, 0x10, 3, true, 0, false, true, false, true};
  b.gs = b.fs;
  b.cr3 = 0x10000;
  b.efer = 0xd01;
  return b;
}

std::vector<std::byte> encode(const cpu_state& s) {
  byte_writer w;
  s.encode(w);
  return w.take();
}

result<cpu_state> decode(const std::vector<std::byte>& bytes) {
  byte_reader r(bytes, malformed, "vcpu section");
  KILN_TRY_ASSIGN(auto s, cpu_state::decode(r, built(), memory_size));
  KILN_TRY(r.done());
  return s;
}

void expect_named(const std::vector<std::byte>& bytes, const std::string& what) {
  auto back = decode(bytes);
  ASSERT_FALSE(back) << what << " was accepted";
  EXPECT_EQ(back.code(), malformed);
  EXPECT_EQ(back.err().detail, "vcpu section: " + what);
}

template <class T> std::vector<std::byte> patch(std::vector<std::byte> bytes, std::size_t at, T v) {
  std::memcpy(bytes.data() + at, &v, sizeof v);
  return bytes;
}

TEST(CpuState, RoundTripsRegistersFpuAndTheSavedSpecialFields) {
  const auto s = plausible();
  const auto bytes = encode(s);
  ASSERT_EQ(bytes.size(), encoded_size);
  // The general registers lead, in register_fields' order.
  std::uint64_t rbx = 0;
  std::memcpy(&rbx, bytes.data() + 8, 8);
  EXPECT_EQ(rbx, s.regs.rbx);
  auto back = decode(bytes);
  ASSERT_TRUE(back) << back.err().message();
  EXPECT_EQ(back->regs, s.regs);
  EXPECT_EQ(back->fpu, s.fpu);
  EXPECT_EQ(back->sregs.fs.base, s.sregs.fs.base);
  EXPECT_EQ(back->sregs.gs.base, s.sregs.gs.base);
  EXPECT_EQ(back->sregs.idt, s.sregs.idt);
  EXPECT_EQ(back->sregs.cr2, s.sregs.cr2);
}

TEST(CpuState, SpecialRegistersAreKilnsNotTheBytes) {
  auto s = plausible();
  s.sregs.fs.selector = 0x2b; // recorded, never used
  s.sregs.cr3 = 0xbad000;     // not even recorded
  auto back = decode(encode(s));
  ASSERT_TRUE(back) << back.err().message();
  EXPECT_EQ(back->sregs.fs.selector, 0x10);
  EXPECT_EQ(back->sregs.fs.limit, 0xffffffffu);
  EXPECT_EQ(back->sregs.cr3, 0x10000u);
  EXPECT_EQ(back->sregs.cs, built().cs);
  EXPECT_EQ(back->sregs.efer, built().efer);
}

TEST(CpuState, RefusesReservedBitsAndAnIdtPastMemory) {
  const auto good = encode(plausible());
  expect_named(patch(good, rflags_at, std::uint64_t{0}), "rflags");
  expect_named(patch(good, rflags_at, std::uint64_t{0x202} | (1ull << 22)), "rflags");
  expect_named(patch(good, mxcsr_at, std::uint32_t{0x11f80}), "mxcsr reserved bits");
  expect_named(patch(good, idt_at, memory_size - 16), "IDT outside guest memory");
  expect_named(patch(good, idt_at, ~std::uint64_t{0}), "IDT outside guest memory");
}

TEST(CpuState, RefusesTruncatedOrTrailingBytes) {
  const auto good = encode(plausible());
  for (std::size_t cut = 0; cut < good.size(); cut += 5)
    expect_named({good.begin(), good.begin() + static_cast<std::ptrdiff_t>(cut)}, "truncated");
  auto trailing = good;
  trailing.push_back(std::byte{0});
  expect_named(trailing, "trailing bytes");
}

} // namespace
} // namespace kiln::vcpu::x86_64
