/* Guest-library internals shared by its files: the hypercall stub, buffers, wire helpers. */
#ifndef KILN_GUEST_INTERNAL_H
#define KILN_GUEST_INTERNAL_H

#include "kiln_guest.h"

/* The one hypercall instruction sequence: a 4-byte `out %eax, %dx`, then a jump to the next
 * instruction so the `out` ends its translation block on the emulated backend (without it the
 * emulator may run past the stop or repeat the `out`; see notes/emulated-backend.md trap 3).
 * The "memory" clobber makes the compiler finish writing out_buf before the exit and re-read
 * in_buf after it, since the host reads and writes them while the vCPU is stopped. */
static inline void kiln_hypercall(uint16_t port, uint32_t value) {
  __asm__ volatile("outl %%eax, %%dx\n\tjmp 1f\n1:" : : "a"(value), "d"(port) : "memory");
}

/* Marks the library's definitions of libc names (see libc_hooks.c for why they are weak). */
#define KILN_LIBC __attribute__((weak))

static inline _Noreturn void kiln_halt_forever(void) {
  for (;;)
    __asm__ volatile("cli\n\thlt" : : : "memory");
}

/* Set once at entry from boot info; the I/O buffers never move. */
struct kiln_io {
  const struct kiln_boot_info* boot;
  uint8_t* in_buf;
  uint64_t in_size;
  uint8_t* out_buf;
  uint64_t out_size;
  bool emulated; /* KILN_FEATURE_EMULATED: prefer few, wide stores over `rep` string ops */
};
extern struct kiln_io kiln_io_;

/* Unaligned little-endian access. __builtin_memcpy with a constant size is expanded inline even
 * under -fno-builtin, so these are single moves. */
static inline uint32_t kiln_ld32(const uint8_t* p) {
  uint32_t v;
  __builtin_memcpy(&v, p, 4);
  return v;
}
static inline uint64_t kiln_ld64(const uint8_t* p) {
  uint64_t v;
  __builtin_memcpy(&v, p, 8);
  return v;
}
static inline void kiln_st32(uint8_t* p, uint32_t v) {
  __builtin_memcpy(p, &v, 4);
}
static inline void kiln_st64(uint8_t* p, uint64_t v) {
  __builtin_memcpy(p, &v, 8);
}

/* Bounded writer over a buffer: every put checks the remaining room; `ok` turns false on the
 * first overflow and stays false (callers check once at the end). */
struct kiln_writer {
  uint8_t* buf;
  uint64_t cap;
  uint64_t pos;
  bool ok;
};
void kiln_wire_put_value(struct kiln_writer* w, const struct kiln_value* v);
void kiln_wire_put_string(struct kiln_writer* w, const void* data, uint64_t len);
/* Bytes one value takes on the wire. */
uint64_t kiln_wire_value_size(const struct kiln_value* v);

/* Bounded reader over a guest-owned copy. Returns false on a truncated or invalid value
 * (unknown tag, BOOL not 0/1); STRING/BYTES point into the buffer being read. */
struct kiln_reader {
  const uint8_t* buf;
  uint64_t size;
  uint64_t pos;
};
bool kiln_wire_get_value(struct kiln_reader* r, struct kiln_value* out);

/* Write a message header at the start of `buf`. */
void kiln_wire_put_header(uint8_t* buf, uint16_t kind, uint16_t count, uint32_t status,
                          uint32_t size);

/* Small formatting for messages without pulling in a libc: appends to a NUL-terminated buffer
 * of capacity `cap`, truncating. */
void kiln_str_append(char* dst, size_t cap, const char* src);
void kiln_str_append_n(char* dst, size_t cap, const char* src, size_t n);
void kiln_str_append_u64(char* dst, size_t cap, uint64_t v);

/* Allocator and runtime hooks called from the entry path. */
/* hand_back: the allocator may return free pages with kiln_release (KILN_FEATURE_MEMORY_OPS). */
void kiln_heap_init(uint64_t start, uint64_t size, bool hand_back);
void kiln_idt_install(void);
_Noreturn void kiln_dispatch_loop(void);

/* The library's string functions (also exported under their libc names). */
void* memcpy(void* dst, const void* src, size_t n);
void* memmove(void* dst, const void* src, size_t n);
void* memset(void* dst, int c, size_t n);
int memcmp(const void* a, const void* b, size_t n);
size_t strlen(const char* s);
size_t strnlen(const char* s, size_t max);
void* malloc(size_t n);
void free(void* p);

#endif /* KILN_GUEST_INTERNAL_H */
