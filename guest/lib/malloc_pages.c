/* The guest allocator's clean-page bookkeeping: which heap pages read as zero and are not
 * resident, and when free ranges go back to the host (kiln_release). */
#include "malloc_internal.h"

/* A page is *clean* when it reads as zero and is not resident: never written since boot, or
 * handed back with kiln_release and not handed out since. The allocator never writes a clean
 * page itself (stores are slow under the emulator and would make it resident again) and never
 * hands a clean page back. It knows where clean pages are from two facts:
 *   - everything from page_up(high_water) up is clean;
 *   - a free chunk's interior, [page_up(c + META), page_down(c + size)), is never written by the
 *     allocator (a free chunk's metadata is its first META bytes; the next chunk's prev_size
 *     lies past its end). A free chunk with F_CLEAN has one clean page range
 *     [clean_lo, clean_hi) inside its interior, and no other clean pages the allocator could
 *     hand back; without F_CLEAN it has none. In-use chunks are handed out: their pages count as
 *     written. Splitting a free chunk gives each free piece the part of the range inside that
 *     piece's interior; coalescing joins ranges (see kiln_heap_settle()).
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

/* The heap is the guest's own memory, but a corrupted range would make us hand back live data,
 * so it is checked against the interior. */
struct range kiln_heap_clean_of(struct chunk* c) {
  if (!(c->head & F_CLEAN)) return no_pages;
  struct range r = {c->clean_lo, c->clean_hi}, in = interior((uint8_t*)c, csize(c));
  if (is_empty(r) || r.lo < in.lo || r.hi > in.hi ||
      (((uintptr_t)r.lo | (uintptr_t)r.hi) & (PAGE - 1)))
    heap_corrupt("heap corrupted: bad clean range in a free chunk");
  return r;
}

void kiln_heap_set_clean(struct chunk* c, struct range r) {
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
  if (!kiln_heap_.hand_back) return false;
  ++kiln_heap_.release_calls;
  if (kiln_release(lo, (size_t)(hi - lo)) != KILN_MEMORY_OK) return false;
  kiln_heap_.released_bytes += (uint64_t)(hi - lo);
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

struct range kiln_heap_settle(uint8_t* p, uint64_t size, const struct range* parts, unsigned n) {
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

void kiln_heap_top_dropped(const struct range* parts, unsigned n) {
  uint8_t* t = page_up(kiln_heap_.top);
  if (kiln_heap_.high_water <= t) return;
  uint8_t* hi = page_up(kiln_heap_.high_water);
  if (n == 0 && (uint64_t)(hi - t) < KILN_RELEASE_MIN) return;
  /* With clean pieces merged, hand back even a small rest: [top, high_water) is not tracked, so
   * keeping high_water would forget their pages. */
  if (hand_back_gaps(t, hi, parts, n)) kiln_heap_.high_water = t;
}
