// Tests of the KVM backend's exit decoding (detail/exit_decode) over a fake kvm_run area.
#include <kiln/vcpu/kvm/detail/exit_decode.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <system_error>

#include <linux/kvm.h>

namespace kiln::vcpu::kvm::detail {
namespace {

namespace exits = vcpu::exits;

/// No vCPU: decode_exit reads RIP through this fd for some exits, and read_rip gives 0 on error.
constexpr int no_vcpu_fd = -1;

/// A zeroed run mapping laid out as KVM's: the kvm_run struct, then the PIO data page.
class fake_run_area {
public:
  static constexpr std::size_t size = 3 * 4096;
  static constexpr std::uint64_t pio_offset = 4096; // KVM_PIO_PAGE_OFFSET * PAGE_SIZE
  static_assert(sizeof(kvm_run) <= pio_offset);

  fake_run_area() : bytes_(new (std::align_val_t{4096}) std::byte[size]{}) {}

  kvm_run& run() { return *reinterpret_cast<kvm_run*>(bytes_.get()); }
  std::byte* at(std::uint64_t offset) { return bytes_.get() + offset; }

  decoded_exit decode() { return decode_exit(run(), size, no_vcpu_fd); }

  /// Sets up KVM_EXIT_IO as KVM leaves it after an `out`.
  void io_out(std::uint16_t port, std::uint8_t size, std::uint32_t count, std::uint64_t offset) {
    run().exit_reason = KVM_EXIT_IO;
    run().io.direction = KVM_EXIT_IO_OUT;
    run().io.port = port;
    run().io.size = size;
    run().io.count = count;
    run().io.data_offset = offset;
  }

private:
  struct aligned_delete {
    void operator()(std::byte* p) const { ::operator delete[](p, std::align_val_t{4096}); }
  };
  std::unique_ptr<std::byte[], aligned_delete> bytes_;
};

/// The exit's alternative T, by value (callers often pass a temporary); a failure otherwise.
template <class T> T as(const exit& e) {
  const T* x = std::get_if<T>(&e);
  if (!x) {
    ADD_FAILURE() << "exit is " << exit_name(e);
    return T{};
  }
  return *x;
}

// ---- io --------------------------------------------------------------------------------------

TEST(kvm_exit_decode, out_of_each_size_reads_the_low_bytes_from_the_pio_page) {
  for (std::uint8_t size : {1, 2, 4}) {
    SCOPED_TRACE(int{size});
    fake_run_area a;
    const std::uint32_t data = 0x44332211;
    std::memcpy(a.at(fake_run_area::pio_offset), &data, 4);
    a.io_out(0x3f8, size, 1, fake_run_area::pio_offset);
    const auto d = a.decode();
    const auto out = as<exits::io_out>(d.value);
    EXPECT_EQ(out.port, 0x3f8);
    EXPECT_EQ(out.size, size);
    EXPECT_EQ(out.value, size == 4 ? 0x44332211u : size == 2 ? 0x2211u : 0x11u);
    EXPECT_EQ(d.pending, pending_completion::io_out);
  }
}

TEST(kvm_exit_decode, out_ending_exactly_at_the_end_of_the_area_is_accepted) {
  fake_run_area a;
  const std::uint32_t data = 0xcafef00d;
  std::memcpy(a.at(fake_run_area::size - 4), &data, 4);
  a.io_out(0x10, 4, 1, fake_run_area::size - 4);
  EXPECT_EQ(as<exits::io_out>(a.decode().value).value, 0xcafef00du);
}

TEST(kvm_exit_decode, out_data_offset_outside_the_area_is_an_internal_error) {
  for (std::uint64_t offset :
       {std::uint64_t{fake_run_area::size - 3}, std::uint64_t{fake_run_area::size},
        std::uint64_t{1} << 40, ~std::uint64_t{0} - 1 /* offset + size wraps */}) {
    SCOPED_TRACE(offset);
    fake_run_area a;
    a.io_out(0x10, 4, 1, offset);
    const auto d = a.decode();
    const auto ie = as<exits::internal_error>(d.value);
    EXPECT_NE(ie.what.find("outside the run area"), std::string::npos) << ie.what;
    EXPECT_EQ(ie.rip, 0u);
  }
}

TEST(kvm_exit_decode, string_out_with_a_count_is_an_internal_error) {
  for (std::uint32_t count : {0u, 2u, 4096u}) {
    SCOPED_TRACE(count);
    fake_run_area a;
    a.io_out(0x10, 1, count, fake_run_area::pio_offset);
    const auto ie = as<exits::internal_error>(a.decode().value);
    EXPECT_NE(ie.what.find("rep outs"), std::string::npos) << ie.what;
    EXPECT_NE(ie.what.find("0x10"), std::string::npos) << "names the port: " << ie.what;
  }
}

TEST(kvm_exit_decode, out_of_an_odd_size_is_an_internal_error) {
  for (std::uint8_t size : {0, 3, 8}) {
    SCOPED_TRACE(int{size});
    fake_run_area a;
    a.io_out(0x10, size, 1, fake_run_area::pio_offset);
    const auto ie = as<exits::internal_error>(a.decode().value);
    EXPECT_NE(ie.what.find("bytes on port"), std::string::npos) << ie.what;
  }
}

TEST(kvm_exit_decode, in_is_an_io_in_exit_awaiting_completion) {
  fake_run_area a;
  a.run().exit_reason = KVM_EXIT_IO;
  a.run().io.direction = KVM_EXIT_IO_IN;
  a.run().io.port = 0x60;
  a.run().io.size = 2;
  a.run().io.count = 1;
  a.run().io.data_offset = fake_run_area::pio_offset;
  const auto d = a.decode();
  const auto in = as<exits::io_in>(d.value);
  EXPECT_EQ(in.port, 0x60);
  EXPECT_EQ(in.size, 2);
  EXPECT_EQ(d.pending, pending_completion::io_in);
}

TEST(kvm_exit_decode, io_with_an_unknown_direction_is_an_internal_error) {
  fake_run_area a;
  a.io_out(0x10, 1, 1, fake_run_area::pio_offset);
  a.run().io.direction = 7;
  const auto ie = as<exits::internal_error>(a.decode().value);
  EXPECT_NE(ie.what.find("direction 7"), std::string::npos) << ie.what;
}

// ---- the other exits -------------------------------------------------------------------------

TEST(kvm_exit_decode, hlt_shutdown_and_fail_entry) {
  fake_run_area a;
  a.run().exit_reason = KVM_EXIT_HLT;
  auto d = a.decode();
  EXPECT_EQ(as<exits::halt>(d.value).rip, 0u);
  EXPECT_EQ(d.pending, pending_completion::none);

  a.run().exit_reason = KVM_EXIT_SHUTDOWN;
  EXPECT_TRUE(std::holds_alternative<exits::shutdown>(a.decode().value));

  a.run().exit_reason = KVM_EXIT_FAIL_ENTRY;
  a.run().fail_entry.hardware_entry_failure_reason = 0x80000021;
  EXPECT_EQ(as<exits::fail_entry>(a.decode().value).reason, 0x80000021u);
}

TEST(kvm_exit_decode, mmio_read_and_write) {
  fake_run_area a;
  a.run().exit_reason = KVM_EXIT_MMIO;
  a.run().mmio.phys_addr = 0xfee00030;
  a.run().mmio.len = 4;
  a.run().mmio.is_write = 1;
  auto d = a.decode();
  const auto w = as<exits::mmio>(d.value);
  EXPECT_EQ(w.gpa, 0xfee00030u);
  EXPECT_EQ(w.size, 4);
  EXPECT_TRUE(w.write);
  EXPECT_EQ(d.pending, pending_completion::mmio);
  a.run().mmio.is_write = 0;
  a.run().mmio.len = 8;
  const auto r = as<exits::mmio>(a.decode().value);
  EXPECT_FALSE(r.write);
  EXPECT_EQ(r.size, 8);
}

TEST(kvm_exit_decode, internal_error_names_its_suberror_and_bounds_its_data) {
  fake_run_area a;
  a.run().exit_reason = KVM_EXIT_INTERNAL_ERROR;
  a.run().internal.suberror = KVM_INTERNAL_ERROR_EMULATION;
  a.run().internal.ndata = 2;
  a.run().internal.data[0] = 0xabc;
  a.run().internal.data[1] = 0xdef;
  auto ie = as<exits::internal_error>(a.decode().value);
  EXPECT_NE(ie.what.find("instruction emulation failed"), std::string::npos) << ie.what;
  EXPECT_NE(ie.what.find("0xabc 0xdef"), std::string::npos) << ie.what;

  // A kernel (or a corrupted area) claiming more data than the struct holds: at most 16 words.
  a.run().internal.ndata = 0xffffffff;
  for (auto& w : a.run().internal.data)
    w = 0x77;
  ie = as<exits::internal_error>(a.decode().value);
  std::size_t words = 0;
  for (std::size_t p = ie.what.find("0x77"); p != std::string::npos;
       p = ie.what.find("0x77", p + 1))
    ++words;
  EXPECT_EQ(words, std::size(a.run().internal.data)) << ie.what;
}

TEST(kvm_exit_decode, unknown_and_system_event_are_internal_errors_with_their_detail) {
  fake_run_area a;
  a.run().exit_reason = KVM_EXIT_UNKNOWN;
  a.run().hw.hardware_exit_reason = 0x30;
  auto ie = as<exits::internal_error>(a.decode().value);
  EXPECT_NE(ie.what.find("KVM_EXIT_UNKNOWN"), std::string::npos) << ie.what;
  EXPECT_NE(ie.what.find("0x30"), std::string::npos) << ie.what;

  a.run().exit_reason = KVM_EXIT_SYSTEM_EVENT;
  a.run().system_event.type = KVM_SYSTEM_EVENT_RESET;
  ie = as<exits::internal_error>(a.decode().value);
  EXPECT_NE(ie.what.find("KVM_EXIT_SYSTEM_EVENT"), std::string::npos) << ie.what;
}

TEST(kvm_exit_decode, every_other_reason_is_an_internal_error_naming_it) {
  const std::uint32_t handled[] = {KVM_EXIT_IO,       KVM_EXIT_HLT,         KVM_EXIT_MMIO,
                                   KVM_EXIT_SHUTDOWN, KVM_EXIT_FAIL_ENTRY,  KVM_EXIT_INTERNAL_ERROR,
                                   KVM_EXIT_UNKNOWN,  KVM_EXIT_SYSTEM_EVENT};
  for (std::uint32_t reason = 0; reason < 64; ++reason) {
    if (std::find(std::begin(handled), std::end(handled), reason) != std::end(handled)) continue;
    SCOPED_TRACE(reason);
    fake_run_area a;
    a.run().exit_reason = reason;
    const auto d = a.decode();
    const auto ie = as<exits::internal_error>(d.value);
    EXPECT_EQ(ie.what,
              "KVM exit reason " + std::to_string(reason) + " (" + exit_reason_name(reason) + ")");
    EXPECT_EQ(d.pending, pending_completion::none);
  }
  fake_run_area a;
  a.run().exit_reason = 0xffffffff;
  EXPECT_NE(as<exits::internal_error>(a.decode().value).what.find("unknown"), std::string::npos);
}

// ---- names -----------------------------------------------------------------------------------

TEST(kvm_exit_decode, reason_names_match_the_kernel_header) {
#define KILN_REASON(x)                                                                             \
  { x, #x }
  const struct {
    std::uint32_t value;
    const char* name;
  } reasons[] = {
      KILN_REASON(KVM_EXIT_UNKNOWN),
      KILN_REASON(KVM_EXIT_EXCEPTION),
      KILN_REASON(KVM_EXIT_IO),
      KILN_REASON(KVM_EXIT_HYPERCALL),
      KILN_REASON(KVM_EXIT_DEBUG),
      KILN_REASON(KVM_EXIT_HLT),
      KILN_REASON(KVM_EXIT_MMIO),
      KILN_REASON(KVM_EXIT_IRQ_WINDOW_OPEN),
      KILN_REASON(KVM_EXIT_SHUTDOWN),
      KILN_REASON(KVM_EXIT_FAIL_ENTRY),
      KILN_REASON(KVM_EXIT_INTR),
      KILN_REASON(KVM_EXIT_SET_TPR),
      KILN_REASON(KVM_EXIT_TPR_ACCESS),
      KILN_REASON(KVM_EXIT_S390_SIEIC),
      KILN_REASON(KVM_EXIT_S390_RESET),
      KILN_REASON(KVM_EXIT_DCR),
      KILN_REASON(KVM_EXIT_NMI),
      KILN_REASON(KVM_EXIT_INTERNAL_ERROR),
      KILN_REASON(KVM_EXIT_OSI),
      KILN_REASON(KVM_EXIT_PAPR_HCALL),
      KILN_REASON(KVM_EXIT_S390_UCONTROL),
      KILN_REASON(KVM_EXIT_WATCHDOG),
      KILN_REASON(KVM_EXIT_S390_TSCH),
      KILN_REASON(KVM_EXIT_EPR),
      KILN_REASON(KVM_EXIT_SYSTEM_EVENT),
      KILN_REASON(KVM_EXIT_S390_STSI),
      KILN_REASON(KVM_EXIT_IOAPIC_EOI),
      KILN_REASON(KVM_EXIT_HYPERV),
      KILN_REASON(KVM_EXIT_ARM_NISV),
      KILN_REASON(KVM_EXIT_X86_RDMSR),
      KILN_REASON(KVM_EXIT_X86_WRMSR),
      KILN_REASON(KVM_EXIT_DIRTY_RING_FULL),
      KILN_REASON(KVM_EXIT_AP_RESET_HOLD),
      KILN_REASON(KVM_EXIT_X86_BUS_LOCK),
      KILN_REASON(KVM_EXIT_XEN),
      KILN_REASON(KVM_EXIT_RISCV_SBI),
      KILN_REASON(KVM_EXIT_RISCV_CSR),
      KILN_REASON(KVM_EXIT_NOTIFY),
      {38, "KVM_EXIT_LOONGARCH_IOCSR"},
      {39, "KVM_EXIT_MEMORY_FAULT"},
  };
#undef KILN_REASON
  for (const auto r : reasons)
    EXPECT_STREQ(exit_reason_name(r.value), r.name) << r.value;
  EXPECT_STREQ(exit_reason_name(40), "unknown");
  EXPECT_STREQ(exit_reason_name(0xffffffff), "unknown");
  EXPECT_EQ(static_cast<std::uint32_t>(exit_reason::memory_fault), 39u);
}

TEST(kvm_exit_decode, internal_error_suberror_names) {
  EXPECT_STREQ(internal_error_name(KVM_INTERNAL_ERROR_EMULATION), "instruction emulation failed");
  EXPECT_STREQ(internal_error_name(KVM_INTERNAL_ERROR_SIMUL_EX),
               "exception while delivering an exception");
  EXPECT_STREQ(internal_error_name(KVM_INTERNAL_ERROR_DELIVERY_EV), "event delivery failed");
  EXPECT_STREQ(internal_error_name(KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON),
               "unexpected hardware exit reason");
  EXPECT_STREQ(internal_error_name(0), "unknown");
  EXPECT_STREQ(internal_error_name(99), "unknown");
}

// ---- KVM_RUN failures ------------------------------------------------------------------------

TEST(kvm_exit_decode, efault_with_a_memory_fault_exit_is_backing_lost_at_its_gpa) {
  fake_run_area a;
  a.run().exit_reason = 39; // KVM_EXIT_MEMORY_FAULT (Linux 6.8)
  const std::uint64_t payload[3] = {0 /* flags */, 0x123000 /* gpa */, 0x1000 /* size */};
  std::memcpy(&a.run().hw, payload, sizeof payload);
  for (int err : {EFAULT, EHWPOISON}) {
    SCOPED_TRACE(err);
    const auto bl = as<exits::backing_lost>(decode_run_failure(a.run(), err, no_vcpu_fd));
    EXPECT_EQ(bl.gpa, 0x123000u);
    EXPECT_TRUE(bl.gpa_known);
    EXPECT_EQ(bl.hw_poison, err == EHWPOISON);
  }
}

TEST(kvm_exit_decode, efault_without_a_memory_fault_exit_is_backing_lost_somewhere) {
  fake_run_area a;
  a.run().exit_reason = KVM_EXIT_UNKNOWN; // what run() resets it to before KVM_RUN
  auto bl = as<exits::backing_lost>(decode_run_failure(a.run(), EFAULT, no_vcpu_fd));
  EXPECT_FALSE(bl.gpa_known);
  EXPECT_FALSE(bl.hw_poison);
  bl = as<exits::backing_lost>(decode_run_failure(a.run(), EHWPOISON, no_vcpu_fd));
  EXPECT_FALSE(bl.gpa_known);
  EXPECT_TRUE(bl.hw_poison);
}

TEST(kvm_exit_decode, other_run_failures_name_the_errno) {
  fake_run_area a;
  a.run().exit_reason = 39; // ignored for errors other than EFAULT/EHWPOISON
  const auto ie = as<exits::internal_error>(decode_run_failure(a.run(), ENOMEM, no_vcpu_fd));
  EXPECT_EQ(ie.what, "KVM_RUN: " + std::generic_category().message(ENOMEM));
}

TEST(kvm_exit_decode, read_rip_without_a_vcpu_is_zero) {
  EXPECT_EQ(read_rip(no_vcpu_fd), 0u);
}

} // namespace
} // namespace kiln::vcpu::kvm::detail
