// Runs part of a test in a forked child, for what must not touch the test process itself: a
// lowered resource limit, or code that might end the whole process when kiln gets it wrong.
#pragma once

#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
#include <string>

namespace kiln::test {

/// How a child ended: its exit status, or the signal that killed it.
struct child_end {
  bool exited = false;
  int status = -1; // exit status when `exited`, else the signal number
  std::string describe() const {
    return exited ? "exit status " + std::to_string(status) : "signal " + std::to_string(status);
  }
};

/// Forks, runs `body` in the child and _exits with what it returns (0-255), flushing stdio first
/// so its messages reach the test log. Call it before the test starts threads of its own:
/// only the forking thread exists in the child.
inline child_end run_in_child(const std::function<int()>& body) {
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) return {};
  if (pid == 0) {
    int rc = 99;
    try {
      rc = body();
    } catch (...) {
      rc = 98;
    }
    std::fflush(nullptr);
    ::_exit(rc);
  }
  int st = 0;
  while (::waitpid(pid, &st, 0) < 0) {
  }
  if (WIFEXITED(st)) return {true, WEXITSTATUS(st)};
  return {false, WIFSIGNALED(st) ? WTERMSIG(st) : -1};
}

/// This process's address-space size (VmSize), in bytes; 0 when /proc cannot tell.
inline std::uint64_t address_space_bytes() {
  std::ifstream f("/proc/self/statm");
  std::uint64_t pages = 0;
  f >> pages;
  return pages * static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
}

/// Lowers RLIMIT_AS (soft and hard) to `bytes`; false when the kernel refused.
inline bool limit_address_space(std::uint64_t bytes) {
  rlimit rl{bytes, bytes};
  return ::setrlimit(RLIMIT_AS, &rl) == 0;
}

/// Lowers RLIMIT_NOFILE (soft only, so it could be raised again) to `count`.
inline bool limit_open_files(std::uint64_t count) {
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) != 0) return false;
  rl.rlim_cur = count;
  return ::setrlimit(RLIMIT_NOFILE, &rl) == 0;
}

/// Memory mappings of this process now (lines of /proc/self/maps).
inline std::uint64_t mapping_count() {
  std::ifstream f("/proc/self/maps");
  std::uint64_t n = 0;
  for (std::string line; std::getline(f, line);)
    ++n;
  return n;
}

/// Uses up this process's mappings until only `spare` are left below vm.max_map_count, which
/// is system-wide and not to be lowered by a test: one reservation, every other page of it made
/// readable, so that each page is a mapping of its own. Only for a child (the pages stay).
/// False when the limit cannot be read or the kernel refused first.
inline bool limit_mappings(std::uint64_t spare) {
  std::ifstream f("/proc/sys/vm/max_map_count");
  std::uint64_t max = 0;
  if (!(f >> max) || max == 0) return false;
  const std::uint64_t now = mapping_count();
  if (now + spare >= max) return true;
  const std::uint64_t wanted = max - spare - now; // new mappings to make
  const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  // 2k+1 pages cut as none/read/none/... give 2k+1 mappings.
  const std::uint64_t pages = wanted | 1;
  void* base =
      ::mmap(nullptr, pages * page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED) return false;
  auto* p = static_cast<char*>(base);
  for (std::uint64_t i = 1; i + 1 < pages; i += 2)
    if (::mprotect(p + i * page, page, PROT_READ) != 0) return false;
  return true;
}

} // namespace kiln::test
