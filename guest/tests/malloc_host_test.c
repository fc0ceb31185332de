/* Host-native test of the guest allocator's hand-back logic: guest/lib/malloc.c and
 * malloc_pages.c are compiled into this program (malloc & co. renamed) over an mmap'd "heap"
 * whose pages are tracked.
 *
 * Page model: every heap page starts PROT_NONE and UNTOUCHED. The first access (SIGSEGV) makes
 * it DIRTY and readable/writable. kiln_release() (stubbed here) zeroes pages with
 * MADV_DONTNEED, makes them PROT_NONE again and RELEASED. So the test sees:
 *   - a redundant hand-back (a RELEASED page handed back again before anyone touched it);
 *   - a hand-back of a page never written, or of a live block;
 *   - the allocator touching clean pages (faults taken inside allocator calls);
 *   - clean claims that are wrong (a chunk's clean range or the part above high_water holding a
 *     DIRTY page), and, in strict mode, released pages the allocator has lost track of.
 * Runs scenario checks with exact hand-back counts, then random workloads with hand-back on, on
 * with injected kiln_release failures, and off. Exit status 0 on success.
 * Built by guest/CMakeLists.txt as `guest_malloc_host_test` (CTest, label "guest"). */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define malloc tm_malloc
#define free tm_free
#define calloc tm_calloc
#define realloc tm_realloc
#define aligned_alloc tm_aligned_alloc
#define memalign tm_memalign
#define posix_memalign tm_posix_memalign
#define malloc_usable_size tm_malloc_usable_size
#define __libc_malloc tm_libc_malloc
#define __libc_malloc_impl tm_libc_malloc_impl
#define __libc_free tm_libc_free
#define __libc_calloc tm_libc_calloc
#define __libc_realloc tm_libc_realloc
#include "../lib/malloc.c"
#include "../lib/malloc_pages.c"
#undef malloc
#undef free
#undef calloc
#undef realloc

#define REGION (48u << 20)
#define NPAGES (REGION / PAGE)
enum page_state { UNTOUCHED, DIRTY, RELEASED };

static uint8_t* region;
static uint8_t state[NPAGES];
static volatile sig_atomic_t in_allocator, in_checker;
static unsigned alloc_faults;
static bool strict = true;       /* hand-back on, no failures: knowledge must be exact */
static unsigned fail_percent;    /* kiln_release failure injection */
static uint64_t redundant_pages; /* counted when not strict */
static const char* cur_op = "";
static unsigned check_every = 128; /* CHECK_EVERY=1 in the environment walks after every call */
static unsigned cur_it;

#define CHECK(cond, ...)                                                                           \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond);                     \
      fprintf(stderr, __VA_ARGS__);                                                                \
      fprintf(stderr, " (last allocator call: %s, iteration %u)\n", cur_op, cur_it);               \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

static uint64_t rng = 88172645463325252ull;
static uint64_t rnd(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng;
}

_Noreturn void kiln_abort(uint32_t code, const char* msg) {
  fprintf(stderr, "kiln_abort(%#x): %s\n", code, msg);
  exit(1);
}

static void on_segv(int sig, siginfo_t* si, void* uctx) {
  (void)uctx;
  uint8_t* a = si->si_addr;
  if (in_checker || a < region || a >= region + REGION) {
    signal(sig, SIG_DFL); /* a real crash: let it happen */
    return;
  }
  size_t pg = (size_t)(a - region) / PAGE;
  if (in_allocator) ++alloc_faults;
  state[pg] = DIRTY;
  mprotect(region + pg * PAGE, PAGE, PROT_READ | PROT_WRITE);
}

/* ---- live blocks, as the test program sees them ---- */
#define SLOTS 256
static struct block {
  uint8_t* p;
  uint64_t size;
  uint8_t tag;
} live[SLOTS];

static bool overlaps_live(uint8_t* lo, uint8_t* hi) {
  for (unsigned i = 0; i < SLOTS; ++i)
    if (live[i].p && live[i].p < hi && lo < live[i].p + live[i].size) return true;
  return false;
}

