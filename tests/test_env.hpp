// What a test run is told by its environment: whether KVM must be there, and how slow time is.
#pragma once

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <string_view>
#include <thread>

namespace kiln::test {

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
