// snapshot_image: capture guest RAM into a sparse memfd, copying a parent image in the kernel.
#include <kiln/memory/address.hpp>
#include <kiln/memory/guest_memory.hpp>
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/snapshot_image.hpp>

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

namespace kiln::memory {
namespace {

bool all_zero(const std::byte* p, std::uint64_t len) {
  // Word at a time; pages are 8-byte aligned.
  const auto* w = reinterpret_cast<const std::uint64_t*>(p);
  for (std::uint64_t i = 0; i < len / 8; ++i)
    if (w[i]) return false;
  return true;
}

result<void> write_all(int fd, const std::byte* p, std::uint64_t len, std::uint64_t off) {
  for (std::uint64_t done = 0; done < len;) {
    const ssize_t n = ::pwrite(fd, p + done, len - done, static_cast<off_t>(off + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return errno_error("pwrite snapshot image");
    done += static_cast<std::uint64_t>(n);
  }
  return {};
}

result<void> punch(int fd, std::uint64_t off, std::uint64_t len) {
  if (len == 0) return {};
  if (::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                  static_cast<off_t>(len)) != 0)
    return errno_error("fallocate(PUNCH_HOLE) snapshot image");
  return {};
}

/// Copies the data extents of `from` into `to` at the same offsets (holes stay holes).
result<void> copy_data(int from, int to, std::uint64_t size) {
  off_t at = 0;
  while (static_cast<std::uint64_t>(at) < size) {
    const off_t data = ::lseek(from, at, SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break; // no data after `at`
      return errno_error("lseek(SEEK_DATA) snapshot image");
    }
    off_t hole = ::lseek(from, data, SEEK_HOLE);
    if (hole < 0) return errno_error("lseek(SEEK_HOLE) snapshot image");
    off_t in = data, out = data;
    while (in < hole) {
      const ssize_t n = ::copy_file_range(from, &in, to, &out, static_cast<std::size_t>(hole - in), 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return errno_error("copy_file_range snapshot image");
    }
    at = hole;
  }
  return {};
}

/// Writes RAM range [lo, hi) from guest memory into the image: non-zero pages as data, zero
/// pages as holes (punched, in case a parent's data lies there).
result<void> store_range(int fd, const guest_memory& mem, std::uint64_t lo, std::uint64_t hi,
                         bool punch_zero) {
  std::uint64_t run = lo; // start of the current run of non-zero pages
  auto flush = [&](std::uint64_t end) -> result<void> {
    if (end > run)
      KILN_TRY(write_all(fd, mem.host_address_for_mapping(guest_phys_addr{run}), end - run, run));
    return {};
  };
  for (std::uint64_t p = lo; p < hi; p += page_size) {
    // SAFETY: p is a host-readable RAM page (the caller excludes PROT_NONE ranges).
    if (all_zero(mem.host_address_for_mapping(guest_phys_addr{p}), page_size)) {
      KILN_TRY(flush(p));
      if (punch_zero) KILN_TRY(punch(fd, p, page_size));
      run = p + page_size;
    }
  }
  return flush(hi);
}

/// [lo, hi) minus every range in `cut` (sorted or not), in order.
std::vector<byte_range> subtract(std::uint64_t lo, std::uint64_t hi,
                                 std::span<const byte_range> cut) {
  std::vector<byte_range> sorted(cut.begin(), cut.end());
  std::sort(sorted.begin(), sorted.end());
  std::vector<byte_range> out;
  std::uint64_t at = lo;
  for (const auto& [b, e] : sorted) {
    if (e <= at || b >= hi) continue;
    if (b > at) out.emplace_back(at, b);
    at = std::max(at, e);
  }
  if (at < hi) out.emplace_back(at, hi);
  return out;
}

} // namespace

result<std::shared_ptr<const snapshot_image>> snapshot_image::capture(
    const guest_memory& mem, std::span<const byte_range> zeroed,
    std::span<const byte_range> unreadable) {
  const int raw = ::memfd_create("kiln-snapshot", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (raw < 0) return errno_error("memfd_create snapshot image");
  unique_fd fd(raw);
  const std::uint64_t size = mem.size();
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0)
    return errno_error("ftruncate snapshot image");

  std::vector<byte_range> cut(zeroed.begin(), zeroed.end());
  cut.insert(cut.end(), unreadable.begin(), unreadable.end());
  if (mem.image()) {
    // The parent's bytes, then what the guest changed since (pages it dirtied).
    KILN_TRY(copy_data(mem.image()->fd(), fd.get(), size));
    KILN_TRY_ASSIGN(auto dirty, mem.dirty_ranges());
    for (const auto& [b, e] : dirty)
      for (const auto& [lo, hi] : subtract(b, e, cut))
        KILN_TRY(store_range(fd.get(), mem, lo, hi, /*punch_zero=*/true));
    for (const auto& [b, e] : cut)
      KILN_TRY(punch(fd.get(), b, e - b));
  } else {
    // Anonymous RAM: pages never touched are zero, so only present pages are read.
    KILN_TRY_ASSIGN(auto present, mem.dirty_ranges());
    for (const auto& [b, e] : present)
      for (const auto& [lo, hi] : subtract(b, e, cut))
        KILN_TRY(store_range(fd.get(), mem, lo, hi, /*punch_zero=*/false));
  }
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0)
    return errno_error("fcntl(F_ADD_SEALS) snapshot image");
  auto img = std::shared_ptr<snapshot_image>(new snapshot_image(std::move(fd), size));
  KILN_TRY_ASSIGN(img->data_bytes_, img->scan_data_bytes());
  return std::shared_ptr<const snapshot_image>(std::move(img));
}

result<std::uint64_t> snapshot_image::allocated_bytes() const {
  struct stat st {};
  if (::fstat(fd_.get(), &st) != 0) return errno_error("fstat snapshot image");
  return static_cast<std::uint64_t>(st.st_blocks) * 512;
}

result<std::uint64_t> snapshot_image::scan_data_bytes() const {
  std::uint64_t total = 0;
  off_t at = 0;
  while (static_cast<std::uint64_t>(at) < size_) {
    const off_t data = ::lseek(fd_.get(), at, SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break;
      return errno_error("lseek(SEEK_DATA) snapshot image");
    }
    const off_t hole = ::lseek(fd_.get(), data, SEEK_HOLE);
    if (hole < 0) return errno_error("lseek(SEEK_HOLE) snapshot image");
    total += static_cast<std::uint64_t>(hole - data);
    at = hole;
  }
  return total;
}

} // namespace kiln::memory
