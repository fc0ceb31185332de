// Tests for memory/prefetch.hpp: real files evicted from the page cache, real io_uring, both
// paths; page-cache residency by mincore, installed mappings by /proc/self/pagemap.
#include <kiln/memory/address.hpp>
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/prefetch.hpp>
#include <kiln/support/unique_fd.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/magic.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstddef>

namespace kiln::memory {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

constexpr std::uint64_t mib = 1ull << 20;

/// The file's 8-byte word at offset `o` (8-aligned): never the guest's patterns below.
std::uint64_t file_word(std::uint64_t o) {
  return (o * 0x9E3779B97F4A7C15ull) ^ 0x1234567ull;
}
std::uint64_t guest_word(std::uint64_t o, std::uint64_t seed) {
  return ~file_word(o) ^ (seed << 56);
}

/// A temporary file of known content, and helpers to evict it and look at the page cache.
class temp_file {
public:
  temp_file(const temp_file&) = delete;
  temp_file& operator=(const temp_file&) = delete;
  explicit temp_file(std::uint64_t size) : size_(size) {
    std::string t = (fs::temp_directory_path() / "kiln-prefetch-XXXXXX").string();
    fd_.reset(::mkstemp(t.data()));
    if (!fd_) throw std::system_error(errno, std::generic_category(), "mkstemp");
    path_ = t;
    std::vector<std::uint64_t> block(mib / 8);
    for (std::uint64_t off = 0; off < size; off += mib) {
      for (std::uint64_t i = 0; i < block.size(); ++i)
        block[i] = file_word(off + i * 8);
      if (::pwrite(fd_.get(), block.data(), mib, static_cast<off_t>(off)) != ssize_t(mib))
        throw std::system_error(errno, std::generic_category(), "pwrite");
    }
    ::fdatasync(fd_.get());
  }
  ~temp_file() { ::unlink(path_.c_str()); }

  int fd() const { return fd_.get(); }
  std::uint64_t size() const { return size_; }

  /// True when the file system can drop the file's pages (tmpfs cannot).
  bool evictable() const {
    struct statfs s {};
    return ::fstatfs(fd_.get(), &s) == 0 && s.f_type != TMPFS_MAGIC;
  }
  void evict() const {
    ::fdatasync(fd_.get());
    ::posix_fadvise(fd_.get(), 0, 0, POSIX_FADV_DONTNEED);
  }
  /// Pages of [off, off + len) in the page cache (a never-touched probe mapping: mincore then
  /// says page cache, not page tables).
  std::uint64_t resident(std::uint64_t off, std::uint64_t len) const {
    void* m = ::mmap(nullptr, len, PROT_READ, MAP_SHARED, fd_.get(), static_cast<off_t>(off));
    if (m == MAP_FAILED) return ~0ull;
    const std::uint64_t pages = len / page_size;
    auto vec = std::make_unique<unsigned char[]>(pages);
    std::uint64_t n = 0;
    if (::mincore(m, len, vec.get()) == 0)
      for (std::uint64_t i = 0; i < pages; ++i)
        n += vec[i] & 1;
    ::munmap(m, len);
    return n;
  }

private:
  unique_fd fd_;
  std::string path_;
  std::uint64_t size_;
};

/// The file mapped MAP_PRIVATE read-write, as guest RAM from a snapshot is.
class private_map {
public:
  private_map(const temp_file& f, std::uint64_t len) : len_(len) {
    void* m = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE, f.fd(), 0);
    if (m == MAP_FAILED) throw std::system_error(errno, std::generic_category(), "mmap");
    p_ = static_cast<std::byte*>(m);
  }
  ~private_map() { ::munmap(p_, len_); }
  private_map(const private_map&) = delete;
  private_map& operator=(const private_map&) = delete;
  std::byte* data() const { return p_; }

private:
  std::byte* p_;
  std::uint64_t len_;
};

