// End to end: working sets recorded in a sandbox, stored in .ksnap files, and the three ways a
// sandbox created from a file brings its pages in (prefetch, demand, eager), with the guest's
// own writes never clobbered by a prefetch running under it.
#include "backend_fixture.hpp"

#include <kiln/guest/abi.h>
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/snapshot_file.hpp>
#include <kiln/runtime/runtime.hpp>

#include <boost/asio/use_future.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <thread>

namespace kiln::test {
namespace {

constexpr std::uint64_t page = 4096, mib = 1ull << 20;

/// Page-cache pages of `path` resident now (mincore over a fresh mapping of it).
std::uint64_t cached_pages(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  EXPECT_GE(fd, 0);
  struct stat st {};
  ::fstat(fd, &st);
  const auto size = static_cast<std::size_t>(st.st_size);
  void* m = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  EXPECT_NE(m, MAP_FAILED);
  std::vector<unsigned char> v((size + page - 1) / page);
  EXPECT_EQ(::mincore(m, size, v.data()), 0);
  ::munmap(m, size);
  ::close(fd);
  return static_cast<std::uint64_t>(
      std::count_if(v.begin(), v.end(), [](unsigned char c) { return c & 1; }));
}

/// Drops `path` from the page cache (written back first), as after a reboot.
void evict(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  ::fdatasync(fd);
  ASSERT_EQ(::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
  ::close(fd);
}

class lazy_load_e2e : public file_backend_test {
protected:
  /// A 64 MiB memory_test snapshot with 16 MiB of heap data (value 5), whose working set is the
  /// pages `sum_pages` reads over its first 4 MiB, saved to `file`. Sets heap_.
  void save_with_working_set(const std::string& file) {
    auto c = config_for("memory_test");
    c.memory_size = 64 * mib;
    auto sb = sandbox::create(c);
    ASSERT_TRUE(sb) << sb.err().message();
    heap_ = as<std::uint64_t>((*sb)->call("heap_start"));
    ASSERT_TRUE((*sb)->call("touch", heap_, 16 * mib, std::int64_t{5}));
    auto snap = (*sb)->take_snapshot();
    ASSERT_TRUE(snap);
    auto rec = sandbox::create(*snap, {}, c);
    ASSERT_TRUE(rec) << rec.err().message();
    ASSERT_TRUE((*rec)->start_recording());
    EXPECT_EQ(as<std::uint64_t>((*rec)->call("sum_pages", heap_, 4 * mib)), 5u * 1024);
    auto ws = (*rec)->stop_recording();
    ASSERT_TRUE(ws) << ws.err().message();
    auto with = snap->with_working_set(*ws);
    ASSERT_TRUE(with) << with.err().message();
    ASSERT_TRUE(with->save(file, {.layered = false}));
  }
  std::uint64_t heap_ = 0;
};

TEST_F(lazy_load_e2e, recording_lists_the_pages_a_call_touches_in_first_touch_order) {
  auto c = config_for("memory_test");
  c.memory_size = 32 * mib;
  auto sb = sandbox::create(c);
  ASSERT_TRUE(sb) << sb.err().message();
  const auto h = as<std::uint64_t>((*sb)->call("heap_start"));
  EXPECT_EQ((*sb)->start_recording().code(), errc::not_ready) << "no snapshot to record against";
  auto snap = (*sb)->take_snapshot();
  ASSERT_TRUE(snap);
  ASSERT_TRUE((*sb)->start_recording()) << "restored to nothing, but its RAM maps the snapshot now";
  EXPECT_EQ((*sb)->start_recording().code(), errc::not_ready) << "already recording";
  ASSERT_TRUE((*sb)->call("touch", h + 5 * page, 3 * page, std::int64_t{1}));
  ASSERT_TRUE((*sb)->call("sum_pages", h, 2 * page));
  auto ws = (*sb)->stop_recording();
  ASSERT_TRUE(ws) << ws.err().message();
  EXPECT_TRUE(ws->complete);
  EXPECT_EQ(ws->snapshot_id, snap->id());
  // The heap pages appear in the order the calls touched them, each once.
  const std::uint32_t h0 = static_cast<std::uint32_t>(h / page);
  std::vector<std::uint32_t> heap_pages;
  for (auto pg : ws->pages)
    if (pg >= h0 && pg < h0 + 8) heap_pages.push_back(pg);
  EXPECT_EQ(heap_pages, (std::vector<std::uint32_t>{h0 + 5, h0 + 6, h0 + 7, h0, h0 + 1}));
  auto sorted = ws->pages;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(std::adjacent_find(sorted.begin(), sorted.end()), sorted.end()) << "each page once";
  EXPECT_EQ((*sb)->stop_recording().code(), errc::not_ready) << "taken already";

  // The sandbox works as before (recording gave every page its protection back).
  EXPECT_EQ(as<std::uint64_t>((*sb)->call("sum_pages", h + 5 * page, 3 * page)), 3u);

  // A working set belongs to the snapshot it was recorded against.
  auto with = snap->with_working_set(*ws);
  ASSERT_TRUE(with) << with.err().message();
  EXPECT_EQ(with->working_set_pages(), ws->pages.size());
  auto other = (*sb)->take_snapshot();
  ASSERT_TRUE(other);
  EXPECT_EQ(other->with_working_set(*ws).code(), errc::bad_arguments);
  working_set bad = *ws;
  bad.pages.push_back(bad.pages.front());
  EXPECT_EQ(snap->with_working_set(bad).code(), errc::bad_arguments) << "a page twice";

  // A guest memory request ends the recording (it may reprotect armed pages) and is served.
  ASSERT_TRUE((*sb)->start_recording());
  EXPECT_EQ(
      as<std::int32_t>((*sb)->call("protect", h + 16 * page, page, std::int32_t{KILN_PROT_READ})),
      0);
  EXPECT_TRUE((*sb)->stop_recording()) << "ended by the request, its pages kept";
  auto write = (*sb)->call("touch", h + 16 * page, page, std::int64_t{1});
  EXPECT_EQ(write.code(), errc::memory_violation) << "the page is read-only, as the guest asked";
}

// A page the host already had mapped (an earlier call read it, or a prefetch brought it in) is
// still recorded when a recorded call only reads it: on KVM, where no fault reaches user space,
// recording first unmaps every page that is still the snapshot's, so the read maps it again.
TEST_F(lazy_load_e2e, recording_sees_reads_of_pages_that_were_already_mapped) {
  auto c = config_for("memory_test");
  c.memory_size = 32 * mib;
  auto sb = sandbox::create(c);
  ASSERT_TRUE(sb) << sb.err().message();
  const auto h = as<std::uint64_t>((*sb)->call("heap_start"));
  ASSERT_TRUE((*sb)->call("touch", h + 32 * page, 4 * page, std::int64_t{2}));
  auto snap = (*sb)->take_snapshot();
  ASSERT_TRUE(snap);
  EXPECT_EQ(as<std::uint64_t>((*sb)->call("sum_pages", h + 32 * page, 4 * page)), 8u);
  ASSERT_TRUE((*sb)->start_recording());
  EXPECT_EQ(as<std::uint64_t>((*sb)->call("sum_pages", h + 32 * page, 4 * page)), 8u);
  auto ws = (*sb)->stop_recording();
  ASSERT_TRUE(ws) << ws.err().message();
  const auto h0 = static_cast<std::uint32_t>(h / page) + 32;
  std::vector<std::uint32_t> read;
  for (auto pg : ws->pages)
    if (pg >= h0 && pg < h0 + 4) read.push_back(pg);
  EXPECT_EQ(read, (std::vector<std::uint32_t>{h0, h0 + 1, h0 + 2, h0 + 3}));
  // The sandbox carries on with its own state.
  EXPECT_EQ(as<std::uint64_t>((*sb)->call("sum_pages", h + 32 * page, 4 * page)), 8u);
}

TEST_F(lazy_load_e2e, a_snapshot_or_restore_ends_a_recording_and_keeps_its_pages) {
  auto c = config_for("memory_test");
  auto sb = sandbox::create(c);
  ASSERT_TRUE(sb) << sb.err().message();
  const auto h = as<std::uint64_t>((*sb)->call("heap_start"));
  auto snap = (*sb)->take_snapshot();
  ASSERT_TRUE(snap);
  ASSERT_TRUE((*sb)->start_recording());
  ASSERT_TRUE((*sb)->call("touch", h, 4 * page, std::int64_t{2}));
  auto mid = (*sb)->take_snapshot(); // writes RAM to a memfd: recording must have ended
  ASSERT_TRUE(mid) << mid.err().message();
  auto ws = (*sb)->stop_recording();
  ASSERT_TRUE(ws);
  EXPECT_GE(ws->pages.size(), 4u);
  ASSERT_TRUE((*sb)->start_recording());
  ASSERT_TRUE((*sb)->restore(*snap));
  EXPECT_TRUE((*sb)->stop_recording());
  EXPECT_EQ(as<std::uint64_t>((*sb)->call("sum_pages", h, 4 * page)), 0u);
}

TEST_F(lazy_load_e2e,
       the_working_set_is_stored_in_the_file_and_every_load_mode_gives_the_same_guest) {
  const auto file = path("ws.ksnap");
  ASSERT_NO_FATAL_FAILURE(save_with_working_set(file));
  auto loaded = snapshot::load(file);
  ASSERT_TRUE(loaded) << loaded.err().message();
  EXPECT_GE(loaded->working_set_pages(), 1024u);
  EXPECT_NE(loaded->describe().find("working set: "), std::string::npos);
  const std::uint64_t data_pages = *loaded->stored_bytes() / page;

  struct mode_case {
    load_mode mode;
    bool io_uring;
  };
  for (auto m : {mode_case{load_mode::prefetch, true}, mode_case{load_mode::prefetch, false},
                 mode_case{load_mode::demand, true}, mode_case{load_mode::eager, true}}) {
    SCOPED_TRACE(static_cast<int>(m.mode) * 10 + m.io_uring);
    evict(file);
    auto c = config_for("memory_test");
    c.load.mode = m.mode;
    c.load.use_io_uring = m.io_uring;
    c.load.count_faults = true;
    auto sb = sandbox::create(*loaded, {}, c);
    ASSERT_TRUE(sb) << sb.err().message();
    EXPECT_EQ(as<std::uint64_t>((*sb)->call("sum_pages", heap_, 16 * mib)), 5u * 4096);
    (*sb)->wait_loaded();
    // The pre-fault of what the prefetch made resident happens between runs: one more call.
    EXPECT_EQ(as<std::uint64_t>((*sb)->call("sum_pages", heap_, mib)), 5u * 256);
    const auto ls = (*sb)->stats().load;
    EXPECT_TRUE(ls.from_file);
    EXPECT_EQ(ls.mode, m.mode);
    EXPECT_EQ(ls.working_set_pages, loaded->working_set_pages());
    EXPECT_GT(ls.to_first_result, ls.to_start);
    if (backend_under_test() == vcpu::backend_kind::emulated) {
      EXPECT_EQ(ls.bytes_prefaulted, 0u) << "no second-level page tables to fill";
    } else {
      ::testing::Test::RecordProperty("bytes_prefaulted", std::to_string(ls.bytes_prefaulted));
      if (m.mode == load_mode::demand) {
        EXPECT_EQ(ls.bytes_prefaulted, 0u);
      } else if (kvm_has_pre_fault_memory()) {
        EXPECT_GT(ls.bytes_prefaulted, 0u) << "KVM_PRE_FAULT_MEMORY is there, and was not used";
      }
    }
    if (m.mode == load_mode::demand) {
      EXPECT_EQ(ls.bytes_prefetched, 0u);
      EXPECT_FALSE(ls.everything_resident);
      // One fault maps up to 16 pages of a file (the kernel's fault-around): 256 for 16 MiB.
      EXPECT_GE(ls.faults, 16 * mib / (64 * 1024)) << "the 16 MiB faulted in";
    } else {
      EXPECT_EQ(ls.io_uring, m.io_uring);
      // Every page of the file; the working set's twice (first on its own, then with the rest).
      EXPECT_GE(ls.bytes_prefetched, data_pages * page);
      EXPECT_LE(ls.bytes_prefetched, (data_pages + 2 * loaded->working_set_pages()) * page);
      EXPECT_TRUE(ls.working_set_resident && ls.everything_resident);
      EXPECT_LE(ls.to_working_set, ls.to_everything);
      EXPECT_GE(cached_pages(file), data_pages) << "the file's data is in the page cache";
      if (m.mode == load_mode::eager) {
        EXPECT_LE(ls.to_everything, ls.to_start);
      }
    }
  }
  // Fault counting costs two getrusage() per run, so it is only done when asked for.
  evict(file);
  auto c = config_for("memory_test");
  c.load.mode = load_mode::demand;
  auto sb = sandbox::create(*loaded, {}, c);
  ASSERT_TRUE(sb) << sb.err().message();
  EXPECT_EQ(as<std::uint64_t>((*sb)->call("sum_pages", heap_, 16 * mib)), 5u * 4096);
  EXPECT_EQ((*sb)->stats().load.faults, 0u) << "counted without count_faults";
}

// Issue 6, item 4: a guest writing pages while the prefetch runs over them ends with its own
// data, never the file's. Evicted file, so the prefetch is still reading while the guest runs.
/// Flips one byte of `file`'s stored data at guest address `a`.
void flip_stored_byte(const std::string& file, std::uint64_t a) {
  auto chain = memory::snapshot_chain::open(file);
  ASSERT_TRUE(chain) << chain.err().message();
  auto img = chain->image();
  ASSERT_TRUE(img);
  const auto at = static_cast<off_t>((*img)->layers()[0]->base() + a);
  const int fd = ::open(file.c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  unsigned char b = 0;
  ASSERT_EQ(::pread(fd, &b, 1, at), 1);
  b ^= 0x01;
  ASSERT_EQ(::pwrite(fd, &b, 1, at), 1);
  ::close(fd);
}

// A byte flipped in the stored data: an eager load refuses the file; a prefetch finds it as its
// reads complete, and from then on no call of any sandbox over that file returns a result.
TEST_F(lazy_load_e2e,
       a_corrupt_chunk_fails_an_eager_load_and_every_call_after_a_prefetch_finds_it) {
  const auto file = path("corrupt.ksnap");
  ASSERT_NO_FATAL_FAILURE(save_with_working_set(file));
  ASSERT_NO_FATAL_FAILURE(flip_stored_byte(file, heap_ + 8 * mib + 12345)); // past the working set
  auto c = config_for("memory_test");

  auto loaded = snapshot::load(file);
  ASSERT_TRUE(loaded) << loaded.err().message();
  c.load.mode = load_mode::eager;
  auto eager = sandbox::create(*loaded, {}, c);
  ASSERT_FALSE(eager);
  EXPECT_EQ(eager.code(), memory::memory_errc::snapshot_corrupt);
  EXPECT_NE(eager.err().message().find("chunk "), std::string::npos) << eager.err().message();
  c.load.check_data = false;
  EXPECT_TRUE(sandbox::create(*loaded, {}, c)) << "unchecked, the same file loads";

  auto fresh = snapshot::load(file); // a new image: nothing known about it yet
  ASSERT_TRUE(fresh);
  c.load.check_data = true;
  c.load.mode = load_mode::demand;
  auto bystander = sandbox::create(*fresh, {}, c); // reads nothing itself
  ASSERT_TRUE(bystander) << bystander.err().message();
  EXPECT_EQ(as<std::uint64_t>((*bystander)->call("sum_pages", heap_, mib)), 5u * 256);
  c.load.mode = load_mode::prefetch;
  auto sb = sandbox::create(*fresh, {}, c);
  ASSERT_TRUE(sb) << sb.err().message();
  (*sb)->wait_loaded();
  const auto st = (*sb)->stats().load;
  EXPECT_GT(st.chunks_total, 0u);
  EXPECT_EQ(st.chunks_checked + 1, st.chunks_total);
  auto r = (*sb)->call("sum_pages", heap_, mib);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), memory::memory_errc::snapshot_corrupt);
  EXPECT_NE(r.err().message().find(file), std::string::npos) << r.err().message();
  EXPECT_TRUE((*sb)->poisoned());
  // The sandbox that loaded nothing learns it from the file's layer.
  auto other = (*bystander)->call("sum_pages", heap_, mib);
  ASSERT_FALSE(other);
  EXPECT_EQ(other.code(), memory::memory_errc::snapshot_corrupt);
}

TEST_F(lazy_load_e2e, a_guest_writing_under_a_running_prefetch_keeps_its_own_data) {
  const auto file = path("race.ksnap");
  ASSERT_NO_FATAL_FAILURE(save_with_working_set(file));
  auto loaded = snapshot::load(file);
  ASSERT_TRUE(loaded) << loaded.err().message();
  for (int i = 0; i < 12; ++i) {
    SCOPED_TRACE(i);
    evict(file);
    auto c = config_for("memory_test");
    c.load.chunk_bytes = 64 * 1024; // many small chunks: more interleaving
    c.load.use_io_uring = i % 3 != 2;
    auto sb = sandbox::create(*loaded, {}, c);
    ASSERT_TRUE(sb) << sb.err().message();
    // Write over the working set and beyond it, from the back, as the prefetch goes forward.
    const auto value = std::int64_t{100 + i};
    for (std::uint64_t off = 16 * mib; off > 0; off -= 2 * mib)
      ASSERT_TRUE((*sb)->call("touch", heap_ + off - mib, mib, value));
    (*sb)->wait_loaded();
    for (std::uint64_t off = 0; off < 16 * mib; off += 2 * mib) {
      EXPECT_EQ(as<std::uint64_t>((*sb)->call("sum_pages", heap_ + off, mib)), 5u * 256)
          << "untouched megabyte at " << off;
      EXPECT_EQ(as<std::uint64_t>((*sb)->call("sum_pages", heap_ + off + mib, mib)),
                static_cast<std::uint64_t>(value) * 256)
          << "the guest's own megabyte at " << off + mib;
    }
  }
}

TEST_F(lazy_load_e2e, a_layered_file_prefetches_each_page_from_the_file_that_holds_it) {
  const auto base = path("base.ksnap"), child = path("child.ksnap");
  ASSERT_NO_FATAL_FAILURE(save_with_working_set(base));
  auto c = config_for("memory_test");
  {
    auto loaded = snapshot::load(base);
    ASSERT_TRUE(loaded);
    auto sb = sandbox::create(*loaded, {}, c);
    ASSERT_TRUE(sb) << sb.err().message();
    // Over the working set and past it: the child's pages lie among its parent's.
    ASSERT_TRUE((*sb)->call("touch", heap_ + mib, 2 * mib, std::int64_t{9}));
    auto snap = (*sb)->take_snapshot();
    ASSERT_TRUE(snap);
    auto rec = sandbox::create(*snap, {}, c);
    ASSERT_TRUE(rec);
    ASSERT_TRUE((*rec)->start_recording());
    ASSERT_TRUE((*rec)->call("sum_pages", heap_, 4 * mib));
    auto ws = (*rec)->stop_recording();
    ASSERT_TRUE(ws);
    auto with = snap->with_working_set(*ws);
    ASSERT_TRUE(with && with->save(child));
  }
  auto loaded = snapshot::load(child);
  ASSERT_TRUE(loaded) << loaded.err().message();
  ASSERT_EQ(loaded->files().size(), 2u);
  for (auto mode : {load_mode::prefetch, load_mode::eager}) {
    evict(base);
    evict(child);
    c.load.mode = mode;
    auto sb = sandbox::create(*loaded, {}, c);
    ASSERT_TRUE(sb) << sb.err().message();
    EXPECT_EQ(as<std::uint64_t>((*sb)->call("sum_pages", heap_, 16 * mib)),
              5u * (4096 - 512) + 9u * 512);
    (*sb)->wait_loaded();
    const auto ls = (*sb)->stats().load;
    EXPECT_TRUE(ls.everything_resident);
    EXPECT_GE(ls.bytes_prefetched, 16 * mib) << "both files' pages";
    EXPECT_GE(cached_pages(child), 512u) << "the child's own pages came from the child";
  }
}

TEST_F(lazy_load_e2e, the_runtime_reaps_the_prefetch_on_its_service_thread) {
  const auto file = path("rt.ksnap");
  ASSERT_NO_FATAL_FAILURE(save_with_working_set(file));
  auto loaded = snapshot::load(file);
  ASSERT_TRUE(loaded) << loaded.err().message();
  evict(file);
  runtime rt({.workers = 1});
  auto sb = rt.async_create(*loaded, {}, config_for("memory_test"), boost::asio::use_future).get();
  ASSERT_TRUE(sb);
  auto r =
      sb.async_call("sum_pages", {value{heap_}, value{16 * mib}}, boost::asio::use_future).get();
  ASSERT_TRUE(std::holds_alternative<std::uint64_t>(r)) << to_string(r);
  EXPECT_EQ(std::get<std::uint64_t>(r), 5u * 4096);
  // The prefetch finishes by itself, driven by the service thread (nobody waits on it here;
  // a cheap call now and then refreshes the handle's copy of the stats).
  load_stats ls;
  for (int i = 0; i < 2000 && !(ls = sb.stats().load).everything_resident; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    sb.async_call("bump", {}, boost::asio::use_future).get();
  }
  EXPECT_TRUE(ls.everything_resident);
  EXPECT_TRUE(ls.io_uring);
  EXPECT_GE(ls.bytes_prefetched, *loaded->stored_bytes());
  sb.async_destroy(boost::asio::use_future).get();
}

TEST_F(lazy_load_e2e, sandboxes_destroyed_or_a_runtime_stopped_mid_prefetch_leave_nothing_behind) {
  const auto file = path("stop.ksnap");
  ASSERT_NO_FATAL_FAILURE(save_with_working_set(file));
  auto loaded = snapshot::load(file);
  ASSERT_TRUE(loaded) << loaded.err().message();
  for (int round = 0; round < 3; ++round) {
    evict(file);
    runtime rt({.workers = 2});
    auto c = config_for("memory_test");
    c.load.chunk_bytes = 64 * 1024; // a long prefetch: still running when the end comes
    c.load.queue_depth = 1;
    std::vector<async_sandbox> boxes;
    for (int i = 0; i < 4; ++i) {
      auto sb = rt.async_create(*loaded, {}, c, boost::asio::use_future).get();
      ASSERT_TRUE(sb);
      boxes.push_back(sb);
    }
    // Two destroyed at once, one after a call, one left to the runtime's stop.
    boxes[0].async_destroy(boost::asio::use_future).get();
    boxes[1].async_destroy(boost::asio::use_future).get();
    auto r =
        boxes[2].async_call("sum_pages", {value{heap_}, value{mib}}, boost::asio::use_future).get();
    ASSERT_TRUE(std::holds_alternative<std::uint64_t>(r));
    EXPECT_EQ(std::get<std::uint64_t>(r), 5u * 256);
    boxes[2].async_destroy(boost::asio::use_future).get();
    rt.stop(); // boxes[3]'s prefetch may still be reading
  }
}

} // namespace
} // namespace kiln::test
