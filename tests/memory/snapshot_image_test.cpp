// Tests for memory/snapshot_image.hpp and the image side of guest_memory: capture, layers,
// back_with, dirty_ranges, revert and resident_bytes.
#include <kiln/memory/guest_memory.hpp>
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/snapshot_image.hpp>

#include <gtest/gtest.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace kiln::memory {
namespace {

constexpr std::uint64_t mib = 1ull << 20;
constexpr std::uint64_t ram_size = 16 * mib;

using page = std::vector<std::byte>;
using image_ptr = std::shared_ptr<const snapshot_image>;
using model = std::map<std::uint64_t, page>; // page address -> bytes; absent pages are zero

/// A page no two calls with other arguments share, never all zero.
page pattern(std::uint64_t addr, std::uint8_t seed) {
  page p(page_size);
  for (std::uint64_t i = 0; i < page_size; ++i)
    p[i] = std::byte(static_cast<std::uint8_t>((addr / page_size) * 13 + i * 7 + seed));
  return p;
}

page zeros() {
  return page(page_size);
}

/// Page `a` of `layer`'s file, read with pread.
page read_layer(const snapshot_layer& layer, std::uint64_t a) {
  page out(page_size, std::byte{0x5a});
  for (std::uint64_t done = 0; done < page_size;) {
    const ssize_t n = ::pread(layer.fd(), out.data() + done, page_size - done,
                              static_cast<off_t>(layer.base() + a + done));
    if (n <= 0) {
      ADD_FAILURE() << "pread layer at " << a + done << ": " << (n < 0 ? errno : 0);
      break;
    }
    done += static_cast<std::uint64_t>(n);
  }
  return out;
}

/// Page `a` of the image: from the layer its extent names, zero where no extent is.
page read_image(const snapshot_image& img, std::uint64_t a) {
  const snapshot_layer* layer = img.layer_at(a);
  return layer ? read_layer(*layer, a) : zeros();
}

/// The data extents of a layer's file (SEEK_DATA / SEEK_HOLE), merged.
std::vector<byte_range> layer_data(const snapshot_layer& layer, std::uint64_t size) {
  std::vector<byte_range> out;
  off_t at = 0;
  while (static_cast<std::uint64_t>(at) < size) {
    const off_t data = ::lseek(layer.fd(), at, SEEK_DATA);
    if (data < 0) {
      EXPECT_EQ(errno, ENXIO);
      break;
    }
    const off_t hole = ::lseek(layer.fd(), data, SEEK_HOLE);
    EXPECT_GT(hole, data);
    if (hole <= data) break;
    out.emplace_back(data, hole);
    at = hole;
  }
  return out;
}

/// The ranges of the pages in `pages` (page addresses), merged when adjacent.
std::vector<byte_range> ranges_of(const std::vector<std::uint64_t>& pages) {
  std::vector<byte_range> out;
  for (std::uint64_t a : pages)
    if (!out.empty() && out.back().second == a)
      out.back().second = a + page_size;
    else
      out.emplace_back(a, a + page_size);
  return out;
}

/// The non-zero pages of `m`, in order.
std::vector<std::uint64_t> nonzero_pages(const model& m) {
  std::vector<std::uint64_t> out;
  for (const auto& [a, p] : m)
    if (p != zeros()) out.push_back(a);
  return out;
}

std::vector<byte_range> extent_ranges(const snapshot_image& img) {
  std::vector<byte_range> out;
  for (const auto& e : img.extents())
    out.emplace_back(e.lo, e.hi);
  return out;
}

/// Checks every page of the image against `want`.
void expect_bytes(const snapshot_image& img, const model& want) {
  ASSERT_EQ(img.size(), ram_size);
  for (std::uint64_t a = 0; a < ram_size; a += page_size) {
    const auto it = want.find(a);
    EXPECT_TRUE(read_image(img, a) == (it != want.end() ? it->second : zeros()))
        << "image bytes of page 0x" << std::hex << a;
  }
}

/// Checks a one-layer image against `want`: its bytes, and that its layer holds exactly the
/// non-zero pages as data (zero pages are holes), which are its extents and data_bytes().
void expect_flat_image(const snapshot_image& img, const model& want) {
  expect_bytes(img, want);
  ASSERT_EQ(img.layers().size(), 1u);
  const auto data = ranges_of(nonzero_pages(want));
  EXPECT_EQ(layer_data(*img.layers()[0], ram_size), data) << "data pages of the layer's file";
  EXPECT_EQ(extent_ranges(img), data);
  for (const auto& e : img.extents())
    EXPECT_EQ(e.layer, 0u);
  EXPECT_EQ(img.data_bytes(), nonzero_pages(want).size() * page_size);
  EXPECT_EQ(img.total_data_bytes(), img.data_bytes());
}

/// Maps the kernel's shared zero page at `host` (an untouched anonymous page) through
/// userfaultfd, as a read fault does on kernels that map it there (most; not all).
/// Returns false, with the reason in `why`, where userfaultfd is unavailable.
bool map_zero_page(std::byte* host, std::string& why) {
  const int u = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY));
  if (u < 0) {
    why = std::string("userfaultfd: ") + std::strerror(errno);
    return false;
  }
  const auto at = reinterpret_cast<std::uintptr_t>(host);
  uffdio_api api{};
  api.api = UFFD_API;
  uffdio_register reg{};
  reg.range = {at, page_size};
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  uffdio_zeropage zp{};
  zp.range = {at, page_size};
  uffdio_range range{at, page_size};
  bool ok = ::ioctl(u, UFFDIO_API, &api) == 0 && ::ioctl(u, UFFDIO_REGISTER, &reg) == 0 &&
            ::ioctl(u, UFFDIO_ZEROPAGE, &zp) == 0;
  if (!ok) why = std::string("userfaultfd ioctl: ") + std::strerror(errno);
  ok = ::ioctl(u, UFFDIO_UNREGISTER, &range) == 0 && ok;
  ::close(u);
  return ok;
}

