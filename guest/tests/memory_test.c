/* Test guest for the memory contract: protect/release requests, heap hand-back, host files. */
#include <kiln_guest.h>

void* malloc(size_t n);
void* calloc(size_t count, size_t each);
void* realloc(void* p, size_t n);
void* aligned_alloc(size_t align, size_t n);
void* memalign(size_t align, size_t n);
int posix_memalign(void** out, size_t align, size_t n);
size_t malloc_usable_size(void* p);
void free(void* p);

#define PAGE 4096u

#define FN(name)                                                                                   \
  static enum kiln_status name(const struct kiln_value* a, uint32_t n, struct kiln_value* r)
#define UNUSED (void)a, (void)n, (void)r

static enum kiln_status fail(const char* msg) {
  kiln_set_error(msg);
  return KILN_STATUS_FAILED;
}

static void* ptr(uint64_t addr) {
  return (void*)(uintptr_t)addr;
}

/* ---- raw page access: the first (up to) 8 bytes of every page a range overlaps ----
 * Volatile byte-wise for a partial word so a store never spills past the range; these run
 * against memory the host may have protected, released or mapped read-only, on purpose. */
static void store_word(uint8_t* p, uint64_t len, uint64_t v) {
  if (len >= 8) {
    *(volatile uint64_t*)(void*)p = v; /* x86 allows unaligned access */
    return;
  }
  for (uint64_t i = 0; i < len; ++i)
    ((volatile uint8_t*)p)[i] = (uint8_t)(v >> (8 * i));
}
static uint64_t load_word(const uint8_t* p, uint64_t len) {
  if (len >= 8) return *(const volatile uint64_t*)(const void*)p;
  uint64_t v = 0;
  for (uint64_t i = 0; i < len; ++i)
    v |= (uint64_t)((const volatile uint8_t*)p)[i] << (8 * i);
  return v;
}

/* Calls fn-like code for every page of [addr, addr + size): `pos` is where the page's part of
 * the range starts, `len` how many of its bytes (at most 8) belong to the range. */
#define FOR_EACH_PAGE(addr, size, pos, len)                                                        \
  for (uint64_t pg_ = (addr) & ~(uint64_t)(PAGE - 1), end_ = (addr) + (size), pos, len;            \
       (size) && pg_ < end_ &&                                                                     \
       (pos = pg_ < (addr) ? (addr) : pg_, len = end_ - pos < 8 ? end_ - pos : 8, 1);              \
       pg_ += PAGE)

static void fill_pages(uint64_t addr, uint64_t size, uint64_t value) {
  FOR_EACH_PAGE(addr, size, pos, len) {
    store_word(ptr(pos), len, value);
  }
}

/* ---- boot info ---- */
FN(heap_start) {
  UNUSED;
  r->u64 = kiln_boot_info()->heap_start;
  return KILN_STATUS_OK;
}
FN(heap_size) {
  UNUSED;
  r->u64 = kiln_boot_info()->heap_size;
  return KILN_STATUS_OK;
}
FN(stack_bottom) {
  UNUSED;
  r->u64 = kiln_boot_info()->stack_bottom;
  return KILN_STATUS_OK;
}
FN(stack_top) {
  UNUSED;
  r->u64 = kiln_boot_info()->stack_top;
  return KILN_STATUS_OK;
}

/* ---- memory requests ---- */
FN(protect) {
  (void)n;
  r->i32 = kiln_protect(ptr(a[0].u64), (size_t)a[1].u64, (unsigned)a[2].i32);
  return KILN_STATUS_OK;
}

/* One request per page, to reach the host's cap on distinct protection ranges. */
FN(protect_pages) {
  (void)n;
  uint64_t addr = a[0].u64, end = a[0].u64 + a[1].u64;
  r->i32 = 0;
  for (uint64_t p = addr; p < end && p >= addr; p += PAGE) {
    int st = kiln_protect(ptr(p), PAGE, (unsigned)a[2].i32);
    if (st != KILN_MEMORY_OK) {
      r->i32 = st;
      break;
    }
  }
  return KILN_STATUS_OK;
}

FN(release) {
  (void)n;
  r->i32 = kiln_release(ptr(a[0].u64), (size_t)a[1].u64);
  return KILN_STATUS_OK;
}

