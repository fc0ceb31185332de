// kiln::sandbox: one guest in its own micro-VM; call its functions, let it call host functions.
#pragma once

#include <kiln/memory/layout.hpp>
#include <kiln/runtime/errc.hpp>
#include <kiln/runtime/host_function.hpp>
#include <kiln/runtime/snapshot.hpp>
#include <kiln/runtime/value.hpp>
#include <kiln/support/result.hpp>
#include <kiln/vcpu/vcpu.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace kiln {

namespace detail {
struct sandbox_access;
} // namespace detail

/// A host file to map read-only into a sandbox.
struct file_mapping {
  std::string path;
  /// How the guest finds it (kiln_file_find); default: the file name without directories.
  /// 1..55 bytes, unique within the sandbox.
  std::string name;
  /// Guest-physical address in the file room (page-aligned); 0: the first free 2 MiB-aligned
  /// place.
  std::uint64_t guest_address = 0;
};

/// A host file mapped into a sandbox.
struct mapped_file_info {
  std::string name;
  std::string path;
  std::uint64_t guest_address = 0;
  std::uint64_t size = 0; // the file's size when mapped (the mapping is rounded up to pages)
};

/// Plain configuration of a sandbox.
/// How a sandbox created from a snapshot loaded from a .ksnap file brings the file's pages in.
/// In every mode the guest's RAM is a private copy-on-write mapping of the file; what differs is
/// when the pages come off the disk.
enum class load_mode {
  /// The default. The sandbox is returned at once; in the background an io_uring ring reads the
  /// working set the file recorded (in first-touch order), then the rest, into the page cache and
  /// pre-installs the mappings (MADV_POPULATE_READ) in bounded chunks. Nothing is written into
  /// the guest's mapping, so pages the guest already dirtied keep its data.
  prefetch,
  /// Nothing is read ahead: each page is read when the guest first touches it (a page fault).
  demand,
  /// Every page is read and mapped before create() returns.
  eager,
};

struct load_options {
  load_mode mode = load_mode::prefetch;
  /// false: do the prefetch with a worker thread (pread + madvise), as kiln does by itself when
  /// the kernel refuses io_uring (kernel.io_uring_disabled, seccomp).
  bool use_io_uring = true;
  /// Each read and populate covers at most this. 256 KiB with 8 in flight measured best on the
  /// build machine (5.2 GB/s from an evicted file; 1 MiB: 3.4 GB/s, 4 MiB: 1.7 GB/s).
  std::uint64_t chunk_bytes = 256ull << 10;
  unsigned queue_depth = 8; // reads in flight
  /// Count the host page faults the guest takes while the load is incomplete (with demand
  /// paging: always) into stats().load.faults. It costs two getrusage() calls around every run
  /// of the guest, so it is off unless asked for (the CLI's load report and the lazy-load
  /// benchmark ask).
  bool count_faults = false;
  /// Check the file's data against its chunk checksums as eager and prefetch loads read it
  /// (memory/load_check.hpp): eager fails creation on a bad chunk; prefetch makes the calls of
  /// every sandbox over that file fail with snapshot_corrupt from the moment it is found.
  /// Demand paging reads nothing itself and checks nothing (kiln verify checks a whole file).
  bool check_data = true;
};