/// Pages of [p, p + len) with a page-table entry (pagemap bit 63).
std::uint64_t present(const std::byte* p, std::uint64_t len) {
  unique_fd pm(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  if (!pm) return ~0ull;
  std::vector<std::uint64_t> e(len / page_size);
  const auto first = reinterpret_cast<std::uintptr_t>(p) / page_size;
  const auto want = static_cast<ssize_t>(e.size() * 8);
  if (::pread(pm.get(), e.data(), e.size() * 8, static_cast<off_t>(first * 8)) != want)
    return ~0ull;
  std::uint64_t n = 0;
  for (std::uint64_t v : e)
    n += v >> 63;
  return n;
}

void write_guest_page(std::byte* host, std::uint64_t off, std::uint64_t seed) {
  auto* w = reinterpret_cast<std::uint64_t*>(host + off);
  for (std::uint64_t i = 0; i < page_size / 8; ++i)
    w[i] = guest_word(off + i * 8, seed);
}

/// Which page of [0, len) differs from the file (or, for pages in `written`, from the guest's
/// pattern): the first, or ~0.
std::uint64_t first_bad_page(const std::byte* host, std::uint64_t len,
                             const std::vector<std::uint64_t>& written_seed) {
  for (std::uint64_t off = 0; off < len; off += page_size) {
    const std::uint64_t seed = written_seed.empty() ? 0 : written_seed[off / page_size];
    const auto* w = reinterpret_cast<const std::uint64_t*>(host + off);
    for (std::uint64_t i = 0; i < page_size / 8; ++i) {
      const std::uint64_t o = off + i * 8;
      if (w[i] != (seed ? guest_word(o, seed) : file_word(o))) return off / page_size;
    }
  }
  return ~0ull;
}

std::size_t open_fds() {
  std::size_t n = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator("/proc/self/fd"))
    ++n;
  return n;
}

/// Every test runs on both paths: io_uring (skipped only where the kernel refuses a ring) and
/// the worker thread.
class Prefetch : public ::testing::TestWithParam<bool> {
protected:
  bool thread_path() const { return GetParam(); }

  prefetch_options options(std::size_t working_set = 0) const {
    prefetch_options o;
    o.force_thread = thread_path();
    o.working_set_extents = working_set;
    o.chunk_bytes = 1ull << 20; // the counts below are per 1 MiB chunk
    return o;
  }

  /// Starts `plan`; skips the test where io_uring was asked for and the kernel refused it.
  std::unique_ptr<prefetch> start(std::vector<prefetch_extent> plan, prefetch_options o) {
    auto p = prefetch::start(std::move(plan), o);
    EXPECT_TRUE(p) << p.err().message();
    if (!p) return nullptr;
    if (!thread_path() && !(*p)->stats().used_io_uring) skipped_ = true;
    return std::move(*p);
  }
  bool refused() const { return skipped_; }

  /// A file of `size` bytes out of the page cache (skips where the file system cannot drop it).
  std::unique_ptr<temp_file> evicted_file(std::uint64_t size) {
    auto f = std::make_unique<temp_file>(size);
    if (!f->evictable()) return nullptr;
    f->evict();
    EXPECT_EQ(f->resident(0, size), 0u) << "the file is still in the page cache";
    return f;
  }

private:
  bool skipped_ = false;
};

#define KILN_NEED_FILE(f)                                                                          \
  if (!(f)) GTEST_SKIP() << "the temp directory is tmpfs: its pages cannot be evicted"
#define KILN_NEED_RING(p)                                                                          \
  if (!(p)) return;                                                                                \
  if (refused()) GTEST_SKIP() << "the kernel refused io_uring (see the stderr line)"

