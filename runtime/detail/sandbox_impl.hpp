// sandbox::impl: the state of one sandbox: its address space (memory/), its vCPU, its host
// functions and the call loop, shared by the sandbox_*.cpp files. Internal to runtime/.
#pragma once

#include <kiln/guest/abi.h>
#include <kiln/memory/address_space.hpp>
#include <kiln/memory/elf_loader.hpp>
#include <kiln/memory/layout.hpp>
#include <kiln/memory/snapshot_loader.hpp>
#include <kiln/memory/touch_recorder.hpp>
#include <kiln/runtime/detail/hypercall_table.hpp>
#include <kiln/runtime/detail/prefetch_driver.hpp>
#include <kiln/runtime/sandbox.hpp>

#include <boost/asio/any_io_executor.hpp>

#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace kiln::detail {

// What a hypercall or exit means for the call in progress.
struct step {
  enum kind_t { resume, done, fail, interrupted, park } kind = resume;
  value result;
  error err;
  kiln::sandbox::pending_host_call host;
  static step resume_guest() { return {}; }
  static step finished(value v) { return {done, std::move(v), {}, {}}; }
  static step failed(error e) { return {fail, {}, std::move(e), {}}; }
  static step kicked() { return {interrupted, {}, {}, {}}; }
  static step parked(kiln::sandbox::pending_host_call h) { return {park, {}, {}, std::move(h)}; }
};

/// A host function as a snapshot records it: what the guest was built against.
struct recorded_function {
  std::string name;
  std::vector<kiln_type> params;
  kiln_type returns = KILN_TYPE_VOID;
  bool operator==(const recorded_function&) const = default;
};

/// Everything a snapshot holds (kiln::snapshot shares it, immutable).
struct snapshot_state {
  std::uint64_t id = 0;
  vcpu::backend_kind taken_on{};
  bool nx = false; // the page tables carry NX bits (taken on KVM)
  std::uint64_t memory_size = 0, file_room = 0, heap_size = 0, stack_size = 0;
  std::string guest_path;
  memory::layout layout;
  std::vector<memory::region> regions; // RAM regions (files are in `files`)
  std::shared_ptr<const memory::snapshot_image> image;
  vcpu::registers regs;
  vcpu::special_registers sregs;
  vcpu::fpu_state fpu;
  memory::protection_map prot;
  memory::x86_64::page_table_editor::state tables;
  std::vector<memory::saved_file> files;
  std::vector<recorded_function> host_functions;
  std::vector<std::uint32_t> working_set; // guest pages in first-touch order (may be empty)
  std::string source;                     // the .ksnap it was loaded from, if any
};

/// The memory part of a snapshot, as an address space is brought to it.
inline memory::saved_memory saved_memory_of(const snapshot_state& s) {
  return {s.image, s.regions, s.prot, s.tables, s.files, s.nx};
}

} // namespace kiln::detail

namespace kiln {

struct sandbox::impl {
  sandbox_config config;
  host_functions functions;
  /// RAM, protections, page tables, mapped files and their watches (memory/address_space).
  memory::address_space space;
  memory::layout layout;
  std::unique_ptr<vcpu::vcpu> cpu;
  error poison;
  bool is_poisoned = false;
  bool ready = false;
  bool calling = false; // between begin_call and the end of that call
  std::chrono::steady_clock::time_point call_started;
  sandbox_stats stats;
  std::uint64_t log_budget = 0; // bytes of log the current call may still write
  // The log rate across calls (config.log_bytes_per_second): a bucket of up to one second's
  // bytes, refilled as time passes.
  double log_tokens = 0;
  std::chrono::steady_clock::time_point log_refilled{};
  std::vector<std::byte> scratch; // copy of out_buf for parsing; sized once

  std::uint64_t backend_calls_at_build = 0;

  impl(sandbox_config c, host_functions f, memory::guest_memory m)
      : config(std::move(c)), functions(std::move(f)),
        space(std::move(m), config.memory_bookkeeping),
        log_tokens(static_cast<double>(config.log_bytes_per_second)),
        log_refilled(std::chrono::steady_clock::now()) {}

  result<void> build(const memory::elf_image& image);
  result<value> run_until_ready();
  sandbox::run_state resume();
  /// Ends the call in progress with `e` (poisoning where e says so).
  sandbox::run_state fail_call(error e);
  /// snapshot_corrupt when a layer of the image under RAM failed its checksum (this sandbox's
  /// load or another's over the same file found it): one atomic load per layer otherwise.
  std::optional<error> known_corrupt() const;
  result<void> write_host_result(const host_call_outcome& outcome);
  void set_poison(error e) {
    is_poisoned = true;
    poison = std::move(e);
  }
  using step = detail::step;
  step on_exit(const vcpu::exit& e, bool init);
  // sandbox_hypercalls.cpp: one handler per port of the ABI, looked up in a table.
  using hypercall_handler = step (impl::*)(const detail::hypercall&);
  static const detail::hypercall_table<hypercall_handler> hypercalls;
  step on_hypercall(const vcpu::exits::io_out& io, bool init);
  step on_ready(const detail::hypercall& hc);
  step on_return(const detail::hypercall& hc);
  step on_host_call(const detail::hypercall& hc);
  step on_log(const detail::hypercall& hc);
  step on_abort(const detail::hypercall& hc);
  step on_exception_record(const detail::hypercall& hc);
  step on_exception(std::uint64_t vector, std::uint64_t error_code, std::uint64_t rip,
                    std::uint64_t cr2);
  result<std::span<const std::byte>> copy_out(std::uint32_t len);

