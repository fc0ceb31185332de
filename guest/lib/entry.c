/* Guest entry: _start, boot-info checks, FS-base thread block, constructors, READY. */
#include "internal.h"

struct kiln_io kiln_io_;

/* _start: the host enters with rdi = &boot_info and rsp = stack_top. The stack is re-aligned
 * anyway (a C function expects rsp % 16 == 8 right after its call). Returning is impossible by
 * construction; if it ever happened the vCPU halts instead of running off into memory. */
__asm__(".section .text.kiln_entry,\"ax\",@progbits\n"
        ".globl _start\n"
        ".type _start,@function\n"
        "_start:\n"
        "  andq $-16, %rsp\n"
        "  xorl %ebp, %ebp\n"
        "  call kiln_start\n"
        "1: cli\n"
        "  hlt\n"
        "  jmp 1b\n"
        ".size _start, .-_start\n"
        ".text\n");

/* The FS-base thread block. musl (built with -fstack-protector-strong) reads the canary at
 * %fs:0x28 and finds its `struct pthread` through %fs:0 (self pointer): errno at +0x34 and the
 * locale pointer at +0xa8 (offsets of musl 1.2.3 x86_64, read from its __errno_location and
 * __ctype_get_mb_cur_max). The whole struct is ~0xc8 bytes; the block is 4 KiB so a later musl
 * or our own per-thread fields fit. It lives in .bss: zero except the words set below. */
#define KILN_TB_SELF 0x00
#define KILN_TB_CANARY 0x28
#define KILN_TB_MUSL_LOCALE 0xa8
#define KILN_TB_C_LOCALE 0x800 /* a zeroed musl `struct __locale_struct` (all categories C) */
#define KILN_TB_SIZE 4096
static uint8_t kiln_thread_block[KILN_TB_SIZE] __attribute__((aligned(64)));

static void set_fs_base(uint64_t base) {
  __asm__ volatile("wrmsr" : : "c"(0xC0000100u), "a"((uint32_t)base), "d"((uint32_t)(base >> 32)));
}

static uint64_t read_tsc(void) {
  uint32_t lo, hi;
  __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
  return ((uint64_t)hi << 32) | lo;
}

static void thread_block_init(void) {
  uint8_t* tb = kiln_thread_block;
  kiln_st64(tb + KILN_TB_SELF, (uint64_t)(uintptr_t)tb);
  /* Not a secret from the host (it can read guest memory); it only has to be unlikely for a
   * buggy guest to write by accident. The low byte is zero like glibc's, so string overflows
   * that stop at a NUL cannot reproduce it. */
  kiln_st64(tb + KILN_TB_CANARY, (read_tsc() * 0x9E3779B97F4A7C15ull) & ~0xFFull);
  kiln_st64(tb + KILN_TB_MUSL_LOCALE, (uint64_t)(uintptr_t)(tb + KILN_TB_C_LOCALE));
  set_fs_base((uint64_t)(uintptr_t)tb);
}

/* Boot info we cannot trust: report without touching its out_buf unless the layout is ours. */
static _Noreturn void boot_info_abort(const struct kiln_boot_info* bi) {
  if (bi && bi->magic == KILN_ABI_MAGIC && bi->out_buf && bi->out_buf_size >= 64) {
    kiln_io_.out_buf = (uint8_t*)(uintptr_t)bi->out_buf;
    kiln_io_.out_size = bi->out_buf_size;
    kiln_abort(KILN_ABORT_BOOT_INFO, "guest library: boot info ABI major version mismatch");
  }
  kiln_hypercall(KILN_PORT_ABORT, KILN_ABORT_BOOT_INFO);
  kiln_halt_forever();
}

static void run_constructors(void) {
  typedef void (*ctor_fn)(void);
  extern ctor_fn __init_array_start[], __init_array_end[];
  for (ctor_fn* f = __init_array_start; f < __init_array_end; ++f)
    (*f)();
}

/* A known FPU state whatever the vCPU was reset to: Unicorn 2.0.1 starts with an x87 control
 * word whose precision control is 24-bit, which made musl's strtod/printf (they compute in long
 * double) round to float precision. fninit gives 0x37F (64-bit precision, exceptions masked);
 * 0x1F80 is the SSE default (round to nearest, exceptions masked). */
static void fpu_init(void) {
  uint32_t mxcsr = 0x1F80;
  __asm__ volatile("fninit\n\tldmxcsr %0" : : "m"(mxcsr));
}

_Noreturn void kiln_start(const struct kiln_boot_info* bi);
_Noreturn void kiln_start(const struct kiln_boot_info* bi) {
  /* The IDT first: from here on a fault is reported with its vector and RIP (in eax and, once
   * out_buf is known, as a full record) instead of triple-faulting the vCPU on KVM. */
  kiln_idt_install();
  fpu_init();
  /* The canary and errno must work before any musl code runs, constructors included. */
  thread_block_init();
  if (!bi || bi->magic != KILN_ABI_MAGIC || bi->abi_major != KILN_ABI_VERSION_MAJOR)
    boot_info_abort(bi);
  kiln_io_.boot = bi;
  kiln_io_.in_buf = (uint8_t*)(uintptr_t)bi->in_buf;
  kiln_io_.in_size = bi->in_buf_size;
  kiln_io_.out_buf = (uint8_t*)(uintptr_t)bi->out_buf;
  kiln_io_.out_size = bi->out_buf_size;
  kiln_io_.emulated = (bi->features & KILN_FEATURE_EMULATED) != 0;
  if (kiln_io_.out_size < 64 || kiln_io_.in_size < sizeof(struct kiln_msg_header))
    kiln_abort(KILN_ABORT_BOOT_INFO, "guest library: I/O buffers too small");
  /* The allocator hands free pages back only to a host that serves KILN_PORT_MEMORY. */
  kiln_heap_init(bi->heap_start, bi->heap_size, (bi->features & KILN_FEATURE_MEMORY_OPS) != 0);
  run_constructors();
  kiln_guest_init();
  kiln_dispatch_loop();
}

const struct kiln_boot_info* kiln_boot_info(void) {
  return kiln_io_.boot;
}
