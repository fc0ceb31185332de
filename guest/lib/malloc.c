/* The guest allocator: TLSF over the boot-info heap, O(1) malloc/free, coalescing, 16-aligned;
 * large free ranges go back to the host. */
#include "internal.h"

/* Chunk layout (addresses 16-aligned, sizes multiples of 16, header included):
 *   +0   prev_size   size of the previous chunk; valid only while that chunk is free
 *   +8   head        size | F_INUSE | F_PREV_INUSE | F_CLEAN
 *   +16  payload     (free chunks keep their free-list links here, and with F_CLEAN the
 *                     clean range at +32)
 * Chunks tile [base, top). Above `top` nothing was carved yet: a free chunk next to `top` is
 * merged into it, so the heap is only touched as far as it has been used (the region can be
 * large, and under the emulator every store is slow). Memory above `high_water` reads as zero
 * (never written, or handed back), which lets calloc skip clearing it.
 *
 * Hand-back. A page is *clean* when it reads as zero and is not resident: never written since
 * boot, or handed back with kiln_release and not handed out since. The allocator never writes a
 * clean page itself (stores are slow under the emulator and would make it resident again) and
 * never hands a clean page back. It knows where clean pages are from two facts:
 *   - everything from page_up(high_water) up is clean;
 *   - a free chunk's interior, [page_up(c + META), page_down(c + size)), is never written by the
 *     allocator (a free chunk's metadata is its first META bytes; the next chunk's prev_size
 *     lies past its end). A free chunk with F_CLEAN has one clean page range
 *     [clean_lo, clean_hi) inside its interior, and no other clean pages the allocator could
 *     hand back; without F_CLEAN it has none. In-use chunks are handed out: their pages count as
 *     written. Splitting a free chunk gives each free piece the part of the range inside that
 *     piece's interior; coalescing joins ranges (see settle()).
 * Rules (only with hand-back enabled; else no page is handed back):
 *   - a free chunk that is not next to top, once coalesced, hands back its interior when at
 *     least KILN_RELEASE_MIN bytes of it are not clean yet, and is then clean all through;
 *   - a chunk joining two clean ranges hands back the pages between them (so one range per chunk
 *     is enough), however few;
 *   - when top comes down, [page_up(top), page_up(high_water)) is handed back, minus the clean
 *     pages of the chunks that merged into top, if it is at least KILN_RELEASE_MIN bytes or any
 *     clean range merged; high_water then drops to page_up(top).
 * A failed kiln_release is not an error: the pages stay resident and the allocator forgets
 * what it learnt during that step, which is always safe. */
#define HDR 16u
#define MIN_CHUNK 32u
#define META 48u /* bytes of a free chunk the allocator may write: header, links, clean range */
#define F_INUSE 1u
#define F_PREV_INUSE 2u
#define F_CLEAN 4u /* free chunk only: clean_lo/clean_hi are valid */
#define SIZE_MASK (~(uint64_t)15)
#define PAGE 4096u

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
  uint8_t* clean_lo; /* only with F_CLEAN, which implies a chunk far larger than META */
  uint8_t* clean_hi;
};

/* A page-aligned range of clean pages; empty when lo >= hi. */
struct range {
  uint8_t* lo;
  uint8_t* hi;
};