FN(poke) {
  UNUSED;
  *(volatile uint8_t*)ptr(a[0].u64) = (uint8_t)a[1].i32;
  return KILN_STATUS_OK;
}

FN(peek) {
  (void)n;
  r->i32 = *(const volatile uint8_t*)ptr(a[0].u64);
  return KILN_STATUS_OK;
}

FN(touch) {
  UNUSED;
  fill_pages(a[0].u64, a[1].u64, (uint64_t)a[2].i64);
  return KILN_STATUS_OK;
}

FN(sum_pages) {
  (void)n;
  uint64_t sum = 0;
  FOR_EACH_PAGE(a[0].u64, a[1].u64, pos, len) {
    sum += load_word(ptr(pos), len);
  }
  r->u64 = sum;
  return KILN_STATUS_OK;
}

/* One word from each of `count` distinct pages of [base, base + span), visited in a scattered
 * order: page (seed + i * P) mod pages for a prime P far above any page count here, so P is
 * coprime with it and the pages are distinct (REAP's working sets are scattered, which is what
 * makes demand paging slow). Fails when count exceeds the pages or P divides them. */
FN(sum_scattered) {
  (void)n;
  const uint64_t prime = 2654435761u;
  uint64_t base = a[0].u64, pages = a[1].u64 / PAGE, count = a[2].u64;
  if (pages == 0 || count > pages || pages % prime == 0) return fail("sum_scattered: bad span");
  uint64_t step = prime % pages, idx = a[3].u64 % pages, sum = 0;
  for (uint64_t i = 0; i < count; ++i) {
    sum += load_word(ptr(base + idx * PAGE), 8);
    idx += step;
    if (idx >= pages) idx -= pages;
  }
  r->u64 = sum;
  return KILN_STATUS_OK;
}

/* Every page of `clusters` runs of `cluster_pages` pages spread evenly over [base, base + span),
 * the runs visited in a scattered order (run (seed + i * P) mod clusters): a clustered working
 * set (heap arenas, tables), which a prefetch can read as a few large requests. */
FN(sum_clusters) {
  (void)n;
  const uint64_t prime = 2654435761u;
  uint64_t base = a[0].u64, pages = a[1].u64 / PAGE, clusters = a[2].u64, run = a[3].u64;
  if (clusters == 0 || run == 0 || clusters * run > pages || clusters % prime == 0)
    return fail("sum_clusters: bad shape");
  uint64_t stride = pages / clusters, step = prime % clusters, c = a[4].u64 % clusters, sum = 0;
  for (uint64_t i = 0; i < clusters; ++i) {
    for (uint64_t p = 0; p < run; ++p)
      sum += load_word(ptr(base + (c * stride + p) * PAGE), 8);
    c += step;
    if (c >= clusters) c -= clusters;
  }
  r->u64 = sum;
  return KILN_STATUS_OK;
}

/* ---- the allocator ---- */
static void heap_stats_now(struct kiln_heap_stats* s) {
  kiln_heap_stats(s);
}

FN(alloc) {
  (void)n;
  uint64_t size = a[0].u64;
  uint8_t* p = malloc((size_t)size);
  if (p) fill_pages((uint64_t)(uintptr_t)p, size, (uint64_t)(uintptr_t)p | 1);
  r->u64 = (uint64_t)(uintptr_t)p;
  return KILN_STATUS_OK;
}

FN(dealloc) {
  UNUSED;
  free(ptr(a[0].u64));
  return KILN_STATUS_OK;
}

FN(alloc_free) {
  (void)n;
  uint64_t size = a[0].u64;
  for (int32_t i = 0; i < a[1].i32; ++i) {
    uint8_t* p = malloc((size_t)size);
    if (!p) return fail("alloc_free: malloc failed");
    fill_pages((uint64_t)(uintptr_t)p, size, (uint64_t)i + 1);
    free(p);
  }
  struct kiln_heap_stats s;
  heap_stats_now(&s);
  r->u64 = s.released_bytes;
  return KILN_STATUS_OK;
}

/* Protects `pages` pages of spare heap read-only in one request, then asks for the same again
 * page by page (requests that change nothing); returns the first non-OK status or 0. For
 * `kiln run memory_test.elf protect_twice 64 --stats`. */
