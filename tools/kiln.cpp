// The `kiln` command-line tool: list backends, run a guest function.
#include "cli_values.hpp"

#include <kiln/runtime/sandbox.hpp>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cstdio>
#include <span>
#include <string>
#include <vector>

namespace {

int cmd_backends() {
  for (auto k : {kiln::vcpu::backend_kind::kvm, kiln::vcpu::backend_kind::emulated}) {
    const auto st = kiln::vcpu::probe(k);
    fmt::print("{:<9} {:<10} {}\n", kiln::vcpu::to_string(k), st.usable ? "usable" : "unusable",
               st.reason);
  }
  auto chosen = kiln::vcpu::resolve(kiln::vcpu::backend_choice::automatic);
  if (chosen)
    fmt::print("auto      -> {}\n", kiln::vcpu::to_string(*chosen));
  else
    fmt::print("auto      -> none: {}\n", chosen.err().message());
  return 0;
}

struct run_options {
  std::vector<std::string>
      positional;       // GUEST FUNCTION ARGS..., or FUNCTION ARGS... with --snapshot
  std::string snapshot; // --snapshot FILE
  std::string guest;
  std::string function;
  std::vector<std::string> args;
  std::string backend = "auto";
  std::string memory = "16M";
  std::string stack = "256K";
  std::string heap = "0";
  std::vector<std::string> map_files; // PATH or PATH=NAME
  bool stats = false;
  std::string load = "prefetch";         // --load MODE with --snapshot
  std::string save;                      // --save FILE: snapshot after the call
  bool save_whole = false;               // --whole: never a layered file
  std::vector<std::string> allow_mapped; // --allow-mapped DIR with --snapshot
  bool trust_mapped = false;             // --trust-mapped-files with --snapshot
};

/// The host functions every CLI run offers, so guests that call the host can be tried from here.
kiln::host_functions cli_host_functions() {
  kiln::host_functions host;
  host.add("host_add", [](std::int64_t a, std::int64_t b) { return a + b; });
  host.add("host_mul", [](std::int64_t a, std::int64_t b) { return a * b; });
  host.add("host_print", [](std::string s) { fmt::print("{}\n", s); });
  return host;
}

/// Fills `cfg` and `args` from the command line of `kiln run`. Returns 0, or 2 after printing
/// what is wrong with it.
int parse_run(run_options& o, kiln::sandbox_config& cfg, std::vector<kiln::value>& args) {
  // Positionals: GUEST FUNCTION ARGS..., or FUNCTION ARGS... when the guest comes from a file.
  const std::size_t need = o.snapshot.empty() ? 2 : 1;
  if (o.positional.size() < need) {
    fmt::print(stderr, "kiln: run needs {}\n",
               o.snapshot.empty() ? "GUEST FUNCTION [ARGS...]" : "FUNCTION [ARGS...]");
    return 2;
  }
  if (o.snapshot.empty()) o.guest = o.positional[0];
  o.function = o.positional[need - 1];
  o.args.assign(o.positional.begin() + static_cast<std::ptrdiff_t>(need), o.positional.end());
  cfg.guest_path = o.guest;
  auto backend = kiln::vcpu::parse_backend_choice(o.backend);
  if (!backend) {
    fmt::print(stderr, "kiln: --backend: {}\n", backend.err().message());
    return 2;
  }
  cfg.backend = *backend;
  struct {
    const char* option;
    const std::string& text;
    std::uint64_t& out;
  } const sizes[] = {{"--memory", o.memory, cfg.memory_size},
                     {"--stack", o.stack, cfg.stack_size},
                     {"--heap", o.heap, cfg.heap_size}};
  for (const auto& s : sizes) {
    auto v = kiln::cli::parse_size(s.text);
    if (!v) {
      fmt::print(stderr, "kiln: {}: {}\n", s.option, v.err().message());
      return 2;
    }
    s.out = *v;
  }
  for (const auto& m : o.map_files) {
    auto f = kiln::cli::parse_file_mapping(m);
    if (!f) {
      fmt::print(stderr, "kiln: --map-file: {}\n", f.err().message());
      return 2;
    }
    cfg.files.push_back(std::move(*f));
  }
  auto values = kiln::cli::parse_call_args(o.args);
  if (!values) {
    fmt::print(stderr, "kiln: bad argument: {}\n", values.err().message());
    return 2;
  }
  args = std::move(*values);
  cfg.load.count_faults = true; // the load report prints them
  auto mode = kiln::cli::parse_load_mode(o.load);
  if (!mode) {
    fmt::print(stderr, "kiln: --load: {}\n", mode.err().message());
    return 2;
  }
  cfg.load.mode = *mode;
  return 0;
}

/// --save FILE: snapshots `sb` after its call and reports what the file holds.
int save_after_run(kiln::sandbox& sb, const run_options& o) {
  auto snap = sb.take_snapshot();
  auto saved =
      snap ? snap->save(o.save, {.layered = !o.save_whole}) : kiln::result<void>(snap.err());
  if (!saved) {
    fmt::print(stderr, "kiln: cannot save {}: {}\n", o.save, saved.err().message());
    return 1;
  }
  if (auto again = kiln::snapshot::load(o.save, kiln::mapped_file_policy::any())) {
    const auto files = again->files();
    const auto stored = again->stored_bytes();
    fmt::print(stderr, "saved {}: {} KiB stored{}\n", o.save, stored ? *stored / 1024 : 0,
               files.size() > 1 ? ", over " + files[files.size() - 2] : std::string());
  }
  return 0;
}

/// --stats for a sandbox loaded from a file: waits for the load to finish and reports its
/// timeline.
void print_load_stats(kiln::sandbox& sb) {
  sb.wait_loaded();
  const auto w = sb.stats().load;
  const char* mode = w.mode == kiln::load_mode::prefetch ? "prefetch"
                     : w.mode == kiln::load_mode::demand ? "demand"
                                                         : "eager";
  auto ms = [](std::chrono::nanoseconds d) { return d.count() / 1e6; };
  fmt::print(stderr, "load: {} ({}), working set {} pages\n", mode,
             w.mode == kiln::load_mode::demand ? "pages fault in"
             : w.io_uring                      ? "io_uring"
                                               : "worker thread",
             w.working_set_pages);
  fmt::print(stderr, "  vCPU could start after {:.2f} ms, first result after {:.2f} ms\n",
             ms(w.to_start), ms(w.to_first_result));
  if (w.working_set_resident)
    fmt::print(stderr, "  working set resident after {:.2f} ms, everything after {:.2f} ms\n",
               ms(w.to_working_set), ms(w.to_everything));
  fmt::print(stderr,
             "  {} KiB read ahead; {} page faults during the load ({} waited for the disk)\n",
             w.bytes_prefetched / 1024, w.faults, w.major_faults);
  if (w.bytes_prefaulted != 0)
    fmt::print(stderr, "  {} KiB pre-faulted in the second-level page tables\n",
               w.bytes_prefaulted / 1024);
  if (w.chunks_total != 0)
    fmt::print(stderr, "  {} of {} stored 2 MiB chunks checked against their checksums\n",
               w.chunks_checked, w.chunks_total);
}

/// --stats: what the run cost, on stderr.
void print_run_stats(kiln::sandbox& sb) {
  const auto s = sb.stats();
  fmt::print(
      stderr,
      "backend: {}\ncreate: {:.1f} us\ncall: {:.1f} us\nexits: {} ({} hypercalls, {} other)\n"
      "host calls: {}\nvcpu runs: {}, memory map calls: {}\n",
      kiln::vcpu::to_string(sb.backend()), s.create_time.count() / 1e3,
      s.last_call_time.count() / 1e3, s.exits, s.exits_io, s.exits_other, s.host_calls, s.vcpu.runs,
      s.vcpu.map_calls);
  const auto& m = s.memory;
  fmt::print(stderr,
             "memory after create: {} host syscalls, {} backend calls, {} page-table edits\n"
             "protect requests: {} ({} changed nothing and cost nothing, {} refused)\n"
             "protection ranges: {}, page-table pages: {}\n"
             "hand-backs: {} ({} bytes discarded)\nfiles mapped: {}, unmapped: {}\n",
             m.host_syscalls, m.backend_calls, m.page_table_edits, m.protect_requests,
             m.protect_noops, m.protect_refused, m.protection_ranges, m.page_tables,
             m.release_requests, m.released_bytes, m.files_mapped, m.files_unmapped);
  if (s.load.from_file) print_load_stats(sb);
  if (auto rss = sb.resident_bytes())
    fmt::print(stderr, "guest RAM resident: {} KiB\n", *rss / 1024);
  for (const auto& f : sb.mapped_files())
    fmt::print(stderr, "file '{}': {} bytes at guest {:#x} ({})\n", f.name, f.size, f.guest_address,
               f.path);
}

int cmd_run(run_options o) {
  kiln::sandbox_config cfg;
  std::vector<kiln::value> args;
  if (const int rc = parse_run(o, cfg, args); rc != 0) return rc;
  kiln::result<std::unique_ptr<kiln::sandbox>> sb = kiln::error{};
  if (o.snapshot.empty()) {
    sb = kiln::sandbox::create(cfg, cli_host_functions());
  } else {
    const auto policy = o.trust_mapped ? kiln::mapped_file_policy::any()
                                       : kiln::mapped_file_policy{o.allow_mapped, {}};
    auto snap = kiln::snapshot::load(o.snapshot, policy);
    if (!snap) {
      fmt::print(stderr, "kiln: cannot load {}: {}\n", o.snapshot, snap.err().message());
      return 1;
    }
    sb = kiln::sandbox::create(*snap, cli_host_functions(), cfg);
  }
  if (!sb) {
    fmt::print(stderr, "kiln: cannot create sandbox: {}\n", sb.err().message());
    return 1;
  }
  auto r = (*sb)->call(o.function, args);
  const int rc = r ? 0 : 1;
  if (r)
    fmt::print("{}\n", kiln::to_string(*r));
  else
    fmt::print(stderr, "kiln: {} failed: {}\n", o.function, r.err().message());
  std::fflush(stdout);
  if (r && !o.save.empty())
    if (const int saved = save_after_run(**sb, o); saved != 0) return saved;
  if (o.stats) print_run_stats(**sb);
  return rc;
}

/// kiln snapshot GUEST -o FILE: boot the guest, run its init, save the state.
int cmd_snapshot(const std::string& guest, const std::string& out, const std::string& backend,
                 const std::string& memory, const std::vector<std::string>& map_files,
                 const std::vector<std::string>& record) {
  kiln::sandbox_config cfg;
  cfg.guest_path = guest;
  auto b = kiln::vcpu::parse_backend_choice(backend);
  if (!b) {
    fmt::print(stderr, "kiln: --backend: {}\n", b.err().message());
    return 2;
  }
  auto mem = kiln::cli::parse_size(memory);
  if (!mem) {
    fmt::print(stderr, "kiln: --memory: {}\n", mem.err().message());
    return 2;
  }
  cfg.backend = *b;
  cfg.memory_size = *mem;
  for (const auto& m : map_files) {
    auto f = kiln::cli::parse_file_mapping(m);
    if (!f) {
      fmt::print(stderr, "kiln: --map-file: {}\n", f.err().message());
      return 2;
    }
    cfg.files.push_back(std::move(*f));
  }
  auto sb = kiln::sandbox::create(cfg, cli_host_functions());
  if (!sb) {
    fmt::print(stderr, "kiln: cannot create sandbox: {}\n", sb.err().message());
    return 1;
  }
  auto snap = (*sb)->take_snapshot();
  if (!snap) {
    fmt::print(stderr, "kiln: snapshot failed: {}\n", snap.err().message());
    return 1;
  }
  if (!record.empty()) {
    // Run the recording call in a sandbox started from the snapshot, and keep the pages it
    // touched as the file's working set.
    auto args = kiln::cli::parse_call_args(std::span(record).subspan(1));
    if (!args) {
      fmt::print(stderr, "kiln: bad argument: {}\n", args.err().message());
      return 2;
    }
    auto rsb = kiln::sandbox::create(*snap, cli_host_functions(), cfg);
    if (!rsb) {
      fmt::print(stderr, "kiln: cannot create the recording sandbox: {}\n", rsb.err().message());
      return 1;
    }
    if (auto r = (*rsb)->start_recording(); !r) {
      fmt::print(stderr, "kiln: cannot record: {}\n", r.err().message());
      return 1;
    }
    if (auto r = (*rsb)->call(record[0], *args); !r) {
      fmt::print(stderr, "kiln: recording call {} failed: {}\n", record[0], r.err().message());
      return 1;
    }
    auto ws = (*rsb)->stop_recording();
    auto with = ws ? snap->with_working_set(*ws) : kiln::result<kiln::snapshot>(ws.err());
    if (!with) {
      fmt::print(stderr, "kiln: working set: {}\n", with.err().message());
      return 1;
    }
    fmt::print("working set: {} pages recorded during {}{}\n", ws->pages.size(), record[0],
               ws->complete ? "" : " (stopped early: a prefix)");
    *snap = std::move(*with);
  }
  if (auto r = snap->save(out); !r) {
    fmt::print(stderr, "kiln: cannot save {}: {}\n", out, r.err().message());
    return 1;
  }
  auto stored = snap->stored_bytes();
  fmt::print("{}: {} MiB of guest memory, {} KiB stored\n", out, snap->memory_size() >> 20,
             stored ? *stored / 1024 : 0);
  return 0;
}

int cmd_inspect(const std::string& path) {
  // Describing maps nothing: the recorded paths are shown as they are.
  auto snap = kiln::snapshot::load(path, kiln::mapped_file_policy::any());
  if (!snap) {
    fmt::print(stderr, "kiln: {}: {}\n", path, snap.err().message());
    return 1;
  }
  fmt::print("{}", snap->describe());
  return 0;
}

int cmd_verify(const std::string& path) {
  if (auto r = kiln::snapshot::verify(path); !r) {
    fmt::print(stderr, "kiln: {}: {}\n", path, r.err().message());
    return 1;
  }
  fmt::print("{}: every checksum matches and its state loads\n", path);
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  CLI::App app{"kiln: micro-VM sandboxes for untrusted code"};
  app.require_subcommand(1);
  auto* backends =
      app.add_subcommand("backends", "List the vCPU backends and whether each is usable here");
  run_options ro;
  auto* run = app.add_subcommand("run", "Run one function of a guest and print its result");
  run->add_option("items", ro.positional,
                  "GUEST FUNCTION [ARGS...] (FUNCTION [ARGS...] with --snapshot). Arguments: 5 "
                  "(i32), 5:i64, 5:u64, 2.5 (f64), true, str:text, hex:0a0b")
      ->required();
  run->add_option("--snapshot", ro.snapshot, "Start the sandbox from this .ksnap file");
  run->add_option("--backend", ro.backend,
                  "auto, kvm or emulated (default auto; KILN_BACKEND too)");
  run->add_option("--memory", ro.memory, "Guest memory size (default 16M)");
  run->add_option("--stack", ro.stack, "Guest stack size (default 256K)");
  run->add_option("--heap", ro.heap, "Guest heap size (default 0: all memory left)");
  run->add_option("--map-file", ro.map_files,
                  "Map a host file read-only into the guest: PATH or PATH=NAME (repeatable)");
  run->add_flag("--stats", ro.stats,
                "Print create time, call time, exits and memory counters to stderr");
  run->add_option(
      "--load", ro.load,
      "With --snapshot: prefetch (default: start at once, io_uring reads the working set "
      "then the rest), demand (pages fault in) or eager (read everything first)");
  run->add_option("--save", ro.save,
                  "After a successful call, save a snapshot here (with --snapshot: a small layered "
                  "file over that one)");
  run->add_flag("--whole", ro.save_whole, "With --save: write a whole file, never a layered one");
  run->add_option("--allow-mapped", ro.allow_mapped,
                  "With --snapshot: host files the snapshot maps must lie under this directory "
                  "(repeatable; by default a snapshot file may map no host file)");
  run->add_flag("--trust-mapped-files", ro.trust_mapped,
                "With --snapshot: map whatever host files the snapshot names (files you wrote)");
  std::string snap_guest, snap_out, snap_backend = "auto", snap_memory = "16M";
  std::vector<std::string> snap_files;
  auto* snapshot =
      app.add_subcommand("snapshot", "Boot a guest, run its init and save the state as .ksnap");
  snapshot->add_option("guest", snap_guest, "Guest ELF file")->required();
  snapshot->add_option("-o,--output", snap_out, "The .ksnap file to write")->required();
  snapshot->add_option("--backend", snap_backend, "auto, kvm or emulated");
  snapshot->add_option("--memory", snap_memory, "Guest memory size (default 16M)");
  snapshot->add_option("--map-file", snap_files, "Map a host file: PATH or PATH=NAME");
  std::vector<std::string> snap_record;
  snapshot
      ->add_option("--record", snap_record,
                   "FUNCTION [ARGS...]: run this call from the snapshot and store the pages it "
                   "touches as the working set a load prefetches first")
      ->expected(1, -1);
  std::string inspect_path, verify_path;
  auto* inspect = app.add_subcommand("inspect", "Describe a .ksnap file");
  inspect->add_option("file", inspect_path, "The .ksnap file")->required();
  auto* verify = app.add_subcommand(
      "verify", "Check every checksum of a .ksnap file and everything a load checks");
  verify->add_option("file", verify_path, "The .ksnap file")->required();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (*backends) return cmd_backends();
  if (*run) return cmd_run(ro);
  if (*snapshot)
    return cmd_snapshot(snap_guest, snap_out, snap_backend, snap_memory, snap_files, snap_record);
  if (*inspect) return cmd_inspect(inspect_path);
  if (*verify) return cmd_verify(verify_path);
  return 2;
}