TEST_P(Prefetch, ReadsThePlanInOrderAndPopulatesTheMapping) {
  constexpr std::uint64_t size = 64 * mib;
  auto f = evicted_file(size);
  KILN_NEED_FILE(f);
  private_map map(*f, size);
  std::byte* h = map.data();
  // The working set (two pieces, out of file order), then the rest; [60M, 64M) has no host.
  const std::vector<std::pair<std::uint64_t, std::uint64_t>> ws = {{48 * mib, 52 * mib},
                                                                   {4 * mib, 5 * mib}};
  std::vector<prefetch_extent> plan;
  auto add = [&](std::uint64_t lo, std::uint64_t hi, bool host) {
    plan.push_back({f->fd(), lo, hi - lo, host ? h + lo : nullptr});
  };
  for (auto [lo, hi] : ws)
    add(lo, hi, true);
  add(0, 4 * mib, true);
  add(5 * mib, 48 * mib, true);
  add(52 * mib, 60 * mib, true);
  add(60 * mib, 64 * mib, false);
  auto p = start(plan, options(ws.size()));
  KILN_NEED_RING(p);

  const auto deadline = std::chrono::steady_clock::now() + 120s;
  bool checked_ws = false;
  while (!p->poll()) {
    const prefetch_stats s = p->stats();
    if (s.working_set_done && !checked_ws) {
      checked_ws = true;
      for (auto [lo, hi] : ws) {
        EXPECT_EQ(f->resident(lo, hi - lo), (hi - lo) / page_size) << "working set in the cache";
        EXPECT_EQ(present(h + lo, hi - lo), (hi - lo) / page_size) << "working set installed";
      }
    }
    ASSERT_LT(std::chrono::steady_clock::now(), deadline);
    pollfd pfd{p->notify_fd(), POLLIN, 0};
    ::poll(&pfd, 1, 1000);
  }
  const prefetch_stats s = p->stats();
  EXPECT_EQ(s.used_io_uring, !thread_path());
  EXPECT_TRUE(s.done);
  EXPECT_FALSE(s.cancelled);
  EXPECT_FALSE(s.failure.code) << s.failure.message();
  EXPECT_TRUE(s.working_set_done);
  EXPECT_LE(s.working_set_time, s.total_time);
  EXPECT_GT(s.total_time.count(), 0);
  EXPECT_EQ(s.bytes_read, size);
  EXPECT_GE(s.reads, size / mib);
  EXPECT_EQ(s.populate_calls, 60u) << "one per 1 MiB chunk with a host";
  EXPECT_EQ(s.populate_failures, 0u);

  EXPECT_EQ(f->resident(0, size), size / page_size);
  EXPECT_EQ(present(h, 60 * mib), 60 * mib / page_size);
  // No host: read, not installed (fault-around of the last populate may reach 64 KiB in).
  EXPECT_EQ(present(h + 61 * mib, 3 * mib), 0u);
  EXPECT_EQ(first_bad_page(h, size, {}), ~0ull);
  p->cancel(); // after the end: changes nothing
  EXPECT_TRUE(p->stats().done);
  EXPECT_FALSE(p->stats().cancelled);
}

TEST_P(Prefetch, PagesTheGuestWroteKeepTheirData) {
  constexpr std::uint64_t size = 16 * mib;
  auto f = evicted_file(size);
  KILN_NEED_FILE(f);
  private_map map(*f, size);
  std::byte* h = map.data();
  std::vector<std::uint64_t> seed(size / page_size, 0);
  for (std::uint64_t pg = 0; pg < size / page_size; pg += 37) { // scattered pages
    seed[pg] = 1 + pg % 200;
    write_guest_page(h, pg * page_size, seed[pg]);
  }
  for (std::uint64_t off = 3 * mib; off < 4 * mib; off += page_size) { // one whole chunk
    seed[off / page_size] = 201;
    write_guest_page(h, off, 201);
  }
  f->evict(); // the writes read their pages in; the private copies stay
  auto p = start({{f->fd(), 0, size, h}}, options());
  KILN_NEED_RING(p);
  p->wait();
  const auto s = p->stats();
  EXPECT_TRUE(s.done);
  EXPECT_FALSE(s.failure.code) << s.failure.message();
  EXPECT_EQ(s.populate_failures, 0u);
  EXPECT_EQ(present(h, size), size / page_size);
  EXPECT_EQ(first_bad_page(h, size, seed), ~0ull);
  // The file itself is untouched.
  std::uint64_t w = 0;
  ASSERT_EQ(::pread(f->fd(), &w, 8, 3 * mib), 8);
  EXPECT_EQ(w, file_word(3 * mib));
}

