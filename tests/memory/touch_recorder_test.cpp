// Tests for memory/touch_recorder.hpp: first touches recorded in order, with real faults.
#include "../test_env.hpp"

#include <kiln/memory/address.hpp>
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/touch_recorder.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csetjmp>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

namespace kiln::memory {
namespace {

namespace fs = std::filesystem;
constexpr std::uint64_t pg = page_size;
constexpr std::uint64_t pages_64m = (64ull << 20) / pg;

// A SIGSEGV handler installed before main, hence before kiln's (which is installed by the first
// start() and chains to it): faults() arms it to siglongjmp out of a fault, so a test sees that
// a genuine fault reached "the previous handler". Unarmed, it hands the fault on to whatever
// was there before it (ASan's handler, or the default action).
thread_local sigjmp_buf* fault_jump = nullptr;
std::atomic<int> previous_handler_calls{0};
struct sigaction before_test_handler {};

void test_handler(int sig, siginfo_t* info, void* context) {
  if (fault_jump != nullptr) {
    previous_handler_calls.fetch_add(1);
    siglongjmp(*fault_jump, 1);
  }
  if (before_test_handler.sa_flags & SA_SIGINFO) {
    before_test_handler.sa_sigaction(sig, info, context);
    return;
  }
  if (before_test_handler.sa_handler != SIG_DFL && before_test_handler.sa_handler != SIG_IGN) {
    before_test_handler.sa_handler(sig);
    return;
  }
  ::signal(sig, SIG_DFL);               // a faulting access repeats, and the process dies of it
  if (info->si_code <= 0) ::raise(sig); // sent by kill/raise: nothing repeats
}

const bool test_handler_installed = [] {
  ::sigaction(SIGSEGV, nullptr, &before_test_handler);
  struct sigaction sa {};
  sa.sa_sigaction = test_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  return ::sigaction(SIGSEGV, &sa, nullptr) == 0;
}();

/// Runs f; true if it faulted (and the fault reached the test handler through kiln's).
template <class F> bool faults(F&& f) {
  sigjmp_buf env;
  if (sigsetjmp(env, 1) == 0) {
    fault_jump = &env;
    std::atomic_signal_fence(std::memory_order_seq_cst);
    f();
    std::atomic_signal_fence(std::memory_order_seq_cst);
    fault_jump = nullptr;
    return false;
  }
  fault_jump = nullptr;
  return true;
}

// SAFETY (for the three helpers): the pointers are into mappings the tests own; faults are
// what the tests are about.
std::uint64_t read_u64(const std::byte* p) {
  return *reinterpret_cast<const volatile std::uint64_t*>(p);
}
void write_u64(std::byte* p, std::uint64_t v) {
  *reinterpret_cast<volatile std::uint64_t*>(p) = v;
}
// An address in the never-mapped first page (SEGV_MAPERR), opaque to the optimizer (which
// would turn a visible null dereference into a trap) and not null (UBSan would report it).
std::byte* volatile null_page = reinterpret_cast<std::byte*>(64);

/// A death: by a signal, or (under ASan, whose handler reports a SIGSEGV) by a failing exit.
bool died(int status) {
  return WIFSIGNALED(status) || (WIFEXITED(status) && WEXITSTATUS(status) != 0);
}

/// An anonymous private mapping, read-write, unmapped on destruction.
struct mapping {
  std::byte* p = nullptr;
  std::uint64_t len = 0;
  explicit mapping(std::uint64_t pages, int prot = PROT_READ | PROT_WRITE, int fd = -1)
      : len(pages * pg) {
    void* m = ::mmap(nullptr, len, prot, MAP_PRIVATE | MAP_NORESERVE | (fd < 0 ? MAP_ANONYMOUS : 0),
                     fd, 0);
    if (m != MAP_FAILED) p = static_cast<std::byte*>(m);
  }
  ~mapping() {
    if (p) ::munmap(p, len);
  }
  mapping(const mapping&) = delete;
  mapping& operator=(const mapping&) = delete;
  std::byte* page(std::uint64_t i) const { return p + i * pg; }
};

/// The VMAs of /proc/self/maps clipped to [b, b+len): "start-end perms" relative to b.
std::vector<std::string> vmas(const std::byte* b, std::uint64_t len) {
  const auto lo = reinterpret_cast<std::uintptr_t>(b);
  const std::uintptr_t hi = lo + len;
  std::ifstream maps("/proc/self/maps");
  std::vector<std::string> out;
  std::string line;
  while (std::getline(maps, line)) {
    std::istringstream in(line);
    std::string range, perms;
    in >> range >> perms;
    const auto dash = range.find('-');
    const std::uintptr_t s = std::stoull(range.substr(0, dash), nullptr, 16);
    const std::uintptr_t e = std::stoull(range.substr(dash + 1), nullptr, 16);
    if (e <= lo || s >= hi) continue;
    out.push_back(std::to_string((std::max(s, lo) - lo) / pg) + "-" +
                  std::to_string((std::min(e, hi) - lo) / pg) + " " + perms.substr(0, 3));
  }
  return out;
}

/// vmas() with adjacent equal protections merged: what the pages allow, whatever the VMAs.
std::vector<std::string> prot_runs(const std::byte* b, std::uint64_t len) {
  std::vector<std::string> out;
  std::string last_perms;
  std::string last_start;
  std::string last_end;
  for (const std::string& v : vmas(b, len)) {
    const auto dash = v.find('-'), space = v.find(' ');
    const std::string start = v.substr(0, dash), end = v.substr(dash + 1, space - dash - 1),
                      perms = v.substr(space + 1);
    if (!out.empty() && perms == last_perms && start == last_end) {
      out.back() = last_start + "-" + end + " " + perms;
    } else {
      out.push_back(v);
      last_start = start;
    }
    last_end = end;
    last_perms = perms;
  }
  return out;
}

std::vector<std::uint32_t> scrambled(std::uint64_t pages, std::uint64_t n, unsigned seed) {
  std::vector<std::uint32_t> all(pages);
  std::iota(all.begin(), all.end(), 0u);
  std::mt19937 rng(seed);
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(n);
  return all;
}

std::uint64_t tag(std::uint64_t page, std::uint64_t round) {
  return (page << 16) ^ (round * 0x9e3779b97f4a7c15ull) ^ 0x5a5a;
}

/// Touches `order` in turn: even positions read, odd positions write tag(page, 1).
void touch_all(const mapping& m, const std::vector<std::uint32_t>& order) {
  for (std::size_t i = 0; i < order.size(); ++i) {
    if (i % 2 == 0)
      (void)read_u64(m.page(order[i]) + 8);
    else
      write_u64(m.page(order[i]) + 8, tag(order[i], 1));
  }
}

/// After stop(): every page reads its expected data and is writable, without any fault.
void expect_plain_memory(const mapping& m, std::uint64_t pages,
                         const std::vector<std::uint32_t>& order,
                         const std::vector<std::uint64_t>& before) {
  std::vector<std::uint64_t> expected = before;
  for (std::size_t i = 1; i < order.size(); i += 2)
    expected[order[i]] = tag(order[i], 1);
  const int calls = previous_handler_calls.load();
  std::uint64_t bad = 0;
  const bool faulted = faults([&] {
    for (std::uint64_t i = 0; i < pages; ++i) {
      if (read_u64(m.page(i) + 8) != expected[i]) ++bad;
      write_u64(m.page(i) + 16, i);
    }
  });
  EXPECT_FALSE(faulted);
  EXPECT_EQ(previous_handler_calls.load(), calls);
  EXPECT_EQ(bad, 0u) << "pages whose data changed";
}

TEST(TouchRecorder, OurHandlerSitsOnTopOfThePreviousOne) {
  ASSERT_TRUE(test_handler_installed);
  mapping m(4);
  ASSERT_TRUE(m.p);
  const std::vector<int> prot(4, PROT_READ | PROT_WRITE);
  auto rec = touch_recorder::start(m.p, prot);
  ASSERT_TRUE(rec) << rec.err().message();
  struct sigaction now {};
  ASSERT_EQ(::sigaction(SIGSEGV, nullptr, &now), 0);
  EXPECT_NE(now.sa_sigaction, &test_handler);
  EXPECT_TRUE(now.sa_flags & SA_SIGINFO);
  EXPECT_FALSE(now.sa_flags & SA_RESETHAND);
}

TEST(TouchRecorder, RecordsAScrambledAnonymousRangeInOrder) {
  mapping m(pages_64m);
  ASSERT_TRUE(m.p);
  // Data present before recording (every 3rd page), which must survive it.
  std::vector<std::uint64_t> before(pages_64m, 0);
  for (std::uint64_t i = 0; i < pages_64m; i += 3) {
    before[i] = tag(i, 0);
    write_u64(m.page(i) + 8, before[i]);
  }
  const auto maps_before = vmas(m.p, m.len);
  const std::vector<int> prot(pages_64m, PROT_READ | PROT_WRITE);
  auto rec = touch_recorder::start(m.p, prot);
  ASSERT_TRUE(rec) << rec.err().message();
  EXPECT_EQ(vmas(m.p, m.len), std::vector<std::string>{"0-16384 ---"});

  const auto order = scrambled(pages_64m, 5000, 1);
  touch_all(m, order);
  // A second touch of a page records nothing.
  (void)read_u64(m.page(order[0]));
  write_u64(m.page(order[0]) + 4000, 7);
  EXPECT_EQ(rec->touched(), order.size());

  auto got = rec->stop();
  ASSERT_TRUE(got) << got.err().message();
  EXPECT_EQ(*got, order);
  EXPECT_FALSE(rec->armed());
  EXPECT_FALSE(rec->overflowed());
  EXPECT_EQ(vmas(m.p, m.len), maps_before) << "the range is as before start()";
  expect_plain_memory(m, pages_64m, order, before);
  EXPECT_EQ(read_u64(m.page(order[0]) + 4000), 7u);
}

TEST(TouchRecorder, RecordsAPrivateFileMappingInOrder) {
  std::random_device rd;
  const fs::path path =
      fs::temp_directory_path() /
      ("kiln_touch_recorder_test." + std::to_string(::getpid()) + "." + std::to_string(rd()));
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0);
  fs::remove(path);
  ASSERT_EQ(::ftruncate(fd, static_cast<off_t>(pages_64m * pg)), 0); // sparse: reads as zero
  std::vector<std::uint64_t> before(pages_64m, 0);
  for (std::uint64_t i = 0; i < pages_64m; i += 5) {
    before[i] = tag(i, 0);
    ASSERT_EQ(::pwrite(fd, &before[i], 8, static_cast<off_t>(i * pg + 8)), 8);
  }
  {
    mapping m(pages_64m, PROT_READ | PROT_WRITE, fd);
    ASSERT_TRUE(m.p);
    const auto maps_before = vmas(m.p, m.len);
    const std::vector<int> prot(pages_64m, PROT_READ | PROT_WRITE);
    auto rec = touch_recorder::start(m.p, prot);
    ASSERT_TRUE(rec) << rec.err().message();
    const auto order = scrambled(pages_64m, 4000, 2);
    std::uint64_t read_mismatch = 0;
    for (std::size_t i = 0; i < order.size(); ++i) {
      if (i % 2 == 0) {
        if (read_u64(m.page(order[i]) + 8) != before[order[i]]) ++read_mismatch;
      } else {
        write_u64(m.page(order[i]) + 8, tag(order[i], 1));
      }
    }
    EXPECT_EQ(read_mismatch, 0u) << "first reads see the file's data";
    auto got = rec->stop();
    ASSERT_TRUE(got) << got.err().message();
    EXPECT_EQ(*got, order);
    // Protections are as before, but not the VMAs: the mapping had no anon_vma (never written),
    // so each page written while its neighbours were split off got its own, and VMAs with
    // different anon_vmas never merge again. (A mapping written once before start() does
    // merge back: see RecordsAScrambledAnonymousRangeInOrder.)
    EXPECT_EQ(prot_runs(m.p, m.len), maps_before);
    std::printf("[ vmas ] private file mapping, never written before start(): %zu VMA(s) "
                "before, %zu after stop()\n",
                maps_before.size(), vmas(m.p, m.len).size());
    expect_plain_memory(m, pages_64m, order, before);
  }
  // MAP_PRIVATE: the writes stayed in the mapping.
  std::uint64_t v = 0;
  const std::uint64_t written = scrambled(pages_64m, 4000, 2)[1];
  ASSERT_EQ(::pread(fd, &v, 8, static_cast<off_t>(written * pg + 8)), 8);
  EXPECT_EQ(v, before[written]);
  ::close(fd);
}

TEST(TouchRecorder, ReadOnlyAndNonePagesKeepTheirProtection) {
  if (test::under_tsan) GTEST_SKIP() << test::tsan_takes_sigsegv;
  // Pages: 0 R, 1 RW, 2 R, 3 NONE, 4 RW, 5 R|X, 6 NONE, 7 RW.
  const std::vector<int> prot = {PROT_READ, PROT_READ | PROT_WRITE, PROT_READ,
                                 PROT_NONE, PROT_READ | PROT_WRITE, PROT_READ | PROT_EXEC,
                                 PROT_NONE, PROT_READ | PROT_WRITE};
  mapping m(prot.size());
  ASSERT_TRUE(m.p);
  for (std::size_t i = 0; i < prot.size(); ++i) {
    write_u64(m.page(i), 100 + i);
    ASSERT_EQ(::mprotect(m.page(i), pg, prot[i]), 0);
  }
  const auto maps_before = vmas(m.p, m.len);
  auto rec = touch_recorder::start(m.p, prot);
  ASSERT_TRUE(rec) << rec.err().message();
  const int calls = previous_handler_calls.load();

  EXPECT_EQ(read_u64(m.page(0)), 100u);
  EXPECT_TRUE(faults([&] { write_u64(m.page(0), 1); })) << "page 0 stays read-only";
  // A write as the first touch of a read-only page: recorded, then a genuine fault.
  EXPECT_TRUE(faults([&] { write_u64(m.page(2), 1); }));
  EXPECT_EQ(read_u64(m.page(2)), 102u);
  EXPECT_TRUE(faults([&] { (void)read_u64(m.page(3)); })) << "PROT_NONE entry";
  EXPECT_TRUE(faults([&] { (void)read_u64(m.page(6)); })) << "PROT_NONE entry";
  write_u64(m.page(7), 7);
  EXPECT_EQ(read_u64(m.page(5)), 105u);
  EXPECT_TRUE(faults([&] { write_u64(m.page(5), 1); }));
  EXPECT_EQ(previous_handler_calls.load(), calls + 5);
  EXPECT_EQ(rec->touched(), 4u);

  auto got = rec->stop();
  ASSERT_TRUE(got) << got.err().message();
  EXPECT_EQ(*got, (std::vector<std::uint32_t>{0, 2, 7, 5}));
  EXPECT_EQ(vmas(m.p, m.len), maps_before) << "protections as before start()";
  // And they really are enforced: read-only pages fault on writes, NONE pages on reads.
  EXPECT_TRUE(faults([&] { write_u64(m.page(0), 1); }));
  EXPECT_TRUE(faults([&] { write_u64(m.page(2), 1); }));
  EXPECT_TRUE(faults([&] { (void)read_u64(m.page(3)); }));
  EXPECT_FALSE(faults([&] { write_u64(m.page(4), 4); }));
  EXPECT_EQ(read_u64(m.page(7)), 7u);
}

TEST(TouchRecorder, ConcurrentThreadsRecordEachPageOnce) {
  mapping m(pages_64m);
  ASSERT_TRUE(m.p);
  const std::vector<int> prot(pages_64m, PROT_READ | PROT_WRITE);
  constexpr int threads = 4;
  for (int round = 0; round < 3; ++round) {
    auto rec = touch_recorder::start(m.p, prot);
    ASSERT_TRUE(rec) << rec.err().message();
    // Round 0 and 1: overlapping random sets; round 2: all threads the same pages, same order.
    std::vector<std::vector<std::uint32_t>> sets;
    for (int t = 0; t < threads; ++t)
      sets.push_back(scrambled(pages_64m, 6000, round == 2 ? 99 : 10 * round + t + 3));
    std::atomic<int> ready{0};
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        ready.fetch_add(1);
        while (ready.load() < threads)
          std::this_thread::yield();
        for (std::size_t i = 0; i < sets[t].size(); ++i) {
          std::byte* p = m.page(sets[t][i]);
          if ((i + t) % 2 == 0)
            (void)read_u64(p + 8 * t);
          else
            write_u64(p + 64 + 8 * t, sets[t][i]);
        }
      });
    for (auto& th : pool)
      th.join();
    std::set<std::uint32_t> distinct;
    for (const auto& s : sets)
      distinct.insert(s.begin(), s.end());
    EXPECT_EQ(rec->touched(), distinct.size());
    auto got = rec->stop();
    ASSERT_TRUE(got) << got.err().message();
    EXPECT_EQ(got->size(), distinct.size()) << "round " << round;
    EXPECT_EQ(std::set<std::uint32_t>(got->begin(), got->end()), distinct) << "round " << round;
    // Every write landed.
    std::uint64_t lost = 0;
    for (int t = 0; t < threads; ++t)
      for (std::size_t i = 0; i < sets[t].size(); ++i)
        if ((i + t) % 2 == 1 && read_u64(m.page(sets[t][i]) + 64 + 8 * t) != sets[t][i]) ++lost;
    EXPECT_EQ(lost, 0u);
  }
}

