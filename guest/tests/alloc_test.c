/* Test guest for the guest allocator: a randomized run that checks blocks, plus heap statistics. */
#include <kiln_guest.h>

void* malloc(size_t n);
void* calloc(size_t count, size_t each);
void* realloc(void* p, size_t n);
void* aligned_alloc(size_t align, size_t n);
void free(void* p);

#define SLOTS 512

static uint64_t rng_state;
static uint64_t rnd(void) {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return rng_state;
}

/* Blocks are filled with a per-slot byte; only the first and last 64 bytes are checked, so the
 * run stays fast under the emulator while still catching overlapping blocks. */
static void fill(uint8_t* p, size_t n, uint8_t tag) {
  if (n <= 128) {
    __builtin_memset(p, tag, n);
  } else {
    __builtin_memset(p, tag, 64);
    __builtin_memset(p + n - 64, tag, 64);
  }
}
static int check(const uint8_t* p, size_t n, uint8_t tag) {
  for (size_t i = 0; i < n && i < 64; ++i)
    if (p[i] != tag) return 0;
  for (size_t i = n > 64 ? n - 64 : 0; i < n; ++i)
    if (p[i] != tag) return 0;
  return 1;
}

/* stress(seed, iterations) -> 0 on success, else the (1-based) iteration that found damage,
 * negated when the failure was a misaligned pointer or calloc memory that was not zero. */
static enum kiln_status stress(const struct kiln_value* a, uint32_t n, struct kiln_value* r) {
  (void)n;
  static uint8_t* ptr[SLOTS];
  static size_t size[SLOTS];
  static uint8_t tag[SLOTS];
  rng_state = (uint64_t)(uint32_t)a[0].i32 * 0x9E3779B97F4A7C15ull + 1;
  int32_t iterations = a[1].i32;
  r->i32 = 0;
  for (int32_t it = 1; it <= iterations && r->i32 == 0; ++it) {
    unsigned i = (unsigned)(rnd() % SLOTS);
    if (ptr[i] && !check(ptr[i], size[i], tag[i])) r->i32 = it;
    size_t want = rnd() % 8 == 0 ? rnd() % 100000 : rnd() % 300;
    switch (rnd() % 5) {
    case 0:
    case 1:
      free(ptr[i]);
      ptr[i] = 0;
      size[i] = 0;
      break;
    case 2:
      free(ptr[i]);
      ptr[i] = malloc(want);
      size[i] = ptr[i] ? want : 0;
      break;
    case 3: {
      uint8_t* q = realloc(ptr[i], want);
      if (!q) break;
      size_t keep = size[i] < want ? size[i] : want;
      /* Only the head is known to be filled whatever the old and new sizes were. */
      if (!check(q, keep < 64 ? keep : 64, tag[i])) r->i32 = it;
      ptr[i] = q;
      size[i] = want;
      break;
    }
    default: {
      free(ptr[i]);
      if (rnd() & 1) {
        ptr[i] = aligned_alloc((size_t)32 << (rnd() % 8), want);
        if (ptr[i] && ((uintptr_t)ptr[i] & 31)) r->i32 = -it;
      } else {
        ptr[i] = calloc(1, want);
        for (size_t k = 0; ptr[i] && k < want; k += 61)
          if (ptr[i][k]) r->i32 = -it;
      }
      size[i] = ptr[i] ? want : 0;
    }
    }
    if (ptr[i] && ((uintptr_t)ptr[i] & 15)) r->i32 = -it;
    tag[i] = (uint8_t)rnd();
    if (ptr[i]) fill(ptr[i], size[i], tag[i]);
  }
  for (unsigned i = 0; i < SLOTS; ++i) {
    free(ptr[i]);
    ptr[i] = 0;
    size[i] = 0;
  }
  return KILN_STATUS_OK;
}

/* Bytes in allocated blocks: 0 after stress() if nothing leaked. */
static enum kiln_status heap_in_use(const struct kiln_value* a, uint32_t n, struct kiln_value* r) {
  (void)a, (void)n;
  struct kiln_heap_stats s;
  kiln_heap_stats(&s);
  r->u64 = s.in_use;
  return KILN_STATUS_OK;
}

/* Bytes of the heap ever touched: stays far below the heap size for small workloads. */
static enum kiln_status heap_high_water(const struct kiln_value* a, uint32_t n,
                                        struct kiln_value* r) {
  (void)a, (void)n;
  struct kiln_heap_stats s;
  kiln_heap_stats(&s);
  r->u64 = s.high_water;
  return KILN_STATUS_OK;
}

void kiln_guest_init(void) {
  static const enum kiln_type two_i32[] = {KILN_TYPE_I32, KILN_TYPE_I32};
  if (kiln_register("stress", stress, KILN_TYPE_I32, two_i32, 2) != 0 ||
      kiln_register("heap_in_use", heap_in_use, KILN_TYPE_U64, 0, 0) != 0 ||
      kiln_register("heap_high_water", heap_high_water, KILN_TYPE_U64, 0, 0) != 0)
    kiln_abort(1, "alloc_test: cannot register");
}
