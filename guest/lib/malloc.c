/* The guest allocator: TLSF over the boot-info heap, O(1) malloc/free, coalescing, 16-aligned;
 * large free ranges go back to the host (chunk layout in malloc_internal.h, clean pages and
 * hand-back in malloc_pages.c). */
#include "malloc_internal.h"

/* Size classes: sizes below 256 in exact 16-byte steps (first level 0); above, each power of two
 * split into 16 linear second-level classes. */
#define SL_LOG 4u
#define SL_COUNT (1u << SL_LOG)
#define SMALL_LIMIT 256u
#define FL_COUNT 48u
#define MAX_REQUEST ((uint64_t)1 << 52)

struct kiln_heap kiln_heap_;

/* The free lists, one per size class, and bitmaps of the non-empty ones. */
static struct {
  uint64_t fl_map;
  uint32_t sl_map[FL_COUNT];
  struct chunk* lists[FL_COUNT][SL_COUNT];
} bins;

static inline unsigned msb(uint64_t v) {
  return 63u - (unsigned)__builtin_clzll(v);
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
  struct chunk* head = bins.lists[fl][sl];
  c->next_free = head;
  c->prev_free = 0;
  if (head) head->prev_free = c;
  bins.lists[fl][sl] = c;
  bins.fl_map |= 1ull << fl;
  bins.sl_map[fl] |= 1u << sl;
  ++kiln_heap_.free_blocks;
}

static void list_remove(struct chunk* c) {
  unsigned fl, sl;
  mapping(csize(c), &fl, &sl);
  if (c->next_free) c->next_free->prev_free = c->prev_free;
  if (c->prev_free)
    c->prev_free->next_free = c->next_free;
  else
    bins.lists[fl][sl] = c->next_free;
  if (!bins.lists[fl][sl]) {
    bins.sl_map[fl] &= ~(1u << sl);
    if (!bins.sl_map[fl]) bins.fl_map &= ~(1ull << fl);
  }
  --kiln_heap_.free_blocks;
}

/* A free chunk of at least `size` bytes, or NULL. The request is rounded up to the next class
 * boundary so that any chunk in the class found is big enough (TLSF's good-fit). */
static struct chunk* find_free(uint64_t size) {
  if (size >= SMALL_LIMIT) size += (1ull << (msb(size) - SL_LOG)) - 1;
  unsigned fl, sl;
  mapping(size, &fl, &sl);
  if (fl >= FL_COUNT) return 0;
  uint32_t sl_bits = bins.sl_map[fl] & (~0u << sl);
  if (!sl_bits) {
    uint64_t fl_bits = fl + 1 < FL_COUNT ? bins.fl_map & (~0ull << (fl + 1)) : 0;
    if (!fl_bits) return 0;
    fl = (unsigned)__builtin_ctzll(fl_bits);
    sl_bits = bins.sl_map[fl];
  }
  return bins.lists[fl][(unsigned)__builtin_ctz(sl_bits)];
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
    if ((uint8_t*)prev < kiln_heap_.base || csize(prev) != c->prev_size || (prev->head & F_INUSE))
      heap_corrupt("heap corrupted: bad previous chunk");
    list_remove(prev);
    struct range r = kiln_heap_clean_of(prev);
    if (!is_empty(r)) parts[n++] = r;
    size += c->prev_size;
    c = prev;
  }
  if (!is_empty(clean)) parts[n++] = clean;
  uint8_t* next = (uint8_t*)c + size;
  if (next == kiln_heap_.top) {
    kiln_heap_.top = (uint8_t*)c; /* c's own F_PREV_INUSE is set: no two free chunks touch */
    kiln_heap_top_dropped(parts, n);
    return;
  }
  struct chunk* nc = at(next);
  if (!(nc->head & F_INUSE)) {
    struct range r = kiln_heap_clean_of(nc);
    if (!is_empty(r)) parts[n++] = r;
    list_remove(nc);
    size += csize(nc);
  }
  c->head = size | F_PREV_INUSE;
  struct chunk* after = at((uint8_t*)c + size);
  after->prev_size = size;
  after->head &= ~(uint64_t)F_PREV_INUSE;
  kiln_heap_set_clean(c, kiln_heap_settle((uint8_t*)c, size, parts, n));
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
  kiln_heap_.in_use -= have - size;
  free_chunk(at(rest), have - size, intersect(clean, interior(rest, have - size)));
}

