// load_check: per-chunk checksums of a snapshot file's data, from the bytes a load reads.
#include <kiln/memory/load_check.hpp>
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/snapshot_file.hpp>
#include <kiln/support/crc32c.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <utility>

namespace kiln::memory {

namespace {

constexpr std::uint64_t pages_per_chunk = ksnap::chunk_size / page_size;

/// The CRC32C of a ++ b, given crc(a), crc(b) and b's length (CRC32C is affine in its state).
std::uint32_t combine(std::uint32_t crc_a, std::uint32_t crc_b, std::uint64_t len_b) noexcept {
  return crc32c_zeros(crc_a, len_b) ^ crc_b ^ crc32c_zeros(0, len_b);
}

} // namespace

/// One 2 MiB chunk of one file: what has been read of it, as runs of pages with their CRCs.
struct load_check::chunk {
  struct run {
    std::uint64_t lo = 0, len = 0;
    std::uint32_t crc = 0;
  };
  std::uint32_t expected = 0;
  std::uint64_t missing = 0; // pages the file holds here that no read has brought yet
  bool done = false;
  std::vector<bool> have; // per page of the chunk; allocated by the first read
  std::vector<run> runs;  // disjoint
};

/// One file layer of the image.
struct load_check::layer {
  const snapshot_layer* src = nullptr;
  const layer_file* file = nullptr;
  std::vector<chunk> chunks;
  bool holds(std::uint64_t guest_page) const noexcept {
    const std::uint64_t a = guest_page * page_size;
    auto it = std::upper_bound(file->extents.begin(), file->extents.end(), a,
                               [](std::uint64_t v, const byte_range& e) { return v < e.first; });
    return it != file->extents.begin() && a < std::prev(it)->second;
  }
};

load_check::load_check(std::shared_ptr<const snapshot_image> image, const load_plan& plan)
    : image_(std::move(image)) {
  const auto& layers = image_->layers();
  for (std::size_t i = 0; i < layers.size(); ++i) {
    const auto& f = layers[i]->file();
    if (!f || f->chunk_crcs.empty()) {
      layers_.push_back(nullptr);
      continue;
    }
    auto l = std::make_unique<layer>();
    l->src = layers[i].get();
    l->file = &*f;
    l->chunks.resize(f->chunk_crcs.size());
    for (std::size_t c = 0; c < l->chunks.size(); ++c)
      l->chunks[c].expected = f->chunk_crcs[c];
    for (const auto& [lo, hi] : f->extents)
      for (std::uint64_t a = lo; a < hi;) {
        const std::uint64_t c = a / ksnap::chunk_size;
        const std::uint64_t end = std::min(hi, (c + 1) * ksnap::chunk_size);
        if (c < l->chunks.size()) l->chunks[c].missing += (end - a) / page_size;
        a = end;
      }
    for (const auto& ch : l->chunks)
      total_ += ch.missing != 0 ? 1 : 0; // a chunk the file holds nothing of has nothing to read
    layers_.push_back(std::move(l));
  }
  // Which layer each plan extent reads, by its descriptor (the layers' own, before a loader
  // gives some extents descriptors of their own).
  for (const auto& e : plan.extents) {
    std::uint32_t which = 0;
    while (which < layers.size() && layers[which]->fd() != e.fd)
      ++which;
    layer_of_extent_.push_back(which);
    extent_offset_.push_back(e.offset);
  }
}

load_check::~load_check() = default;

void load_check::take(std::size_t extent, std::uint64_t pos,
                      std::span<const std::byte> bytes) noexcept {
  if (extent >= layer_of_extent_.size() || layer_of_extent_[extent] >= layers_.size()) return;
  layer* l = layers_[layer_of_extent_[extent]].get();
  if (!l) return;
  const std::uint64_t file_at = extent_offset_[extent] + pos;
  if (file_at < l->src->base()) return;
  const std::uint64_t first = (file_at - l->src->base()) / page_size;
  const std::uint64_t pages = bytes.size() / page_size;
  // Runs of pages the file holds, not read before, inside one chunk: one CRC each.
  for (std::uint64_t i = 0; i < pages;) {
    const std::uint64_t g = first + i;
    const std::uint64_t c = g / pages_per_chunk;
    if (c >= l->chunks.size() || !l->holds(g)) {
      ++i;
      continue;
    }
    chunk& ch = l->chunks[c];
    if (ch.done) {
      ++i;
      continue;
    }
    if (ch.have.empty()) ch.have.assign(pages_per_chunk, false);
    std::uint64_t n = 0;
    while (i + n < pages && (first + i + n) / pages_per_chunk == c &&
           !ch.have[(first + i + n) % pages_per_chunk] && l->holds(first + i + n))
      ++n;
    if (n == 0) { // read before
      ++i;
      continue;
    }
    const auto run_bytes = bytes.subspan(i * page_size, n * page_size);
    ch.runs.push_back({g * page_size, n * page_size, crc32c(0, run_bytes)});
    for (std::uint64_t k = 0; k < n; ++k)
      ch.have[(g + k) % pages_per_chunk] = true;
    ch.missing -= n;
    if (ch.missing == 0) finish(*l, c);
    i += n;
  }
}

void load_check::finish(layer& l, std::uint64_t c) noexcept {
  chunk& ch = l.chunks[c];
  std::sort(ch.runs.begin(), ch.runs.end(),
            [](const chunk::run& a, const chunk::run& b) { return a.lo < b.lo; });
  const std::uint64_t lo = c * ksnap::chunk_size;
  const std::uint64_t hi = std::min(image_->size(), lo + ksnap::chunk_size);
  std::uint32_t crc = 0;
  std::uint64_t at = lo;
  for (const auto& r : ch.runs) {
    crc = combine(crc32c_zeros(crc, r.lo - at), r.crc, r.len);
    at = r.lo + r.len;
  }
  crc = crc32c_zeros(crc, hi - at);
  ch.done = true;
  ch.runs = {};
  ch.have = {};
  if (crc == ch.expected) {
    checked_.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  const std::string why =
      fmt::format("{}: chunk {} (guest [{:#x}, {:#x})): checksum {:#x}, computed {:#x}",
                  l.file->path, c, lo, hi, ch.expected, crc);
  l.src->mark_corrupt(why);
  std::lock_guard lock(failure_mutex_);
  if (!failure_) failure_ = error(memory_errc::snapshot_corrupt, why);
}

std::optional<error> load_check::failure() const {
  std::lock_guard lock(failure_mutex_);
  return failure_;
}

} // namespace kiln::memory
