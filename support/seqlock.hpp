// seqlock: a value one thread publishes and any thread reads, without a lock on either side.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace kiln {

/// A trivially copyable value that one writer at a time publishes and any thread reads, with no
/// lock on either side: the writer makes a sequence number odd, stores the value, and makes it
/// even again; a reader keeps its copy only if the number was even and the same before and after
/// it copied, and copies again otherwise. A reader never delays the writer, and a write costs a
/// few relaxed stores per eight bytes. The value is kept as relaxed atomic words, so a copy torn
/// by a concurrent write is discarded, never undefined behaviour (the fence pairing of Boehm,
/// "Can seqlocks get along with programming language memory models?", 2012).
///
/// Thread-safety: store() from one thread at a time (the caller serializes writers); load() from
/// any thread. A reader may spin while a write is in progress, never longer.
template <class T> class seqlock {
  static_assert(std::is_trivially_copyable_v<T> && std::is_default_constructible_v<T>,
                "seqlock copies its value bytewise");
  static constexpr std::size_t words =
      (sizeof(T) + sizeof(std::uint64_t) - 1) / sizeof(std::uint64_t);

public:
  seqlock() noexcept { store(T{}); }
  explicit seqlock(const T& v) noexcept { store(v); }
  seqlock(const seqlock&) = delete;
  seqlock& operator=(const seqlock&) = delete;

  void store(const T& v) noexcept {
    std::array<std::uint64_t, words> buf{};
    std::memcpy(buf.data(), &v, sizeof(T));
    const std::uint64_t s = seq_.load(std::memory_order_relaxed);
    seq_.store(s + 1, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_release); // odd before any word
    for (std::size_t i = 0; i < words; ++i)
      data_[i].store(buf[i], std::memory_order_relaxed);
    seq_.store(s + 2, std::memory_order_release); // every word before even
  }

  T load() const noexcept {
    std::array<std::uint64_t, words> buf{};
    for (;;) {
      const std::uint64_t before = seq_.load(std::memory_order_acquire);
      if (before & 1) continue; // a write is in progress
      for (std::size_t i = 0; i < words; ++i)
        buf[i] = data_[i].load(std::memory_order_relaxed);
      std::atomic_thread_fence(std::memory_order_acquire); // every word before the re-check
      if (seq_.load(std::memory_order_relaxed) == before) break;
    }
    T v;
    std::memcpy(static_cast<void*>(&v), buf.data(), sizeof(T)); // trivially copyable
    return v;
  }

  /// How many stores there have been.
  std::uint64_t version() const noexcept { return seq_.load(std::memory_order_acquire) / 2; }

private:
  std::atomic<std::uint64_t> seq_{0};
  std::array<std::atomic<std::uint64_t>, words> data_{};
};

} // namespace kiln
