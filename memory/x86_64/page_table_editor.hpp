// Edits live x86-64 identity page tables in guest memory: map, unmap and re-protect page ranges.
#pragma once

#include <kiln/memory/address.hpp>
#include <kiln/memory/guest_memory.hpp>
#include <kiln/memory/x86_64/page_tables.hpp>
#include <kiln/support/byte_codec.hpp>
#include <kiln/support/result.hpp>

#include <cstdint>
#include <optional>
#include <vector>

namespace kiln::memory::x86_64 {

/// Changes the leaf entries of the identity tables that build_identity_page_tables() placed in
/// guest memory. A range is set to a protection (none = not present); 2 MiB leaves are split
/// into a page table when a change covers part of one, and a page table whose 512 entries
/// become uniform again is folded back into one 2 MiB leaf (or an empty entry), its page
/// returned to the pool. Only entries whose value changes are written, and each write counts
/// as one edit: setting a range to what it already is costs nothing.
///
/// The caller must make the guest drop stale translations where rights were removed (the
/// guest reloads CR3 after a protect request; an unmapped range is also removed from the
/// backend, which faults a stale translation at the second stage).
///
/// Thread-safety: none; used by the sandbox's thread while its vCPU is stopped.
class page_table_editor {
public:
  /// Takes over the tables of `img` already written at `img.root` in `mem`, with table pages
  /// up to `max_bytes` from the root available for splits.
  page_table_editor(guest_memory& mem, const page_table_image& img, std::uint64_t max_bytes,
                    bool use_nx);

  /// The editor's own bookkeeping (the tables themselves live in guest memory), for snapshots.
  struct state {
    guest_phys_addr root;
    std::uint64_t pd_count = 0;
    std::uint64_t used_tables = 0;
    std::uint64_t max_tables = 0;
    std::vector<std::uint64_t> free; // table pages folded back, for reuse

    /// Appends the state as a snapshot stores it: u64 root, u64 PD count, u64 used tables,
    /// u64 max tables, u32 free count, then a u64 address per free table page.
    void encode(byte_writer& w) const;
    /// Reads what encode() wrote, checking it as the state of tables at `root` with `max_bytes`
    /// of table room (as the editor was built with) that map at least [0, address_limit): the
    /// root and capacity as given, used tables within the capacity, 1 to 512 PDs covering the
    /// limit, and each free page a page-aligned table page past the fixed ones (PML4, PDPT,
    /// PDs) and below the used ones. Errors: the reader's, naming the field.
    static result<state> decode(byte_reader& r, guest_phys_addr root, std::uint64_t max_bytes,
                                std::uint64_t address_limit);
  };
  /// Takes over tables described by `s` (restored in `mem` with the rest of guest memory).
  page_table_editor(guest_memory& mem, const state& s, bool use_nx);
  state save() const { return {root_, pd_count_, used_tables_, max_tables_, free_}; }
  /// Back to `s` (the tables in guest memory must be the ones `s` was saved with).
  void restore(const state& s) {
    root_ = s.root;
    pd_count_ = s.pd_count;
    used_tables_ = s.used_tables;
    max_tables_ = s.max_tables;
    free_ = s.free;
  }

  /// Sets every page of [start, start+size) (page-aligned, below the address limit the tables
  /// were built for) to `p`. Returns the number of entries written. Errors: unaligned,
  /// out_of_bounds, too_many_ranges (no free table page for a split; nothing was changed).
  result<std::uint64_t> set(guest_phys_addr start, std::uint64_t size, protection p);

  /// Table pages set() over [start, start+size) may take (at most 2: the partial 2 MiB chunks
  /// at its ends that have no table yet), so a caller can check several ranges up front.
  result<std::uint64_t> tables_needed(guest_phys_addr start, std::uint64_t size) const;
  /// Table pages still free for splits.
  std::uint64_t free_tables() const noexcept { return free_.size() + (max_tables_ - used_tables_); }

  /// Total entries written by set() so far.
  std::uint64_t edits() const noexcept { return edits_; }
  /// Table pages in use (PML4, PDPT, PDs and page tables).
  std::uint64_t tables_in_use() const noexcept { return used_tables_ - free_.size(); }
  std::uint64_t table_capacity() const noexcept { return max_tables_; }

private:
  std::uint64_t leaf_bits(protection p) const;
  result<std::uint64_t> read_entry(std::uint64_t addr) const;
  result<void> write_entry(std::uint64_t addr, std::uint64_t value);
  result<std::uint64_t> allocate_table();
  /// Tables that partial changes in [start, end) would need but do not have yet; given the
  /// leaf bits to set, a partial chunk whose leaf (or empty entry) already has them needs none.
  result<std::uint64_t> splits_needed(std::uint64_t start, std::uint64_t end,
                                      std::optional<std::uint64_t> bits = std::nullopt) const;
  /// End of the range the tables may map: the guest's address limit.
  std::uint64_t limit() const noexcept;

  guest_memory& mem_;
  guest_phys_addr root_;
  std::uint64_t pd_count_;          // PDs follow the PDPT: PD g maps [g GiB, g+1 GiB)
  std::uint64_t used_tables_;       // table pages handed out from the root upwards
  std::uint64_t max_tables_;        // table pages that fit the reserved area
  std::vector<std::uint64_t> free_; // addresses of table pages folded back, for reuse
  bool nx_;
  std::uint64_t edits_ = 0;
};

} // namespace kiln::memory::x86_64
