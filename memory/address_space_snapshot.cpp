// address_space: capturing RAM for a snapshot, and bringing memory back to one.
#include <kiln/memory/address_space.hpp>
#include <kiln/memory/layout.hpp>
#include <kiln/memory/memory_errc.hpp>

#include <algorithm>
#include <vector>

namespace kiln::memory {

namespace {

/// Dirty runs up to this many pages are copied back from the image (they stay resident and
/// the guest's next touch costs nothing); longer ones are dropped (one madvise, and the pages
/// stop costing memory until touched again). Measured on the 2-core build machine: one
/// MADV_DONTNEED costs about 50 us whatever its length, a 16-page copy about 2 us
/// (bench/snapshot_bench: 16 dirtied pages restore in 18 us copied, 69 us dropped).
constexpr std::uint64_t copy_back_max_pages = 64;

} // namespace

result<void> address_space::apply_protections(const protection_map& to, bool remapped) {
  // Walk the union of both maps' boundaries; each piece has one protection in each.
  std::vector<std::uint64_t> cuts;
  for (const auto& c : prot_.list())
    cuts.insert(cuts.end(), {c.start.value, c.start.value + c.size});
  for (const auto& c : to.list())
    cuts.insert(cuts.end(), {c.start.value, c.start.value + c.size});
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  for (std::size_t i = 0; i + 1 < cuts.size(); ++i) {
    const guest_phys_addr a{cuts[i]};
    const std::uint64_t len = cuts[i + 1] - cuts[i];
    const region* r = mem_.find(a);
    if (!r || !guest_owned(r->kind)) continue;
    const protection pf = prot_.at(a), pt = to.at(a);
    const protection host_from = remapped ? prot_rw : host_level(*r, pf);
    if (host_from != host_level(*r, pt)) KILN_TRY(mem_.host_protect(a, len, host_level(*r, pt)));
    if (pf != pt) KILN_TRY(view_->protect(a, len, pt));
  }
  return {};
}

result<void> address_space::watch_image() {
  const auto& img = mem_.image();
  const bool from_file = img && std::any_of(img->layers().begin(), img->layers().end(),
                                            [](const auto& l) { return l->base() != 0; });
  if (!from_file) {
    image_watch_ = {};
    return {};
  }
  // The size again, now that the file is mapped: one that shrank between the load's checks and
  // the mapping would otherwise only show when the guest touches a lost page.
  if (img->first_shrunk_file())
    return error(memory_errc::snapshot_truncated, "the snapshot file shrank after it was opened");
  KILN_TRY_ASSIGN(image_watch_,
                  file_fault_watch::create(mem_.host_address_for_mapping(guest_phys_addr{0}),
                                           mem_.size(), &faults_, /*writable=*/true));
  return {};
}

result<std::shared_ptr<const snapshot_image>> address_space::capture() const {
  // The I/O buffers are stored zeroed; pages the guest made inaccessible are PROT_NONE in the
  // host and dead to the guest, so they are stored as zeros too.
  const byte_range zeroed[] = {{fixed::io_in.value, fixed::io_in.value + fixed::io_buffer_size},
                               {fixed::io_out.value, fixed::io_out.value + fixed::io_buffer_size}};
  std::vector<byte_range> unreadable;
  for (const auto& c : prot_.list())
    if (const auto* r = mem_.find(c.start); r && host_level(*r, c.to) == protection::none)
      unreadable.emplace_back(c.start.value, c.start.value + c.size);
  return snapshot_image::capture(mem_, zeroed, unreadable);
}

result<void> address_space::rebase(std::shared_ptr<const snapshot_image> image) {
  // From now on RAM is a copy-on-write mapping of the new image: a restore to it drops only
  // what the guest dirties from here, and the image's pages are shared.
  KILN_TRY(mem_.back_with(std::move(image)));
  KILN_TRY(watch_image());
  return apply_protections(prot_, /*remapped=*/true);
}

bool address_space::same_layout(std::span<const region> regions, std::uint64_t memory_size,
                                std::uint64_t file_room) const noexcept {
  if (memory_size != mem_.size() || file_room != mem_.address_limit() - mem_.size()) return false;
  std::vector<const region*> ram;
  for (const auto& r : mem_.regions())
    if (r.kind != region_kind::file) ram.push_back(&r);
  if (ram.size() != regions.size()) return false;
  for (std::size_t i = 0; i < regions.size(); ++i)
    if (regions[i].start != ram[i]->start || regions[i].size != ram[i]->size ||
        regions[i].kind != ram[i]->kind || regions[i].prot != ram[i]->prot)
      return false;
  return true;
}

bool address_space::restore_remaps(const snapshot_image* image) const noexcept {
  // After lost pages of a truncated snapshot file were patched, the mapping is not the image's
  // any more: it is mapped afresh.
  return mem_.image().get() != image || lost_pages_seen();
}

result<address_space::restore_figures> address_space::restore(const saved_memory& s, bool nx) {
  KILN_TRY(sync_files(s.files));
  // Host pages the guest tightened go back to read-write first (copy-back writes them), then
  // the memory, then the snapshot's protections.
  for (const auto& c : prot_.list())
    if (const auto* r = mem_.find(c.start); r && host_level(*r, c.to) != prot_rw)
      KILN_TRY(mem_.host_protect(c.start, c.size, prot_rw));
  restore_figures out;
  out.remapped = restore_remaps(s.image.get());
  if (out.remapped) {
    KILN_TRY(mem_.back_with(s.image));
    KILN_TRY(watch_image());
  } else {
    KILN_TRY_ASSIGN(auto dirty, mem_.dirty_ranges());
    for (const auto& [b, e] : dirty) {
      const std::uint64_t n = (e - b) / page_size;
      const bool copy = n <= copy_back_max_pages;
      KILN_TRY(mem_.revert(guest_phys_addr{b}, e - b, copy));
      out.pages += n;
      out.copied += copy ? n : 0;
    }
  }
  tables_->restore(s.tables);
  KILN_TRY(apply_protections(s.prot, /*remapped=*/true));
  prot_ = s.prot;
  if (nx != s.nx) KILN_TRY(retable(s.regions)); // taken on the other backend
  faults_.first_lost.store(0, std::memory_order_relaxed);
  return out;
}

} // namespace kiln::memory
