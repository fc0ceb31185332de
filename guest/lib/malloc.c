/* The guest allocator: TLSF over the boot-info heap, O(1) malloc/free, coalescing, 16-aligned. */
#include "internal.h"

/* Chunk layout (addresses 16-aligned, sizes multiples of 16, header included):
 *   +0   prev_size   size of the previous chunk; valid only while that chunk is free
 *   +8   head        size | F_INUSE | F_PREV_INUSE
 *   +16  payload     (free chunks keep their free-list links here)
 * Chunks tile [base, top). Above `top` nothing was carved yet: a free chunk next to `top` is
 * merged into it, so the heap is only touched as far as it has been used (the region can be
 * large, and under the emulator every store is slow). Memory above `high_water` has never been
 * written and is still the zero the host gave us, which lets calloc skip clearing it. */
#define HDR 16u
#define MIN_CHUNK 32u
#define F_INUSE 1u
#define F_PREV_INUSE 2u
#define SIZE_MASK (~(uint64_t)15)

/* Size classes: sizes below 256 in exact 16-byte steps (first level 0); above, each power of two
 * split into 16 linear second-level classes. */
#define SL_LOG 4u
#define SL_COUNT (1u << SL_LOG)
#define SMALL_LIMIT 256u
#define FL_COUNT 48u
#define MAX_REQUEST ((uint64_t)1 << 52)

struct chunk {
  uint64_t prev_size;
  uint64_t head;
  struct chunk* next_free;
  struct chunk* prev_free;
};

static struct {
  uint8_t* base;
  uint8_t* top;
  uint8_t* end;
  uint8_t* high_water;
  uint64_t region_size;
  uint64_t in_use;
  uint64_t free_blocks;
  uint64_t fl_map;
  uint32_t sl_map[FL_COUNT];
  struct chunk* lists[FL_COUNT][SL_COUNT];
} heap;

static inline uint64_t csize(const struct chunk* c) {
  return c->head & SIZE_MASK;
}
static inline struct chunk* at(uint8_t* p) {
  return (struct chunk*)(void*)p;
}
static inline struct chunk* next_chunk(struct chunk* c) {
  return at((uint8_t*)c + csize(c));
}
static inline unsigned msb(uint64_t v) {
  return 63u - (unsigned)__builtin_clzll(v);
}

static _Noreturn void heap_corrupt(const char* what) {
  kiln_abort(KILN_ABORT_HEAP, what);
}

static void mapping(uint64_t size, unsigned* fl, unsigned* sl) {
  if (size < SMALL_LIMIT) {
    *fl = 0;
    *sl = (unsigned)(size >> 4);
    return;
  }
  unsigned m = msb(size);
  *fl = m - 7u; /* 256 -> 1 */
  *sl = (unsigned)(size >> (m - SL_LOG)) & (SL_COUNT - 1);
}

static void list_insert(struct chunk* c) {
  unsigned fl, sl;
  mapping(csize(c), &fl, &sl);
  struct chunk* head = heap.lists[fl][sl];
  c->next_free = head;
  c->prev_free = 0;
  if (head) head->prev_free = c;
  heap.lists[fl][sl] = c;
  heap.fl_map |= 1ull << fl;
  heap.sl_map[fl] |= 1u << sl;
  ++heap.free_blocks;
}

static void list_remove(struct chunk* c) {
  unsigned fl, sl;
  mapping(csize(c), &fl, &sl);
  if (c->next_free) c->next_free->prev_free = c->prev_free;
  if (c->prev_free)
    c->prev_free->next_free = c->next_free;
  else
    heap.lists[fl][sl] = c->next_free;
  if (!heap.lists[fl][sl]) {
    heap.sl_map[fl] &= ~(1u << sl);
    if (!heap.sl_map[fl]) heap.fl_map &= ~(1ull << fl);
  }
  --heap.free_blocks;
}

/* A free chunk of at least `size` bytes, or NULL. The request is rounded up to the next class
 * boundary so that any chunk in the class found is big enough (TLSF's good-fit). */
