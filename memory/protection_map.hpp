// Per-page protection of guest memory as an interval map, and the differences a change makes.
#pragma once

#include <kiln/memory/address.hpp>
#include <kiln/memory/guest_memory.hpp>
#include <kiln/support/byte_codec.hpp>
#include <kiln/support/result.hpp>

#include <cstdint>
#include <map>
#include <span>
#include <vector>

namespace kiln::memory {

/// One stretch of pages whose protection changes, as computed by protection_map::tighten().
struct protection_change {
  guest_phys_addr start;
  std::uint64_t size = 0;
  protection from = protection::none;
  protection to = protection::none;
};

/// The recorded protection of every guest page that has one, kept as maximal ranges of equal
/// protection (adjacent equal ranges are merged). This is the bookkeeping that lets a change be
/// applied as its difference against what is already in place: tightening pages to the
/// protection they already have yields no change at all, so the caller issues no syscall, no
/// backend call and no page-table edit (Gramine #1708's lesson).
///
/// Thread-safety: none; owned by one sandbox.
class protection_map {
public:
  /// At most `max_ranges` ranges may exist at once: each distinct range costs the host a VMA and
  /// (on the emulated backend) an engine region, so a guest cannot split its memory page by
  /// page without bound.
  explicit protection_map(std::size_t max_ranges = 4096) : max_ranges_(max_ranges) {}

  /// Records [start, start+size) with protection `p` (page-aligned; must not overlap a recorded
  /// range). Used when regions are created.
  result<void> add(guest_phys_addr start, std::uint64_t size, protection p);
  /// Forgets [start, start+size) (it must be exactly covered by recorded ranges).
  result<void> remove(guest_phys_addr start, std::uint64_t size);

  /// Computes and records the change that sets [start, start+size) to `p`, which must be a
  /// subset of every covered page's current protection. Returns the stretches that actually
  /// change (empty when nothing does). Errors: out_of_bounds (a page with no recorded
  /// protection), protection_widened (some page would gain a right), too_many_ranges (the result
  /// would exceed the cap); on error nothing is recorded.
  result<std::vector<protection_change>> tighten(guest_phys_addr start, std::uint64_t size,
                                                 protection p);
  /// tighten() without recording anything: the changes it would make, or its error.
  result<std::vector<protection_change>> plan(guest_phys_addr start, std::uint64_t size,
                                              protection p) const;

  /// True if every page of [start, start+size) is recorded with exactly `p`.
  bool all(guest_phys_addr start, std::uint64_t size, protection p) const;
  /// The protection of the page holding `a`, or none if it has no recorded protection.
  protection at(guest_phys_addr a) const;

  std::size_t ranges() const noexcept { return ranges_.size(); }
  /// Every recorded range, in address order (from == to == its protection).
  std::vector<protection_change> list() const;
  std::size_t max_ranges() const noexcept { return max_ranges_; }

  /// The largest cap a saved map may carry.
  static constexpr std::uint64_t max_saved_ranges = 1u << 16;
  /// Appends the map as a snapshot stores it: u64 cap, u32 range count, then each range in
  /// address order as {u64 start, u64 size, u8 protection}.
  void encode(byte_writer& w) const;
  /// Reads what encode() wrote, checking it as the map of a guest whose RAM regions are
  /// `regions`: a cap up to max_saved_ranges and no more ranges than it, valid protections, and
  /// every page of every range inside one guest-owned region (guest_owned()) whose rights
  /// include the range's. Errors: the reader's, naming the field.
  static result<protection_map> decode(byte_reader& r, std::span<const region> regions);

private:
  struct range {
    std::uint64_t end;
    protection prot;
  };
  using map_t = std::map<std::uint64_t, range>; // start -> range
  /// Whether [start, end) is fully covered by recorded ranges.
  bool covered(std::uint64_t start, std::uint64_t end) const;
  /// Ranges after setting [start, end) to p in a copy of `m`, merged; used to check the cap
  /// before committing.
  static void assign(map_t& m, std::uint64_t start, std::uint64_t end, protection p);
  /// Splits the range straddling `at` (if any) in two at `at`.
  static void split_at(map_t& m, std::uint64_t at);

  map_t ranges_;
  std::size_t max_ranges_;
};

} // namespace kiln::memory