struct sandbox_config {
  std::string guest_path;                  // the guest ELF
  std::uint64_t memory_size = 16ull << 20; // multiple of 2 MiB, 4 MiB..64 GiB
  std::uint64_t heap_size = 0;             // 0: all memory between image and stack
  std::uint64_t stack_size = 256ull << 10;
  vcpu::backend_choice backend = vcpu::backend_choice::automatic;
  std::string cmdline; // given to the guest through boot info
  /// Receives the guest's log lines. Default: written to stderr as "[guest] ...". The bytes are
  /// the guest's (not checked as UTF-8 or anything else). A sink that throws loses that line
  /// (counted in log_sink_errors and log_bytes_dropped; the first is reported through kiln's
  /// log hook); the call goes on.
  std::function<void(std::string_view)> log_sink;
  /// Bytes of guest log accepted per call (and during init); the rest is dropped and counted.
  std::uint64_t log_budget_per_call = 64ull << 10;
  /// Bytes of guest log accepted per second across calls, on average: a guest may write up to
  /// this much at once, then at this rate; the rest is dropped and counted. 0: no limit over
  /// time (the per-call budget still holds).
  std::uint64_t log_bytes_per_second = 1ull << 20;
  /// Guest-physical room above RAM for mapped host files (multiple of 2 MiB, at most 64 GiB).
  /// It costs address space only, never memory.
  std::uint64_t file_room = 1ull << 30;
  /// Host files mapped before the guest's init runs, so init can already find them.
  std::vector<file_mapping> files;
  /// How many distinct protection ranges the guest may create by tightening its pages. Each
  /// costs the host a VMA (and on the emulated backend an engine region); past the cap a
  /// protect request is answered KILN_MEMORY_LIMIT.
  std::size_t max_protection_ranges = 256;
  /// Apply guest memory requests as differences against the recorded state (the default).
  /// false applies every request in full even when it changes nothing; it exists to measure
  /// what the bookkeeping saves (bench/memory_bench), not for use.
  bool memory_bookkeeping = true;
  /// For sandbox::create(snapshot, ...) from a snapshot loaded from a file.
  load_options load;
};

/// How a sandbox created from a snapshot file was loaded (all zero for other sandboxes). Times
/// run from the start of sandbox::create().
struct load_stats {
  bool from_file = false;
  load_mode mode = load_mode::prefetch;
  bool io_uring = false;                      // the prefetch ran on io_uring (else a thread)
  std::chrono::nanoseconds to_start{};        // until the vCPU could run (create() returned)
  std::chrono::nanoseconds to_first_result{}; // until the first call's result
  std::chrono::nanoseconds to_working_set{};  // until the recorded working set was resident
  std::chrono::nanoseconds to_everything{};   // until every page of the file was resident
  bool working_set_resident = false, everything_resident = false;
  std::uint64_t working_set_pages = 0; // recorded in the file
  std::uint64_t bytes_prefetched = 0;  // read ahead (eager and prefetch)
  /// Mapped in the hardware's second-level page tables ahead of the guest, between runs, once
  /// resident (KVM_PRE_FAULT_MEMORY, KVM on Linux 6.10+; 0 elsewhere).
  std::uint64_t bytes_prefaulted = 0;
  /// With load_options::count_faults, the host page faults the guest took while the load was
  /// incomplete (for demand: always), on the threads that ran it (getrusage RUSAGE_THREAD around
  /// each run): `major` waited for the disk. 0 without it.
  std::uint64_t faults = 0, major_faults = 0;
  /// With load_options::check_data: 2 MiB chunks whose checksum matched as they were read, of
  /// the chunks the files hold (a parent file's chunk that a child file covers is never read,
  /// so never checked).
  std::uint64_t chunks_checked = 0, chunks_total = 0;
};

/// The guest pages a sandbox touched while recording, in first-touch order: what a snapshot
/// file stores so that loads can prefetch those pages first (snapshot::with_working_set).
struct working_set {
  std::uint64_t snapshot_id = 0;    // the snapshot the sandbox started from when recording began
  std::vector<std::uint32_t> pages; // guest page numbers (address / 4096), each once
  bool complete = true;             // false: recording stopped early, `pages` is a prefix
};

/// What a sandbox's memory bookkeeping counted after creation.
struct memory_stats {
  std::uint64_t host_syscalls = 0;    // mmap, mprotect, madvise on guest memory
  std::uint64_t backend_calls = 0;    // KVM memslot ioctls or Unicorn map/protect calls
  std::uint64_t page_table_edits = 0; // page-table entries written
  std::uint64_t protect_requests = 0; // guest protect requests served
  std::uint64_t protect_noops = 0;    // ...of which changed nothing (and cost nothing)
  std::uint64_t protect_refused = 0;  // refused (widening, not owned, unaligned, over the cap)
  std::uint64_t release_requests = 0; // guest hand-backs served
  std::uint64_t released_bytes = 0;   // bytes discarded by them
  std::uint64_t files_mapped = 0;
  std::uint64_t files_unmapped = 0;
  std::uint64_t protection_ranges = 0; // distinct protection ranges recorded now
  std::uint64_t page_tables = 0;       // page-table pages in use now
};

