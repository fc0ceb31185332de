// Benchmark: a sandbox started from a .ksnap file evicted from the page cache, loaded eager,
// demand and prefetch: time to first result and to working-set residency, beside the disk's
// sequential read bandwidth measured on the same file in the same run.
//
//   lazy_load_bench [--runs N] [--dir DIR] [--shape scattered|clustered]
//
// The snapshot is a 256 MiB memory_test guest that wrote every page of its heap, with a
// recorded working set of 6144 heap pages (24 MiB, plus a few stack and data pages): scattered
// one by one over the whole heap (default), or clustered in 64 runs of 384 KiB spread over it.
#include "bench_support.hpp"

#include <kiln/runtime/sandbox.hpp>
#include <kiln/support/unique_fd.hpp>

#include <fmt/format.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace {

using clock_type = std::chrono::steady_clock;
using kiln::bench::call;
constexpr std::uint64_t page = 4096, mib = 1ull << 20;
constexpr std::uint64_t memory_mib = 256;
constexpr std::uint64_t ws_pages = 6144; // 24 MiB
constexpr std::uint64_t seed = 12345;
constexpr std::int64_t fill_value = 0x5A5A;

[[noreturn]] void die(std::string_view what, const kiln::error& e) {
  fmt::print(stderr, "{} failed: {}\n", what, e.message());
  std::exit(1);
}
[[noreturn]] void die_errno(std::string_view what) {
  fmt::print(stderr, "{} failed: {}\n", what, std::strerror(errno));
  std::exit(1);
}

double ms(clock_type::duration d) {
  return std::chrono::duration<double, std::milli>(d).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

kiln::unique_fd open_or_die(const std::string& path) {
  kiln::unique_fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) die_errno("open " + path);
  return fd;
}

/// Pages of the file behind `fd` that mincore finds in the page cache (mapping the file touches
/// none of them).
std::uint64_t resident_pages(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) die_errno("fstat");
  const auto size = static_cast<std::uint64_t>(st.st_size);
  if (size == 0) return 0;
  void* m = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  if (m == MAP_FAILED) die_errno("mmap for mincore");
  std::vector<unsigned char> vec((size + page - 1) / page);
  if (::mincore(m, size, vec.data()) != 0) die_errno("mincore");
  ::munmap(m, size);
  return static_cast<std::uint64_t>(
      std::count_if(vec.begin(), vec.end(), [](unsigned char c) { return c & 1; }));
}

/// Drops `path` from the page cache (fdatasync, then POSIX_FADV_DONTNEED, retried while pages
/// remain) and returns how many of its pages are still resident. Nothing may map the file.
std::uint64_t evict(const std::string& path) {
  const auto fd = open_or_die(path);
  if (::fdatasync(fd.get()) != 0) die_errno("fdatasync");
  std::uint64_t left = 0;
  for (int attempt = 0; attempt < 3; ++attempt) {
    if (int e = ::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_DONTNEED); e != 0) {
      errno = e;
      die_errno("posix_fadvise(DONTNEED)");
    }
    left = resident_pages(fd.get());
    if (left == 0) break;
  }
  return left;
}

/// MiB/s of reading the whole (evicted) file with 1 MiB preads, one at a time.
double sequential_mib_s(const std::string& path) {
  const auto fd = open_or_die(path);
  constexpr std::size_t chunk = mib;
  std::unique_ptr<char[]> buf(new char[chunk]);
  std::uint64_t done = 0;
  const auto t0 = clock_type::now();
  for (;;) {
    const ssize_t n = ::pread(fd.get(), buf.get(), chunk, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) die_errno("pread");
    if (n == 0) break;
    done += static_cast<std::uint64_t>(n);
  }
  const double secs = std::chrono::duration<double>(clock_type::now() - t0).count();
  return static_cast<double>(done) / mib / secs;
}

const char* fs_name(long type) {
  switch (static_cast<unsigned long>(type)) {
  case 0xEF53:
    return "ext2/3/4";
  case 0x58465342:
    return "xfs";
  case 0x9123683E:
    return "btrfs";
  case 0x794C7630:
    return "overlayfs";
  case 0x01021994:
    return "tmpfs";
  case 0x858458F6:
    return "ramfs";
  default:
    return "other";
  }
}