static struct {
  uint8_t* base;
  uint8_t* top;
  uint8_t* end;
  uint8_t* high_water;
  uint64_t region_size;
  uint64_t in_use;
  uint64_t free_blocks;
  uint64_t released_bytes;
  uint64_t release_calls;
  bool hand_back;     /* hand free ranges back now (can_hand_back, and not switched off) */
  bool can_hand_back; /* the host serves KILN_MEMORY_RELEASE and the region ends on a page */
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

static inline uint8_t* page_up(uint8_t* p) {
  return (uint8_t*)(((uintptr_t)p + PAGE - 1) & ~(uintptr_t)(PAGE - 1));
}
static inline uint8_t* page_down(uint8_t* p) {
  return (uint8_t*)((uintptr_t)p & ~(uintptr_t)(PAGE - 1));
}
static inline bool is_empty(struct range r) {
  return r.lo >= r.hi;
}
static inline uint64_t range_size(struct range r) {
  return is_empty(r) ? 0 : (uint64_t)(r.hi - r.lo);
}
static inline struct range intersect(struct range a, struct range b) {
  return (struct range){a.lo > b.lo ? a.lo : b.lo, a.hi < b.hi ? a.hi : b.hi};
}
static const struct range no_pages = {0, 0};

/* The pages of a chunk at p of `size` bytes that stay untouched while it is free. */
static inline struct range interior(uint8_t* p, uint64_t size) {
  return (struct range){page_up(p + META), page_down(p + size)};
}

/* A free chunk's clean range (empty without F_CLEAN). The heap is the guest's own memory, but a
 * corrupted range would make us hand back live data, so it is checked against the interior. */
static struct range clean_of(struct chunk* c) {
  if (!(c->head & F_CLEAN)) return no_pages;
  struct range r = {c->clean_lo, c->clean_hi}, in = interior((uint8_t*)c, csize(c));
  if (is_empty(r) || r.lo < in.lo || r.hi > in.hi ||
      (((uintptr_t)r.lo | (uintptr_t)r.hi) & (PAGE - 1)))
    heap_corrupt("heap corrupted: bad clean range in a free chunk");
  return r;
}

static void set_clean(struct chunk* c, struct range r) {
  if (is_empty(r)) {
    c->head &= ~(uint64_t)F_CLEAN;
    /* When the range's words would begin a page of their own, write one anyway: that page is
     * outside the interior, so if it stayed clean nothing would track it, and it could later be
     * handed back a second time as part of a larger chunk's interior. */
    if (csize(c) >= META && !(((uintptr_t)c + 32) & (PAGE - 1))) c->clean_lo = 0;
    return;
  }
  c->head |= F_CLEAN;
  c->clean_lo = r.lo;
  c->clean_hi = r.hi;
}

/* One kiln_release; false when hand-back is off or the host refused. */
static bool hand_back(uint8_t* lo, uint8_t* hi) {
  if (!heap.hand_back) return false;
  ++heap.release_calls;
  if (kiln_release(lo, (size_t)(hi - lo)) != KILN_MEMORY_OK) return false;
  heap.released_bytes += (uint64_t)(hi - lo);
  return true;
}

/* Hands back the pages of [lo, hi) outside `clean` (sorted, disjoint, non-empty ranges inside
 * [lo, hi)), one call per gap. False if any call failed (the gaps before it are handed back). */
static bool hand_back_gaps(uint8_t* lo, uint8_t* hi, const struct range* clean, unsigned n) {
  for (unsigned i = 0; i <= n; ++i) {
    uint8_t* gap_end = i < n ? clean[i].lo : hi;
    if (gap_end > lo && !hand_back(lo, gap_end)) return false;
    if (i < n) lo = clean[i].hi;
  }
  return true;
}

/* The clean range of a new free chunk [p, p + size), not next to top, coalesced from pieces
 * whose clean ranges are `parts` (sorted, disjoint, non-empty, inside its interior). */
static struct range settle(uint8_t* p, uint64_t size, const struct range* parts, unsigned n) {
  struct range in = interior(p, size);
  uint64_t known = 0;
  unsigned widest = 0;
  for (unsigned i = 0; i < n; ++i) {
    known += range_size(parts[i]);
    if (range_size(parts[i]) > range_size(parts[widest])) widest = i;
  }
  struct range fallback = n ? parts[widest] : no_pages;
  if (range_size(in) - known >= KILN_RELEASE_MIN)
    return hand_back_gaps(in.lo, in.hi, parts, n) ? in : fallback;
  if (n >= 2) {
    /* One range per chunk: rather than forget one of them (and later hand its pages back a
     * second time), hand back the few pages between them. */
    struct range joined = {parts[0].lo, parts[n - 1].hi};
    return hand_back_gaps(joined.lo, joined.hi, parts, n) ? joined : fallback;
  }
  return fallback;
}

/* `top` has just come down over free pieces whose clean ranges are `parts` (as for settle()).
 * Hand back what lies between top's page and the high-water mark, so that all of it is clean. */
static void top_dropped(const struct range* parts, unsigned n) {
  uint8_t* t = page_up(heap.top);
  if (heap.high_water <= t) return;
  uint8_t* hi = page_up(heap.high_water);
  if (n == 0 && (uint64_t)(hi - t) < KILN_RELEASE_MIN) return;
  /* With clean pieces merged, hand back even a small rest: [top, high_water) is not tracked, so
   * keeping high_water would forget their pages. */
  if (hand_back_gaps(t, hi, parts, n)) heap.high_water = t;
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
 * a correct F_PREV_INUSE bit; `clean` is the clean range it brings (inside its interior). */
static void free_chunk(struct chunk* c, uint64_t size, struct range clean) {
  struct range parts[3]; /* clean ranges of the pieces, in address order */
  unsigned n = 0;
  /* Cleared first: if c merges into its predecessor its header is never rewritten, and a second
   * free() of it must still fail the F_INUSE check. */
  c->head &= ~(uint64_t)F_INUSE;
  if (!(c->head & F_PREV_INUSE)) {
    struct chunk* prev = at((uint8_t*)c - c->prev_size);
    if ((uint8_t*)prev < heap.base || csize(prev) != c->prev_size || (prev->head & F_INUSE))
      heap_corrupt("heap corrupted: bad previous chunk");
    list_remove(prev);
    struct range r = clean_of(prev);
    if (!is_empty(r)) parts[n++] = r;
    size += c->prev_size;
    c = prev;
  }
  if (!is_empty(clean)) parts[n++] = clean;
  uint8_t* next = (uint8_t*)c + size;
  if (next == heap.top) {
    heap.top = (uint8_t*)c; /* c's own F_PREV_INUSE is set: no two free chunks touch */
    top_dropped(parts, n);
    return;
  }
  struct chunk* nc = at(next);
  if (!(nc->head & F_INUSE)) {
    struct range r = clean_of(nc);
    if (!is_empty(r)) parts[n++] = r;
    list_remove(nc);
    size += csize(nc);
  }
  c->head = size | F_PREV_INUSE;
  struct chunk* after = at((uint8_t*)c + size);
  after->prev_size = size;
  after->head &= ~(uint64_t)F_PREV_INUSE;
  set_clean(c, settle((uint8_t*)c, size, parts, n));
  list_insert(c);
}

/* Shrink the in-use chunk c to `size` bytes, freeing the tail when it is big enough; `clean`
 * holds clean pages of c (the tail keeps those inside its interior). */
static void trim(struct chunk* c, uint64_t size, struct range clean) {
  uint64_t have = csize(c);
  if (have - size < MIN_CHUNK) return;
  c->head = size | (c->head & F_PREV_INUSE) | F_INUSE;
  uint8_t* rest = (uint8_t*)c + size;
  at(rest)->head = (have - size) | F_PREV_INUSE;
  heap.in_use -= have - size;
  free_chunk(at(rest), have - size, intersect(clean, interior(rest, have - size)));
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

void kiln_heap_init(uint64_t start, uint64_t size, bool may_hand_back) {
  uint64_t base = (start + 15) & SIZE_MASK;
  uint64_t end = (start + size) & SIZE_MASK;
  if (size == 0 || end <= base) end = base;
  if (end - base > MAX_REQUEST) end = base + MAX_REQUEST;
  heap.base = heap.top = heap.high_water = (uint8_t*)(uintptr_t)base;
  heap.end = (uint8_t*)(uintptr_t)end;
  heap.region_size = size;
  /* top's hand-back covers the page holding high_water, which must be wholly the heap's. */
  heap.hand_back = may_hand_back && ((start + size) & (PAGE - 1)) == 0;
  heap.can_hand_back = heap.hand_back;
}

bool kiln_heap_set_hand_back(bool on) {
  bool was = heap.hand_back;
  heap.hand_back = on && heap.can_hand_back;
  return was;
}

/* A free-list chunk of at least `size` bytes, now in use (not trimmed), or NULL; *clean gets
 * its clean range. */
static struct chunk* take_free(uint64_t size, struct range* clean) {
  struct chunk* c = find_free(size);
  if (!c) return 0;
  *clean = clean_of(c);
  list_remove(c);
  c->head = (c->head & ~(uint64_t)F_CLEAN) | F_INUSE;
  next_chunk(c)->head |= F_PREV_INUSE;
  heap.in_use += csize(c);
  return c;
}

/* An in-use chunk of exactly `size` bytes carved at top, or NULL; *clean gets the pages of its
 * interior above the high-water mark. */
static struct chunk* carve(uint64_t size, struct range* clean) {
  if ((uint64_t)(heap.end - heap.top) < size) return 0;
  struct chunk* c = at(heap.top);
  *clean = intersect(interior(heap.top, size), (struct range){page_up(heap.high_water), heap.end});
  heap.top += size;
  if (heap.top > heap.high_water) heap.high_water = heap.top;
  c->head = size | F_INUSE | F_PREV_INUSE; /* whatever precedes `top` is in use */
  heap.in_use += size;
  return c;
}

/* malloc, also telling the caller which pages of the block are known to be zero. */
static void* alloc(size_t n, struct range* clean) {
  if (n > MAX_REQUEST) return 0;
  uint64_t size = request_size(n);
  struct chunk* c = take_free(size, clean);
  if (!c) c = carve(size, clean);
  if (!c) return 0;
  trim(c, size, *clean);
  return (uint8_t*)c + HDR;
}

KILN_LIBC void* malloc(size_t n) {
  struct range clean;
  return alloc(n, &clean);
}

KILN_LIBC void free(void* p) {
  if (!p) return;
  struct chunk* c = checked_chunk(p, "free(): invalid pointer or double free");
  uint64_t size = csize(c);
  heap.in_use -= size;
  free_chunk(c, size, no_pages);
}

static void zero(uint8_t* lo, uint8_t* hi) {
  if (hi > lo) memset(lo, 0, (size_t)(hi - lo));
}

KILN_LIBC void* calloc(size_t count, size_t each) {
  size_t n;
  if (__builtin_mul_overflow(count, each, &n)) return 0;
  uint8_t* old_high_water = heap.high_water;
  struct range clean;
  uint8_t* p = alloc(n, &clean);
  if (!p) return 0;
  /* Old data can only be below the old high-water mark, and not on clean pages (clearing those
   * would also make them resident again). */
  if (p >= old_high_water) return p;
  uint8_t* end = (uint64_t)(old_high_water - p) < n ? old_high_water : p + n;
  struct range c = intersect(clean, (struct range){p, end});
  if (is_empty(c)) {
    zero(p, end);
  } else {
    zero(p, c.lo);
    zero(c.hi, end);
  }
  return p;
}

KILN_LIBC void* realloc(void* p, size_t n) {
  if (!p) return malloc(n);
  if (n > MAX_REQUEST) return 0;
  struct chunk* c = checked_chunk(p, "realloc(): invalid pointer");
  uint64_t want = request_size(n), have = csize(c);
  if (want <= have) {
    trim(c, want, no_pages);
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
    /* Grow into the free neighbour; what is left of it keeps its clean pages. */
    struct chunk* nc = at(next);
    uint64_t total = have + csize(nc);
    struct range clean = clean_of(nc);
    list_remove(nc);
    c->head = total | (c->head & F_PREV_INUSE) | F_INUSE;
    next_chunk(c)->head |= F_PREV_INUSE;
    heap.in_use += total - have;
    trim(c, want, clean);
    return p;
  }
  void* q = malloc(n);
  if (!q) return 0;
  memcpy(q, p, have - HDR);
  free(p);
  return q;
}

/* The first payload address >= p + HDR aligned to `align` that leaves either no lead or a lead
 * of at least MIN_CHUNK in front of it (the lead becomes a free chunk of its own). */
static uint8_t* aligned_payload(uint8_t* chunk_start, uint64_t align) {
  uint8_t* p = chunk_start + HDR;
  uint8_t* a = (uint8_t*)(((uintptr_t)p + align - 1) & ~(uintptr_t)(align - 1));
  if (a != p && (uint64_t)(a - p) < MIN_CHUNK) a += align;
  return a;
}

KILN_LIBC void* aligned_alloc(size_t align, size_t n) {
  if (align == 0 || (align & (align - 1))) return 0;
  if (align <= HDR) return malloc(n);
  if (align > MAX_REQUEST || n > MAX_REQUEST) return 0;
  uint64_t size = request_size(n);
  struct range clean;
  /* From a free chunk with room for any lead; else exactly at top, so nothing past the aligned
   * block is carved (and its pages stay clean). */
  struct chunk* c = take_free(size + align + MIN_CHUNK, &clean);
  if (!c) c = carve((uint64_t)(aligned_payload(heap.top, align) - HDR - heap.top) + size, &clean);
  if (!c) return 0;
  uint8_t* a = aligned_payload((uint8_t*)c, align);
  if (a != (uint8_t*)c + HDR) {
    uint64_t lead = (uint64_t)(a - HDR - (uint8_t*)c), have = csize(c);
    struct chunk* ac = at(a - HDR);
    ac->head = (have - lead) | F_INUSE | F_PREV_INUSE;
    c->head = lead | (c->head & F_PREV_INUSE) | F_INUSE;
    heap.in_use -= lead;
    free_chunk(c, lead, intersect(clean, interior((uint8_t*)c, lead)));
    c = ac;
  }
  trim(c, size, clean);
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
 * musl's own malloc out of the image. The target is named through the preprocessor so that the
 * host-native test (tests/malloc_host_test.c), which renames malloc & co., still links. */
#define ALIAS_OF_(name) #name
#define ALIAS_OF(name) ALIAS_OF_(name)
void* __libc_malloc(size_t n) __attribute__((weak, alias(ALIAS_OF(malloc))));
void* __libc_malloc_impl(size_t n) __attribute__((weak, alias(ALIAS_OF(malloc))));
void __libc_free(void* p) __attribute__((weak, alias(ALIAS_OF(free))));
void* __libc_calloc(size_t count, size_t each) __attribute__((weak, alias(ALIAS_OF(calloc))));
void* __libc_realloc(void* p, size_t n) __attribute__((weak, alias(ALIAS_OF(realloc))));

void kiln_heap_stats(struct kiln_heap_stats* out) {
  out->heap_size = heap.region_size;
  out->in_use = heap.in_use;
  out->high_water = (uint64_t)(heap.high_water - heap.base);
  out->free_blocks = heap.free_blocks;
  out->released_bytes = heap.released_bytes;
  out->release_calls = heap.release_calls;
}