TEST(TouchRecorder, GenuineFaultsGoToThePreviousHandler) {
  if (test::under_tsan) GTEST_SKIP() << test::tsan_takes_sigsegv;
  mapping m(8);
  ASSERT_TRUE(m.p);
  std::vector<int> prot(8, PROT_READ | PROT_WRITE);
  prot[5] = PROT_NONE;
  ASSERT_EQ(::mprotect(m.page(5), pg, PROT_NONE), 0);
  mapping guard(1, PROT_NONE); // outside every range: SEGV_ACCERR, not ours
  mapping hole(1);             // unmapped below: SEGV_MAPERR
  ASSERT_TRUE(guard.p && hole.p);
  auto rec = touch_recorder::start(m.p, prot);
  ASSERT_TRUE(rec) << rec.err().message();
  std::byte* const unmapped = hole.p; // unmapped after start(), which maps its own arrays
  ASSERT_EQ(::munmap(hole.p, pg), 0);
  hole.p = nullptr;
  const int calls = previous_handler_calls.load();
  EXPECT_TRUE(faults([&] { (void)read_u64(guard.p); }));
  EXPECT_TRUE(faults([&] { (void)read_u64(unmapped); }));
  EXPECT_TRUE(faults([&] { (void)read_u64(m.page(5)); }));
  EXPECT_TRUE(faults([&] { write_u64(null_page, 1); }));
  EXPECT_EQ(previous_handler_calls.load(), calls + 4);
  // Recording goes on after those siglongjmps (SIGSEGV is not left blocked).
  write_u64(m.page(3), 3);
  EXPECT_EQ(read_u64(m.page(1)), 0u);
  auto got = rec->stop();
  ASSERT_TRUE(got);
  EXPECT_EQ(*got, (std::vector<std::uint32_t>{3, 1}));
  EXPECT_EQ(previous_handler_calls.load(), calls + 4);
}

