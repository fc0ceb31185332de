/* Test guest: one function per way a guest can fail, for the host's adversarial tests. */

/* Each function takes no arguments and returns i32; most never return. */
#include <kiln_guest.h>

/* Hides a value from the optimiser so faulting code cannot be folded, moved or deleted. */
#define OPAQUE(x) __asm__ volatile("" : "+r"(x))

static void out32(uint16_t port, uint32_t value) {
  __asm__ volatile("outl %%eax, %%dx\n\tjmp 1f\n1:" : : "a"(value), "d"(port) : "memory");
}

static uint8_t* out_buf(void) {
  return (uint8_t*)(uintptr_t)kiln_boot_info()->out_buf;
}

#define FN(name)                                                                                   \
  static enum kiln_status name(const struct kiln_value* a, uint32_t n, struct kiln_value* r)
#define UNUSED (void)a, (void)n

FN(null_read) {
  UNUSED;
  volatile int* p = 0;
  OPAQUE(p);
  r->i32 = *p;
  return KILN_STATUS_OK;
}

FN(write_code) {
  UNUSED;
  volatile uint8_t* p = (volatile uint8_t*)(uintptr_t)&write_code;
  OPAQUE(p);
  *p = 0xC3;
  r->i32 = 1; /* reached only if .text was writable */
  return KILN_STATUS_OK;
}

/* NX page fault on KVM, a fetch-protection fault on the emulated backend. */
FN(exec_heap) {
  UNUSED;
  uint8_t* code = __builtin_malloc(16);
  if (!code) return KILN_STATUS_FAILED;
  code[0] = 0xC3; /* ret */
  OPAQUE(code);
  ((void (*)(void))(uintptr_t)code)();
  r->i32 = 1; /* reached only if the heap was executable */
  return KILN_STATUS_OK;
}

FN(div_zero) {
  UNUSED;
  uint32_t zero = 0, q = 1, d = 0;
  OPAQUE(zero);
  __asm__ volatile("divl %2" : "+a"(q), "+d"(d) : "r"(zero));
  r->i32 = (int32_t)q;
  return KILN_STATUS_OK;
}

FN(ud2) {
  UNUSED, (void)r;
  __asm__ volatile("ud2");
  return KILN_STATUS_OK;
}

/* A load through a non-canonical address: #GP on hardware (the emulator may report it as an
 * unmapped access instead). */
FN(gp) {
  UNUSED;
  uint64_t addr = 0x8000000000000000ull, v;
  __asm__ volatile("movq (%1), %0" : "=r"(v) : "r"(addr) : "memory");
  r->i32 = (int32_t)v;
  return KILN_STATUS_OK;
}

FN(breakpoint) {
  UNUSED, (void)r;
  __asm__ volatile("int3");
  return KILN_STATUS_OK;
}

static volatile int recursion_limit = -1; /* never reached: it only keeps the recursion "finite" */

static int __attribute__((noinline)) recurse(int depth) {
  volatile char frame[1024];
  frame[0] = (char)depth;
  frame[1023] = (char)depth;
  if (depth == recursion_limit) return 0;
  return recurse(depth + 1) + frame[depth & 1023]; /* used after the call: no tail call */
}

FN(stack_overflow) {
  UNUSED;
  r->i32 = recurse(0);
  return KILN_STATUS_OK;
}

/* 10 MB on the stack, touched from the top down one page at a time (and probed by
 * -fstack-clash-protection), so the first fault is the guard page below the stack rather than a
 * silent write into whatever lies 10 MB below. */
FN(big_stack_array) {
  UNUSED;
  volatile char big[10 * 1000 * 1000];
  for (long i = (long)sizeof big - 1; i >= 0; i -= 4096)
    big[i] = 1;
  r->i32 = big[0];
  return KILN_STATUS_OK;
}

FN(abort_msg) {
  UNUSED, (void)r;
  kiln_abort(42, "guest gave up");
}

FN(abort_long) {
  UNUSED, (void)r;
  const size_t len = 1u << 20;
  char* msg = __builtin_malloc(len + 1);
  if (!msg) kiln_abort(43, "abort_long: no heap for the message");
  __builtin_memset(msg, 'x', len);
  msg[len] = '\0';
  kiln_abort_n(43, msg, len);
}

FN(bad_port) {
  UNUSED;
  out32(0x1234, 0);
  r->i32 = 1;
  return KILN_STATUS_OK;
}

FN(wrong_size_port) {
  UNUSED;
  __asm__ volatile("outb %%al, %%dx\n\tjmp 1f\n1:" : : "a"(0), "d"(KILN_PORT_LOG) : "memory");
  r->i32 = 1;
  return KILN_STATUS_OK;
}

FN(in_port) {
  UNUSED;
  uint32_t v;
  __asm__ volatile("inl %%dx, %%eax\n\tjmp 1f\n1:" : "=a"(v) : "d"(KILN_PORT_READY) : "memory");
  r->i32 = (int32_t)v;
  return KILN_STATUS_OK;
}