TEST_P(Prefetch, AGuestWritingDuringThePrefetchKeepsItsData) {
  constexpr std::uint64_t size = 16 * mib;
  auto f = evicted_file(size);
  KILN_NEED_FILE(f);
  for (int iteration = 0; iteration < 4; ++iteration) {
    SCOPED_TRACE(iteration);
    f->evict();
    private_map map(*f, size);
    std::byte* h = map.data();
    std::vector<std::uint64_t> seed(size / page_size, 0);
    const std::uint64_t stride = 3 + iteration;
    for (std::uint64_t pg = 0; pg < seed.size(); pg += stride)
      seed[pg] = 1 + (pg + iteration) % 250;
    prefetch_options o = options();
    o.chunk_bytes = 256 * 1024; // more, smaller populates to interleave with
    auto p = start({{f->fd(), 0, size, h}}, o);
    KILN_NEED_RING(p);
    std::atomic<bool> go{false};
    std::thread guest([&] {
      while (!go.load()) {
      }
      // Backwards, against the prefetch's order, so both meet in the middle.
      for (std::uint64_t pg = seed.size(); pg-- > 0;)
        if (seed[pg]) write_guest_page(h, pg * page_size, seed[pg]);
    });
    go = true;
    p->wait();
    guest.join();
    const auto s = p->stats();
    EXPECT_TRUE(s.done);
    EXPECT_FALSE(s.failure.code) << s.failure.message();
    EXPECT_EQ(first_bad_page(h, size, seed), ~0ull);
  }
}

TEST_P(Prefetch, AFileShorterThanPlannedStopsThatExtentWithSnapshotTruncated) {
  constexpr std::uint64_t size = 16 * mib;
  constexpr std::uint64_t cut = 9 * mib + 3 * page_size;
  for (bool cut_after_start : {false, true}) {
    SCOPED_TRACE(cut_after_start);
    if (cut_after_start && thread_path()) continue; // the worker starts at once: no fixed point
    auto f = evicted_file(size);
    KILN_NEED_FILE(f);
    private_map map(*f, size);
    std::byte* h = map.data();
    // Planned for 16 MiB; the working set lies past the new end, the rest straddles it.
    std::vector<prefetch_extent> plan = {{f->fd(), 12 * mib, 4 * mib, h + 12 * mib},
                                         {f->fd(), 0, 12 * mib, h}};
    if (!cut_after_start) {
      ASSERT_EQ(::ftruncate(f->fd(), cut), 0);
    }
    auto p = start(plan, options(1));
    KILN_NEED_RING(p);
    if (cut_after_start) { // before the first poll
      ASSERT_EQ(::ftruncate(f->fd(), cut), 0);
    }
    p->wait();
    const auto s = p->stats();
    EXPECT_TRUE(s.done);
    EXPECT_EQ(s.failure.code, memory_errc::snapshot_truncated) << s.failure.message();
    EXPECT_TRUE(s.working_set_done) << "processed as far as the file goes";
    EXPECT_EQ(s.bytes_read, cut) << "the second extent went on up to the end";
    EXPECT_EQ(present(h, 9 * mib), 9 * mib / page_size);
    EXPECT_EQ(first_bad_page(h, 9 * mib, {}), ~0ull); // nothing past the end is touched
  }
}

TEST_P(Prefetch, APopulateThatFailsIsCountedNotFatal) {
  constexpr std::uint64_t size = 4 * mib;
  auto f = evicted_file(size);
  KILN_NEED_FILE(f);
  private_map map(*f, size);
  std::byte* h = map.data();
  ASSERT_EQ(::mprotect(h + mib, mib, PROT_NONE), 0); // the guest made a chunk inaccessible
  auto p = start({{f->fd(), 0, size, h}}, options());
  KILN_NEED_RING(p);
  p->wait();
  const auto s = p->stats();
  EXPECT_TRUE(s.done);
  EXPECT_FALSE(s.failure.code) << s.failure.message();
  EXPECT_EQ(s.populate_calls, 4u);
  EXPECT_EQ(s.populate_failures, 1u);
  EXPECT_EQ(present(h, mib), mib / page_size);
  EXPECT_EQ(present(h + 2 * mib, 2 * mib), 2 * mib / page_size) << "later chunks went on";
}

