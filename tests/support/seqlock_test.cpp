// seqlock: a reader sees each published value whole, never a mix of two, under a writer that
// publishes as fast as it can.
#include <kiln/support/seqlock.hpp>

#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

// Wider than a cache line, so that a torn copy would straddle lines and words.
struct wide {
  std::array<std::uint64_t, 24> words{};
  std::uint16_t tail = 0; // an odd size: the last word is partly padding
  bool consistent() const {
    for (auto w : words)
      if (w != words[0]) return false;
    return tail == static_cast<std::uint16_t>(words[0]);
  }
};

wide filled(std::uint64_t v) {
  wide w;
  w.words.fill(v);
  w.tail = static_cast<std::uint16_t>(v);
  return w;
}

TEST(Seqlock, StartsWithTheValueItWasGivenAndCountsStores) {
  kiln::seqlock<wide> s(filled(7));
  EXPECT_EQ(s.load().words[23], 7u);
  EXPECT_EQ(s.version(), 1u);
  s.store(filled(8));
  EXPECT_EQ(s.load().words[0], 8u);
  EXPECT_EQ(s.load().tail, 8u);
  EXPECT_EQ(s.version(), 2u);
  kiln::seqlock<wide> d;
  EXPECT_TRUE(d.load().consistent());
  EXPECT_EQ(d.load().words[5], 0u);
}

TEST(Seqlock, ReadersNeverSeeAValueHalfWritten) {
  kiln::seqlock<wide> s(filled(0));
  std::atomic<bool> stop{false};
  // `racing` counts reads made after the writer began (a value other than the first): on a
  // loaded machine the readers may get the processor long before the writer does.
  std::atomic<std::uint64_t> torn{0}, racing{0}, backwards{0};
  std::vector<std::jthread> readers;
  for (int r = 0; r < 3; ++r)
    readers.emplace_back([&] {
      std::uint64_t last = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        const wide w = s.load();
        if (!w.consistent()) torn.fetch_add(1);
        if (w.words[0] < last) backwards.fetch_add(1); // one writer, increasing values
        last = w.words[0];
        if (w.words[0] != 0) racing.fetch_add(1, std::memory_order_relaxed);
      }
    });
  std::uint64_t v = 0;
  // Until the readers have raced the writer a good while, and the writer has stored enough
  // values to make tearing likely; bounded so that a starved reader cannot hang the test.
  while ((racing.load(std::memory_order_relaxed) < 200'000 || v < 100'000) && v < 50'000'000)
    s.store(filled(++v));
  stop = true;
  readers.clear();
  EXPECT_EQ(torn.load(), 0u) << "of " << racing.load() << " reads during " << v << " stores";
  EXPECT_EQ(backwards.load(), 0u);
  EXPECT_GT(racing.load(), 1000u) << "the readers hardly raced the writer: the test proves little";
}

} // namespace