FN(malformed_host_call) {
  UNUSED;
  uint8_t* out = out_buf();
  for (unsigned i = 0; i < 64; ++i)
    out[i] = (uint8_t)(0xA5 ^ (i * 37));
  out32(KILN_PORT_HOST_CALL, 64);
  r->i32 = -1;
  return KILN_STATUS_OK;
}

/* A well-formed HOST_CALL request for add(1:i64, 2:i64); returns its length. */
static uint32_t write_valid_host_call(uint8_t* out) {
  // clang-format off
  static const uint8_t payload[] = {
      KILN_TYPE_STRING, 3, 0, 0, 0, 'a', 'd', 'd',
      KILN_TYPE_I64, 1, 0, 0, 0, 0, 0, 0, 0,
      KILN_TYPE_I64, 2, 0, 0, 0, 0, 0, 0, 0};
  // clang-format on
  struct kiln_msg_header h = {KILN_MSG_MAGIC, KILN_MSG_HOST_CALL, 2, 0, sizeof payload};
  __builtin_memcpy(out, &h, sizeof h);
  __builtin_memcpy(out + sizeof h, payload, sizeof payload);
  return (uint32_t)(sizeof h + sizeof payload);
}

FN(corrupt_len) {
  UNUSED;
  write_valid_host_call(out_buf());
  out32(KILN_PORT_HOST_CALL, 0xFFFFFFFBu);
  r->i32 = -1;
  return KILN_STATUS_OK;
}

FN(lying_len) {
  UNUSED;
  uint8_t* out = out_buf();
  uint32_t len = write_valid_host_call(out);
  uint32_t lie = 0xFFFFFFF0u;
  __builtin_memcpy(out + __builtin_offsetof(struct kiln_msg_header, size), &lie, 4);
  out32(KILN_PORT_HOST_CALL, len);
  r->i32 = -1;
  return KILN_STATUS_OK;
}

FN(unregistered_host_call) {
  UNUSED;
  r->i32 = (int32_t)kiln_host_call("no_such_fn", 0, 0, 0);
  return KILN_STATUS_OK;
}

FN(spin) {
  UNUSED, (void)r;
  for (;;)
    __asm__ volatile("" ::: "memory");
  return KILN_STATUS_OK;
}

FN(cli_hlt) {
  UNUSED, (void)r;
  for (;;)
    __asm__ volatile("cli\n\thlt" ::: "memory");
  return KILN_STATUS_OK;
}

/* With an empty IDT the #BP cannot be delivered: #GP, then #DF, then a triple fault (KVM's
 * SHUTDOWN exit). The emulated backend reports the int3 itself. */
FN(triple_fault) {
  UNUSED, (void)r;
  struct __attribute__((packed)) {
    uint16_t limit;
    uint64_t base;
  } idtr = {0, 0};
  __asm__ volatile("lidt %0\n\tint3" : : "m"(idtr) : "memory");
  return KILN_STATUS_OK;
}

/* Allocates 1 MiB blocks until malloc returns NULL, then frees them all (so the count is the same
 * on every call if freed memory is reused). Each block's first word links the list. */
FN(malloc_until_fail) {
  UNUSED;
  void* head = 0;
  int32_t count = 0;
  for (;;) {
    void** block = __builtin_malloc(1u << 20);
    if (!block) break;
    *block = head;
    head = block;
    ++count;
  }
  while (head) {
    void* next = *(void**)head;
    __builtin_free(head);
    head = next;
  }
  r->i32 = count;
  return KILN_STATUS_OK;
}

FN(log_hello) {
  UNUSED;
  kiln_print("hello from guest");
  r->i32 = 7;
  return KILN_STATUS_OK;
}

/* ADVERSARIAL 8: as much log as one call may write, 16 lines of 4 KiB; returns the line count. */
FN(log_flood) {
  UNUSED;
  static char line[4096];
  for (unsigned i = 0; i < sizeof line; ++i)
    line[i] = (char)('a' + i % 26);
  for (int i = 0; i < 16; ++i)
    kiln_log(line, sizeof line);
  r->i32 = 16;
  return KILN_STATUS_OK;
}

/* ADVERSARIAL 8, at its worst: 16 records of the largest size the log port carries (the whole
 * 64 KiB output buffer), 1 MiB a call; returns the record count. */
FN(log_flood_max) {
  UNUSED;
  static char record[64 << 10];
  for (unsigned i = 0; i < sizeof record; ++i)
    record[i] = (char)('A' + i % 26);
  for (int i = 0; i < 16; ++i)
    kiln_log(record, sizeof record);
  r->i32 = 16;
  return KILN_STATUS_OK;
}

/* ---- Surface probing (ADVERSARIAL 14): what the CPU shows the guest, and what it refuses ---- */

static void cpuid(uint32_t leaf, uint32_t* eax, uint32_t* ebx, uint32_t* ecx, uint32_t* edx) {
  __asm__ volatile("cpuid" : "=a"(*eax), "=b"(*ebx), "=c"(*ecx), "=d"(*edx) : "a"(leaf), "c"(0));
}