class SnapshotImage : public ::testing::Test {
protected:
  void SetUp() override {
    auto m = guest_memory::create(ram_size, 0);
    ASSERT_TRUE(m) << m.err().message();
    mem_.emplace(std::move(m).value());
  }
  guest_memory& mem() { return *mem_; }

  std::byte* host(std::uint64_t a) { return mem().host_address_for_mapping(guest_phys_addr{a}); }
  /// Writes `p` at RAM page `a` through the host mapping, and records it in `model_`.
  void put(std::uint64_t a, const page& p) {
    // SAFETY: `a` is a page of this guest's RAM, host-writable in these tests.
    std::memcpy(host(a), p.data(), page_size);
    model_[a] = p;
  }
  /// RAM page `a`, read through the host mapping.
  page ram(std::uint64_t a) {
    // SAFETY: as in put(); host-readable.
    return page(host(a), host(a) + page_size);
  }
  image_ptr capture(std::span<const byte_range> zeroed = {},
                    std::span<const byte_range> unreadable = {}) {
    auto img = snapshot_image::capture(mem(), zeroed, unreadable);
    EXPECT_TRUE(img) << img.err().message();
    return img ? *img : nullptr;
  }
  std::vector<byte_range> dirty() {
    auto d = mem().dirty_ranges();
    EXPECT_TRUE(d) << d.err().message();
    return d ? *d : std::vector<byte_range>{};
  }
  std::uint64_t resident(std::uint64_t a, std::uint64_t len) {
    auto r = mem().resident_bytes(guest_phys_addr{a}, len);
    EXPECT_TRUE(r) << r.err().message();
    return r ? *r : ~0ull;
  }

  std::optional<guest_memory> mem_;
  model model_; // what RAM holds
};

// ---- Capture of anonymous RAM -------------------------------------------------------------------