TEST_P(Prefetch, CancelMidwayIsPromptIdempotentAndFinal) {
  constexpr std::uint64_t size = 64 * mib;
  auto f = evicted_file(size);
  KILN_NEED_FILE(f);
  private_map map(*f, size);
  for (int polls : {0, 1, 2}) {
    SCOPED_TRACE(polls);
    f->evict();
    auto p = start({{f->fd(), 0, size, map.data()}}, options());
    KILN_NEED_RING(p);
    for (int i = 0; i < polls; ++i)
      p->poll();
    const auto t0 = std::chrono::steady_clock::now();
    p->cancel();
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 30s);
    const auto s = p->stats();
    EXPECT_NE(s.cancelled, s.done) << "one or the other (it may have ended first)";
    if (!thread_path() && polls == 0) {
      EXPECT_TRUE(s.cancelled);
      EXPECT_EQ(s.bytes_read, 0u) << "nothing is submitted before the first poll()";
    }
    p->cancel();
    EXPECT_TRUE(p->poll());
    const auto again = p->stats();
    EXPECT_EQ(again.cancelled, s.cancelled);
    EXPECT_EQ(again.done, s.done);
    EXPECT_EQ(again.bytes_read, s.bytes_read) << "nothing ran after cancel()";
    EXPECT_EQ(again.populate_calls, s.populate_calls);
  }
}

TEST_P(Prefetch, DestroyingWithoutWaitingReleasesEverything) {
  constexpr std::uint64_t size = 32 * mib;
  auto f = evicted_file(size);
  KILN_NEED_FILE(f);
  const std::size_t fds = open_fds();
  for (int polls : {0, 1, 3}) {
    private_map map(*f, size);
    auto p = start({{f->fd(), 0, size, map.data()}}, options());
    KILN_NEED_RING(p);
    for (int i = 0; i < polls; ++i)
      p->poll();
    p.reset(); // before the mapping goes
  }
  EXPECT_EQ(open_fds(), fds) << "ring and eventfd closed";
}

TEST_P(Prefetch, AnEmptyPlanIsDoneAtOnce) {
  auto p = prefetch::start({}, options());
  ASSERT_TRUE(p) << p.err().message();
  EXPECT_TRUE((*p)->poll());
  EXPECT_TRUE((*p)->stats().done);
  EXPECT_TRUE((*p)->stats().working_set_done);
  (*p)->wait();
}

INSTANTIATE_TEST_SUITE_P(Paths, Prefetch, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "thread" : "io_uring"; });

