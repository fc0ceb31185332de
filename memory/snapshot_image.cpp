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

/// Extents of the layer's data (SEEK_DATA/SEEK_HOLE).
result<std::vector<byte_range>> data_extents(int fd, std::uint64_t size) {
  std::vector<byte_range> out;
  off_t at = 0;
  while (static_cast<std::uint64_t>(at) < size) {
    const off_t data = ::lseek(fd, at, SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break;
      return errno_error("lseek(SEEK_DATA) snapshot layer");
    }
    const off_t hole = ::lseek(fd, data, SEEK_HOLE);
    if (hole < 0) return errno_error("lseek(SEEK_HOLE) snapshot layer");
    out.emplace_back(static_cast<std::uint64_t>(data), static_cast<std::uint64_t>(hole));
    at = hole;
  }
  return out;
}

/// `below` with `top` (sorted, disjoint) laid over it as layer `layer`, merged.
std::vector<image_extent> overlay(const std::vector<image_extent>& below,
                                  const std::vector<byte_range>& top, std::uint32_t layer) {
  std::vector<image_extent> out;
  auto push = [&out](image_extent e) {
    if (e.lo >= e.hi) return;
    if (!out.empty() && out.back().hi == e.lo && out.back().layer == e.layer)
      out.back().hi = e.hi;
    else
      out.push_back(e);
  };
  std::vector<image_extent> all;
  for (const auto& e : below)
    for (const auto& [lo, hi] : subtract(e.lo, e.hi, top))
      all.push_back({lo, hi, e.layer});
  for (const auto& [lo, hi] : top)
    all.push_back({lo, hi, layer});
  std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return a.lo < b.lo; });
  for (const auto& e : all)
    push(e);
  return out;
}

/// Copies [lo, hi) of `from` into `to` at the same offsets, leaving its zero pages as holes.
result<void> copy_nonzero(const snapshot_layer& from, std::uint64_t lo, std::uint64_t hi, int to) {
  std::vector<std::byte> buf(16 * page_size);
  for (std::uint64_t at = lo; at < hi;) {
    const std::uint64_t len = std::min<std::uint64_t>(buf.size(), hi - at);
    const ssize_t n = ::pread(from.fd(), buf.data(), len, static_cast<off_t>(from.base() + at));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno_error("pread snapshot layer");
    if (static_cast<std::uint64_t>(n) != len)
      return error(memory_errc::out_of_bounds, "snapshot layer ends early");
    for (std::uint64_t p = 0; p < len; p += page_size)
      if (!all_zero(&buf[p], page_size)) KILN_TRY(write_all(to, &buf[p], page_size, at + p));
    at += len;
  }
  return {};
}

result<void> write_zeros(int fd, std::uint64_t off, std::uint64_t len) {
  static const std::byte zero_page[page_size] = {};
  for (std::uint64_t done = 0; done < len; done += page_size)
    KILN_TRY(write_all(fd, zero_page, page_size, off + done));
  return {};
}

// ---- the three ways capture() stores RAM into its new layer ----------------------------------

/// RAM not backed by an image (anonymous memory): pages never touched are zero, so only the
/// pages present in host memory are read, less `cut`.
result<void> store_present(int fd, const guest_memory& mem, std::span<const byte_range> cut) {
  KILN_TRY_ASSIGN(auto present, mem.dirty_ranges());
  for (const auto& [b, e] : present)
    for (const auto& [lo, hi] : subtract(b, e, cut))
      KILN_TRY(store_range(fd, mem, lo, hi, /*punch_zero=*/false));
  return {};
}

/// A layer over `parent`'s: only what differs from the parent, that is the dirtied pages, and
/// zeros where the parent has data that must now read as zero (a page the guest cleared, the
/// I/O buffers and unreadable pages in `cut`...).
result<void> store_difference(int fd, const guest_memory& mem, const snapshot_image& parent,
                              std::span<const byte_range> cut) {
  KILN_TRY_ASSIGN(auto dirty, mem.dirty_ranges());
  for (const auto& [b, e] : dirty)
    for (const auto& [lo, hi] : subtract(b, e, cut))
      for (std::uint64_t p = lo; p < hi; p += page_size) {
        // SAFETY: p is a host-readable RAM page (unreadable ranges were cut out).
        const std::byte* host = mem.host_address_for_mapping(guest_phys_addr{p});
        if (!all_zero(host, page_size))
          KILN_TRY(write_all(fd, host, page_size, p));
        else if (parent.layer_at(p))
          KILN_TRY(write_zeros(fd, p, page_size));
      }
  for (const auto& [b, e] : cut)
    for (std::uint64_t p = align_down(b, page_size); p < e; p += page_size)
      if (parent.layer_at(p)) KILN_TRY(write_zeros(fd, p, page_size));
  return {};
}

/// Copies extent `ext` of the bottom layer `from` into `to` at the same offsets, in the kernel
/// (copy_file_range) where both files allow it.
result<void> copy_bottom_extent(const snapshot_layer& from, const image_extent& ext, int to) {
  loff_t in = static_cast<loff_t>(from.base() + ext.lo);
  loff_t out = static_cast<loff_t>(ext.lo);
  const auto in_end = static_cast<loff_t>(from.base() + ext.hi);
  while (in < in_end) {
    const ssize_t n =
        ::copy_file_range(from.fd(), &in, to, &out, static_cast<std::size_t>(in_end - in), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EXDEV || errno == EINVAL || errno == EOPNOTSUPP)) {
      // A .ksnap layer on another file system than the memfd: through user space.
      return copy_nonzero(from, static_cast<std::uint64_t>(out), ext.hi, to);
    }
    if (n <= 0) return errno_error("copy_file_range snapshot image");
  }
  return {};
}

