// The order in which loading a sandbox from a snapshot file reads the file's pages.
#pragma once

#include <kiln/memory/guest_memory.hpp>
#include <kiln/memory/prefetch.hpp>
#include <kiln/memory/snapshot_image.hpp>

#include <cstdint>
#include <span>
#include <vector>

namespace kiln::memory {

/// The reads a load plans. First the working set's pages that a file provides, by 2 MiB region
/// in the order the guest first touched each region; within a region in address order, a page
/// at most `gap_pages` past the end of the read before it (same file) extending that read, gap
/// included. On a virtual disk a small read costs about what a larger one does (latency-bound),
/// so reading a region's pages as a few runs beats one request per page in exact first-touch
/// order (bench/lazy_load_bench, a scattered 24 MiB working set in 256 MiB: 6,000 single-page
/// reads took about 200 ms, as long as reading the whole file three times). Then every page the
/// files provide, in address order, less the working-set reads of 256 KiB or more: smaller ones
/// are read again (a copy from the page cache), since skipping every working-set page cut the
/// rest into 6,000 requests of 39 KiB. A working set whose regions make up more than half the
/// file is not read first (see below). Pages the image leaves zero, or holds in memory (a memfd
/// layer), need no read. An eager load skips the working-set phase: one pass in address order is
/// the fastest way to everything.
struct load_plan {
  std::vector<prefetch_extent> extents; // in reading order, `host` where `mem` maps each
  std::vector<byte_range> guest;        // the guest-physical range of each extent
  std::size_t working_set_extents = 0;  // extents[0, this) are the working set
  bool one_pass = false;                // no selective working-set phase (see above)
};

/// The plan for `img` mapped as `mem`'s RAM, with `working_set` (guest page numbers in
/// first-touch order; empty for an eager load). Only layers mapped from files are read.
load_plan plan_load(const snapshot_image& img, const guest_memory& mem,
                    std::span<const std::uint32_t> working_set);

} // namespace kiln::memory