/// The first candidate directory on a file system with a disk behind it (not tmpfs or ramfs).
std::string pick_dir(const std::vector<std::string>& candidates) {
  for (const auto& d : candidates) {
    struct statfs sf {};
    if (d.empty() || ::statfs(d.c_str(), &sf) != 0) continue;
    const auto t = static_cast<unsigned long>(sf.f_type);
    if (t == 0x01021994 || t == 0x858458F6) {
      fmt::print("{}: {} (no disk behind it), not used\n", d, fs_name(sf.f_type));
      continue;
    }
    fmt::print("snapshot file in {} ({}, f_type {:#x})\n", d, fs_name(sf.f_type), t);
    return d;
  }
  fmt::print(stderr, "no directory on a real disk among the candidates; pass --dir\n");
  std::exit(1);
}

/// The kernel's read-ahead window for the device holding `path` (what a demand fault on a file
/// mapping reads around the faulting page), or -1 when unknown.
long read_ahead_kb(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return -1;
  std::ifstream f(
      fmt::format("/sys/class/bdi/{}:{}/read_ahead_kb", major(st.st_dev), minor(st.st_dev)));
  long kb = -1;
  return f >> kb ? kb : -1;
}

struct heap_span {
  std::uint64_t base = 0, span = 0;
};

bool clustered = false;                // --shape clustered
constexpr std::uint64_t clusters = 64; // of ws_pages / clusters pages each

/// The working-set call: touches the ws_pages pages the recording touched, in the same order.
std::uint64_t ws_call(kiln::sandbox& sb, const heap_span& h) {
  return clustered ? call<std::uint64_t>(sb, "sum_clusters", h.base, h.span, clusters,
                                         ws_pages / clusters, seed)
                   : call<std::uint64_t>(sb, "sum_scattered", h.base, h.span, ws_pages, seed);
}

/// Builds the snapshot file (not timed): a 256 MiB guest that wrote every heap page, and the
/// working set of one sum_scattered call recorded in a sandbox created from its snapshot.
heap_span make_snapshot_file(kiln::vcpu::backend_kind kind, const std::string& path) {
  kiln::sandbox_config c;
  c.guest_path = std::string(KILN_GUEST_DIR) + "/memory_test.elf";
  c.backend = kind == kiln::vcpu::backend_kind::kvm ? kiln::vcpu::backend_choice::kvm
                                                    : kiln::vcpu::backend_choice::emulated;
  c.memory_size = memory_mib * mib;
  const auto t0 = clock_type::now();
  auto sb = kiln::sandbox::create(c);
  if (!sb) die("create", sb.err());
  const auto heap = call<std::uint64_t>(**sb, "heap_start");
  const auto heap_size = call<std::uint64_t>(**sb, "heap_size");
  heap_span h;
  h.base = (heap + page - 1) / page * page;
  h.span = (heap + heap_size) / page * page - h.base;
  call<std::monostate>(**sb, "touch", h.base, h.span, fill_value);
  const auto t_touched = clock_type::now();
  auto snap = (*sb)->take_snapshot();
  if (!snap) die("take_snapshot", snap.err());
  sb->reset();

  auto rec = kiln::sandbox::create(*snap, {}, c);
  if (!rec) die("create from snapshot", rec.err());
  if (auto r = (*rec)->start_recording(); !r) die("start_recording", r.err());
  const auto sum = ws_call(**rec, h);
  if (sum != ws_pages * static_cast<std::uint64_t>(fill_value))
    fmt::print("warning: the working-set call returned {}, expected {}\n", sum,
               ws_pages * static_cast<std::uint64_t>(fill_value));
  auto ws = (*rec)->stop_recording();
  if (!ws) die("stop_recording", ws.err());
  auto with_ws = snap->with_working_set(*ws);
  if (!with_ws) die("with_working_set", with_ws.err());
  const auto t_recorded = clock_type::now();
  if (auto r = with_ws->save(path, {.layered = false}); !r) die("save", r.err());
  const auto t_saved = clock_type::now();
  struct stat st {};
  ::stat(path.c_str(), &st);
  fmt::print("setup: {} MiB guest wrote {} heap pages ({:.0f} ms), working set recorded "
             "({:.0f} ms), saved ({:.0f} ms)\n",
             memory_mib, h.span / page, ms(t_touched - t0), ms(t_recorded - t_touched),
             ms(t_saved - t_recorded));
  fmt::print("file: {:.1f} MiB, {:.1f} MiB on disk; working set recorded: {} pages ({:.2f} MiB; "
             "{} by the {} call, {} stack/data/other){}\n",
             static_cast<double>(st.st_size) / mib, static_cast<double>(st.st_blocks) * 512 / mib,
             ws->pages.size(), static_cast<double>(ws->pages.size() * page) / mib, ws_pages,
             clustered ? "sum_clusters" : "sum_scattered",
             static_cast<std::int64_t>(ws->pages.size()) - static_cast<std::int64_t>(ws_pages),
             ws->complete ? "" : " (INCOMPLETE: recording stopped early)");
  return h;
}