using TouchRecorderDeathTest = ::testing::Test;

TEST_F(TouchRecorderDeathTest, AnUnhandledFaultStillKills) {
  mapping m(4);
  ASSERT_TRUE(m.p);
  const std::vector<int> prot = {PROT_READ, PROT_READ | PROT_WRITE, PROT_READ, PROT_READ};
  ASSERT_EQ(::mprotect(m.p, pg, PROT_READ), 0);
  ASSERT_EQ(::mprotect(m.page(2), 2 * pg, PROT_READ), 0);
  auto rec = touch_recorder::start(m.p, prot);
  ASSERT_TRUE(rec) << rec.err().message();
  EXPECT_EQ(read_u64(m.p), 0u);
  // Without a siglongjmp target the chain ends in ASan's report or the default action.
  EXPECT_DEATH(write_u64(m.p, 1), "");         // a read-only page after its first touch
  EXPECT_DEATH(write_u64(m.page(2), 1), "");   // a write as first touch of a read-only page
  EXPECT_DEATH((void)read_u64(null_page), ""); // SEGV_MAPERR
  EXPECT_EXIT(::raise(SIGSEGV), died, "") << "a sent SIGSEGV";
  auto got = rec->stop();
  ASSERT_TRUE(got);
  EXPECT_EQ(*got, (std::vector<std::uint32_t>{0})) << "the children's touches are theirs";
}