/// What a sandbox counted about itself.
struct sandbox_stats {
  std::chrono::nanoseconds create_time{}; // create(): memory, load, vCPU, guest init
  std::chrono::nanoseconds last_call_time{};
  std::uint64_t calls = 0;
  std::uint64_t host_calls = 0;
  std::uint64_t exits = 0;
  std::uint64_t exits_io = 0;    // hypercalls (port I/O)
  std::uint64_t exits_other = 0; // faults, halts, cancellations...
  std::uint64_t log_lines = 0;
  std::uint64_t log_bytes_dropped = 0; // over the per-call budget or the rate, or lost by the sink
  std::uint64_t log_sink_errors = 0;   // lines the log sink threw on
  std::uint64_t snapshots = 0;
  std::uint64_t restores = 0;
  std::chrono::nanoseconds last_restore_time{};
  std::uint64_t last_restore_pages = 0;  // pages the last restore brought back
  std::uint64_t last_restore_copied = 0; // ...of which by copying (the rest were dropped)
  memory_stats memory;
  vcpu::vcpu_stats vcpu;
  load_stats load;
};

/// A guest running in its own VM (KVM) or engine (emulated).
///
/// Lifecycle: create() loads the guest and runs its init until it signals ready; call() runs one
/// guest function to completion. A guest-caused failure (fault, abort, protocol violation,
/// cancellation) poisons the sandbox: later calls fail with errc::poisoned and
/// poison_reason() says why. Bad guest behaviour never takes the host process down.
///
/// Thread-safety: none; use a sandbox from one thread at a time (the async runtime binds each
/// sandbox to one worker thread). kick() is the exception: any thread may call it.
class sandbox {
public:
  ~sandbox();
  sandbox(const sandbox&) = delete;
  sandbox& operator=(const sandbox&) = delete;

  static result<std::unique_ptr<sandbox>> create(const sandbox_config& config,
                                                 host_functions functions = {});

  /// Creates a sandbox from a snapshot: its memory is a copy-on-write mapping of the snapshot's
  /// image and its vCPU starts in the captured state, so no guest code runs and restore() to
  /// `snap` is legal at once. From `config` only the backend, the log sink and budget, the
  /// protection cap and the bookkeeping switch apply; layout, files and guest come from the
  /// snapshot. The snapshot's mapped files are opened again and must be unchanged (same inode,
  /// size and modification time). The backend may differ from the one the snapshot was taken on.
  ///
  /// For a snapshot loaded from a file, `config.load` says how its pages come in (load_mode;
  /// prefetch by default, run on a thread of its own here, on the runtime's service thread
  /// under kiln::runtime), and stats().load how it went.
  static result<std::unique_ptr<sandbox>>
  create(const snapshot& snap, host_functions functions = {}, const sandbox_config& config = {});

  /// Blocks until a prefetch or eager load has brought every page of the file in (at once for
  /// other sandboxes). For tests and benchmarks; a server just lets it run.
  void wait_loaded();

  // ---- Working set ---------------------------------------------------------------------------

  /// Starts recording the guest pages touched from now on, in first-touch order, for a snapshot
  /// file to prefetch (snapshot::with_working_set). The sandbox must descend from a snapshot
  /// (created from or restored to one): the pages are that snapshot's. On the emulated backend
  /// every first touch is recorded exactly (memory::touch_recorder: the RAM is armed PROT_NONE
  /// and each first access is caught); on KVM the pages that became resident are appended after
  /// each call (PAGEMAP_SCAN), in address order within a call, so record there in a sandbox just
  /// created from an in-memory snapshot or with load_mode::demand (pages resident before are not
  /// seen). A prefetch still running is stopped. Recording ends at
  /// stop_recording(), and also before a snapshot, a restore or a guest memory request (the
  /// pages so far are kept). Errors: not_ready (during a call, not descending from a snapshot,
  /// already recording).
  result<void> start_recording();
  /// Ends recording and returns the pages. Errors: not_ready (nothing was recorded).
  result<working_set> stop_recording();

  // ---- Snapshots -----------------------------------------------------------------------------