  // sandbox_memory.cpp: the guest's memory requests and faults, told to the address space.
  /// Tells the address space of the vCPU (after both exist).
  void attach_space() noexcept;
  step on_memory_request(const detail::hypercall& hc);
  result<mapped_file_info> map_file(const file_mapping& request);
  /// An error naming lost mapped-file pages, if the guest touched any (checked after exits).
  std::optional<error> lost_file_pages() const;
  /// A clearer error for a fault at `addr`, if it hit a page the guest tightened or a file.
  std::optional<error> name_memory_fault(std::uint64_t addr, bool write, bool fetch,
                                         std::uint64_t rip) const;
  memory_stats memory_stats_now() const;

  // sandbox_snapshot.cpp
  std::shared_ptr<const detail::snapshot_state> base; // the snapshot RAM is a mapping of
  result<snapshot> take_snapshot();
  result<void> restore(const detail::snapshot_state& s);
  result<void> write_in(std::span<const std::byte> bytes);

  // sandbox_load.cpp: loading from a file, working-set recording. Declared after `space`, so
  // destroyed before it (the prefetch is cancelled before the image it reads goes).
  struct recording {
    std::uint64_t snapshot_id = 0;
    memory::touch_recorder recorder;  // emulated: every first touch, in order
    std::vector<std::uint32_t> pages; // KVM: pages found resident after each call
    std::vector<bool> seen;
  };
  std::optional<recording> rec;
  std::optional<working_set> recorded; // a recording that ended, until stop_recording()
  // The load from a file: the loader (memory/) owns the plan, the reads' descriptors and the
  // read-around policy; the driver runs its prefetch on the service thread. The loader is
  // declared first, so that it outlives the reads the driver may still have in flight.
  std::unique_ptr<memory::snapshot_loader> loader;
  std::shared_ptr<detail::prefetch_driver> prefetcher;
  std::uint32_t load_news = 0; // prefetcher->news() when the sandbox last heard it
  std::chrono::steady_clock::time_point load_started, prefetch_started;
  bool awaiting_first_result = false;
  bool load_complete = true; // false while a file's pages are still coming in (or demand)
  // Stage-2 pre-faulting (KVM): guest ranges the loader says are resident, pre-faulted between
  // runs.
  std::vector<memory::byte_range> to_prefault;
  void prefault_resident() noexcept;
  /// Refreshes stats.load when the prefetch has reached a milestone since the sandbox last
  /// heard: one atomic load otherwise.
  void hear_load() {
    if (prefetcher && !load_complete && prefetcher->news() != load_news) update_load_stats();
  }

  result<void> start_loading(const detail::snapshot_state& s, boost::asio::any_io_executor ex);
  /// Stops a prefetch in progress (its stats are kept).
  void cancel_loading() noexcept;
  /// Refreshes stats.load from the prefetch.
  void update_load_stats();
  result<void> start_recording();
  /// Ends a recording in progress into `recorded` (before anything that remaps or reprotects
  /// RAM, or hands it to the kernel).
  void end_recording() noexcept;
  void record_touched_pages();
  /// Around each run of the guest: fault counting, first result, KVM recording.
  void before_run(std::uint64_t& faults, std::uint64_t& major) const noexcept;
  bool counting_faults() const noexcept {
    return config.load.count_faults && stats.load.from_file &&
           (!load_complete || stats.load.mode == load_mode::demand);
  }
  void after_run(std::uint64_t faults, std::uint64_t major, bool call_ended) noexcept;

  /// How much of a log line of `len` bytes the rate over time lets through, now.
  std::uint64_t log_rate_allows(std::uint64_t len) noexcept;
  /// Hands one line to the sink (or stderr); a sink that throws loses the line, never the call.
  void emit_log(std::string_view line) noexcept;
};

namespace detail {
/// Reaches a sandbox's internals: for kiln's own tests and the runtime, not part of the API.
struct sandbox_access {
  static sandbox::impl& of(sandbox& sb) noexcept { return *sb.impl_; }
  /// sandbox::create(snap, ...) with the executor a prefetch is reaped on (the runtime's service
  /// io_context); a default-constructed one gives the prefetch a thread of its own.
  static result<std::unique_ptr<sandbox>> create_from_snapshot(const snapshot& snap,
                                                               host_functions functions,
                                                               const sandbox_config& config,
                                                               boost::asio::any_io_executor ex);
};
} // namespace detail

} // namespace kiln