TEST_F(SnapshotImage, CapturesAnonymousRamWithZeroPagesAsHoles) {
  put(0x100000, pattern(0x100000, 1));
  put(0x101000, pattern(0x101000, 1)); // adjacent: one extent of two pages
  put(0x400000, pattern(0x400000, 2));
  page last_byte = zeros();
  last_byte[page_size - 1] = std::byte{1};
  put(0x600000, last_byte); // one non-zero byte makes a data page
  put(ram_size - page_size, pattern(ram_size - page_size, 3));
  // Written, then zeroed: present in host memory, but zero, so a hole.
  put(0x500000, pattern(0x500000, 4));
  put(0x500000, zeros());

  auto img = capture();
  ASSERT_TRUE(img);
  expect_flat_image(*img, model_);
  EXPECT_EQ(img->data_bytes(), 5 * page_size);
  const int fd = img->layers()[0]->fd();
  EXPECT_EQ(::lseek(fd, 0, SEEK_DATA), 0x100000);
  EXPECT_EQ(::lseek(fd, 0x100000, SEEK_HOLE), 0x102000);
  EXPECT_EQ(::lseek(fd, 0x401000, SEEK_DATA), 0x600000) << "0x500000 is a hole";
  EXPECT_EQ(img->layer_at(0x500000), nullptr);
  EXPECT_EQ(img->layer_at(0x101fff), img->layers()[0].get());
  // Capture leaves RAM alone.
  EXPECT_EQ(ram(0x400000), pattern(0x400000, 2));
  EXPECT_EQ(mem().image(), nullptr);
}

TEST_F(SnapshotImage, CapturesUntouchedRamAsNothing) {
  auto img = capture();
  ASSERT_TRUE(img);
  EXPECT_EQ(img->size(), ram_size);
  expect_flat_image(*img, {});
  EXPECT_TRUE(img->extents().empty());
  EXPECT_EQ(img->data_bytes(), 0u);
}

TEST_F(SnapshotImage, StoresZeroedAndUnreadableRangesAsZeros) {
  for (std::uint64_t a = 0x200000; a < 0x208000; a += page_size)
    put(a, pattern(a, 5));
  // [0x201000, 0x203000) zeroed, [0x205000, 0x207000) PROT_NONE in the host, and one
  // PROT_NONE range never touched.
  const byte_range zeroed[] = {{0x201000, 0x203000}};
  const byte_range unreadable[] = {{0x205000, 0x207000}, {0x300000, 0x302000}};
  ASSERT_TRUE(mem().host_protect(guest_phys_addr{0x205000}, 2 * page_size, protection::none));
  ASSERT_TRUE(mem().host_protect(guest_phys_addr{0x300000}, 2 * page_size, protection::none));

  auto img = capture(zeroed, unreadable);
  ASSERT_TRUE(img);
  auto want = model_;
  for (std::uint64_t a : {0x201000, 0x202000, 0x205000, 0x206000})
    want.erase(a);
  expect_flat_image(*img, want);
  EXPECT_EQ(img->data_bytes(), 4 * page_size);
  // The zeroed range keeps its bytes in RAM; only the image has zeros there.
  EXPECT_EQ(ram(0x201000), pattern(0x201000, 5));
}

// ---- back_with, dirty_ranges, revert
// --------------------------------------------------------------

/// RAM with data at a few pages, captured and backed by its image.
class SnapshotImageBacked : public SnapshotImage {
protected:
  void SetUp() override {
    SnapshotImage::SetUp();
    if (HasFatalFailure()) return;
    for (std::uint64_t a : {0x100000, 0x101000, 0x180000, 0x400000})
      put(a, pattern(a, 7));
    img_ = capture();
    ASSERT_TRUE(img_);
    parent_ = model_;
    ASSERT_TRUE(mem().back_with(img_)) << "back_with";
  }
  image_ptr img_;
  model parent_; // the image's pages
};

TEST_F(SnapshotImage, BackWithShowsTheImageInsteadOfWhatRamHeld) {
  put(0x100000, pattern(0x100000, 1));
  auto img = capture();
  ASSERT_TRUE(img);
  // RAM changes after the capture; back_with brings the image's bytes, not these.
  put(0x100000, pattern(0x100000, 2));
  put(0x200000, pattern(0x200000, 2));
  ASSERT_TRUE(mem().back_with(img));
  EXPECT_EQ(mem().image(), img);
  EXPECT_TRUE(dirty().empty()) << "nothing written since back_with";
  EXPECT_EQ(ram(0x100000), pattern(0x100000, 1));
  EXPECT_EQ(ram(0x200000), zeros());
}

