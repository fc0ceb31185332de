// Benchmark: restore latency against pages dirtied and memory size, beside the baseline a
// full-copy restore pays (a memcpy of the same memory, same run); snapshot time and size.
//
//   snapshot_bench [--runs N] [--max-mib M]
#include "bench_support.hpp"

#include <kiln/runtime/sandbox.hpp>

#include <fmt/format.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace {

using clock_type = std::chrono::steady_clock;
constexpr std::uint64_t page = 4096, mib = 1ull << 20;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

using kiln::bench::call;

/// Median time of a memcpy of `bytes` between two pre-faulted buffers: what a restore that
/// copies the whole memory back costs at least.
double memcpy_us(std::uint64_t bytes, int runs) {
  auto* src = static_cast<char*>(
      ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  auto* dst = static_cast<char*>(
      ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  std::memset(src, 1, bytes);
  std::memset(dst, 2, bytes);
  std::vector<double> t;
  for (int i = 0; i < runs; ++i) {
    const auto t0 = clock_type::now();
    std::memcpy(dst, src, bytes);
    t.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - t0).count());
  }
  ::munmap(src, bytes);
  ::munmap(dst, bytes);
  return median(t);
}

/// Saves a sandbox whose guest wrote one eighth of its memory, loads it back and creates a
/// sandbox from it; beside a plain write + fsync of the same number of bytes (same run).
void file_bench(kiln::sandbox& s, std::uint64_t heap, std::uint64_t memory) {
  const std::uint64_t pages = memory / page / 8;
  call<std::monostate>(s, "touch", heap, pages * page, std::int64_t{42});
  auto snap = s.take_snapshot();
  if (!snap) std::exit(1);
  const std::string path = "/tmp/kiln-snapshot-bench.ksnap";
  auto t0 = clock_type::now();
  if (auto r = snap->save(path); !r) {
    fmt::print(stderr, "save failed: {}\n", r.err().message());
    std::exit(1);
  }
  const double save_ms = std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
  t0 = clock_type::now();
  auto loaded = kiln::snapshot::load(path);
  if (!loaded) std::exit(1);
  auto sb = kiln::sandbox::create(*loaded, {}, {});
  if (!sb) {
    fmt::print(stderr, "create from file failed: {}\n", sb.err().message());
    std::exit(1);
  }
  call<std::int64_t>(**sb, "bump");
  const double load_ms = std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
  struct stat st {};
  ::stat(path.c_str(), &st);
  // A layered child: the loaded sandbox changes 16 pages, its snapshot is saved over the file.
  call<std::monostate>(**sb, "touch", heap, 16 * page, std::int64_t{43});
  auto child = (*sb)->take_snapshot();
  if (!child) std::exit(1);
  const std::string child_path = "/tmp/kiln-snapshot-bench-child.ksnap";
  t0 = clock_type::now();
  if (auto r = child->save(child_path); !r) {
    fmt::print(stderr, "layered save failed: {}\n", r.err().message());
    std::exit(1);
  }
  const double child_ms = std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
  struct stat cst {};
  ::stat(child_path.c_str(), &cst);
  ::unlink(child_path.c_str());
  const auto data = *snap->stored_bytes();
  // Baseline: the same number of bytes written to a plain file and fsync'ed.
  std::vector<char> buf(data, 7);
  t0 = clock_type::now();
  const int fd = ::open("/tmp/kiln-snapshot-bench.raw", O_WRONLY | O_CREAT | O_TRUNC, 0600);
  for (std::uint64_t done = 0; done < data;)
    done += static_cast<std::uint64_t>(::write(fd, buf.data() + done, data - done));
  ::fsync(fd);
  ::close(fd);
  const double raw_ms = std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
  ::unlink("/tmp/kiln-snapshot-bench.raw");
  ::unlink(path.c_str());
  fmt::print("{:>5} MiB save {:.1f} ms ({:.0f} MiB/s of data; plain write+fsync of it {:.1f} ms), "
             "load + create + first call {:.1f} ms; file {} MiB, on disk {:.1f} MiB\n",
             memory / mib, save_ms, static_cast<double>(data) / mib / (save_ms / 1e3), raw_ms,
             load_ms, static_cast<std::uint64_t>(st.st_size) / mib,
             static_cast<double>(st.st_blocks) * 512 / mib);
  fmt::print("{:>5} MiB layered child after 16 pages changed: saved in {:.2f} ms, {:.0f} KiB on "
             "disk, {:.4f}x its parent's\n",
             memory / mib, child_ms, static_cast<double>(cst.st_blocks) * 512 / 1024,
             static_cast<double>(cst.st_blocks) / static_cast<double>(st.st_blocks));
}