/* CPUID leaf 1 ECX: bit 5 VMX, bit 21 x2APIC. */
FN(cpuid_1_ecx) {
  UNUSED;
  uint32_t eax, ebx, ecx, edx;
  cpuid(1, &eax, &ebx, &ecx, &edx);
  r->i32 = (int32_t)ecx;
  return KILN_STATUS_OK;
}

/* CPUID leaf 0x80000001 ECX: bit 2 SVM. */
FN(cpuid_ext_ecx) {
  UNUSED;
  uint32_t eax, ebx, ecx, edx;
  cpuid(0x80000000u, &eax, &ebx, &ecx, &edx);
  if (eax < 0x80000001u) {
    r->i32 = 0;
    return KILN_STATUS_OK;
  }
  cpuid(0x80000001u, &eax, &ebx, &ecx, &edx);
  r->i32 = (int32_t)ecx;
  return KILN_STATUS_OK;
}

static uint64_t rdmsr(uint32_t msr) {
  uint32_t lo, hi;
  __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr) : "memory");
  return ((uint64_t)hi << 32) | lo;
}

static void wrmsr(uint32_t msr, uint64_t v) {
  __asm__ volatile("wrmsr" : : "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)) : "memory");
}

/* IA32_VMX_BASIC: exists only where VMX is offered. Returns its low half if the read succeeds. */
FN(rdmsr_vmx_basic) {
  UNUSED;
  r->i32 = (int32_t)rdmsr(0x480);
  return KILN_STATUS_OK;
}

/* EFER.SVME (bit 12): turning on AMD's virtualization extensions. */
FN(wrmsr_efer_svme) {
  UNUSED;
  wrmsr(0xC0000080u, rdmsr(0xC0000080u) | (1u << 12));
  r->i32 = 1; /* reached only if the write was accepted */
  return KILN_STATUS_OK;
}

/* CR4.VMXE (bit 13): turning on Intel's virtualization extensions. */
FN(cr4_vmxe) {
  UNUSED;
  uint64_t cr4;
  __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
  cr4 |= 1u << 13;
  __asm__ volatile("mov %0, %%cr4" : : "r"(cr4) : "memory");
  r->i32 = 1;
  return KILN_STATUS_OK;
}

/* VMXON and VMRUN without the extensions enabled: invalid opcodes. */
FN(vmxon) {
  UNUSED;
  uint64_t region = 0;
  __asm__ volatile("vmxon %0" : : "m"(region) : "memory", "cc");
  r->i32 = 1;
  return KILN_STATUS_OK;
}

FN(vmrun) {
  UNUSED;
  __asm__ volatile("vmrun %%rax" : : "a"(0ull) : "memory", "cc");
  r->i32 = 1;
  return KILN_STATUS_OK;
}

/* IA32_APIC_BASE with the x2APIC enable bit (10): refused where x2APIC is not offered. */
FN(x2apic_enable) {
  UNUSED;
  wrmsr(0x1B, rdmsr(0x1B) | (1u << 10));
  r->i32 = 1;
  return KILN_STATUS_OK;
}

void kiln_guest_init(void) {
  static const struct {
    const char* name;
    kiln_guest_fn fn;
  } fns[] = {
      {"null_read", null_read},
      {"write_code", write_code},
      {"exec_heap", exec_heap},
      {"div_zero", div_zero},
      {"ud2", ud2},
      {"gp", gp},
      {"breakpoint", breakpoint},
      {"stack_overflow", stack_overflow},
      {"big_stack_array", big_stack_array},
      {"abort_msg", abort_msg},
      {"abort_long", abort_long},
      {"bad_port", bad_port},
      {"wrong_size_port", wrong_size_port},
      {"in_port", in_port},
      {"malformed_host_call", malformed_host_call},
      {"corrupt_len", corrupt_len},
      {"lying_len", lying_len},
      {"unregistered_host_call", unregistered_host_call},
      {"spin", spin},
      {"cli_hlt", cli_hlt},
      {"triple_fault", triple_fault},
      {"malloc_until_fail", malloc_until_fail},
      {"log_hello", log_hello},
      {"log_flood", log_flood},
      {"log_flood_max", log_flood_max},
      {"cpuid_1_ecx", cpuid_1_ecx},
      {"cpuid_ext_ecx", cpuid_ext_ecx},
      {"rdmsr_vmx_basic", rdmsr_vmx_basic},
      {"wrmsr_efer_svme", wrmsr_efer_svme},
      {"cr4_vmxe", cr4_vmxe},
      {"vmxon", vmxon},
      {"vmrun", vmrun},
      {"x2apic_enable", x2apic_enable},
  };
  for (unsigned i = 0; i < sizeof fns / sizeof fns[0]; ++i)
    if (kiln_register(fns[i].name, fns[i].fn, KILN_TYPE_I32, 0, 0) != 0)
      kiln_abort(1, "faults: cannot register a function");
}
