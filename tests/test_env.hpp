// What a test run is told by its environment: whether KVM must be there, and how slow time is.
#pragma once

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <string_view>
#include <thread>

#include <sys/wait.h>

namespace kiln::test {

/// True in an AddressSanitizer build, and in any sanitizer build: a sanitizer's allocator makes
/// and drops mappings of its own, keeps freed memory (ASan's quarantine) and replaces malloc
/// (mallinfo2 reads zero), so process counters are compared more loosely or not at all there.
#if defined(__has_feature) // clang; GCC says __SANITIZE_ADDRESS__ / __SANITIZE_THREAD__
#define KILN_TEST_HAS_FEATURE(x) __has_feature(x)
#else
#define KILN_TEST_HAS_FEATURE(x) 0
#endif
#if defined(__SANITIZE_ADDRESS__) || KILN_TEST_HAS_FEATURE(address_sanitizer)
inline constexpr bool under_asan = true;
#else
inline constexpr bool under_asan = false;
#endif
#if defined(__SANITIZE_THREAD__) || KILN_TEST_HAS_FEATURE(thread_sanitizer)
inline constexpr bool under_tsan = true;
#else
inline constexpr bool under_tsan = false;
#endif
inline constexpr bool under_sanitizer = under_asan || under_tsan;

/// A death test's predicate: killed by `sig`; under a sanitizer, whose handler catches SIGSEGV
/// and SIGBUS, reports the access and exits (status 1 for ASan, 66 for TSan), that exit.
inline std::function<bool(int)> killed_by(int sig) {
  return [sig](int status) {
    if (WIFSIGNALED(status) && WTERMSIG(status) == sig) return true;
    if (!WIFEXITED(status)) return false;
    return (under_asan && WEXITSTATUS(status) == 1) || (under_tsan && WEXITSTATUS(status) == 66);
  };
}

/// Why a test that recovers from SIGSEGV in a handler of its own (siglongjmp out of it, or a
/// handler chained under kiln's) cannot run under ThreadSanitizer, which takes SIGSEGV itself and
/// ends the process ("nested bug in the same thread").
inline constexpr const char* tsan_takes_sigsegv =
    "ThreadSanitizer handles SIGSEGV itself: a handler that recovers from it cannot run here";

/// The number in environment variable `name`, or `fallback` when it is unset, not a number or
/// below `least`.
inline double env_number(const char* name, double fallback, double least) {
  const char* e = std::getenv(name);
  if (!e || !*e) return fallback;
  char* end = nullptr;
  const double v = std::strtod(e, &end);
  return (end != e && v >= least) ? v : fallback;
}

/// KILN_REQUIRE_KVM=1 (scripts/test.sh sets it where the KVM tests run: on a host with /dev/kvm,
/// or in the nested-KVM VM) turns the skip of a KVM test into a failure, so that a run meant to
/// prove the KVM backend cannot pass by skipping everything.
inline bool kvm_required() {
  const char* e = std::getenv("KILN_REQUIRE_KVM");
  return e && std::string_view(e) == "1";
}

/// KILN_TIME_SCALE (default 1): how many times slower than a real machine this one runs guests.
/// The nested-KVM VM emulates every instruction of the host kernel (scripts/test.sh sets 20
/// there). Time budgets of tests (a kick's latency bound, a deadline's slack) are multiplied by
/// it; what the tests count (calls completed, kicks honoured, false kills) is not.
inline double time_scale() {
  static const double s = env_number("KILN_TIME_SCALE", 1.0, 1.0);
  return s;
}

/// A time budget scaled by time_scale().
template <class Rep, class Period>
std::chrono::milliseconds scaled_budget(std::chrono::duration<Rep, Period> d) {
  return std::chrono::milliseconds(static_cast<long long>(
      std::chrono::duration<double, std::milli>(d).count() * time_scale() + 0.5));
}

/// Threads of this process now (entries of /proc/self/task).
inline long thread_count() {
  long n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/task"))
    ++n;
  return n;
}

/// thread_count() once it is down to `most`, or whatever it is after 2 s (scaled). A thread's
/// pthread_join() returns when the kernel clears its thread id, a moment before the task leaves
/// /proc/self/task; under emulation that moment is long enough to be counted.
inline long thread_count_settled(long most) {
  const auto until = std::chrono::steady_clock::now() + scaled_budget(std::chrono::seconds(2));
  long n = thread_count();
  while (n > most && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    n = thread_count();
  }
  return n;
}

} // namespace kiln::test