  /// Captures the sandbox between calls. The I/O buffers are stored zeroed. Afterwards the
  /// sandbox's memory is itself a copy-on-write mapping of the new image, so a restore to it
  /// drops only what the guest dirties later. Errors: not_ready (a call is in progress or the
  /// guest is parked), poisoned.
  result<snapshot> take_snapshot();
  /// Brings the sandbox back to `snap`: memory byte for byte, registers, protections, mapped
  /// files; clears poison. For a snapshot this sandbox's memory already maps, the cost follows
  /// the pages dirtied since, not the memory size. `snap` must have this sandbox's layout (same
  /// memory, heap, stack and file room sizes). Errors: not_ready (a call in progress),
  /// out_of_bounds (another layout), and the file errors of map_file for the snapshot's files.
  result<void> restore(const snapshot& snap);

  /// Calls guest function `name` with `args`; returns its result. Errors: function_not_found,
  /// bad_arguments, guest_error, result_too_large (the sandbox stays usable); any poisoning
  /// error (see errc.hpp); poisoned if an earlier call poisoned it.
  result<value> call(std::string_view name, std::span<const value> args);

  /// Convenience: call("add", 2, 3) or call("concat", std::string("a"), std::string("b")).
  template <class... A>
  requires(std::is_constructible_v<value, A>&&...) result<value> call(std::string_view name,
                                                                      A&&... args) {
    const value a[] = {value{std::forward<A>(args)}..., value{}};
    return call(name, std::span<const value>(a, sizeof...(A)));
  }

  /// Makes a running call return errc::cancelled promptly (and poison the sandbox). Any thread.
  /// (Under kiln::runtime, kicks also drive time slicing; see resume().)
  void kick() noexcept;

  // ---- Resumable form of call(), for kiln::runtime -------------------------------------------
  // begin_call() writes the request; resume() runs the guest until the call finishes, fails,
  // is interrupted by kick(), or reaches an asynchronous host function (the sandbox is then
  // parked: hand the function's outcome back with finish_host_call() before resuming).
  // call() is begin_call() plus resume() until done. Same thread rules as call().

  /// An asynchronous host function the guest called, with checked arguments.
  struct pending_host_call {
    const host_function* function = nullptr;
    std::vector<value> args;
  };
  struct run_state {
    enum kind_t { done, failed, interrupted, host_call } kind = done;
    value result;           // done
    error err;              // failed (poisoning errors have already poisoned the sandbox)
    pending_host_call host; // host_call
  };
  result<void> begin_call(std::string_view name, std::span<const value> args);
  run_state resume();
  /// Hands an asynchronous host function's outcome to the guest (written to its in-buffer).
  result<void> finish_host_call(const host_call_outcome& outcome);
  /// Poisons the sandbox with `why` (the runtime does this for a cancelled or expired call).
  void poison_with(error why);
  /// True between begin_call() and the end of that call.
  bool in_call() const noexcept;

  // ---- Memory --------------------------------------------------------------------------------

  /// Maps a host file read-only into the guest's file room and lists it in boot info, where the
  /// guest library finds it by name. Sandboxes mapping the same file share its page cache.
  /// Only between calls. Errors: the open's errno (a missing file), file_not_regular,
  /// file_empty, file_name_invalid (bad or duplicate name), file_too_large (no free room big
  /// enough), overlapping_region / out_of_bounds / unaligned (a bad guest_address),
  /// too_many_ranges (32 files, or page tables full), not_ready (a call is in progress).
  result<mapped_file_info> map_file(const file_mapping& request);
  /// Unmaps the file mapped under `name`; the guest's later accesses to its pages fault.
  result<void> unmap_file(std::string_view name);
  std::vector<mapped_file_info> mapped_files() const;

  /// Bytes of the guest's RAM that hold host memory of its own now: pages it wrote or that were
  /// loaded for it alone, not the pages it shares with other sandboxes through a snapshot image
  /// (see memory::guest_memory::resident_bytes).
  result<std::uint64_t> resident_bytes() const;

  bool poisoned() const noexcept;
  /// Why the sandbox is poisoned (empty error if it is not).
  const error& poison_reason() const noexcept;

  vcpu::backend_kind backend() const noexcept;
  sandbox_stats stats() const noexcept;

private:
  struct impl;
  friend struct detail::sandbox_access;
  explicit sandbox(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

} // namespace kiln