TEST_F(SnapshotImageBacked, WritesArePrivateAndShowAsDirtyPages) {
  // Reads of the image's data dirty nothing. (Its holes are not read here: they are anonymous
  // memory, which some kernels allocate on a read; the tests of reads of holes are below.)
  EXPECT_EQ(ram(0x100000), parent_[0x100000]);
  EXPECT_EQ(ram(0x400000), parent_[0x400000]);
  EXPECT_TRUE(dirty().empty());

  // One byte into an image data page, two adjacent hole pages, one page right after a data
  // extent, the last page of RAM.
  // SAFETY: RAM page of this guest, host-writable.
  *host(0x100000 + 17) = std::byte{0xee};
  put(0x300000, pattern(0x300000, 8));
  put(0x301000, pattern(0x301000, 8));
  put(0x102000, pattern(0x102000, 8));
  put(ram_size - page_size, pattern(ram_size - page_size, 8));

  const std::vector<byte_range> want = {{0x100000, 0x101000},
                                        {0x102000, 0x103000},
                                        {0x300000, 0x302000},
                                        {ram_size - page_size, ram_size}};
  EXPECT_EQ(dirty(), want);
  EXPECT_EQ(std::to_integer<int>(ram(0x100000)[17]), 0xee);
  EXPECT_EQ(ram(0x300000), pattern(0x300000, 8));
  // The image keeps its bytes, and its layer gains no pages.
  expect_flat_image(*img_, parent_);
}

TEST_F(SnapshotImageBacked, RevertByDiscardBringsTheImageBackAndCleansThePages) {
  put(0x100000, pattern(0x100000, 9));
  put(0x101000, zeros());
  put(0x300000, pattern(0x300000, 9));
  const auto before = mem().host_syscalls();
  const auto written = dirty();
  ASSERT_EQ(written, (std::vector<byte_range>{{0x100000, 0x102000}, {0x300000, 0x301000}}));
  for (const auto& [b, e] : written)
    ASSERT_TRUE(mem().revert(guest_phys_addr{b}, e - b, /*copy=*/false));
  EXPECT_EQ(mem().host_syscalls(), before + 2) << "one per range";
  EXPECT_TRUE(dirty().empty());
  EXPECT_EQ(ram(0x100000), parent_[0x100000]);
  EXPECT_EQ(ram(0x101000), parent_[0x101000]);
  EXPECT_EQ(ram(0x400000), parent_[0x400000]);
  // A range wider than the dirty pages is fine: clean pages stay the image's.
  put(0x180000, pattern(0x180000, 9));
  ASSERT_TRUE(mem().revert(guest_phys_addr{0x100000}, 2 * mib, /*copy=*/false));
  EXPECT_TRUE(dirty().empty());
  EXPECT_EQ(ram(0x180000), parent_[0x180000]);
  EXPECT_EQ(ram(0x300000), zeros()) << "a hole of the image reads zero again";
  expect_flat_image(*img_, parent_);
}

TEST_F(SnapshotImageBacked, RevertByCopyBringsTheImageBackAndKeepsThePagesPrivate) {
  put(0x100000, pattern(0x100000, 10));
  put(0x101000, zeros());
  put(0x300000, pattern(0x300000, 10));
  const auto written = dirty();
  ASSERT_EQ(written, (std::vector<byte_range>{{0x100000, 0x102000}, {0x300000, 0x301000}}));
  const auto before = mem().host_syscalls();
  for (const auto& [b, e] : written)
    ASSERT_TRUE(mem().revert(guest_phys_addr{b}, e - b, /*copy=*/true));
  EXPECT_EQ(mem().host_syscalls(), before + 2) << "one per range";
  EXPECT_EQ(ram(0x100000), parent_[0x100000]);
  EXPECT_EQ(ram(0x101000), parent_[0x101000]);
  EXPECT_EQ(ram(0x300000), zeros()) << "a hole of the image copies in as zeros";
  // Documented: copied-in pages stay resident as private copies (with the image's bytes), so
  // they still show as dirty; a discard revert cleans them.
  EXPECT_EQ(dirty(), written);
  EXPECT_EQ(resident(0, ram_size), 3 * page_size);
  for (const auto& [b, e] : written)
    ASSERT_TRUE(mem().revert(guest_phys_addr{b}, e - b, /*copy=*/false));
  EXPECT_TRUE(dirty().empty());
  EXPECT_EQ(ram(0x100000), parent_[0x100000]);
  expect_flat_image(*img_, parent_);
}