uint64_t stub_calls;
int kiln_release(void* addr, size_t len) {
  uint8_t* lo = addr;
  ++stub_calls;
  CHECK(len > 0 && ((uintptr_t)lo % PAGE) == 0 && len % PAGE == 0, "unaligned %p+%zu", addr, len);
  CHECK(lo >= page_down(kiln_heap_.base) && lo + len <= region + REGION, "outside the heap: %p",
        addr);
  CHECK(!overlaps_live(lo, lo + len), "hands back a live block: %p+%zu", addr, len);
  if (fail_percent && rnd() % 100 < fail_percent) return KILN_MEMORY_NOT_WRITABLE;
  for (size_t pg = (size_t)(lo - region) / PAGE; pg < (size_t)(lo + len - region) / PAGE; ++pg) {
    if (strict) {
      CHECK(state[pg] != RELEASED, "redundant hand-back of page %zu (+%#zx, %zu bytes)", pg,
            (size_t)(lo - region), len);
      CHECK(state[pg] != UNTOUCHED, "hand-back of a never-written page %zu", pg);
    } else if (state[pg] == RELEASED) {
      ++redundant_pages;
    }
    state[pg] = RELEASED;
  }
  CHECK(madvise(lo, len, MADV_DONTNEED) == 0, "madvise");
  CHECK(mprotect(lo, len, PROT_NONE) == 0, "mprotect");
  return KILN_MEMORY_OK;
}

