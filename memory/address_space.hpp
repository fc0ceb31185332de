// address_space: one guest's memory as a whole: RAM and its regions, the guest's own page
// protections, the page tables, the mapped host files, and the watches that catch a file
// truncated under the guest. It keeps these in step with each other and tells the guest's CPU
// (a guest_view) of every change.
#pragma once

#include <kiln/guest/abi.h>
#include <kiln/memory/file_fault_guard.hpp>
#include <kiln/memory/guest_memory.hpp>
#include <kiln/memory/guest_view.hpp>
#include <kiln/memory/mapped_files.hpp>
#include <kiln/memory/protection_map.hpp>
#include <kiln/memory/snapshot_image.hpp>
#include <kiln/memory/x86_64/page_table_editor.hpp>
#include <kiln/support/result.hpp>

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace kiln::memory {

/// The host mapping's protection of a RAM page whose guest rights are `p` in region `r`: a page
/// keeps the host's read-write until the guest first tightens it, then follows its rights (exec
/// is the guest's business).
protection host_level(const region& r, protection p) noexcept;

/// What the address space counted about the guest's requests and mapped files.
struct address_space_counters {
  std::uint64_t protect_requests = 0; // protect requests served
  std::uint64_t protect_noops = 0;    // ...of which changed nothing (and cost nothing)
  std::uint64_t protect_refused = 0;  // refused (widening, not owned, unaligned, over the cap)
  std::uint64_t release_requests = 0; // hand-backs served
  std::uint64_t released_bytes = 0;   // bytes discarded by them
  std::uint64_t files_mapped = 0;
  std::uint64_t files_unmapped = 0;
};

/// The memory a snapshot holds, as an address space is brought to it.
struct saved_memory {
  std::shared_ptr<const snapshot_image> image;
  std::span<const region> regions; // RAM regions, in order (files are in `files`)
  const protection_map& prot;
  const x86_64::page_table_editor::state& tables;
  std::span<const saved_file> files;
  bool nx = false; // the saved page tables carry NX bits
};

/// One guest's memory. Built in two steps: the RAM with its regions (guest_memory), then the
/// page tables, either fresh (init_fresh) or a snapshot's (init_saved). Everything after that
/// keeps RAM, protections, page tables, files and the guest's view in step; on a failure the
/// step in progress is undone where it can be.
///
/// Not movable: the file watches point into it. Thread-safety: none (the sandbox's thread),
/// except that a watch's fault handler writes the lost-page record from a signal handler.
class address_space {
public:
  /// `bookkeeping` off is a measurement mode: every protect request is applied whole, as if
  /// nothing were recorded (to show what the bookkeeping saves).
  address_space(guest_memory mem, bool bookkeeping)
      : mem_(std::move(mem)), bookkeeping_(bookkeeping) {}
  address_space(const address_space&) = delete;
  address_space& operator=(const address_space&) = delete;

  /// The guest's CPU, told of every change from here on. `lost_pages` is called from a signal
  /// handler when the guest touched a page a truncated file lost (async-signal-safe, with
  /// `context`).
  void attach(guest_view& view, void (*lost_pages)(void*) noexcept, void* context) noexcept;

  /// Page tables just built into RAM (`img`); the guest-owned regions start at their own rights,
  /// with room for `extra_ranges` distinct protection ranges the guest may add.
  result<void> init_fresh(const x86_64::page_table_image& img, bool nx, std::size_t extra_ranges);
  /// Page tables as a snapshot saved them; RAM is already backed by its image, which is
  /// watched from here on.
  result<void> init_saved(const x86_64::page_table_editor::state& tables, bool nx);
  /// After init_saved and the guest view's first map_memory: the snapshot's files and
  /// protections, and NX bits as this backend wants them (`nx`).
  result<void> adopt(const saved_memory& s, bool nx);

  guest_memory& ram() noexcept { return mem_; }
  const guest_memory& ram() const noexcept { return mem_; }
  const protection_map& protections() const noexcept { return prot_; }
  const mapped_files& files() const noexcept { return files_; }
  const address_space_counters& counters() const noexcept { return counters_; }
  /// The page tables' state as a snapshot records it.
  x86_64::page_table_editor::state saved_tables() const { return tables_->save(); }
  std::uint64_t page_table_edits() const noexcept { return tables_ ? tables_->edits() : 0; }
  std::uint64_t page_tables_in_use() const noexcept {
    return tables_ ? tables_->tables_in_use() : 0;
  }

  // ---- the guest's requests ----

  /// Serves one protect or release request from the guest: the status it reads back. An error
  /// is the host's (an mprotect that failed after the request was validated): the guest's
  /// memory state is then uncertain.
  result<std::uint32_t> serve(const kiln_memory_request& req);

  // ---- mapped files ----

  /// Maps the host file at `path` read-only as `name` (its last path component when empty), at
  /// guest address `at` (0: first fit), and updates the guest's file table.
  result<const mapped_file*> map_file(std::string_view path, std::string name, std::uint64_t at);
  /// Unmaps the file the guest knows as `name`. Errors: file_not_mapped.
  result<void> unmap_file(std::string_view name);
  /// The mapped files as a snapshot records them.
  std::vector<saved_file> saved_files() const;

  // ---- faults ----

  /// Whether a watch saw the guest touch a page a truncated file lost.
  bool lost_pages_seen() const noexcept {
    return faults_.first_lost.load(std::memory_order_relaxed) != 0;
  }
  /// What was lost, if the guest touched pages of a truncated file or snapshot file (`source`:
  /// the snapshot file's path, for the message).
  std::optional<std::string> describe_lost_pages(std::string_view source) const;
  /// A clearer account of a fault at `addr`, if it hit a page the guest tightened, a mapped
  /// file, non-executable data or the empty file room.
  std::optional<std::string> describe_fault(std::uint64_t addr, bool write, bool fetch,
                                            std::uint64_t rip) const;
  /// The host protection of every RAM page now (read-write except where the guest tightened).
  std::vector<protection> host_protections() const;

  // ---- snapshots ----

  /// RAM as a snapshot stores it: the I/O buffers zeroed, and pages the guest made
  /// inaccessible stored as zeros.
  result<std::shared_ptr<const snapshot_image>> capture() const;
  /// RAM becomes a copy-on-write mapping of `image` (just captured from it), watched when it
  /// has layers in a file.
  result<void> rebase(std::shared_ptr<const snapshot_image> image);
  /// Whether restoring to `image` maps RAM afresh (another image, or pages of a truncated file
  /// were patched) rather than reverting the pages dirtied since.
  bool restore_remaps(const snapshot_image* image) const noexcept;
  /// How a restore brought RAM back.
  struct restore_figures {
    std::uint64_t pages = 0;  // dirtied pages reverted
    std::uint64_t copied = 0; // ...of which copied back from the image (the rest dropped)
    bool remapped = false;    // RAM was mapped afresh (translated code over it is stale)
  };
  /// Brings memory back to `s` (same RAM layout: see same_layout): files, RAM, page tables and
  /// protections; `nx` as for adopt.
  result<restore_figures> restore(const saved_memory& s, bool nx);
  /// Whether a snapshot of RAM regions `regions` with these sizes fits this address space.
  bool same_layout(std::span<const region> regions, std::uint64_t memory_size,
                   std::uint64_t file_room) const noexcept;

private:
  bool owned(std::uint64_t addr, std::uint64_t end, bool heap_or_stack_only) const;
  result<std::uint32_t> serve_protect(std::uint64_t addr, std::uint64_t size, protection p);
  result<std::uint32_t> serve_release(std::uint64_t addr, std::uint64_t size);
  result<void> write_file_table();
  result<void> watch_image();
  result<void> sync_files(std::span<const saved_file> files);
  /// Host and view protections of RAM from `to`, given that they are now as in `prot_` (host
  /// protections of every range that is not read-write are re-applied when `remapped`).
  result<void> apply_protections(const protection_map& to, bool remapped);
  /// NX bits in the page tables' leaves as this backend wants them.
  result<void> retable(std::span<const region> regions);

  guest_memory mem_;
  bool bookkeeping_;
  guest_view* view_ = nullptr;
  protection_map prot_;                             // the guest-owned pages' rights
  std::optional<x86_64::page_table_editor> tables_; // the live page tables
  file_fault_state faults_;                         // outlives the watches below
  mapped_files files_;
  file_fault_watch image_watch_; // over RAM mapped from a snapshot file that could shrink
  address_space_counters counters_;
};

} // namespace kiln::memory