TEST_F(SnapshotImageBacked, RevertByCopyAcrossDataAndHolesCopiesEachPart) {
  // One range over a hole, two data pages, a hole and a data page: every page written first.
  const std::uint64_t lo = 0xff000, hi = 0x181000;
  for (std::uint64_t a = lo; a < hi; a += page_size)
    put(a, pattern(a, 11));
  ASSERT_TRUE(mem().revert(guest_phys_addr{lo}, hi - lo, /*copy=*/true));
  for (std::uint64_t a = lo; a < hi; a += page_size) {
    const auto it = parent_.find(a);
    EXPECT_EQ(ram(a), it != parent_.end() ? it->second : zeros()) << std::hex << a;
  }
}

TEST_F(SnapshotImageBacked, RevertRefusesUnalignedAndOutOfRamRanges) {
  const auto before = mem().host_syscalls();
  for (bool copy : {false, true}) {
    EXPECT_EQ(mem().revert(guest_phys_addr{0x100800}, page_size, copy).code(),
              memory_errc::unaligned);
    EXPECT_EQ(mem().revert(guest_phys_addr{0x100000}, 0, copy).code(), memory_errc::unaligned);
    EXPECT_EQ(mem().revert(guest_phys_addr{ram_size - page_size}, 2 * page_size, copy).code(),
              memory_errc::out_of_bounds);
  }
  EXPECT_EQ(mem().host_syscalls(), before) << "refused before any syscall";
}

TEST_F(SnapshotImage, BackWithRefusesAnImageOfAnotherSize) {
  auto other = guest_memory::create(ram_size / 2, 0);
  ASSERT_TRUE(other) << other.err().message();
  auto small = snapshot_image::capture(*other, {}, {});
  ASSERT_TRUE(small) << small.err().message();
  put(0x100000, pattern(0x100000, 12));
  EXPECT_EQ(mem().back_with(*small).code(), memory_errc::bad_size);
  EXPECT_EQ(mem().back_with(nullptr).code(), memory_errc::bad_size);
  EXPECT_EQ(mem().image(), nullptr);
  EXPECT_EQ(ram(0x100000), pattern(0x100000, 12)) << "RAM untouched";
  EXPECT_EQ(mem().host_syscalls(), 0u) << "refused before any syscall";
}

TEST_F(SnapshotImage, RevertNeedsAnImage) {
  put(0x100000, pattern(0x100000, 13));
  EXPECT_FALSE(mem().revert(guest_phys_addr{0x100000}, page_size, /*copy=*/true));
  EXPECT_FALSE(mem().revert(guest_phys_addr{0x100000}, page_size, /*copy=*/false));
  EXPECT_EQ(ram(0x100000), pattern(0x100000, 13));
  EXPECT_EQ(mem().host_syscalls(), 0u);
}

// ---- Capture of image-backed RAM: layers --------------------------------------------------------

TEST_F(SnapshotImageBacked, ACaptureAddsALayerOfWhatChanged) {
  // Parent data: 0x100000, 0x101000, 0x180000, 0x400000.
  put(0x101000, pattern(0x101000, 14)); // replaced
  put(0x180000, zeros());               // zeros over parent data
  put(0x500000, pattern(0x500000, 14)); // data where the parent has a hole
  put(0x600000, zeros());               // zeros where the parent has a hole: nothing to store
  // SAFETY: RAM page of this guest, host-writable.
  *host(0x400000 + 100) = std::byte{0};
  model_[0x400000][100] = std::byte{0};
  EXPECT_EQ(ram(0x100000), parent_[0x100000]); // read, not written

  auto child = capture();
  ASSERT_TRUE(child);
  expect_bytes(*child, model_);
  // The parent's layer is shared; the new one holds the changed pages, zeros included where the
  // parent has data (so they hide it), nothing where the parent already reads zero.
  ASSERT_EQ(child->layers().size(), 2u);
  EXPECT_EQ(child->layers()[0], img_->layers()[0]);
  const std::vector<byte_range> top = {
      {0x101000, 0x102000}, {0x180000, 0x181000}, {0x400000, 0x401000}, {0x500000, 0x501000}};
  EXPECT_EQ(layer_data(*child->layers()[1], ram_size), top);
  EXPECT_EQ(read_layer(*child->layers()[1], 0x180000), zeros());
  EXPECT_EQ(child->data_bytes(), 4 * page_size);
  EXPECT_EQ(child->total_data_bytes(), img_->data_bytes() + 4 * page_size);
  EXPECT_EQ(child->extents(), (std::vector<image_extent>{{0x100000, 0x101000, 0},
                                                         {0x101000, 0x102000, 1},
                                                         {0x180000, 0x181000, 1},
                                                         {0x400000, 0x401000, 1},
                                                         {0x500000, 0x501000, 1}}));
  EXPECT_EQ(child->layer_at(0x100000), img_->layers()[0].get());
  EXPECT_EQ(child->layer_at(0x600000), nullptr);
  // The parent is unchanged.
  expect_flat_image(*img_, parent_);

  // The child backs RAM in turn: one mmap for the zero memory, one per extent.
  const auto before = mem().host_syscalls();
  ASSERT_TRUE(mem().back_with(child));
  EXPECT_EQ(mem().host_syscalls(), before + 1 + child->extents().size());
  EXPECT_TRUE(dirty().empty());
  for (std::uint64_t a : {0x100000, 0x101000, 0x180000, 0x400000, 0x500000, 0x600000})
    EXPECT_EQ(ram(a), read_image(*child, a)) << std::hex << a;
  EXPECT_EQ(ram(0x101000), pattern(0x101000, 14));
  EXPECT_EQ(ram(0x180000), zeros());
}