TEST_F(TouchRecorderDeathTest, TheDefaultActionIsChainedToo) {
  // A fresh process per death test, where SIGSEGV has the default action before kiln's handler
  // is installed: a genuine fault, and a SIGSEGV sent by raise(), still kill it.
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const auto die = [](bool sent) {
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    ::sigaction(SIGSEGV, &dfl, nullptr);
    mapping m(2);
    auto rec = touch_recorder::start(m.p, std::vector<int>(2, PROT_READ | PROT_WRITE));
    if (!rec) ::_exit(3);
    write_u64(m.page(1), 1); // recorded: kiln's handler is in place and working
    if (rec->touched() != 1) ::_exit(4);
    if (sent)
      ::raise(SIGSEGV);
    else
      (void)read_u64(null_page);
    ::_exit(5);
  };
  EXPECT_EXIT(die(false), ::testing::KilledBySignal(SIGSEGV), "");
  EXPECT_EXIT(die(true), ::testing::KilledBySignal(SIGSEGV), "");
}

TEST_F(TouchRecorderDeathTest, ASanHandlerIsChained) {
  if (test::under_tsan) GTEST_SKIP() << test::tsan_takes_sigsegv;
  // Kiln's handler installed right over the one that was there before the test's (ASan's in a
  // sanitized build, which must still report the crash; the default action otherwise).
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const auto die = [] {
    ::sigaction(SIGSEGV, &before_test_handler, nullptr);
    mapping m(2);
    auto rec = touch_recorder::start(m.p, std::vector<int>(2, PROT_READ | PROT_WRITE));
    if (!rec) ::_exit(3);
    write_u64(m.page(1), 1);
    if (rec->touched() != 1) ::_exit(4);
    (void)read_u64(null_page);
    ::_exit(5);
  };
#if defined(__SANITIZE_ADDRESS__)
  EXPECT_EXIT(die(), died, "AddressSanitizer: SEGV");
#else
  EXPECT_EXIT(die(), ::testing::KilledBySignal(SIGSEGV), "");
#endif
}