TEST(PrefetchPlan, InvalidPlansAreEinval) {
  temp_file f(mib);
  std::byte* h = nullptr;
  {
    void* m = ::mmap(nullptr, mib, PROT_READ, MAP_PRIVATE, f.fd(), 0);
    ASSERT_NE(m, MAP_FAILED);
    h = static_cast<std::byte*>(m);
  }
  const int fd = f.fd();
  const prefetch_options good;
  auto expect_einval = [](std::vector<prefetch_extent> plan, prefetch_options o, const char* why) {
    auto r = prefetch::start(std::move(plan), o);
    EXPECT_FALSE(r) << why;
    if (!r) {
      EXPECT_EQ(r.code(), std::errc::invalid_argument) << why << ": " << r.err().message();
    }
  };
  expect_einval({{-1, 0, page_size, nullptr}}, good, "no fd");
  expect_einval({{fd, 100, page_size, nullptr}}, good, "unaligned offset");
  expect_einval({{fd, 0, 0, nullptr}}, good, "empty");
  expect_einval({{fd, 0, 100, nullptr}}, good, "length not a page multiple");
  expect_einval({{fd, ~0ull & ~(page_size - 1), 2 * page_size, nullptr}}, good, "overflow");
  expect_einval({{fd, 1ull << 63, page_size, nullptr}}, good, "past off_t");
  expect_einval({{fd, 0, page_size, h + 8}}, good, "unaligned host");
  expect_einval({{fd, 0, 2 * page_size, reinterpret_cast<std::byte*>(~0ull & ~(page_size - 1))}},
                good, "host overflow");
  expect_einval({{fd, 0, page_size, h}, {fd, 0, 100, h}}, good, "a later extent");
  auto o = good;
  o.working_set_extents = 2;
  expect_einval({{fd, 0, page_size, h}}, o, "working set past the plan");
  o = good;
  o.chunk_bytes = 0;
  expect_einval({{fd, 0, page_size, h}}, o, "chunk 0");
  o.chunk_bytes = page_size + 1;
  expect_einval({{fd, 0, page_size, h}}, o, "chunk unaligned");
  o.chunk_bytes = 2ull << 30;
  expect_einval({{fd, 0, page_size, h}}, o, "chunk too large");
  o = good;
  o.queue_depth = 0;
  expect_einval({{fd, 0, page_size, h}}, o, "no queue");
  o.queue_depth = 100000;
  expect_einval({{fd, 0, page_size, h}}, o, "queue too deep");
  // And the good one works.
  auto r = prefetch::start({{fd, 0, mib, h}}, good);
  ASSERT_TRUE(r) << r.err().message();
  (*r)->wait();
  EXPECT_TRUE((*r)->stats().done);
  EXPECT_FALSE((*r)->stats().failure.code);
  ::munmap(h, mib);
}

/// In a child whose seccomp filter answers io_uring_setup with EPERM (as a container runtime's
/// default profile does), two prefetches run on the worker thread, complete, and the process
/// writes exactly one line about it to stderr.
TEST(PrefetchFallback, ARefusedRingFallsBackToTheThreadAndSaysSoOnce) {
  temp_file f(4 * mib);
  int out[2];
  ASSERT_EQ(::pipe(out), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::dup2(out[1], 2);
    ::close(out[0]);
    sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    sock_fprog prog{static_cast<unsigned short>(std::size(filter)), filter};
    if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
        ::prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0)
      ::_exit(42);
    void* m = ::mmap(nullptr, 4 * mib, PROT_READ | PROT_WRITE, MAP_PRIVATE, f.fd(), 0);
    if (m == MAP_FAILED) ::_exit(3);
    auto* h = static_cast<std::byte*>(m);
    for (int i = 0; i < 2; ++i) {
      auto p = prefetch::start({{f.fd(), 0, 4 * mib, h}}, {});
      if (!p) ::_exit(4);
      (*p)->wait();
      const auto s = (*p)->stats();
      if (s.used_io_uring || !s.done || s.failure.code || s.bytes_read != 4 * mib) ::_exit(5);
    }
    if (present(h, 4 * mib) != 4 * mib / page_size || first_bad_page(h, 4 * mib, {}) != ~0ull)
      ::_exit(6);
    ::_exit(0);
  }
  ::close(out[1]);
  std::string err;
  char buf[4096];
  for (ssize_t n; (n = ::read(out[0], buf, sizeof buf)) != 0;)
    if (n > 0)
      err.append(buf, static_cast<std::size_t>(n));
    else if (errno != EINTR)
      break;
  ::close(out[0]);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << status;
  if (WEXITSTATUS(status) == 42) GTEST_SKIP() << "the kernel refused a seccomp filter";
  EXPECT_EQ(WEXITSTATUS(status), 0) << err;
  std::size_t lines = 0;
  for (std::size_t at = 0; (at = err.find("io_uring unavailable", at)) != std::string::npos; ++at)
    ++lines;
  EXPECT_EQ(lines, 1u) << err;
  EXPECT_NE(err.find("Operation not permitted"), std::string::npos) << err;
}

} // namespace
} // namespace kiln::memory
