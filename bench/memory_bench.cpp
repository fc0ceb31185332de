// Benchmark: what the memory bookkeeping, the heap hand-back and mapped files save, each beside
// its baseline measured in the same run (bookkeeping off, hand-back off, a private copy).
//
//   memory_bench [--sandboxes N] [--copies M] [--file-mib S]
#include "bench_support.hpp"

#include <kiln/runtime/sandbox.hpp>

#include <fmt/format.h>

#include <unistd.h>

#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

namespace {

using clock_type = std::chrono::steady_clock;
constexpr std::uint64_t page = 4096, mib = 1ull << 20;

kiln::sandbox_config config_for(kiln::vcpu::backend_kind kind) {
  kiln::sandbox_config c;
  c.guest_path = std::string(KILN_GUEST_DIR) + "/memory_test.elf";
  c.backend = kind == kiln::vcpu::backend_kind::kvm ? kiln::vcpu::backend_choice::kvm
                                                    : kiln::vcpu::backend_choice::emulated;
  c.log_sink = [](std::string_view) {};
  return c;
}

std::unique_ptr<kiln::sandbox> make(const kiln::sandbox_config& c) {
  auto sb = kiln::sandbox::create(c);
  if (!sb) {
    fmt::print(stderr, "create failed: {}\n", sb.err().message());
    std::exit(1);
  }
  return std::move(*sb);
}

using kiln::bench::call;

/// The process's proportional set size (kB) from /proc/self/smaps_rollup.
std::uint64_t pss_kib() {
  std::ifstream in("/proc/self/smaps_rollup");
  std::string key;
  std::uint64_t v = 0;
  while (in >> key) {
    if (key == "Pss:") {
      in >> v;
      return v;
    }
    in.ignore(1 << 16, '\n');
  }
  return 0;
}

/// PSS (kB) of every mapping of `path` in this process, from /proc/self/smaps.
std::uint64_t file_pss_kib(const std::string& path) {
  std::ifstream in("/proc/self/smaps");
  std::string line;
  bool in_file = false;
  std::uint64_t total = 0;
  while (std::getline(in, line)) {
    if (!line.empty() && std::isxdigit(static_cast<unsigned char>(line[0])) &&
        line.find('-') < line.find(' ')) {
      in_file = line.size() >= path.size() &&
                line.compare(line.size() - path.size(), path.size(), path) == 0;
    } else if (in_file && line.rfind("Pss:", 0) == 0) {
      total += std::strtoull(line.c_str() + 4, nullptr, 10);
    }
  }
  return total;
}

void redundant_protection(kiln::vcpu::backend_kind kind) {
  constexpr std::uint64_t pages = 256;
  fmt::print("\n{} redundant protect requests, one page each, over a range already read-only:\n",
             pages);
  fmt::print("  {:<22} {:>12} {:>14} {:>14} {:>16}\n", "", "us/request", "host syscalls",
             "backend calls", "page-table edits");
  double per_request[2] = {0, 0};
  for (bool bookkeeping : {true, false}) {
    auto c = config_for(kind);
    c.memory_bookkeeping = bookkeeping;
    auto sb = make(c);
    const auto start = call<std::uint64_t>(*sb, "heap_start");
    const auto size = call<std::uint64_t>(*sb, "heap_size");
    const std::uint64_t a = (start + size / 2) & ~(page - 1);
    if (call<std::int32_t>(*sb, "protect", a, pages * page, std::int32_t{KILN_PROT_READ}) != 0)
      std::exit(1);
    // The same call with a zero-page range gives the cost of a call and its loop of exits.
    const auto before = sb->stats().memory;
    const auto t0 = clock_type::now();
    call<std::int32_t>(*sb, "protect_pages", a, pages * page, std::int32_t{KILN_PROT_READ});
    const double us = std::chrono::duration<double, std::micro>(clock_type::now() - t0).count();
    const auto after = sb->stats().memory;
    per_request[bookkeeping ? 0 : 1] = us / pages;
    fmt::print("  {:<22} {:>12.2f} {:>14} {:>14} {:>16}\n",
               bookkeeping ? "kiln (bookkeeping)" : "baseline (no bookkeeping)", us / pages,
               after.host_syscalls - before.host_syscalls,
               after.backend_calls - before.backend_calls,
               after.page_table_edits - before.page_table_edits);
  }
  fmt::print("  kiln / baseline time: {:.3f}x\n", per_request[0] / per_request[1]);
}

void hand_back(kiln::vcpu::backend_kind kind) {
  fmt::print("\nA guest allocates 64 MiB, writes every page and frees it (96 MiB guest):\n");
  fmt::print("  {:<22} {:>16} {:>14} {:>12}\n", "", "resident after", "handed back", "call ms");
  std::uint64_t resident[2] = {0, 0};
  for (bool on : {true, false}) {
    auto c = config_for(kind);
    c.memory_size = 96 * mib;
    auto sb = make(c);
    call<bool>(*sb, "set_hand_back", on);
    const auto t0 = clock_type::now();
    const auto released = call<std::uint64_t>(*sb, "alloc_free", 64 * mib, std::int32_t{1});
    const double ms = std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
    auto r = sb->resident_bytes();
    resident[on ? 0 : 1] = r ? *r : 0;
    fmt::print("  {:<22} {:>12.1f} MiB {:>10.1f} MiB {:>12.1f}\n",
               on ? "kiln (hand-back)" : "baseline (no hand-back)",
               static_cast<double>(resident[on ? 0 : 1]) / mib, static_cast<double>(released) / mib,
               ms);
  }
  fmt::print("  kiln / baseline resident: {:.3f}x\n",
             static_cast<double>(resident[0]) / static_cast<double>(resident[1]));
}

void shared_file(kiln::vcpu::backend_kind kind, int sandboxes, int copies, std::uint64_t file_mib) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("kiln-memory-bench-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto path = (dir / "data.bin").string();
  {
    std::vector<char> chunk(mib);
    for (std::size_t i = 0; i < chunk.size(); ++i)
      chunk[i] = static_cast<char>(i * 31 + 7);
    std::ofstream out(path, std::ios::binary);
    for (std::uint64_t i = 0; i < file_mib; ++i)
      out.write(chunk.data(), static_cast<std::streamsize>(chunk.size()));
  }
  fmt::print("\nProportional set size (PSS) added per sandbox that reads all of a {} MiB file:\n",
             file_mib);

  // Each batch stays alive until all are measured, so no batch reuses memory another one freed
  // (the host allocator keeps it); a warm-up first takes one-time costs out of the figures.
  std::vector<std::unique_ptr<kiln::sandbox>> alive;
  auto measure = [&](int n, auto&& setup) {
    const std::uint64_t before = pss_kib();
    for (int i = 0; i < n; ++i)
      alive.push_back(setup());
    const std::uint64_t after = pss_kib();
    return static_cast<double>(after - before) / 1024.0 / n; // MiB per sandbox
  };
  auto plain = [&] { return make(config_for(kind)); };
  auto mapping = [&] {
    auto c = config_for(kind);
    c.files.push_back({path, "data", 0});
    auto sb = make(c);
    call<std::uint64_t>(*sb, "file_touch_pages", std::string("data"));
    return sb;
  };
  auto copying = [&] {
    auto c = config_for(kind);
    c.memory_size = (file_mib * 2 + 32) * mib;
    c.files.push_back({path, "data", 0});
    auto sb = make(c);
    call<std::uint64_t>(*sb, "copy_file", std::string("data"));
    return sb;
  };
  for (int i = 0; i < 3; ++i)
    (void)plain(), (void)mapping();
  const double empty = measure(sandboxes, plain);
  const double mapped = measure(sandboxes, mapping);
  const double file_pss = static_cast<double>(file_pss_kib(path)) / 1024.0;
  const double copied = measure(copies, copying);
  fmt::print("  {:<42} {:>9.2f} MiB\n", fmt::format("{} sandboxes, no file", sandboxes), empty);
  fmt::print("  {:<42} {:>9.2f} MiB   (file share {:.2f} MiB; the file's mappings {:.1f} MiB "
             "in all)\n",
             fmt::format("{} sandboxes mapping the file (kiln)", sandboxes), mapped, mapped - empty,
             file_pss);
  fmt::print("  {:<42} {:>9.2f} MiB   (file share {:.2f} MiB)\n",
             fmt::format("{} sandboxes with a private copy", copies), copied, copied - empty);
  fmt::print("  kiln / private copy, PSS per sandbox: {:.3f}x\n", mapped / copied);
  std::filesystem::remove_all(dir);
}

} // namespace

int main(int argc, char** argv) {
  int sandboxes = 100, copies = 10;
  std::uint64_t file_mib = 64;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--sandboxes")) sandboxes = std::atoi(argv[i + 1]);
    if (!std::strcmp(argv[i], "--copies")) copies = std::atoi(argv[i + 1]);
    if (!std::strcmp(argv[i], "--file-mib")) file_mib = std::strtoull(argv[i + 1], nullptr, 10);
  }
  if (sandboxes < 1 || copies < 1 || file_mib < 1) {
    fmt::print(stderr, "usage: memory_bench [--sandboxes N] [--copies M] [--file-mib S]\n");
    return 2;
  }
  kiln::bench::for_each_backend([&](kiln::vcpu::backend_kind kind) {
    redundant_protection(kind);
    hand_back(kind);
    shared_file(kind, sandboxes, copies, file_mib);
  });
  return 0;
}