static struct chunk* find_free(uint64_t size) {
  if (size >= SMALL_LIMIT) size += (1ull << (msb(size) - SL_LOG)) - 1;
  unsigned fl, sl;
  mapping(size, &fl, &sl);
  if (fl >= FL_COUNT) return 0;
  uint32_t sl_bits = heap.sl_map[fl] & (~0u << sl);
  if (!sl_bits) {
    uint64_t fl_bits = fl + 1 < FL_COUNT ? heap.fl_map & (~0ull << (fl + 1)) : 0;
    if (!fl_bits) return 0;
    fl = (unsigned)__builtin_ctzll(fl_bits);
    sl_bits = heap.sl_map[fl];
  }
  return heap.lists[fl][(unsigned)__builtin_ctz(sl_bits)];
}

/* Mark [c, c + size) free, merge it with free neighbours or `top`, and list it. `c` must have
 * a correct F_PREV_INUSE bit. */
static void release(struct chunk* c, uint64_t size) {
  /* Cleared first: if c merges into its predecessor its header is never rewritten, and a second
   * free() of it must still fail the F_INUSE check. */
  c->head &= ~(uint64_t)F_INUSE;
  if (!(c->head & F_PREV_INUSE)) {
    struct chunk* prev = at((uint8_t*)c - c->prev_size);
    if ((uint8_t*)prev < heap.base || csize(prev) != c->prev_size || (prev->head & F_INUSE))
      heap_corrupt("heap corrupted: bad previous chunk");
    list_remove(prev);
    size += c->prev_size;
    c = prev;
  }
  uint8_t* next = (uint8_t*)c + size;
  if (next == heap.top) {
    heap.top = (uint8_t*)c; /* c's own F_PREV_INUSE is set: no two free chunks touch */
    return;
  }
  struct chunk* n = at(next);
  if (!(n->head & F_INUSE)) {
    list_remove(n);
    size += csize(n);
  }
  c->head = size | F_PREV_INUSE;
  struct chunk* after = at((uint8_t*)c + size);
  after->prev_size = size;
  after->head &= ~(uint64_t)F_PREV_INUSE;
  list_insert(c);
}

/* Shrink the in-use chunk c to `size` bytes, releasing the tail when it is big enough. */
static void trim(struct chunk* c, uint64_t size) {
  uint64_t have = csize(c);
  if (have - size < MIN_CHUNK) return;
  c->head = size | (c->head & F_PREV_INUSE) | F_INUSE;
  struct chunk* rest = at((uint8_t*)c + size);
  rest->head = (have - size) | F_PREV_INUSE;
  heap.in_use -= have - size;
  release(rest, have - size);
}

static struct chunk* checked_chunk(void* p, const char* what) {
  uint8_t* raw = (uint8_t*)p - HDR;
  struct chunk* c = at(raw);
  if (raw < heap.base || raw >= heap.top || ((uintptr_t)raw & 15) || !(c->head & F_INUSE) ||
      csize(c) < MIN_CHUNK || csize(c) > (uint64_t)(heap.top - raw))
    heap_corrupt(what);
  return c;
}

static uint64_t request_size(size_t n) {
  return n < MIN_CHUNK - HDR ? MIN_CHUNK : (n + HDR + 15) & SIZE_MASK;
}

void kiln_heap_init(uint64_t start, uint64_t size) {
  uint64_t base = (start + 15) & SIZE_MASK;
  uint64_t end = (start + size) & SIZE_MASK;
  if (size == 0 || end <= base) end = base;
  if (end - base > MAX_REQUEST) end = base + MAX_REQUEST;
  heap.base = heap.top = heap.high_water = (uint8_t*)(uintptr_t)base;
  heap.end = (uint8_t*)(uintptr_t)end;
  heap.region_size = size;
}

KILN_LIBC void* malloc(size_t n) {
  if (n > MAX_REQUEST) return 0;
  uint64_t size = request_size(n);
  struct chunk* c = find_free(size);
  if (c) {
    list_remove(c);
    c->head |= F_INUSE;
    next_chunk(c)->head |= F_PREV_INUSE;
    heap.in_use += csize(c);
    trim(c, size);
    return (uint8_t*)c + HDR;
  }
  if ((uint64_t)(heap.end - heap.top) < size) return 0;
  c = at(heap.top);
  heap.top += size;
  if (heap.top > heap.high_water) heap.high_water = heap.top;
  c->head = size | F_INUSE | F_PREV_INUSE; /* whatever precedes `top` is in use */
  heap.in_use += size;
  return (uint8_t*)c + HDR;
}

KILN_LIBC void free(void* p) {
  if (!p) return;
  struct chunk* c = checked_chunk(p, "free(): invalid pointer or double free");
  uint64_t size = csize(c);
  heap.in_use -= size;
  release(c, size);
}

