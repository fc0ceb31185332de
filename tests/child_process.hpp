// Runs part of a test in a forked child, for what must not touch the test process itself: a
// lowered resource limit, or code that might end the whole process when kiln gets it wrong.
#pragma once

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

} // namespace kiln::test