TEST_F(SnapshotImageBacked, ACaptureOfImageBackedRamZeroesCutRangesOverParentData) {
  // 0x100000 (parent data, clean) zeroed; 0x400000 (parent data, written) unreadable;
  // 0x700000 (parent hole, written) zeroed.
  put(0x400000, pattern(0x400000, 15));
  ASSERT_TRUE(mem().host_protect(guest_phys_addr{0x400000}, page_size, protection::none));
  put(0x600000, pattern(0x600000, 15));
  put(0x700000, pattern(0x700000, 15));
  const byte_range zeroed[] = {{0x100000, 0x101000}, {0x700000, 0x701000}};
  const byte_range unreadable[] = {{0x400000, 0x401000}};
  auto child = capture(zeroed, unreadable);
  ASSERT_TRUE(child);
  auto want = model_;
  for (std::uint64_t a : {0x100000, 0x400000, 0x700000})
    want.erase(a);
  expect_bytes(*child, want);
  ASSERT_EQ(child->layers().size(), 2u);
  EXPECT_EQ(
      layer_data(*child->layers()[1], ram_size),
      (std::vector<byte_range>{{0x100000, 0x101000}, {0x400000, 0x401000}, {0x600000, 0x601000}}));
  EXPECT_EQ(child->data_bytes(), 3 * page_size);
  expect_flat_image(*img_, parent_);
}

TEST_F(SnapshotImageBacked, AReadMappingTheZeroPageIsNeitherDirtyNorResident) {
  // On most kernels a read of an untouched anonymous page maps the kernel's shared zero page;
  // on some (this project's build machine's) it allocates a page. Userfaultfd maps the zero
  // page explicitly, so the first case is tested on every kernel.
  std::string why;
  if (!map_zero_page(host(0x300000), why)) GTEST_SKIP() << why;
  ASSERT_TRUE(map_zero_page(host(0x301000), why)) << why;
  EXPECT_EQ(ram(0x300000), zeros());
  EXPECT_EQ(resident(0, ram_size), 0u) << "the zero page is nobody's memory";
  EXPECT_TRUE(dirty().empty()) << "the zero page holds nothing to revert or capture";
  put(0x301000, pattern(0x301000, 16)); // a write replaces it with a private page
  EXPECT_EQ(dirty(), (std::vector<byte_range>{{0x301000, 0x302000}}));
  EXPECT_EQ(resident(0, ram_size), page_size);
}

TEST_F(SnapshotImageBacked, ReadsOfHolesAddNothingToTheNextCapture) {
  // Whatever a read of a hole costs in RAM (see above), the pages are zero and the parent has
  // no data there: the child stores nothing for them.
  for (std::uint64_t a = 0x300000; a < 0x310000; a += page_size)
    EXPECT_EQ(ram(a), zeros());
  for (const auto& [b, e] : dirty()) {
    EXPECT_GE(b, 0x300000u);
    EXPECT_LE(e, 0x310000u) << "only pages read can have become present";
  }
  auto child = capture();
  ASSERT_TRUE(child);
  EXPECT_EQ(child->data_bytes(), 0u);
  EXPECT_EQ(child->extents(), img_->extents());
  expect_bytes(*child, parent_);
}