TEST(TouchRecorder, TwoRecordersStopInEitherOrder) {
  mapping a(64), b(64);
  ASSERT_TRUE(a.p && b.p);
  const std::vector<int> prot(64, PROT_READ | PROT_WRITE);
  for (int round = 0; round < 2; ++round) {
    auto ra = touch_recorder::start(a.p, prot);
    ASSERT_TRUE(ra) << ra.err().message();
    auto rb = touch_recorder::start(b.p, prot);
    ASSERT_TRUE(rb) << rb.err().message();
    EXPECT_EQ(touch_recorder::start(a.p + 8 * pg, std::span(prot).first(4)).code(),
              memory_errc::overlapping_region);
    const auto oa = scrambled(64, 20, 5 + round), ob = scrambled(64, 30, 7 + round);
    for (std::size_t i = 0; i < ob.size(); ++i) {
      if (i < oa.size()) write_u64(a.page(oa[i]), 1);
      (void)read_u64(b.page(ob[i]));
    }
    // A moved recorder keeps recording.
    touch_recorder moved = std::move(rb).value();
    auto first = round == 0 ? ra->stop() : moved.stop();
    auto second = round == 0 ? moved.stop() : ra->stop();
    ASSERT_TRUE(first && second);
    EXPECT_EQ(round == 0 ? *first : *second, oa);
    EXPECT_EQ(round == 0 ? *second : *first, ob);
  }
}