KILN_LIBC void* calloc(size_t count, size_t each) {
  size_t n;
  if (__builtin_mul_overflow(count, each, &n)) return 0;
  uint8_t* clean = heap.high_water;
  uint8_t* p = malloc(n);
  /* Only the part below the old high-water mark can hold old data. */
  if (p && p < clean) memset(p, 0, (uint64_t)(clean - p) < n ? (size_t)(clean - p) : n);
  return p;
}

KILN_LIBC void* realloc(void* p, size_t n) {
  if (!p) return malloc(n);
  if (n > MAX_REQUEST) return 0;
  struct chunk* c = checked_chunk(p, "realloc(): invalid pointer");
  uint64_t want = request_size(n), have = csize(c);
  if (want <= have) {
    trim(c, want);
    return p;
  }
  uint8_t* next = (uint8_t*)c + have;
  if (next == heap.top && (uint64_t)(heap.end - (uint8_t*)c) >= want) {
    heap.top = (uint8_t*)c + want;
    if (heap.top > heap.high_water) heap.high_water = heap.top;
    c->head = want | (c->head & F_PREV_INUSE) | F_INUSE;
    heap.in_use += want - have;
    return p;
  }
  if (next != heap.top && !(at(next)->head & F_INUSE) && have + csize(at(next)) >= want) {
    uint64_t total = have + csize(at(next));
    list_remove(at(next));
    c->head = total | (c->head & F_PREV_INUSE) | F_INUSE;
    next_chunk(c)->head |= F_PREV_INUSE;
    heap.in_use += total - have;
    trim(c, want);
    return p;
  }
  void* q = malloc(n);
  if (!q) return 0;
  memcpy(q, p, have - HDR);
  free(p);
  return q;
}

KILN_LIBC void* aligned_alloc(size_t align, size_t n) {
  if (align == 0 || (align & (align - 1))) return 0;
  if (align <= HDR) return malloc(n);
  if (align > MAX_REQUEST || n > MAX_REQUEST) return 0;
  uint8_t* p = malloc(n + align + MIN_CHUNK);
  if (!p) return 0;
  uint8_t* a = (uint8_t*)(((uintptr_t)p + align - 1) & ~(uintptr_t)(align - 1));
  if (a != p && (uint64_t)(a - p) < MIN_CHUNK) a += align; /* the lead must be a whole chunk */
  if (a != p) {
    struct chunk* c = at(p - HDR);
    uint64_t lead = (uint64_t)(a - p), size = csize(c);
    struct chunk* ac = at(a - HDR);
    ac->head = (size - lead) | F_INUSE | F_PREV_INUSE;
    c->head = lead | (c->head & F_PREV_INUSE) | F_INUSE;
    heap.in_use -= lead;
    release(c, lead);
  }
  trim(at(a - HDR), request_size(n));
  return a;
}

KILN_LIBC void* memalign(size_t align, size_t n) {
  return aligned_alloc(align, n);
}

KILN_LIBC int posix_memalign(void** out, size_t align, size_t n) {
  if (align < sizeof(void*) || (align & (align - 1))) return 22; /* EINVAL */
  void* p = aligned_alloc(align, n);
  if (!p) return 12; /* ENOMEM */
  *out = p;
  return 0;
}

KILN_LIBC size_t malloc_usable_size(void* p) {
  return p ? csize(checked_chunk(p, "malloc_usable_size(): invalid pointer")) - HDR : 0;
}

/* musl's internal names (locale, atexit and others call these directly); aliasing them keeps
 * musl's own malloc out of the image. */
void* __libc_malloc(size_t n) __attribute__((weak, alias("malloc")));
void* __libc_malloc_impl(size_t n) __attribute__((weak, alias("malloc")));
void __libc_free(void* p) __attribute__((weak, alias("free")));
void* __libc_calloc(size_t count, size_t each) __attribute__((weak, alias("calloc")));
void* __libc_realloc(void* p, size_t n) __attribute__((weak, alias("realloc")));

void kiln_heap_stats(struct kiln_heap_stats* out) {
  out->heap_size = heap.region_size;
  out->in_use = heap.in_use;
  out->high_water = (uint64_t)(heap.high_water - heap.base);
  out->free_blocks = heap.free_blocks;
}