TEST_F(SnapshotImageBacked, PastTheDepthCapTheLayersAreFlattened) {
  // Generation g writes page 0x200000 + g * page_size, and zeros over one of the parent's data
  // pages in generation 2.
  image_ptr img = img_;
  for (std::size_t g = 2; g <= snapshot_image::max_depth + 1; ++g) {
    const std::uint64_t a = 0x200000 + g * page_size;
    put(a, pattern(a, static_cast<std::uint8_t>(g)));
    if (g == 2) put(0x180000, zeros());
    img = capture();
    ASSERT_TRUE(img);
    SCOPED_TRACE("generation " + std::to_string(g));
    expect_bytes(*img, model_);
    if (g <= snapshot_image::max_depth) {
      EXPECT_EQ(img->layers().size(), g);
      EXPECT_EQ(img->data_bytes(), g == 2 ? 2 * page_size : page_size);
    }
    ASSERT_TRUE(mem().back_with(img));
  }
  // The ninth generation is one layer again, with every non-zero page and only those.
  expect_flat_image(*img, model_);
  for (std::uint64_t a = 0; a < ram_size; a += page_size) {
    const auto it = model_.find(a);
    ASSERT_EQ(ram(a), it != model_.end() ? it->second : zeros()) << std::hex << a;
  }
}

// ---- resident_bytes -----------------------------------------------------------------------------

TEST_F(SnapshotImage, ResidentBytesOfAnonymousRamCountsWrittenPages) {
  const std::uint64_t lo = 0x800000, len = 64 * page_size;
  EXPECT_EQ(resident(lo, len), 0u);
  put(lo, pattern(lo, 17));
  put(lo + 10 * page_size, pattern(lo, 17));
  put(lo + 11 * page_size, zeros()); // written zeros still take a page
  EXPECT_EQ(resident(lo, len), 3 * page_size);
  EXPECT_EQ(resident(lo + page_size, 9 * page_size), 0u);
}

TEST_F(SnapshotImageBacked, ResidentBytesOfImageBackedRamCountsOnlyPrivatePages) {
  const std::uint64_t lo = 0x100000, len = 2 * mib;
  EXPECT_EQ(resident(lo, len), 0u);
  // Reads of the image's data map the layer's (shared) pages.
  for (const auto& [a, p] : parent_)
    EXPECT_EQ(ram(a), p);
  EXPECT_EQ(resident(lo, len), 0u) << "pages merely read are the image's";
  put(0x101000, pattern(0x101000, 18)); // over image data
  put(0x200000, pattern(0x200000, 18)); // over a hole
  EXPECT_EQ(resident(lo, len), 2 * page_size);
  EXPECT_EQ(resident(lo, page_size), 0u);
  ASSERT_TRUE(mem().revert(guest_phys_addr{lo}, len, /*copy=*/false));
  EXPECT_EQ(resident(lo, len), 0u);
}

// ---- host_syscalls ------------------------------------------------------------------------------

TEST_F(SnapshotImage, HostSyscallsCountsBackWithAndRevert) {
  put(0x100000, pattern(0x100000, 19));
  put(0x300000, pattern(0x300000, 19));
  auto img = capture();
  ASSERT_TRUE(img);
  ASSERT_EQ(img->extents().size(), 2u);
  EXPECT_EQ(mem().host_syscalls(), 0u) << "capture changes nothing in guest memory";
  ASSERT_TRUE(mem().back_with(img));
  EXPECT_EQ(mem().host_syscalls(), 3u) << "the zero memory, then each extent";
  put(0x100000, pattern(0x100000, 20));
  ASSERT_TRUE(mem().revert(guest_phys_addr{0x100000}, page_size, /*copy=*/true));
  EXPECT_EQ(mem().host_syscalls(), 4u);
  ASSERT_TRUE(mem().revert(guest_phys_addr{0x100000}, page_size, /*copy=*/false));
  EXPECT_EQ(mem().host_syscalls(), 5u);
  // Queries are not changes.
  (void)dirty();
  (void)resident(0, ram_size);
  EXPECT_EQ(mem().host_syscalls(), 5u);
  ASSERT_TRUE(mem().back_with(img));
  EXPECT_EQ(mem().host_syscalls(), 8u);
}

} // namespace
} // namespace kiln::memory