TEST(TouchRecorder, ADestroyedRecorderRestoresItsRange) {
  mapping m(16);
  ASSERT_TRUE(m.p);
  const auto maps_before = vmas(m.p, m.len);
  {
    auto rec = touch_recorder::start(m.p, std::vector<int>(16, PROT_READ | PROT_WRITE));
    ASSERT_TRUE(rec);
    write_u64(m.page(3), 3);
  }
  EXPECT_EQ(vmas(m.p, m.len), maps_before);
  EXPECT_FALSE(faults([&] { write_u64(m.page(9), 9); }));
}

TEST(TouchRecorder, BadArgumentsAreRefused) {
  mapping m(4);
  ASSERT_TRUE(m.p);
  const auto einval = std::make_error_code(std::errc::invalid_argument);
  const std::vector<int> rw(4, PROT_READ | PROT_WRITE);
  EXPECT_EQ(touch_recorder::start(m.p + 8, rw).code(), einval);
  EXPECT_EQ(touch_recorder::start(nullptr, rw).code(), einval);
  EXPECT_EQ(touch_recorder::start(m.p, {}).code(), einval);
  EXPECT_EQ(touch_recorder::start(m.p, std::vector<int>{PROT_WRITE}).code(), einval);
  EXPECT_EQ(touch_recorder::start(m.p, std::vector<int>{PROT_READ | 0x8}).code(), einval);
  auto rec = touch_recorder::start(m.p, rw);
  ASSERT_TRUE(rec);
  EXPECT_EQ(rec->set_protection(2, 3, PROT_READ).code(), einval);
  EXPECT_EQ(rec->set_protection(0, 1, PROT_EXEC).code(), einval);
  ASSERT_TRUE(rec->stop());
  EXPECT_EQ(rec->stop().code(), einval);
  touch_recorder empty;
  EXPECT_FALSE(empty.armed());
  EXPECT_EQ(empty.touched(), 0u);
  EXPECT_EQ(empty.stop().code(), einval);
}