/// One flat layer with everything: `parent`'s extents, then the dirtied pages, `cut` punched.
result<void> store_flat(int fd, const guest_memory& mem, const snapshot_image& parent,
                        std::span<const byte_range> cut) {
  // Layers above the first hold zero pages where they hide data below (see store_difference):
  // those are copied page by page, so that the flat layer keeps zero pages as holes.
  for (const auto& ext : parent.extents()) {
    const auto& from_layer = *parent.layers()[ext.layer];
    if (ext.layer != 0)
      KILN_TRY(copy_nonzero(from_layer, ext.lo, ext.hi, fd));
    else
      KILN_TRY(copy_bottom_extent(from_layer, ext, fd));
  }
  KILN_TRY_ASSIGN(auto dirty, mem.dirty_ranges());
  for (const auto& [b, e] : dirty)
    for (const auto& [lo, hi] : subtract(b, e, cut))
      KILN_TRY(store_range(fd, mem, lo, hi, /*punch_zero=*/true));
  for (const auto& [b, e] : cut)
    KILN_TRY(punch(fd, b, e - b));
  return {};
}

} // namespace

std::shared_ptr<const snapshot_image>
snapshot_image::from_files(std::vector<file_layer_source> files, std::uint64_t size) {
  auto img = std::shared_ptr<snapshot_image>(new snapshot_image());
  img->size_ = size;
  for (auto& f : files) {
    auto layer = std::shared_ptr<snapshot_layer>(new snapshot_layer(std::move(f.fd), f.base));
    for (const auto& [b, e] : f.extents)
      layer->data_bytes_ += e - b;
    layer->file_ = std::move(f.file);
    img->extents_ =
        overlay(img->extents_, f.extents, static_cast<std::uint32_t>(img->layers_.size()));
    img->layers_.push_back(std::move(layer));
  }
  return img;
}

void snapshot_layer::mark_corrupt(std::string why) const {
  std::lock_guard lock(why_mutex_);
  if (corrupt_.load(std::memory_order_relaxed)) return;
  why_ = std::move(why);
  corrupt_.store(true, std::memory_order_release);
}

std::optional<std::string> snapshot_layer::corruption() const {
  if (!known_corrupt()) return std::nullopt;
  std::lock_guard lock(why_mutex_);
  return why_;
}

std::optional<std::string> snapshot_image::corruption() const {
  for (const auto& l : layers_)
    if (l->known_corrupt()) return l->corruption();
  return std::nullopt;
}

std::size_t snapshot_image::file_layers() const noexcept {
  std::size_t n = 0;
  while (n < layers_.size() && layers_[n]->file_)
    ++n;
  return n;
}

std::uint64_t snapshot_image::total_data_bytes() const noexcept {
  std::uint64_t total = 0;
  for (const auto& l : layers_)
    total += l->data_bytes();
  return total;
}

const image_extent* snapshot_image::extent_at(std::uint64_t a) const noexcept {
  auto it = std::upper_bound(extents_.begin(), extents_.end(), a,
                             [](std::uint64_t v, const image_extent& e) { return v < e.lo; });
  if (it == extents_.begin()) return nullptr;
  --it;
  return a < it->hi ? &*it : nullptr;
}

result<std::shared_ptr<const snapshot_image>>
snapshot_image::capture(const guest_memory& mem, std::span<const byte_range> zeroed,
                        std::span<const byte_range> unreadable) {
  const int raw = ::memfd_create("kiln-snapshot", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (raw < 0) return errno_error("memfd_create snapshot image");
  auto layer = std::shared_ptr<snapshot_layer>(new snapshot_layer(unique_fd(raw)));
  const int fd = layer->fd();
  const std::uint64_t size = mem.size();
  if (::ftruncate(fd, static_cast<off_t>(size)) != 0)
    return errno_error("ftruncate snapshot image");

  std::vector<byte_range> cut(zeroed.begin(), zeroed.end());
  cut.insert(cut.end(), unreadable.begin(), unreadable.end());
  const auto& parent = mem.image();
  // A new layer over the parent's, unless the stack is as deep as allowed or too fragmented:
  // then one flat layer with everything.
  const bool layered =
      parent && parent->layers_.size() < max_depth && parent->extents_.size() < max_extents;
  if (!parent)
    KILN_TRY(store_present(fd, mem, cut));
  else if (layered)
    KILN_TRY(store_difference(fd, mem, *parent, cut));
  else
    KILN_TRY(store_flat(fd, mem, *parent, cut));
  if (::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0)
    return errno_error("fcntl(F_ADD_SEALS) snapshot image");

  KILN_TRY_ASSIGN(auto data, data_extents(fd, size));
  for (const auto& [b, e] : data)
    layer->data_bytes_ += e - b;
  auto img = std::shared_ptr<snapshot_image>(new snapshot_image());
  img->size_ = size;
  if (layered) img->layers_ = parent->layers_;
  img->layers_.push_back(std::move(layer));
  img->extents_ = overlay(layered ? parent->extents_ : std::vector<image_extent>{}, data,
                          static_cast<std::uint32_t>(img->layers_.size() - 1));
  return std::shared_ptr<const snapshot_image>(std::move(img));
}

std::optional<snapshot_image::shrunk_file> snapshot_image::first_shrunk_file() const noexcept {
  for (const auto& l : layers_) {
    if (l->base() == 0) continue; // a memfd: sealed, it cannot shrink
    struct stat st {};
    const std::uint64_t now =
        ::fstat(l->fd(), &st) == 0 ? static_cast<std::uint64_t>(st.st_size) : 0;
    if (now < l->base() + size_) return shrunk_file{l.get(), now, l->base() + size_};
  }
  return std::nullopt;
}

} // namespace kiln::memory
