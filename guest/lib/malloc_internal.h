/* The guest allocator's internals shared by malloc.c and malloc_pages.c: chunk layout, heap
 * state, page ranges. */
#ifndef KILN_GUEST_MALLOC_INTERNAL_H
#define KILN_GUEST_MALLOC_INTERNAL_H

#include "internal.h"

/* Chunk layout (addresses 16-aligned, sizes multiples of 16, header included):
 *   +0   prev_size   size of the previous chunk; valid only while that chunk is free
 *   +8   head        size | F_INUSE | F_PREV_INUSE | F_CLEAN
 *   +16  payload     (free chunks keep their free-list links here, and with F_CLEAN the
 *                     clean range at +32)
 * Chunks tile [base, top). Above `top` nothing was carved yet: a free chunk next to `top` is
 * merged into it, so the heap is only touched as far as it has been used (the region can be
 * large, and under the emulator every store is slow). Memory above `high_water` reads as zero
 * (never written, or handed back), which lets calloc skip clearing it. Which pages are clean,
 * and when they go back to the host, is malloc_pages.c's part. */
#define HDR 16u
#define MIN_CHUNK 32u
#define META 48u /* bytes of a free chunk the allocator may write: header, links, clean range */
#define F_INUSE 1u
#define F_PREV_INUSE 2u
#define F_CLEAN 4u /* free chunk only: clean_lo/clean_hi are valid */
#define SIZE_MASK (~(uint64_t)15)
#define PAGE 4096u

struct chunk {
  uint64_t prev_size;
  uint64_t head;
  struct chunk* next_free;
  struct chunk* prev_free;
  uint8_t* clean_lo; /* only with F_CLEAN, which implies a chunk far larger than META */
  uint8_t* clean_hi;
};

/* The heap: where it lies, how far it is used, and what was handed back (the free lists are
 * malloc.c's own). */
struct kiln_heap {
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
};
extern struct kiln_heap kiln_heap_;

static inline uint64_t csize(const struct chunk* c) {
  return c->head & SIZE_MASK;
}
static inline struct chunk* at(uint8_t* p) {
  return (struct chunk*)(void*)p;
}
static inline struct chunk* next_chunk(struct chunk* c) {
  return at((uint8_t*)c + csize(c));
}

static inline _Noreturn void heap_corrupt(const char* what) {
  kiln_abort(KILN_ABORT_HEAP, what);
}

/* A page-aligned range of clean pages; empty when lo >= hi. */
struct range {
  uint8_t* lo;
  uint8_t* hi;
};

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

/* Clean-page bookkeeping and hand-back (malloc_pages.c). */

/* A free chunk's clean range (empty without F_CLEAN); aborts on a range outside its interior. */
struct range kiln_heap_clean_of(struct chunk* c);
/* Records `r` (empty for none) as free chunk c's clean range. */
void kiln_heap_set_clean(struct chunk* c, struct range r);
/* The clean range of a new free chunk [p, p + size), not next to top, coalesced from pieces
 * whose clean ranges are `parts` (sorted, disjoint, non-empty, inside its interior); hands back
 * what the rules say. */
struct range kiln_heap_settle(uint8_t* p, uint64_t size, const struct range* parts, unsigned n);
/* `top` has just come down over free pieces whose clean ranges are `parts` (as for
 * kiln_heap_settle): hands back what lies between top's page and the high-water mark, so that all
 * of it is clean. */
void kiln_heap_top_dropped(const struct range* parts, unsigned n);

#endif /* KILN_GUEST_MALLOC_INTERNAL_H */
