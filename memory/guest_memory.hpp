// Guest memory: one host mapping split into named regions, with checked accessors.
#pragma once

#include <kiln/memory/address.hpp>
#include <kiln/memory/host_mapping.hpp>
#include <kiln/memory/layout.hpp>
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/snapshot_image.hpp>
#include <kiln/memory/touch_recorder.hpp>
#include <kiln/support/result.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace kiln::memory {

enum class region_kind {
  boot_info,     // boot info page (+ command line, file table), read-only to the guest
  system_tables, // GDT and TSS, read-only
  page_tables,   // the identity page tables; not mapped in the guest's virtual view
  ist_stack,     // exception-handler stack
  io_in,         // host -> guest buffer
  io_out,        // guest -> host buffer
  image,         // one loadable ELF segment
  heap,          // the guest-owned heap
  stack,         // the guest stack (an unmapped guard page lies below it)
  file,          // a host file mapped read-only (in the file room above guest RAM)
};

/// What backs a region's host pages.
enum class region_backing {
  anonymous, // private zero-filled memory, part of the guest's RAM mapping
  file,      // a host file mapped MAP_SHARED read-only: its pages are the page cache's
};

const char* to_string(region_kind k) noexcept;

/// Whether the guest owns the pages of a region of kind `k`: it may tighten their protection
/// (image, heap, stack). kiln's own regions and mapped files keep the rights kiln gave them.
constexpr bool guest_owned(region_kind k) noexcept {
  switch (k) {
  case region_kind::image:
  case region_kind::heap:
  case region_kind::stack:
    return true;
  case region_kind::boot_info:
  case region_kind::system_tables:
  case region_kind::page_tables:
  case region_kind::ist_stack:
  case region_kind::io_in:
  case region_kind::io_out:
  case region_kind::file:
    return false;
  }
  return false;
}

struct region {
  std::string name; // e.g. "image.text", "heap"
  region_kind kind;
  guest_phys_addr start;
  std::uint64_t size = 0; // page-aligned
  protection prot = protection::none;
  /// False for regions the guest must not reach through its page tables (the page tables
  /// themselves). The backend still maps them so the CPU's page walker can read them.
  bool guest_visible = true;
  region_backing backing = region_backing::anonymous;

  guest_phys_addr end() const { return start + size; }
  bool contains(guest_phys_addr a) const { return a >= start && a < end(); }
};

/// The region of kind `k` as kiln puts it in a guest laid out as `l` with a stack of
/// `stack_size` bytes: where, how large, with which rights, named for its kind. The fixed low
/// regions, the page tables (not guest-visible), heap and stack; nothing for image and file
/// regions, which have no one place. Building a sandbox and checking a saved one both go by it.
std::optional<region> kiln_region(region_kind k, const layout& l, std::uint64_t stack_size);

/// All of one sandbox's guest memory: guest-physical [0, size()) is the guest's RAM, backed by
/// one private anonymous host mapping; [size(), address_limit()) is the file room, reserved
/// inaccessible in the host until a host file is mapped into part of it. The regions are the
/// parts the guest may use. Gaps between regions are never mapped into the guest (null page,
/// guard pages), and the whole reservation is fenced by PROT_NONE host guard pages.
///
/// Every host syscall issued on the guest's memory after creation goes through this class and
/// is counted (host_syscalls()), so the bookkeeping above it can prove it issues none for
/// changes that change nothing.
///
/// Thread-safety: not synchronised; owned and used by one sandbox's thread.
class guest_memory {
public:
  /// Reserves `size` bytes (page-aligned, 4 MiB to 64 GiB) of zeroed memory, plus `file_room`
  /// bytes (page-aligned) of inaccessible room for mapped files after it.
  static result<guest_memory> create(std::uint64_t size, std::uint64_t file_room = 0);

  std::uint64_t size() const noexcept { return mapping_.size(); }
  /// End of the guest-physical address space: RAM plus the file room.
  std::uint64_t address_limit() const noexcept { return mapping_.size() + mapping_.extra(); }

  /// Adds a region; refuses overlap, misalignment and ranges outside the address space. File
  /// regions must lie in the file room, all others in RAM.
  result<void> add_region(region r);
  /// Removes the region starting at `start` (only file regions can be removed).
  result<void> remove_region(guest_phys_addr start);
  const std::vector<region>& regions() const noexcept { return regions_; }
  /// The region containing `a`, or nullptr.
  const region* find(guest_phys_addr a) const noexcept;
  const region* find(region_kind k) const noexcept;

  /// Copies guest bytes [a, a+out.size()) into `out`. The range must lie inside one region.
  result<void> read(guest_phys_addr a, std::span<std::byte> out) const;
  /// Copies `in` into guest memory at `a`. The range must lie inside one region.
  result<void> write(guest_phys_addr a, std::span<const std::byte> in);
  /// Writes zeros over [a, a+len), inside one region.
  result<void> zero(guest_phys_addr a, std::uint64_t len);

  template <class T>
  requires std::is_trivially_copyable_v<T> result<T> read_object(guest_phys_addr a)
  const {
    T v;
    KILN_TRY(read(a, std::as_writable_bytes(std::span<T, 1>(&v, 1))));
    return v;
  }
  template <class T>
  requires std::is_trivially_copyable_v<T> result<void> write_object(guest_phys_addr a,
                                                                     const T& v) {
    return write(a, std::as_bytes(std::span<const T, 1>(&v, 1)));
  }

  // ---- Host-side changes, each one syscall, each counted --------------------------------------