TEST(TouchRecorder, SetProtectionWhileRecording) {
  if (test::under_tsan) GTEST_SKIP() << test::tsan_takes_sigsegv;
  // 0 RW untouched -> R; 1 RW touched -> R; 2 NONE -> RW; 3 RW -> NONE; 4 R untouched -> RW.
  std::vector<int> prot = {
      PROT_READ | PROT_WRITE, PROT_READ | PROT_WRITE, PROT_NONE, PROT_READ | PROT_WRITE, PROT_READ,
      PROT_READ | PROT_WRITE};
  mapping m(prot.size());
  ASSERT_TRUE(m.p);
  ASSERT_EQ(::mprotect(m.page(2), pg, PROT_NONE), 0);
  ASSERT_EQ(::mprotect(m.page(4), pg, PROT_READ), 0);
  auto rec = touch_recorder::start(m.p, prot);
  ASSERT_TRUE(rec);
  write_u64(m.page(1), 1);
  ASSERT_TRUE(rec->set_protection(0, 2, PROT_READ));
  EXPECT_TRUE(faults([&] { write_u64(m.page(1), 2); })) << "touched: changed now";
  ASSERT_TRUE(rec->set_protection(2, 1, PROT_READ | PROT_WRITE));
  ASSERT_TRUE(rec->set_protection(3, 1, PROT_NONE));
  ASSERT_TRUE(rec->set_protection(4, 1, PROT_READ | PROT_WRITE));
  EXPECT_EQ(read_u64(m.page(0)), 0u);
  EXPECT_TRUE(faults([&] { write_u64(m.page(0), 2); })) << "untouched: got R on first touch";
  write_u64(m.page(2), 2);
  EXPECT_TRUE(faults([&] { (void)read_u64(m.page(3)); })) << "set to NONE: not recorded";
  write_u64(m.page(4), 4);
  auto got = rec->stop();
  ASSERT_TRUE(got);
  EXPECT_EQ(*got, (std::vector<std::uint32_t>{1, 0, 2, 4}));
  EXPECT_EQ(vmas(m.p, m.len),
            (std::vector<std::string>{"0-2 r--", "2-3 rw-", "3-4 ---", "4-6 rw-"}));
}

TEST(TouchRecorder, SyscallsOnUntouchedPagesFailWithEfault) {
  // The documented limitation: the kernel's own accesses raise no signal.
  mapping m(2);
  ASSERT_TRUE(m.p);
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  auto rec = touch_recorder::start(m.p, std::vector<int>(2, PROT_READ | PROT_WRITE));
  ASSERT_TRUE(rec);
  errno = 0;
  EXPECT_EQ(::write(fds[1], m.page(0), 16), -1);
  EXPECT_EQ(errno, EFAULT);
  EXPECT_EQ(rec->touched(), 0u) << "nothing recorded";
  (void)read_u64(m.page(0)); // touching it from user space first makes it usable
  EXPECT_EQ(::write(fds[1], m.page(0), 16), 16);
  EXPECT_EQ(::read(fds[0], m.page(1), 16), -1) << "untouched destination";
  (void)read_u64(m.page(1)); // a read is enough: the page gets read-write back
  EXPECT_EQ(::read(fds[0], m.page(1), 16), 16);
  auto got = rec->stop();
  ASSERT_TRUE(got);
  EXPECT_EQ(*got, (std::vector<std::uint32_t>{0, 1}));
  ::close(fds[0]);
  ::close(fds[1]);
}