static struct chunk* checked_chunk(void* p, const char* what) {
  uint8_t* raw = (uint8_t*)p - HDR;
  struct chunk* c = at(raw);
  if (raw < kiln_heap_.base || raw >= kiln_heap_.top || ((uintptr_t)raw & 15) ||
      !(c->head & F_INUSE) || csize(c) < MIN_CHUNK || csize(c) > (uint64_t)(kiln_heap_.top - raw))
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
  kiln_heap_.base = kiln_heap_.top = kiln_heap_.high_water = (uint8_t*)(uintptr_t)base;
  kiln_heap_.end = (uint8_t*)(uintptr_t)end;
  kiln_heap_.region_size = size;
  /* top's hand-back covers the page holding high_water, which must be wholly the heap's. */
  kiln_heap_.hand_back = may_hand_back && ((start + size) & (PAGE - 1)) == 0;
  kiln_heap_.can_hand_back = kiln_heap_.hand_back;
}

bool kiln_heap_set_hand_back(bool on) {
  bool was = kiln_heap_.hand_back;
  kiln_heap_.hand_back = on && kiln_heap_.can_hand_back;
  return was;
}

/* A free-list chunk of at least `size` bytes, now in use (not trimmed), or NULL; *clean gets
 * its clean range. */
static struct chunk* take_free(uint64_t size, struct range* clean) {
  struct chunk* c = find_free(size);
  if (!c) return 0;
  *clean = kiln_heap_clean_of(c);
  list_remove(c);
  c->head = (c->head & ~(uint64_t)F_CLEAN) | F_INUSE;
  next_chunk(c)->head |= F_PREV_INUSE;
  kiln_heap_.in_use += csize(c);
  return c;
}

/* An in-use chunk of exactly `size` bytes carved at top, or NULL; *clean gets the pages of its
 * interior above the high-water mark. */
static struct chunk* carve(uint64_t size, struct range* clean) {
  if ((uint64_t)(kiln_heap_.end - kiln_heap_.top) < size) return 0;
  struct chunk* c = at(kiln_heap_.top);
  *clean = intersect(interior(kiln_heap_.top, size),
                     (struct range){page_up(kiln_heap_.high_water), kiln_heap_.end});
  kiln_heap_.top += size;
  if (kiln_heap_.top > kiln_heap_.high_water) kiln_heap_.high_water = kiln_heap_.top;
  c->head = size | F_INUSE | F_PREV_INUSE; /* whatever precedes `top` is in use */
  kiln_heap_.in_use += size;
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
  kiln_heap_.in_use -= size;
  free_chunk(c, size, no_pages);
}

static void zero(uint8_t* lo, uint8_t* hi) {
  if (hi > lo) memset(lo, 0, (size_t)(hi - lo));
}

KILN_LIBC void* calloc(size_t count, size_t each) {
  size_t n;
  if (__builtin_mul_overflow(count, each, &n)) return 0;
  uint8_t* old_high_water = kiln_heap_.high_water;
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
  if (next == kiln_heap_.top && (uint64_t)(kiln_heap_.end - (uint8_t*)c) >= want) {
    kiln_heap_.top = (uint8_t*)c + want;
    if (kiln_heap_.top > kiln_heap_.high_water) kiln_heap_.high_water = kiln_heap_.top;
    c->head = want | (c->head & F_PREV_INUSE) | F_INUSE;
    kiln_heap_.in_use += want - have;
    return p;
  }
  if (next != kiln_heap_.top && !(at(next)->head & F_INUSE) && have + csize(at(next)) >= want) {
    /* Grow into the free neighbour; what is left of it keeps its clean pages. */
    struct chunk* nc = at(next);
    uint64_t total = have + csize(nc);
    struct range clean = kiln_heap_clean_of(nc);
    list_remove(nc);
    c->head = total | (c->head & F_PREV_INUSE) | F_INUSE;
    next_chunk(c)->head |= F_PREV_INUSE;
    kiln_heap_.in_use += total - have;
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
  if (!c)
    c = carve((uint64_t)(aligned_payload(kiln_heap_.top, align) - HDR - kiln_heap_.top) + size,
              &clean);
  if (!c) return 0;
  uint8_t* a = aligned_payload((uint8_t*)c, align);
  if (a != (uint8_t*)c + HDR) {
    uint64_t lead = (uint64_t)(a - HDR - (uint8_t*)c), have = csize(c);
    struct chunk* ac = at(a - HDR);
    ac->head = (have - lead) | F_INUSE | F_PREV_INUSE;
    c->head = lead | (c->head & F_PREV_INUSE) | F_INUSE;
    kiln_heap_.in_use -= lead;
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
  out->heap_size = kiln_heap_.region_size;
  out->in_use = kiln_heap_.in_use;
  out->high_water = (uint64_t)(kiln_heap_.high_water - kiln_heap_.base);
  out->free_blocks = kiln_heap_.free_blocks;
  out->released_bytes = kiln_heap_.released_bytes;
  out->release_calls = kiln_heap_.release_calls;
}