FN(protect_twice) {
  (void)n;
  const struct kiln_boot_info* bi = kiln_boot_info();
  uint64_t pages = a[0].i32 > 0 ? (uint64_t)a[0].i32 : 0;
  uint64_t base = (bi->heap_start + bi->heap_size / 2) & ~(uint64_t)(PAGE - 1);
  int st = kiln_protect((void*)(uintptr_t)base, pages * PAGE, KILN_PROT_READ);
  for (uint64_t i = 0; i < pages && st == KILN_MEMORY_OK; ++i)
    st = kiln_protect((void*)(uintptr_t)(base + i * PAGE), PAGE, KILN_PROT_READ);
  r->i32 = st;
  return KILN_STATUS_OK;
}

/* State that lives in guest memory (.data), for snapshot tests. */
static int64_t counter = 0;
FN(bump) {
  UNUSED;
  r->i64 = ++counter;
  return KILN_STATUS_OK;
}

/* FNV-1a over the 8-byte words of [addr, addr+size) (loads are cheap under the emulator). */
FN(hash_range) {
  (void)n;
  const uint64_t* p = (const uint64_t*)(uintptr_t)a[0].u64;
  uint64_t h = 1469598103934665603ull;
  for (uint64_t i = 0; i < a[1].u64 / 8; ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  r->u64 = h;
  return KILN_STATUS_OK;
}

/* Bytes of out_buf that are not zero (the host stores the I/O buffers zeroed in snapshots). */
FN(out_buf_nonzero) {
  UNUSED;
  const struct kiln_boot_info* bi = kiln_boot_info();
  const uint8_t* p = (const uint8_t*)(uintptr_t)bi->out_buf;
  uint64_t count = 0;
  for (uint64_t i = 0; i < bi->out_buf_size; ++i)
    count += p[i] != 0;
  r->u64 = count;
  return KILN_STATUS_OK;
}

FN(set_hand_back) {
  (void)n;
  r->b = kiln_heap_set_hand_back(a[0].b);
  return KILN_STATUS_OK;
}

/* Copies mapped file `name` into a fresh heap block, one 8-byte store per word (the private
 * copy a guest would need without mapped files); returns the block's address, 0 on failure. */
FN(copy_file) {
  (void)n;
  struct kiln_file f;
  if (!kiln_file_find_n(a[0].buf.data, a[0].buf.len, &f)) return fail("copy_file: no such file");
  uint64_t* dst = malloc((size_t)f.size + 8);
  if (!dst) return fail("copy_file: heap exhausted");
  const uint8_t* src = f.data;
  for (uint64_t i = 0; i < f.size / 8; ++i) {
    uint64_t w;
    __builtin_memcpy(&w, src + i * 8, 8);
    dst[i] = w;
  }
  r->u64 = (uint64_t)(uintptr_t)dst;
  return KILN_STATUS_OK;
}

static char* append(char* out, const char* s) {
  while (*s)
    *out++ = *s++;
  return out;
}
static char* append_u64(char* out, uint64_t v) {
  char digits[20];
  int k = 0;
  do {
    digits[k++] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  while (k)
    *out++ = digits[--k];
  return out;
}

FN(heap_stats) {
  UNUSED;
  struct kiln_heap_stats s;
  heap_stats_now(&s);
  char* buf = kiln_call_alloc(256);
  if (!buf) return fail("heap_stats: heap exhausted");
  char* o = buf;
  o = append_u64(append(o, "in_use="), s.in_use);
  o = append_u64(append(o, " high_water="), s.high_water);
  o = append_u64(append(o, " free_blocks="), s.free_blocks);
  o = append_u64(append(o, " released_bytes="), s.released_bytes);
  o = append_u64(append(o, " release_calls="), s.release_calls);
  r->buf.data = buf;
  r->buf.len = (uint32_t)(o - buf);
  return KILN_STATUS_OK;
}

FN(heap_released) {
  UNUSED;
  struct kiln_heap_stats s;
  heap_stats_now(&s);
  r->u64 = s.released_bytes;
  return KILN_STATUS_OK;
}

FN(heap_release_calls) {
  UNUSED;
  struct kiln_heap_stats s;
  heap_stats_now(&s);
  r->u64 = s.release_calls;
  return KILN_STATUS_OK;
}

/* Blocks are chained through their first word (one store per block, which also touches it). */
FN(exhaust) {
  (void)n;
  uint64_t chunk = a[0].u64, total = 0;
  void* head = 0;
  for (;;) {
    void** p = malloc((size_t)chunk);
    if (!p) break;
    *p = head;
    head = p;
    total += chunk;
  }
  while (head) {
    void* next = *(void**)head;
    free(head);
    head = next;
  }
  r->u64 = total;
  return KILN_STATUS_OK;
}

/* ---- allocator checks ---- */
/* A byte pattern over the first and last 64 bytes and the first word of every page: enough to
 * see a block moved or overlapped, without a store per byte (slow under the emulator). Each
 * byte's value depends only on its offset, so overlapping spots agree. */
static uint64_t pattern_word(uint64_t seed, uint64_t off) {
  uint64_t w = 0;
  for (unsigned i = 0; i < 8; ++i) {
    uint64_t b = off + i;
    w |= (uint64_t)(uint8_t)(seed * 131 + b * 7 + (b >> 12) * 13 + 1) << (8 * i);
  }
  return w;
}

enum spot_mode { SPOT_FILL, SPOT_CHECK, SPOT_ZERO };

/* Visits the spots of a block of `size` (>= 8) bytes that end at or before `limit` (a block
 * realloc'd smaller keeps only those); false when a check fails. */
static bool spots_upto(uint8_t* p, uint64_t size, uint64_t limit, uint64_t seed,
                       enum spot_mode mode) {
  for (unsigned pass = 0; pass < 4; ++pass) {
    uint64_t first = pass == 0 ? 0 : pass == 1 ? (size > 64 ? size - 64 : 0) : PAGE;
    uint64_t stride = pass == 2 ? PAGE : 8;
    uint64_t stop = pass == 2 ? size : first + 64;
    if (pass == 3) { /* the last bytes, as one word ending at the block's end */
      if (size % 8 == 0) break;
      first = size - 8;
      stop = size;
    }
    for (uint64_t off = first; off + 8 <= size && off + 8 <= limit && off < stop; off += stride) {
      uint64_t want = mode == SPOT_ZERO ? 0 : pattern_word(seed, off);
      if (mode == SPOT_FILL)
        store_word(p + off, 8, want);
      else if (load_word(p + off, 8) != want)
        return false;
    }
  }
  return true;
}
static bool spots(uint8_t* p, uint64_t size, uint64_t seed, enum spot_mode mode) {
  return spots_upto(p, size, size, seed, mode);
}

static const uint64_t check_sizes[] = {16, 100, 4096, 65536, 300000, 1u << 20, 4u << 20};
#define NSIZES (sizeof check_sizes / sizeof check_sizes[0])

static bool same_address_after_free(uint64_t size) {
  void* p = malloc((size_t)size);
  if (!p) return false;
  free(p);
  void* q = malloc((size_t)size);
  free(q);
  return p == q;
}

FN(realloc_check) {
  UNUSED;
  bool ok = true;
  for (unsigned i = 0; i < NSIZES && ok; ++i) {
    for (unsigned j = 0; j < NSIZES && ok; ++j) {
      uint64_t from = check_sizes[i], to = check_sizes[j], seed = i * 16 + j;
      uint8_t* p = malloc((size_t)from);
      if (!p) return fail("realloc_check: malloc failed");
      spots(p, from, seed, SPOT_FILL);
      uint8_t* q = realloc(p, (size_t)to);
      if (!q) return fail("realloc_check: realloc failed");
      ok = ((uintptr_t)q & 15) == 0 && malloc_usable_size(q) >= to &&
           spots_upto(q, from, to, seed, SPOT_CHECK);
      free(q);
    }
    ok = ok && same_address_after_free(check_sizes[i]);
  }
  /* Growing in place into a freed neighbour (which the allocator may have handed back to the
   * host), then calloc over what is left of it. */
  uint8_t* small = malloc(100);
  uint8_t* big = malloc(1u << 20);
  uint8_t* guard = malloc(16);
  if (!small || !big || !guard) return fail("realloc_check: malloc failed");
  bool adjacent = big == small + malloc_usable_size(small) + 16; /* + big's header */
  spots(small, 100, 7, SPOT_FILL);
  fill_pages((uint64_t)(uintptr_t)big, 1u << 20, 0xFFFF);
  free(big);
  uint8_t* grown = realloc(small, 300000);
  ok = ok && grown && (!adjacent || grown == small) && spots(grown, 100, 7, SPOT_CHECK);
  uint8_t* z = calloc(1, 600000);
  ok = ok && z && spots(z, 600000, 0, SPOT_ZERO);
  free(z);
  free(grown ? grown : small);
  free(guard);
  r->b = ok;
  return KILN_STATUS_OK;
}

/* aligned_alloc, posix_memalign, memalign in turn; 0 when k is out of range or on failure. */
static void* aligned_by(unsigned k, uint64_t align, uint64_t size) {
  void* p = 0;
  if (k == 0) return aligned_alloc((size_t)align, (size_t)size);
  if (k == 1) return posix_memalign(&p, (size_t)align, (size_t)size) == 0 ? p : 0;
  return memalign((size_t)align, (size_t)size);
}

FN(aligned_check) {
  UNUSED;
  static const uint64_t sizes[] = {16, 1000, 65536, 4u << 20};
  bool ok = true;
  for (uint64_t align = 16; align <= (2u << 20) && ok; align <<= 1) {
    for (unsigned i = 0; i < sizeof sizes / sizeof sizes[0] && ok; ++i) {
      uint64_t size = sizes[i];
      /* Small blocks are held together (a later one must not overwrite an earlier one); large
       * ones one at a time, so the check fits a small heap. */
      bool hold = size < (1u << 20);
      void* held[3] = {0, 0, 0};
      for (unsigned k = 0; k < 3 && ok; ++k) {
        uint8_t* b = aligned_by(k, align, size);
        ok = b && ((uintptr_t)b & (align - 1)) == 0 && malloc_usable_size(b) >= size;
        if (!ok) break;
        spots(b, size, align + k, SPOT_FILL);
        if (hold) {
          held[k] = b;
        } else {
          ok = spots(b, size, align + k, SPOT_CHECK);
          free(b);
        }
      }
      for (unsigned k = 0; k < 3; ++k) {
        if (ok && held[k]) ok = spots(held[k], size, align + k, SPOT_CHECK);
      }
      for (unsigned k = 3; k-- > 0;)
        free(held[k]);
      /* Freed memory is reused: the same request gets the same block back. */
      void* x = aligned_alloc((size_t)align, (size_t)size);
      free(x);
      void* y = aligned_alloc((size_t)align, (size_t)size);
      free(y);
      ok = ok && x && x == y;
    }
  }
  void* p;
  if (posix_memalign(&p, 24, 16) != 22) ok = false; /* not a power of two: EINVAL */
  r->b = ok;
  return KILN_STATUS_OK;
}

/* ---- host files ---- */
static bool find_arg(const struct kiln_value* v, struct kiln_file* f) {
  return kiln_file_find_n(v->buf.data, v->buf.len, f);
}

FN(file_count) {
  UNUSED;
  r->i32 = (int32_t)kiln_file_count();
  return KILN_STATUS_OK;
}

FN(file_name) {
  (void)n;
  struct kiln_file f;
  if (a[0].i32 >= 0 && kiln_file_at((uint32_t)a[0].i32, &f)) {
    r->buf.data = f.name;
    r->buf.len = 0;
    while (f.name[r->buf.len])
      ++r->buf.len;
  } else {
    r->buf.data = "";
    r->buf.len = 0;
  }
  return KILN_STATUS_OK;
}

FN(file_size) {
  (void)n;
  struct kiln_file f;
  r->i64 = find_arg(&a[0], &f) ? (int64_t)f.size : -1;
  return KILN_STATUS_OK;
}

/* Sum of a word's eight bytes: pairs into 16-bit lanes, then the lanes by one multiply. */
static uint64_t byte_sum(uint64_t w) {
  const uint64_t m = 0x00FF00FF00FF00FFull;
  uint64_t lanes = (w & m) + ((w >> 8) & m);
  return (lanes * 0x0001000100010001ull) >> 48;
}

FN(file_sum) {
  (void)n;
  struct kiln_file f;
  if (!find_arg(&a[0], &f)) return fail("file_sum: no such file");
  const uint8_t* p = f.data;
  uint64_t size = f.size, sum = 0, i = 0;
  for (; i < size && ((uintptr_t)(p + i) & 7); ++i)
    sum += p[i];
  for (; i + 8 <= size; i += 8)
    sum += byte_sum(*(const uint64_t*)(const void*)(p + i));
  for (; i < size; ++i)
    sum += p[i];
  r->u64 = sum;
  return KILN_STATUS_OK;
}

FN(file_byte) {
  (void)n;
  struct kiln_file f;
  if (!find_arg(&a[0], &f) || a[1].u64 >= f.size)
    r->i32 = -1;
  else
    r->i32 = ((const volatile uint8_t*)f.data)[a[1].u64];
  return KILN_STATUS_OK;
}

FN(file_touch_pages) {
  (void)n;
  struct kiln_file f;
  if (!find_arg(&a[0], &f)) return fail("file_touch_pages: no such file");
  uint64_t pages = 0;
  FOR_EACH_PAGE((uint64_t)(uintptr_t)f.data, f.size, pos, len) {
    (void)len;
    (void)*(const volatile uint8_t*)ptr(pos);
    ++pages;
  }
  r->u64 = pages;
  return KILN_STATUS_OK;
}

/* Must fault: files are mapped read-only. */
FN(file_write) {
  UNUSED;
  struct kiln_file f;
  if (!find_arg(&a[0], &f)) return fail("file_write: no such file");
  if (f.size == 0) return fail("file_write: empty file");
  *(volatile uint8_t*)(uintptr_t)f.data = 0x5A;
  return KILN_STATUS_OK;
}

void kiln_guest_init(void) {
#define V KILN_TYPE_VOID
#define I32 KILN_TYPE_I32
#define I64 KILN_TYPE_I64
#define U64 KILN_TYPE_U64
#define BOOL KILN_TYPE_BOOL
#define STR KILN_TYPE_STRING
  static const struct {
    const char* name;
    kiln_guest_fn fn;
    enum kiln_type ret;
    uint32_t nparams;
    enum kiln_type params[5];
  } fns[] = {
      {"heap_start", heap_start, U64, 0, {V}},
      {"heap_size", heap_size, U64, 0, {V}},
      {"stack_bottom", stack_bottom, U64, 0, {V}},
      {"stack_top", stack_top, U64, 0, {V}},
      {"protect", protect, I32, 3, {U64, U64, I32}},
      {"protect_pages", protect_pages, I32, 3, {U64, U64, I32}},
      {"release", release, I32, 2, {U64, U64}},
      {"poke", poke, V, 2, {U64, I32}},
      {"peek", peek, I32, 1, {U64}},
      {"touch", touch, V, 3, {U64, U64, I64}},
      {"sum_pages", sum_pages, U64, 2, {U64, U64}},
      {"sum_scattered", sum_scattered, U64, 4, {U64, U64, U64, U64}},
      {"sum_clusters", sum_clusters, U64, 5, {U64, U64, U64, U64, U64}},
      {"alloc", alloc, U64, 1, {U64}},
      {"dealloc", dealloc, V, 1, {U64}},
      {"alloc_free", alloc_free, U64, 2, {U64, I32}},
      {"set_hand_back", set_hand_back, BOOL, 1, {BOOL}},
      {"bump", bump, I64, 0, {V}},
      {"hash_range", hash_range, U64, 2, {U64, U64}},
      {"out_buf_nonzero", out_buf_nonzero, U64, 0, {V}},
      {"protect_twice", protect_twice, I32, 1, {I32}},
      {"copy_file", copy_file, U64, 1, {STR}},
      {"heap_stats", heap_stats, STR, 0, {V}},
      {"heap_released", heap_released, U64, 0, {V}},
      {"heap_release_calls", heap_release_calls, U64, 0, {V}},
      {"exhaust", exhaust, U64, 1, {U64}},
      {"realloc_check", realloc_check, BOOL, 0, {V}},
      {"aligned_check", aligned_check, BOOL, 0, {V}},
      {"file_count", file_count, I32, 0, {V}},
      {"file_name", file_name, STR, 1, {I32}},
      {"file_size", file_size, I64, 1, {STR}},
      {"file_sum", file_sum, U64, 1, {STR}},
      {"file_byte", file_byte, I32, 2, {STR, U64}},
      {"file_touch_pages", file_touch_pages, U64, 1, {STR}},
      {"file_write", file_write, V, 1, {STR}},
  };
  for (unsigned i = 0; i < sizeof fns / sizeof fns[0]; ++i)
    if (kiln_register(fns[i].name, fns[i].fn, fns[i].ret, fns[i].params, fns[i].nparams) != 0)
      kiln_abort(1, fns[i].name);
}