TEST(TouchRecorder, OverflowAtMaxMapCountKeepsAPrefix) {
  std::ifstream f("/proc/sys/vm/max_map_count");
  std::uint64_t max_maps = 0;
  f >> max_maps;
  if (max_maps == 0 || max_maps > (1u << 20))
    GTEST_SKIP() << "vm.max_map_count " << max_maps << " too high to reach in a test";
  // Reading every other page of a range splits it into two VMAs per touch: the limit is
  // reached after about max_maps / 2 touches.
  const std::uint64_t pages = 2 * max_maps + 4096;
  mapping m(pages);
  ASSERT_TRUE(m.p);
  write_u64(m.page(0), 1); // gives the VMA its anon_vma, so that it can merge back whole
  const auto maps_before = vmas(m.p, m.len);
  auto rec = touch_recorder::start(m.p, std::vector<int>(pages, PROT_READ | PROT_WRITE));
  ASSERT_TRUE(rec) << rec.err().message();
  std::vector<std::uint32_t> order;
  // Reads map the zero page (or, on kernels without one, a page each): stop soon after the
  // overflow.
  std::uint64_t after = 0;
  for (std::uint64_t i = 1; i < pages && after < 100; i += 2) {
    order.push_back(static_cast<std::uint32_t>(i));
    (void)read_u64(m.page(i));
    if (rec->overflowed()) ++after;
  }
  EXPECT_TRUE(rec->overflowed());
  EXPECT_EQ(vmas(m.p, m.len), maps_before) << "restored whole on overflow";
  auto got = rec->stop();
  ASSERT_TRUE(got) << got.err().message();
  EXPECT_TRUE(rec->overflowed());
  std::printf("[ overflow ] vm.max_map_count %llu: %zu of %zu touches recorded\n",
              static_cast<unsigned long long>(max_maps), got->size(), order.size());
  ASSERT_LT(got->size(), order.size());
  EXPECT_GT(got->size(), max_maps / 4);
  EXPECT_TRUE(std::equal(got->begin(), got->end(), order.begin())) << "a prefix";
  EXPECT_FALSE(faults([&] { write_u64(m.page(0), 1); }));
}

TEST(TouchRecorder, TimingPerRecordedPage) {
  constexpr std::uint64_t pages = 16384;
  mapping m(pages);
  ASSERT_TRUE(m.p);
  for (std::uint64_t i = 0; i < pages; ++i)
    write_u64(m.page(i), i); // populate first
  const std::vector<int> prot(pages, PROT_READ | PROT_WRITE);
  const auto order = scrambled(pages, pages, 42);
  using clock = std::chrono::steady_clock;
  const auto ns = [](clock::duration d) {
    return static_cast<double>(std::chrono::duration_cast<std::chrono::nanoseconds>(d).count());
  };
  for (const bool writes : {false, true}) {
    const auto t0 = clock::now();
    auto rec = touch_recorder::start(m.p, prot);
    ASSERT_TRUE(rec);
    const auto t1 = clock::now();
    std::uint64_t sum = 0;
    for (const std::uint32_t p : order) {
      if (writes)
        write_u64(m.page(p) + 8, p);
      else
        sum += read_u64(m.page(p));
    }
    const auto t2 = clock::now();
    auto got = rec->stop();
    const auto t3 = clock::now();
    ASSERT_TRUE(got);
    EXPECT_EQ(*got, order);
    if (!writes) {
      EXPECT_EQ(sum, pages * (pages - 1) / 2);
    }
    std::printf("[ timing ] %llu pages, scrambled %s: %.0f ns per recorded page "
                "(start %.0f us, stop %.0f us)\n",
                static_cast<unsigned long long>(pages), writes ? "writes" : "reads",
                ns(t2 - t1) / pages, ns(t1 - t0) / 1e3, ns(t3 - t2) / 1e3);
  }
}

} // namespace
} // namespace kiln::memory