  /// mprotect()s [a, a+len) of RAM to `p` (exec is a guest-side right and is ignored here).
  result<void> host_protect(guest_phys_addr a, std::uint64_t len, protection p);
  /// Discards [a, a+len) of RAM (MADV_DONTNEED): the pages read as zero afterwards and stop
  /// counting as resident.
  result<void> discard(guest_phys_addr a, std::uint64_t len);
  /// Maps `len` bytes (page multiple) of the file `fd` read-only and shared at file-room address
  /// `a`. The mapping keeps no reference to `fd`.
  result<void> map_file(guest_phys_addr a, std::uint64_t len, int fd);
  /// Returns [a, a+len) of the file room to inaccessible reserved memory.
  result<void> unmap_file(guest_phys_addr a, std::uint64_t len);
  /// Bytes of [a, a+len) that hold host memory of this guest's own: present pages other than
  /// the kernel's shared zero page, and for RAM mapped from a snapshot image only the private
  /// (written) copies, not the image's shared pages (PAGEMAP_SCAN on Linux 6.7+, else
  /// /proc/self/pagemap). Not counted as a change.
  result<std::uint64_t> resident_bytes(guest_phys_addr a, std::uint64_t len) const;
  // ---- Snapshot images ---------------------------------------------------------------------

  /// Makes RAM a private (copy-on-write) mapping of `img`: anonymous zero memory, with each of
  /// the image's extents mapped MAP_PRIVATE from its layer on top (1 + extents mmaps). The guest
  /// sees the image's bytes, its writes stay private. Host protections of RAM go back to
  /// read-write; the caller re-applies any narrower ones.
  result<void> back_with(std::shared_ptr<const snapshot_image> img);
  /// The image RAM is a private mapping of, or null for plain anonymous RAM.
  const std::shared_ptr<const snapshot_image>& image() const noexcept { return image_; }
  /// RAM ranges holding pages written since RAM was last backed by its image (present pages
  /// that are no longer the image's); without an image, all present pages. PAGEMAP_SCAN on
  /// Linux 6.7+ (cost proportional to the pages mapped), /proc/self/pagemap otherwise.
  result<std::vector<byte_range>> dirty_ranges() const;
  /// RAM ranges whose pages are mapped in the host now, the image's shared pages included (what
  /// the guest, or the host for it, has touched since RAM was mapped, plus what was prefetched).
  result<std::vector<byte_range>> resident_ranges() const;
  /// RAM ranges the guest (or the host for it) has touched since they were last unmapped: every
  /// present page, the shared zero page included (a read of a hole maps it). What recording on
  /// KVM reads after each call, where no fault reaches user space.
  result<std::vector<byte_range>> touched_ranges() const;
  /// Unmaps every RAM page that holds nothing of the guest's own (a page still the image's, or
  /// the shared zero page), so that the next touch of each faults again and shows in
  /// touched_ranges(). Nothing is lost: the image's pages stay in the page cache. Pages written
  /// since RAM was backed stay mapped. Between runs only. Counted in host_syscalls().
  result<void> unmap_clean();
  /// Whether a fault on RAM mapped from an image reads around the faulting page (the kernel's
  /// default, MADV_NORMAL) or only that page (MADV_RANDOM). Counted in host_syscalls().
  result<void> set_read_around(bool on);
  /// Starts recording the first touch of each RAM page (touch_recorder), page i being at host
  /// protection page_prot[i] now (protection::none: not recorded).
  result<touch_recorder> record_touches(std::span<const protection> page_prot) const;
  /// Brings [a, a+len) of RAM back to the image's bytes: by copying them in (`copy`, the pages
  /// stay resident) or by dropping the private pages (MADV_DONTNEED; the next touch maps the
  /// image's page). Requires an image; the range must be host-writable for `copy`.
  result<void> revert(guest_phys_addr a, std::uint64_t len, bool copy);

  /// Syscalls issued by the functions above.
  std::uint64_t host_syscalls() const noexcept { return host_syscalls_; }

  /// True if host address `p` lies in this guest's reservation; for fault handlers.
  bool owns_host_address(const void* p) const noexcept {
    auto* b = static_cast<const std::byte*>(p);
    return b >= mapping_.data() && b < mapping_.data() + address_limit();
  }

  /// The guest-physical address that host address `p` maps (RAM or the file room), or nothing
  /// when `p` is outside this guest's reservation: for reports about a host fault, such as a
  /// mapped file's page that was truncated away. The one place host pointers become guest
  /// addresses.
  std::optional<guest_phys_addr> guest_address_of(const void* p) const noexcept {
    if (!owns_host_address(p)) return std::nullopt;
    return guest_phys_addr{
        static_cast<std::uint64_t>(static_cast<const std::byte*>(p) - mapping_.data())};
  }

  /// The host address of guest-physical `a` for handing a region to a hypervisor (KVM memslot,
  /// Unicorn uc_mem_map_ptr). Only backends may use it, and only to map whole regions.
  /// SAFETY: valid while this guest_memory lives; bounds are the caller's region's.
  std::byte* host_address_for_mapping(guest_phys_addr a) const noexcept {
    return mapping_.data() + a.value;
  }

private:
  explicit guest_memory(host_mapping m) : mapping_(std::move(m)) {}
  /// Checks that [a, a+len) lies inside one region; returns it.
  result<const region*> check_range(guest_phys_addr a, std::uint64_t len) const;
  /// Checks that [a, a+len) is page-aligned and inside RAM (room = false) or the file room.
  result<std::byte*> host_range(guest_phys_addr a, std::uint64_t len, bool room) const;

  host_mapping mapping_;
  std::vector<region> regions_; // sorted by start
  std::uint64_t host_syscalls_ = 0;
  std::shared_ptr<const snapshot_image> image_;
};

} // namespace kiln::memory