struct run_result {
  double first = 0;         // first result, from t0 (before snapshot::load)
  double first_stats = 0;   // stats().load.to_first_result (from create's start)
  double ws_call = 0;       // the working-set call returned, from t0
  double ws_resident = 0;   // the working set resident, from t0
  double all_resident = -1; // every page resident, from t0 (-1: never, demand)
  double mib_read = 0;      // bytes_prefetched
  double faults = 0, major = 0;
  bool io_uring = false;
  double bg_mib_s =
      0; // prefetch: bytes_prefetched / (to_everything - to_start); eager: / to_everything
};

run_result run_once(kiln::load_mode mode, kiln::vcpu::backend_kind kind, const std::string& path,
                    const heap_span& h, bool check = true) {
  kiln::sandbox_config c;
  c.backend = kind == kiln::vcpu::backend_kind::kvm ? kiln::vcpu::backend_choice::kvm
                                                    : kiln::vcpu::backend_choice::emulated;
  c.load.mode = mode;
  c.load.count_faults = true;
  c.load.check_data = check;
  run_result r;
  const auto t0 = clock_type::now();
  auto snap = kiln::snapshot::load(path);
  if (!snap) die("snapshot::load", snap.err());
  const auto t_create = clock_type::now();
  auto sb = kiln::sandbox::create(*snap, {}, c);
  if (!sb) die("create from file", sb.err());
  const auto t_created = clock_type::now();
  call<std::int64_t>(**sb, "bump");
  r.first = ms(clock_type::now() - t0);
  const auto sum = ws_call(**sb, h);
  r.ws_call = ms(clock_type::now() - t0);
  if (sum != ws_pages * static_cast<std::uint64_t>(fill_value)) {
    fmt::print(stderr, "the working-set call returned {} after the load\n", sum);
    std::exit(1);
  }
  (*sb)->wait_loaded();
  const auto ls = (*sb)->stats().load;
  const double before_create = ms(t_create - t0);
  r.first_stats = ms(ls.to_first_result);
  r.mib_read = static_cast<double>(ls.bytes_prefetched) / mib;
  r.faults = static_cast<double>(ls.faults);
  r.major = static_cast<double>(ls.major_faults);
  r.io_uring = ls.io_uring;
  switch (mode) {
  case kiln::load_mode::eager:
    r.ws_resident = r.all_resident = ms(t_created - t0);
    // The reads run inside create(), which to_everything counts from.
    r.bg_mib_s = static_cast<double>(ls.bytes_prefetched) / mib /
                 std::chrono::duration<double>(ls.to_everything).count();
    break;
  case kiln::load_mode::demand:
    r.ws_resident = r.ws_call; // every page of the working set faulted in by then
    break;
  case kiln::load_mode::prefetch:
    if (!ls.working_set_resident || !ls.everything_resident) {
      fmt::print(stderr, "prefetch did not finish (working set {}, everything {})\n",
                 ls.working_set_resident, ls.everything_resident);
      std::exit(1);
    }
    r.ws_resident = before_create + ms(ls.to_working_set);
    r.all_resident = before_create + ms(ls.to_everything);
    r.bg_mib_s = static_cast<double>(ls.bytes_prefetched) / mib /
                 std::chrono::duration<double>(ls.to_everything - ls.to_start).count();
    break;
  }
  return r;
}