static void reset(uint64_t offset, uint64_t size, bool hand_back_on) {
  if (region) munmap(region, REGION);
  region = mmap(0, REGION, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  CHECK(region != MAP_FAILED, "mmap");
  memset(state, UNTOUCHED, sizeof state);
  memset(&kiln_heap_, 0, sizeof kiln_heap_);
  memset(&bins, 0, sizeof bins);
  memset(live, 0, sizeof live);
  stub_calls = 0;
  redundant_pages = 0;
  kiln_heap_init((uint64_t)(uintptr_t)(region + offset), size, hand_back_on);
}

/* ---- allocator calls, counting the faults they take ---- */
#define ALLOC_CALL(expr) ALLOC_CALL_COPYING(expr, 0)
/* `copied`: bytes the call copies into the new block (realloc moving a block), whose pages it
 * may touch legitimately. */
#define ALLOC_CALL_COPYING(expr, copied)                                                           \
  ({                                                                                               \
    alloc_faults = 0;                                                                              \
    in_allocator = 1;                                                                              \
    cur_op = #expr;                                                                                \
    __typeof__(expr) r_ = (expr);                                                                  \
    in_allocator = 0;                                                                              \
    /* headers of a split (at most two pages) and the next chunk's head */                         \
    CHECK(!strict || alloc_faults <= 3 + ((copied) + PAGE - 1) / PAGE + 1, "%u faults in %s",      \
          alloc_faults, #expr);                                                                    \
    r_;                                                                                            \
  })
#define FREE_CALL(p)                                                                               \
  do {                                                                                             \
    alloc_faults = 0;                                                                              \
    in_allocator = 1;                                                                              \
    cur_op = "free";                                                                               \
    tm_free(p);                                                                                    \
    in_allocator = 0;                                                                              \
    CHECK(!strict || alloc_faults <= 3, "%u faults in free", alloc_faults);                        \
  } while (0)

/* The test program writes every page of a block it gets (as a real program would before the
 * pages count as handed out), and checks them later. */
static uint8_t pat(uint8_t tag, uint64_t off) {
  return (uint8_t)(tag * 31 + off * 7 + (off >> 12));
}
/* Spots of a block of `size` bytes: its first and last 64 bytes and the first byte of every
 * 4 KiB step from its start; `limit` cuts them short (a block realloc'd smaller). */
static bool spots(uint8_t* p, uint64_t size, uint64_t limit, uint8_t tag, bool write) {
  for (uint64_t off = 0; off < size && off < limit;) {
    if (write)
      p[off] = pat(tag, off);
    else if (p[off] != pat(tag, off))
      return false;
    off = off + 1 < 64 ? off + 1 : (off | (PAGE - 1)) + 1;
  }
  for (uint64_t off = size > 64 ? size - 64 : 0; off < size && off < limit; ++off) {
    if (write)
      p[off] = pat(tag, off);
    else if (p[off] != pat(tag, off))
      return false;
  }
  return true;
}
static void fill(uint8_t* p, uint64_t size, uint8_t tag) {
  spots(p, size, size, tag, true);
}
static bool check(uint8_t* p, uint64_t size, uint8_t tag) {
  return spots(p, size, size, tag, false);
}
/* Every page of the block's usable part, so the whole chunk counts as handed out. */
static void fill_block(uint8_t* p, uint64_t size, uint8_t tag) {
  uint64_t usable = tm_malloc_usable_size(p);
  volatile uint8_t* v = p; /* volatile: a self-assignment must still be a store */
  for (uint64_t off = 0; off < usable; off += PAGE)
    v[off] = v[off]; /* makes the page DIRTY */
  if (usable) v[usable - 1] = v[usable - 1];
  fill(p, size, tag);
}

static uint8_t* do_malloc(uint64_t n, uint8_t tag) {
  uint8_t* p = ALLOC_CALL(tm_malloc(n));
  if (p) fill_block(p, n, tag);
  return p;
}

/* ---- heap walk: structure and page-state invariants ---- */
static void check_heap(void) {
  in_checker = 1;
  uint8_t* p = kiln_heap_.base;
  bool prev_free = false;
  uint64_t nfree = 0, in_use = 0;
  while (p < kiln_heap_.top) {
    struct chunk* c = at(p);
    uint64_t size = csize(c);
    CHECK(size >= MIN_CHUNK && p + size <= kiln_heap_.top, "bad chunk size %llu at %p",
          (unsigned long long)size, (void*)p);
    CHECK(!!(c->head & F_PREV_INUSE) == !prev_free, "F_PREV_INUSE wrong at %p", (void*)p);
    size_t first = (size_t)(page_down(p) - region) / PAGE;
    size_t last = (size_t)(page_up(p + size) - region) / PAGE;
    if (c->head & F_INUSE) {
      CHECK(!(c->head & F_CLEAN), "in-use chunk with F_CLEAN");
      in_use += size;
      for (size_t pg = first; pg < last; ++pg)
        CHECK(state[pg] == DIRTY, "page %zu of an in-use chunk is not written", pg);
    } else {
      CHECK(!prev_free, "two free chunks touch at %p", (void*)p);
      ++nfree;
      CHECK(at(p + size)->prev_size == size, "bad prev_size after %p", (void*)p);
      struct range r = kiln_heap_clean_of(c), in = interior(p, size);
      for (uint8_t* q = in.lo; q < in.hi; q += PAGE) {
        size_t pg = (size_t)(q - region) / PAGE;
        bool clean = q >= r.lo && q < r.hi;
        if (clean) CHECK(state[pg] != DIRTY, "clean page %zu is dirty", pg);
        if (!clean && strict)
          CHECK(state[pg] == DIRTY,
                "page %zu (state %d): lost track of a clean page; chunk +%#zx size %#llx clean "
                "[+%#zx, +%#zx) interior [+%#zx, +%#zx), top +%#zx hw +%#zx",
                pg, state[pg], (size_t)(p - region), (unsigned long long)size,
                r.lo ? (size_t)(r.lo - region) : 0, r.hi ? (size_t)(r.hi - region) : 0,
                (size_t)(in.lo - region), (size_t)(in.hi - region),
                (size_t)(kiln_heap_.top - region), (size_t)(kiln_heap_.high_water - region));
      }
    }
    prev_free = !(c->head & F_INUSE);
    p += size;
  }
  CHECK(p == kiln_heap_.top, "chunks do not end at top");
  CHECK(nfree == kiln_heap_.free_blocks, "free_blocks %llu, counted %llu",
        (unsigned long long)kiln_heap_.free_blocks, (unsigned long long)nfree);
  CHECK(in_use == kiln_heap_.in_use, "in_use mismatch");
  CHECK(kiln_heap_.high_water >= kiln_heap_.top, "high_water below top");
  size_t hw = (size_t)(page_up(kiln_heap_.high_water) - region) / PAGE;
  for (size_t pg = hw; pg < NPAGES; ++pg)
    CHECK(state[pg] != DIRTY, "page %zu above high_water is dirty", pg);
  if (strict)
    for (size_t pg = (size_t)(page_up(kiln_heap_.top) - region) / PAGE; pg < hw; ++pg)
      CHECK(state[pg] == DIRTY, "page %zu between top and high_water is clean but untracked", pg);
  in_checker = 0;
}

static uint64_t calls(void) {
  return kiln_heap_.release_calls;
}

/* ---- scenarios with exact expectations ---- */
static void scenario_top(void) {
  reset(0, 32u << 20, true);
  uint8_t* a = do_malloc(1u << 20, 1);
  FREE_CALL(a);
  CHECK(calls() == 1 && kiln_heap_.released_bytes == (1u << 20) + PAGE,
        "top: %llu calls, %llu bytes", (unsigned long long)calls(),
        (unsigned long long)kiln_heap_.released_bytes);
  CHECK(kiln_heap_.high_water == kiln_heap_.base, "high_water not lowered");
  /* Below KILN_RELEASE_MIN nothing is handed back. */
  uint8_t* b = do_malloc(100000, 2);
  FREE_CALL(b);
  CHECK(calls() == 1, "small top free handed back");
  check_heap();
}

static void scenario_interior(void) {
  reset(0, 32u << 20, true);
  uint8_t* a = do_malloc(1u << 20, 1);
  uint8_t* guard = do_malloc(16, 2);
  live[0] = (struct block){guard, 16, 2};
  FREE_CALL(a);
  CHECK(calls() == 1, "interior: %llu calls", (unsigned long long)calls());
  check_heap();
  /* Small blocks carved from the clean chunk and given back: no further hand-back, however
   * often (the chunk keeps its clean range). */
  for (int i = 0; i < 100; ++i) {
    uint8_t* s = do_malloc(5000 + (uint64_t)i * 100, 3);
    live[1] = (struct block){s, 5000 + (uint64_t)i * 100, 3};
    check_heap();
    live[1].p = 0;
    FREE_CALL(s);
  }
  CHECK(calls() == 1, "ping-pong handed back: %llu calls", (unsigned long long)calls());
  check_heap();
  /* calloc over the clean chunk takes no faults on its clean pages and reads zero. */
  uint8_t* z = ALLOC_CALL(tm_calloc(1, 900000));
  for (uint64_t i = 0; i < 900000; ++i)
    CHECK(z[i] == 0, "calloc byte %llu not zero", (unsigned long long)i);
  fill_block(z, 900000, 4);
  FREE_CALL(z);
  CHECK(calls() == 2, "calloc'd chunk not handed back once: %llu", (unsigned long long)calls());
  live[0].p = 0;
  FREE_CALL(guard);
  check_heap();
}

static void scenario_join(void) {
  reset(0, 32u << 20, true);
  uint8_t* a = do_malloc(1u << 20, 1);
  uint8_t* mid = do_malloc(20000, 2);
  uint8_t* c = do_malloc(1u << 20, 3);
  uint8_t* guard = do_malloc(16, 4);
  live[0] = (struct block){guard, 16, 4};
  live[1] = (struct block){mid, 20000, 2};
  FREE_CALL(a);
  FREE_CALL(c);
  CHECK(calls() == 2, "join: %llu", (unsigned long long)calls());
  live[1].p = 0;
  FREE_CALL(mid); /* joins two clean ranges: hands back the pages between them */
  CHECK(calls() == 3, "join gap: %llu", (unsigned long long)calls());
  check_heap();
  /* A small block from the joined chunk: no hand-back, the rest stays clean. */
  uint8_t* s = do_malloc(16, 5);
  CHECK(calls() == 3, "small block from a clean chunk: %llu", (unsigned long long)calls());
  check_heap();
  FREE_CALL(s);
  CHECK(calls() == 3, "small block back into a clean chunk: %llu", (unsigned long long)calls());
  live[0].p = 0;
  FREE_CALL(guard);
  check_heap();
}

static void scenario_aligned(void) {
  reset(0, 32u << 20, true);
  uint8_t* x = do_malloc(100, 1);
  live[0] = (struct block){x, 100, 1};
  uint8_t* a = ALLOC_CALL(tm_aligned_alloc(2u << 20, 16));
  CHECK(((uintptr_t)a & ((2u << 20) - 1)) == 0, "misaligned");
  fill_block(a, 16, 2);
  live[1] = (struct block){a, 16, 2};
  CHECK(calls() == 0, "aligned_alloc from top handed back its never-written lead");
  check_heap();
  live[1].p = 0;
  FREE_CALL(a);
  check_heap();
  live[0].p = 0;
  FREE_CALL(x);
  check_heap();
}

static void scenario_realloc(void) {
  reset(0, 32u << 20, true);
  uint8_t* s = do_malloc(100, 1);
  uint8_t* big = do_malloc(2u << 20, 2);
  uint8_t* guard = do_malloc(16, 3);
  live[0] = (struct block){guard, 16, 3};
  FREE_CALL(big);
  CHECK(calls() == 1, "realloc setup");
  uint8_t* g = ALLOC_CALL(tm_realloc(s, 700000));
  CHECK(g == s && check(g, 100, 1), "realloc did not grow in place");
  fill_block(g, 700000, 1);
  live[1] = (struct block){g, 700000, 1};
  check_heap();
  live[1].p = 0;
  FREE_CALL(g); /* merges back: only the pages handed out by the growth go back */
  CHECK(calls() == 2, "realloc: %llu", (unsigned long long)calls());
  check_heap();
}

static void scenario_unaligned_region(void) {
  reset(48, (16u << 20) - 48 - 100, true); /* region ends mid-page: hand-back stays off */
  uint8_t* a = do_malloc(1u << 20, 1);
  FREE_CALL(a);
  CHECK(calls() == 0 && !kiln_heap_.hand_back, "hand-back on an unaligned region");
  reset(48, (16u << 20) - 48, true); /* start mid-page is fine */
  a = do_malloc(1u << 20, 1);
  FREE_CALL(a);
  CHECK(calls() == 1, "unaligned start");
  check_heap();
}

/* ---- random workload ---- */
static void workload(unsigned iterations, bool hand_back_on, unsigned fail_pct) {
  reset(0, 40u << 20, hand_back_on);
  /* Exact knowledge only when every hand-back succeeds: after a failure, or with hand-back
   * off, the allocator may forget clean pages (and then clear or hand them back again). */
  strict = fail_pct == 0 && hand_back_on;
  fail_percent = fail_pct;
  for (unsigned it = 1; it <= iterations; ++it) {
    cur_it = it;
    struct block* b = &live[rnd() % SLOTS];
    if (b->p) CHECK(check(b->p, b->size, b->tag), "iteration %u: block damaged", it);
    uint64_t r = rnd() % 100;
    uint64_t want = r < 70 ? rnd() % 300 : r < 97 ? rnd() % 65536 : rnd() % (1u << 20);
    uint8_t tag = (uint8_t)rnd();
    switch (rnd() % 6) {
    case 0:
    case 1: {
      uint8_t* p = b->p;
      b->p = 0;
      FREE_CALL(p);
      break;
    }
    case 2: {
      uint8_t* p = b->p;
      b->p = 0;
      FREE_CALL(p);
      b->p = do_malloc(want, tag);
      b->size = want;
      b->tag = tag;
      break;
    }
    case 3: {
      uint8_t* old = b->p;
      uint64_t keep = old ? (b->size < want ? b->size : want) : 0;
      b->p = 0; /* while the allocator owns it */
      uint64_t copied = old ? tm_malloc_usable_size(old) : 0;
      uint8_t* q = ALLOC_CALL_COPYING(tm_realloc(old, want), copied);
      if (!q) {
        b->p = old;
        break;
      }
      CHECK(spots(q, b->size, keep, b->tag, false), "iteration %u: realloc lost data", it);
      fill_block(q, want, b->tag);
      b->p = q;
      b->size = want;
      break;
    }
    case 4: {
      uint8_t* p = b->p;
      b->p = 0;
      FREE_CALL(p);
      uint64_t align = (uint64_t)32 << (rnd() % 17);
      uint8_t* q = ALLOC_CALL(tm_aligned_alloc(align, want));
      if (q) {
        CHECK(((uintptr_t)q & (align - 1)) == 0, "misaligned");
        fill_block(q, want, tag);
      }
      b->p = q;
      b->size = want;
      b->tag = tag;
      break;
    }
    default: {
      uint8_t* p = b->p;
      b->p = 0;
      FREE_CALL(p);
      uint8_t* q = ALLOC_CALL(tm_calloc(1, want));
      if (q) {
        for (uint64_t i = 0; i < want; ++i)
          CHECK(q[i] == 0, "iteration %u: calloc byte %llu not zero", it, (unsigned long long)i);
        fill_block(q, want, tag);
      }
      b->p = q;
      b->size = want;
      b->tag = tag;
    }
    }
    if (it % check_every == 0) check_heap();
  }
  for (unsigned i = 0; i < SLOTS; ++i) {
    uint8_t* p = live[i].p;
    live[i].p = 0;
    FREE_CALL(p);
  }
  check_heap();
  CHECK(kiln_heap_.in_use == 0 && kiln_heap_.top == kiln_heap_.base, "heap not empty at the end");
  CHECK(hand_back_on || kiln_heap_.release_calls == 0, "hand-back while off");
  CHECK(kiln_heap_.release_calls == stub_calls, "release_calls %llu, stub saw %llu",
        (unsigned long long)kiln_heap_.release_calls, (unsigned long long)stub_calls);
  printf("workload(%u, hand_back=%d, fail=%u%%): %llu calls, %llu MiB handed back, %llu "
         "redundant pages after failures\n",
         iterations, hand_back_on, fail_pct, (unsigned long long)kiln_heap_.release_calls,
         (unsigned long long)(kiln_heap_.released_bytes >> 20),
         (unsigned long long)redundant_pages);
  strict = true;
  fail_percent = 0;
}

int main(void) {
  if (getenv("CHECK_EVERY")) check_every = (unsigned)atoi(getenv("CHECK_EVERY"));
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO;
  sigaction(SIGSEGV, &sa, 0);
  scenario_top();
  scenario_interior();
  scenario_join();
  scenario_aligned();
  scenario_realloc();
  scenario_unaligned_region();
  workload(40000, true, 0);
  workload(20000, true, 10);
  workload(20000, false, 0);
  printf("malloc_host_test: ok\n");
  return 0;
}