void bench(kiln::vcpu::backend_kind kind, int runs, std::uint64_t max_mib) {
  fmt::print("{:>8} {:>8} {:>14} {:>12} {:>18} {:>9}\n", "memory", "dirtied", "restore us",
             "pages back", "memcpy baseline us", "ratio");
  for (std::uint64_t mem_mib : {16ull, 64ull, 256ull, 1024ull}) {
    if (mem_mib > max_mib) break;
    kiln::sandbox_config c;
    c.guest_path = std::string(KILN_GUEST_DIR) + "/memory_test.elf";
    c.backend = kind == kiln::vcpu::backend_kind::kvm ? kiln::vcpu::backend_choice::kvm
                                                      : kiln::vcpu::backend_choice::emulated;
    c.memory_size = mem_mib * mib;
    auto sb = kiln::sandbox::create(c);
    if (!sb) {
      fmt::print(stderr, "create failed: {}\n", sb.err().message());
      std::exit(1);
    }
    kiln::sandbox& s = **sb;
    const auto heap = call<std::uint64_t>(s, "heap_start");
    const auto t0 = clock_type::now();
    auto snap = s.take_snapshot();
    const double snap_us =
        std::chrono::duration<double, std::micro>(clock_type::now() - t0).count();
    if (!snap) {
      fmt::print(stderr, "snapshot failed: {}\n", snap.err().message());
      std::exit(1);
    }
    const double baseline = memcpy_us(c.memory_size, std::max(3, runs / 4));
    for (std::uint64_t dirty : {1ull, 16ull, 256ull, 4096ull}) {
      if (dirty * page > c.memory_size / 2) continue;
      std::vector<double> t;
      std::uint64_t back = 0;
      for (int i = 0; i < runs; ++i) {
        call<std::monostate>(s, "touch", heap, dirty * page, std::int64_t{i + 1});
        const auto r0 = clock_type::now();
        if (auto r = s.restore(*snap); !r) {
          fmt::print(stderr, "restore failed: {}\n", r.err().message());
          std::exit(1);
        }
        t.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - r0).count());
        back = s.stats().last_restore_pages;
      }
      const double us = median(t);
      fmt::print("{:>5} MiB {:>8} {:>14.1f} {:>12} {:>18.1f} {:>8.4f}x\n", mem_mib, dirty, us, back,
                 baseline, us / baseline);
    }
    auto stored = snap->stored_bytes();
    fmt::print("{:>5} MiB snapshot taken in {:.0f} us; image stores {:.2f} MiB of data\n", mem_mib,
               snap_us, stored ? static_cast<double>(*stored) / mib : -1.0);
    file_bench(s, heap, c.memory_size);
  }
}

} // namespace

int main(int argc, char** argv) {
  int runs = 21;
  std::uint64_t max_mib = 1024;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--runs")) runs = std::atoi(argv[i + 1]);
    if (!std::strcmp(argv[i], "--max-mib")) max_mib = std::strtoull(argv[i + 1], nullptr, 10);
  }
  if (runs < 1) return 2;
  kiln::bench::for_each_backend([&](kiln::vcpu::backend_kind kind) { bench(kind, runs, max_mib); });
  return 0;
}