const char* name(kiln::load_mode m) {
  switch (m) {
  case kiln::load_mode::eager:
    return "eager";
  case kiln::load_mode::demand:
    return "demand";
  case kiln::load_mode::prefetch:
    return "prefetch";
  }
  return "?";
}

void verdict(std::string_view what, double measured, std::string_view target, bool met) {
  fmt::print("  {:<58} {:>8.3f}  target {:<8} {}\n", what, measured, target,
             met ? "meets" : "MISSES");
}

/// The bandwidths and the lazy-load targets from the medians `med` (per mode: first result, ws
/// call, ws resident, background MiB/s) and the sequential-read samples `seq`.
void print_targets(const double (&med)[3][5], const std::vector<double>& seq, bool io_uring) {
  const double seq_mib_s = median(seq);
  std::string seq_all;
  for (double s : seq)
    seq_all += fmt::format(" {:.0f}", s);
  fmt::print(
      "sequential read of the evicted file, 1 MiB preads: {:.0f} MiB/s median (samples:{})\n",
      seq_mib_s, seq_all);
  fmt::print("background prefetch ({}): {:.0f} MiB/s (bytes read ahead / (to_everything - "
             "to_start)); eager: {:.0f} MiB/s (bytes read / to_everything)\n",
             io_uring ? "io_uring" : "worker thread", med[2][3], med[0][3]);
  fmt::print("targets:\n");
  const double first_ratio = med[2][0] / med[0][0];
  verdict("prefetch first result / eager first result", first_ratio, "<= 0.10",
          first_ratio <= 0.10);
  const double ws_speedup = med[1][2] / med[2][2];
  verdict("working set resident: demand / prefetch (x faster)", ws_speedup, ">= 3.7",
          ws_speedup >= 3.7);
  fmt::print("  {:<58} {:>8.3f}  (informative)\n", "working-set call done: demand / prefetch",
             med[1][1] / med[2][1]);
  const double bw_ratio = med[2][3] / seq_mib_s;
  verdict("background prefetch / sequential bandwidth", bw_ratio, ">= 0.70", bw_ratio >= 0.70);
}

/// What checking the data against the file's chunk checksums costs: eager and prefetch loads
/// with the check (the figures above) beside the same loads without it, in the same rounds.
void print_check_cost(const std::vector<run_result>& eager, const std::vector<run_result>& pf,
                      const std::vector<run_result>& eager_unchecked,
                      const std::vector<run_result>& pf_unchecked) {
  auto med = [](const std::vector<run_result>& v, double run_result::*f) {
    std::vector<double> x;
    for (const auto& r : v)
      x.push_back(r.*f);
    return median(std::move(x));
  };
  const double e = med(eager, &run_result::all_resident);
  const double eu = med(eager_unchecked, &run_result::all_resident);
  const double p = med(pf, &run_result::all_resident),
               pu = med(pf_unchecked, &run_result::all_resident);
  const double pw = med(pf, &run_result::ws_call), pwu = med(pf_unchecked, &run_result::ws_call);
  fmt::print("data check (chunk checksums as the reads complete), medians, same rounds:\n");
  fmt::print("  eager, all resident:    {:.1f} ms checked, {:.1f} ms unchecked ({:.2f}x)\n", e, eu,
             eu > 0 ? e / eu : 0.0);
  fmt::print("  prefetch, all resident: {:.1f} ms checked, {:.1f} ms unchecked ({:.2f}x)\n", p, pu,
             pu > 0 ? p / pu : 0.0);
  fmt::print("  prefetch, ws call:      {:.1f} ms checked, {:.1f} ms unchecked ({:.2f}x)\n", pw,
             pwu, pwu > 0 ? pw / pwu : 0.0);
}

