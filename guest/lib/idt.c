/* The guest IDT: 256 stubs on the IST1 stack that report an exception to the host and halt. */
#include "internal.h"

/* One 16-byte stub per vector, at kiln_isr_stubs + 16 * vector. Vectors where the CPU pushes an
 * error code (8, 10-14, 17, 21, 29, 30: the bits of 0x60227D00) skip the `push $0`, so every
 * frame looks the same: [rsp] vector, error code, rip, cs, rflags, rsp, ss.
 * The handler never returns, so nothing is saved. It runs on IST1 (set by the host in the TSS):
 * the faulting stack may be the overflowed one, or in use below rsp by musl's red-zone code. */
__asm__(".text\n"
        ".balign 16\n"
        ".globl kiln_isr_stubs\n"
        "kiln_isr_stubs:\n"
        ".set .Lkiln_vec, 0\n"
        ".rept 256\n"
        "  .balign 16\n"
        "  .if (.Lkiln_vec < 32) && ((0x60227D00 >> (.Lkiln_vec & 31)) & 1)\n" /* CPU pushed an
                                                                                  error code */
        "  .else\n"
        "    pushq $0\n"
        "  .endif\n"
        "  pushq $.Lkiln_vec\n"
        "  jmp kiln_isr_common\n"
        "  .set .Lkiln_vec, .Lkiln_vec + 1\n"
        ".endr\n"
        "kiln_isr_common:\n"
        "  movq %rsp, %rdi\n"
        "  andq $-16, %rsp\n"
        "  call kiln_exception\n"
        "1: cli\n"
        "  hlt\n"
        "  jmp 1b\n");

extern const uint8_t kiln_isr_stubs[];

/* A 64-bit interrupt gate is two words:
 *   word 0: offset[15:0] | selector << 16 | ist << 32 | type_attr << 40 | offset[31:16] << 48
 *   word 1: offset[63:32] (upper half reserved, zero)
 * Built as plain words so installing 256 gates is a short loop (the boot path runs under the
 * emulator too, where every instruction and store counts). */
static uint64_t idt[256][2] __attribute__((aligned(16)));

/* Set while reporting: a fault inside the reporter itself (say a corrupted out_buf pointer)
 * must not loop through the IDT forever; it halts, which the host sees as an unexpected hlt. */
static volatile uint32_t in_exception;

struct isr_frame {
  uint64_t vector;
  uint64_t error_code;
  uint64_t rip;
  uint64_t cs;
  uint64_t rflags;
  uint64_t rsp;
  uint64_t ss;
};

_Noreturn void kiln_exception(const struct isr_frame* f);
_Noreturn void kiln_exception(const struct isr_frame* f) {
  if (in_exception++) kiln_halt_forever();
  uint64_t cr2;
  __asm__ volatile("movq %%cr2, %0" : "=r"(cr2));
  struct kiln_exception_record rec = {
      .vector = f->vector, .error_code = f->error_code, .rip = f->rip, .cr2 = cr2, .rsp = f->rsp};
  if (kiln_io_.out_buf && kiln_io_.out_size >= sizeof rec)
    __builtin_memcpy(kiln_io_.out_buf, &rec, sizeof rec);
  kiln_hypercall(KILN_PORT_EXCEPTION, (uint32_t)f->vector);
  kiln_halt_forever();
}

void kiln_idt_install(void) {
  const uint64_t attrs = (uint64_t)KILN_GDT_CODE64 << 16 /* selector */
                         | 1ull << 32                    /* IST1: the host's exception stack */
                         | 0x8Eull << 40; /* present, DPL 0, 64-bit interrupt gate (IF cleared) */
  uint64_t addr = (uint64_t)(uintptr_t)kiln_isr_stubs;
  for (unsigned v = 0; v < 256; ++v, addr += 16) {
    idt[v][0] = (addr & 0xFFFF) | attrs | (addr >> 16 & 0xFFFF) << 48;
    idt[v][1] = addr >> 32;
  }
  struct __attribute__((packed)) {
    uint16_t limit;
    uint64_t base;
  } idtr = {sizeof idt - 1, (uint64_t)(uintptr_t)idt};
  __asm__ volatile("lidt %0" : : "m"(idtr) : "memory");
}
