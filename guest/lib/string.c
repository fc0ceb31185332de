/* mem* and str* functions for the guest library, guest programs and compiler-emitted calls. */

/* GCC emits memcpy/memset for struct copies even under -fno-builtin. This file is built with
 * -fno-tree-loop-distribute-patterns so GCC cannot turn these loops into calls to themselves. */
#include "internal.h"

/* Copies move 8 bytes per load/store: under the emulator every store instruction costs ~43 ns
 * whatever its width (notes/emulated-backend.md, trap 7), and `rep movsb` runs one store per
 * byte there. On hardware `rep movsb` is the fastest large copy (ERMS), so use it there. */
#define KILN_REP_THRESHOLD 512u

KILN_LIBC void* memcpy(void* restrict dst, const void* restrict src, size_t n) {
  uint8_t* d = dst;
  const uint8_t* s = src;
  if (n >= KILN_REP_THRESHOLD && !kiln_io_.emulated) {
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
    return dst;
  }
  for (; n >= 8; n -= 8, d += 8, s += 8)
    kiln_st64(d, kiln_ld64(s));
  for (; n; --n)
    *d++ = *s++;
  return dst;
}

KILN_LIBC void* memmove(void* dst, const void* src, size_t n) {
  uint8_t* d = dst;
  const uint8_t* s = src;
  if (d == s || n == 0) return dst;
  /* Forward is safe unless dst starts inside [src, src + n). */
  if ((uintptr_t)d - (uintptr_t)s >= n) return memcpy(dst, src, n);
  d += n;
  s += n;
  for (; n >= 8; n -= 8) {
    d -= 8;
    s -= 8;
    kiln_st64(d, kiln_ld64(s));
  }
  while (n--)
    *--d = *--s;
  return dst;
}

KILN_LIBC void* memset(void* dst, int c, size_t n) {
  uint8_t* d = dst;
  if (n >= KILN_REP_THRESHOLD && !kiln_io_.emulated) {
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dst;
  }
  uint64_t pattern = 0x0101010101010101ull * (uint8_t)c;
  for (; n >= 8; n -= 8, d += 8)
    kiln_st64(d, pattern);
  for (; n; --n)
    *d++ = (uint8_t)c;
  return dst;
}

KILN_LIBC int memcmp(const void* a, const void* b, size_t n) {
  const uint8_t* x = a;
  const uint8_t* y = b;
  for (; n >= 8 && kiln_ld64(x) == kiln_ld64(y); n -= 8, x += 8, y += 8) {
  }
  for (; n; --n, ++x, ++y)
    if (*x != *y) return *x < *y ? -1 : 1;
  return 0;
}

KILN_LIBC void* memchr(const void* p, int c, size_t n) {
  const uint8_t* s = p;
  for (; n; --n, ++s)
    if (*s == (uint8_t)c) return (void*)s;
  return 0;
}

KILN_LIBC size_t strlen(const char* s) {
  const char* p = s;
  while (*p)
    ++p;
  return (size_t)(p - s);
}

KILN_LIBC size_t strnlen(const char* s, size_t max) {
  size_t n = 0;
  while (n < max && s[n])
    ++n;
  return n;
}

KILN_LIBC int strcmp(const char* a, const char* b) {
  while (*a && *a == *b)
    ++a, ++b;
  return (int)(uint8_t)*a - (int)(uint8_t)*b;
}

KILN_LIBC int strncmp(const char* a, const char* b, size_t n) {
  for (; n; --n, ++a, ++b) {
    if (*a != *b || !*a) return (int)(uint8_t)*a - (int)(uint8_t)*b;
  }
  return 0;
}

KILN_LIBC char* strchr(const char* s, int c) {
  for (;; ++s) {
    if (*s == (char)c) return (char*)s;
    if (!*s) return 0;
  }
}