void bench(kiln::vcpu::backend_kind kind, int runs, const std::string& dir) {
  const std::string path = dir + "/kiln-lazy-load-bench.ksnap";
  const auto h = make_snapshot_file(kind, path);
  const long ra = read_ahead_kb(path);
  fmt::print("kernel read-ahead for this device: {} KiB\n",
             ra < 0 ? std::string("unknown") : std::to_string(ra));

  constexpr kiln::load_mode modes[] = {kiln::load_mode::eager, kiln::load_mode::demand,
                                       kiln::load_mode::prefetch};
  std::vector<run_result> results[3], unchecked[2]; // unchecked: eager, prefetch
  std::vector<double> seq;
  std::uint64_t worst_left = 0, total_pages = 0;
  {
    const auto fd = open_or_die(path);
    struct stat st {};
    ::fstat(fd.get(), &st);
    total_pages = (static_cast<std::uint64_t>(st.st_size) + page - 1) / page;
  }
  const auto t_runs = clock_type::now();
  for (int i = 0; i < runs; ++i) {
    // The device's speed drifts (a VM disk may be cached by its host): sample it on both sides
    // of each round.
    worst_left = std::max(worst_left, evict(path));
    seq.push_back(sequential_mib_s(path));
    for (int m = 0; m < 3; ++m) {
      worst_left = std::max(worst_left, evict(path));
      results[m].push_back(run_once(modes[m], kind, path, h));
    }
    for (int m = 0; m < 2; ++m) {
      worst_left = std::max(worst_left, evict(path));
      unchecked[m].push_back(run_once(modes[m * 2], kind, path, h, /*check=*/false));
    }
    worst_left = std::max(worst_left, evict(path));
    seq.push_back(sequential_mib_s(path));
  }
  const double runs_s = std::chrono::duration<double>(clock_type::now() - t_runs).count();
  ::unlink(path.c_str());

  if (worst_left == 0)
    fmt::print("page cache: file evicted before every run and the sequential read "
               "(fdatasync + POSIX_FADV_DONTNEED; mincore: 0 of {} pages resident)\n",
               total_pages);
  else
    fmt::print("page cache: EVICTION FAILED, up to {} of {} pages stayed resident: the figures "
               "below are (partly) cache-warm\n",
               worst_left, total_pages);
  fmt::print("{} runs per mode, interleaved ({:.1f} s); medians; times in ms from before "
             "snapshot::load\n",
             runs, runs_s);
  fmt::print("{:<9} {:>9} {:>13} {:>9} {:>11} {:>11} {:>9} {:>16}\n", "mode", "first",
             "(create->1st)", "ws call", "ws resident", "all resident", "MiB read",
             "faults (major)");
  double med[3][5]{};
  for (int m = 0; m < 3; ++m) {
    auto col = [&](double run_result::*f) {
      std::vector<double> v;
      for (const auto& r : results[m])
        v.push_back(r.*f);
      return median(std::move(v));
    };
    med[m][0] = col(&run_result::first);
    med[m][1] = col(&run_result::ws_call);
    med[m][2] = col(&run_result::ws_resident);
    med[m][3] = col(&run_result::bg_mib_s);
    const double all = col(&run_result::all_resident);
    fmt::print("{:<9} {:>9.1f} {:>13.1f} {:>9.1f} {:>11.1f} {:>11} {:>9.1f} {:>8.0f} ({:.0f})\n",
               name(modes[m]), med[m][0], col(&run_result::first_stats), med[m][1], med[m][2],
               all < 0 ? std::string("-") : fmt::format("{:.1f}", all), col(&run_result::mib_read),
               col(&run_result::faults), col(&run_result::major));
  }
  print_targets(med, seq, results[2][0].io_uring);
  print_check_cost(results[0], results[2], unchecked[0], unchecked[1]);
}

} // namespace

int main(int argc, char** argv) {
  int runs = 3;
  std::string dir;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--runs")) runs = std::atoi(argv[i + 1]);
    if (!std::strcmp(argv[i], "--dir")) dir = argv[i + 1];
    if (!std::strcmp(argv[i], "--shape")) clustered = !std::strcmp(argv[i + 1], "clustered");
  }
  if (runs < 1) return 2;
  // Not tmpfs: the load must come off a disk. The build folder (above the guests) is a fallback.
  const std::string chosen =
      pick_dir({dir, dir.empty() ? "/var/tmp" : "", std::string(KILN_GUEST_DIR) + "/.."});
  kiln::bench::for_each_backend([&](kiln::vcpu::backend_kind kind) { bench(kind, runs, chosen); });
  return 0;
}
