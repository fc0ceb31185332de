// snapshot_loader: the plan, the working-set reads' own descriptors, the guest's read-around,
// and the guest ranges handed back as they become resident.
#include <kiln/memory/snapshot_loader.hpp>

#include <fmt/format.h>

#include <fcntl.h>
#include <sys/stat.h>

namespace kiln::memory {

snapshot_loader::snapshot_loader(std::shared_ptr<const snapshot_image> image, guest_memory& mem)
    : image_(std::move(image)), mem_(mem) {}

snapshot_loader::~snapshot_loader() {
  restore_read_around();
}

std::unique_ptr<snapshot_loader>
snapshot_loader::prepare(std::shared_ptr<const snapshot_image> image, guest_memory& mem,
                         std::span<const std::uint32_t> working_set, bool track_ranges,
                         bool check_data) {
  std::unique_ptr<snapshot_loader> l(new snapshot_loader(std::move(image), mem));
  l->plan_ = plan_load(*l->image_, mem, working_set);
  // Before the working set gets descriptors of its own: the check tells files apart by theirs.
  if (check_data) l->check_ = std::make_unique<load_check>(l->image_, l->plan_);
  if (!l->plan_.one_pass) l->open_own_descriptors();
  if (track_ranges) {
    const auto ws_end =
        l->plan_.guest.begin() + static_cast<std::ptrdiff_t>(l->plan_.working_set_extents);
    l->pending_ws_.assign(l->plan_.guest.begin(), ws_end);
    l->pending_rest_.assign(ws_end, l->plan_.guest.end());
  }
  return l;
}

// The working set's extents read through a descriptor of their own per file layer, opened anew
// through /proc so that it has its own file description (and so its own read-ahead state), with
// read-ahead off. Without /proc, or if the reopened file is not the same one, the extents keep
// the shared description, read-ahead and all.
void snapshot_loader::open_own_descriptors() {
  for (const auto& layer : image_->layers()) {
    if (!layer->file()) continue;
    unique_fd own(
        ::open(fmt::format("/proc/self/fd/{}", layer->fd()).c_str(), O_RDONLY | O_CLOEXEC));
    struct stat a {
    }, b{};
    if (!own || ::fstat(own.get(), &a) != 0 || ::fstat(layer->fd(), &b) != 0 ||
        a.st_dev != b.st_dev || a.st_ino != b.st_ino)
      continue;
    ::posix_fadvise(own.get(), 0, 0, POSIX_FADV_RANDOM);
    for (std::size_t i = 0; i < plan_.working_set_extents; ++i)
      if (plan_.extents[i].fd == layer->fd()) plan_.extents[i].fd = own.get();
    own_fds_.push_back(std::move(own));
  }
}

prefetch_options snapshot_loader::options_for(const prefetch_options& options) const {
  prefetch_options po = options;
  po.working_set_extents = plan_.working_set_extents;
  if (check_)
    po.on_read = [c = check_.get()](std::size_t extent, std::uint64_t pos,
                                    std::span<const std::byte> bytes) {
      c->take(extent, pos, bytes);
    };
  return po;
}

result<std::unique_ptr<prefetch>> snapshot_loader::start(const prefetch_options& options) {
  prefetch_options po = options_for(options);
  if (!plan_.one_pass) {
    KILN_TRY(mem_.set_read_around(false));
    read_around_off_ = true;
  }
  auto p = prefetch::start(plan_.extents, po);
  if (!p) restore_read_around();
  return p;
}

result<prefetch_stats> snapshot_loader::load_all(const prefetch_options& options) {
  KILN_TRY_ASSIGN(auto p, prefetch::start(plan_.extents, options_for(options)));
  p->wait();
  prefetch_stats st = p->stats();
  if (st.failure.code) return st.failure;
  if (check_)
    if (auto bad = check_->failure()) return *bad;
  return st;
}

std::vector<byte_range> snapshot_loader::advance(const prefetch_stats& st) {
  std::vector<byte_range> now;
  if (st.working_set_done && !progress_.working_set_resident) {
    progress_.working_set_resident = true;
    now = std::exchange(pending_ws_, {});
  }
  if (st.done && !st.failure.code && !progress_.everything_resident) {
    progress_.everything_resident = true;
    now.insert(now.end(), pending_ws_.begin(), pending_ws_.end());
    now.insert(now.end(), pending_rest_.begin(), pending_rest_.end());
    pending_ws_.clear();
    pending_rest_.clear();
  }
  if (st.done || st.cancelled) {
    progress_.ended = true;
    restore_read_around(); // everything is in: faults after an eviction read around again
  }
  return now;
}

void snapshot_loader::stop() noexcept {
  progress_.ended = true;
  pending_ws_.clear(); // nothing says what is resident now
  pending_rest_.clear();
  restore_read_around();
}

void snapshot_loader::restore_read_around() noexcept {
  if (!read_around_off_) return;
  read_around_off_ = false;
  (void)mem_.set_read_around(true);
}

} // namespace kiln::memory
