// snapshot_chain: a .ksnap file and the parents it names, each checked against its child.
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/snapshot_file.hpp>

#include <fmt/format.h>

#include <filesystem>

namespace kiln::memory {
namespace {

/// A parent's path as stored in `child_path`'s PARENT section, made absolute.
std::string resolve_parent(const std::string& child_path, const std::string& stored) {
  const std::filesystem::path p(stored);
  if (p.is_absolute()) return p.lexically_normal().string();
  return (std::filesystem::path(child_path).parent_path() / p).lexically_normal().string();
}

} // namespace

result<snapshot_chain> snapshot_chain::open(const std::string& path) {
  using enum memory_errc;
  KILN_TRY_ASSIGN(auto top, snapshot_file::open(path));
  std::vector<snapshot_file> newest_first;
  newest_first.push_back(std::move(top));
  while (newest_first.back().info().parent) {
    const snapshot_file& child = newest_first.back();
    const snapshot_parent& want = *child.info().parent;
    if (newest_first.size() >= ksnap::max_chain)
      return error(snapshot_too_large, fmt::format("{}: a chain of more than {} files",
                                                   newest_first.front().path(), ksnap::max_chain));
    const std::string parent_path = resolve_parent(child.path(), want.path);
    auto parent = snapshot_file::open(parent_path);
    if (!parent)
      return error(parent.err().code, fmt::format("parent {} of {}: {}", parent_path, child.path(),
                                                  parent.err().message()));
    const auto& pi = parent->info();
    if (pi.id != want.id || parent->header_crc() != want.header_crc ||
        parent->meta_crc() != want.meta_crc)
      return error(snapshot_parent_mismatch,
                   fmt::format("{} is not the parent {} was written against (another id or "
                               "checksum: rewritten since?)",
                               parent_path, child.path()));
    if (pi.memory_size != child.info().memory_size ||
        pi.guest_abi_major != child.info().guest_abi_major)
      return error(snapshot_parent_mismatch,
                   fmt::format("parent {} has another memory size or guest ABI than {}",
                               parent_path, child.path()));
    newest_first.push_back(std::move(*parent));
  }
  snapshot_chain c;
  for (std::size_t i = newest_first.size(); i-- > 0;)
    c.files_.push_back(std::move(newest_first[i]));
  return c;
}

result<void> snapshot_chain::verify() const {
  for (const auto& f : files_)
    if (auto r = f.verify(); !r)
      return error(r.err().code, fmt::format("{}: {}", f.path(), r.err().message()));
  return {};
}

result<std::shared_ptr<const snapshot_image>> snapshot_chain::image() const {
  std::vector<file_layer_source> layers;
  for (const auto& f : files_) {
    KILN_TRY_ASSIGN(auto l, f.layer());
    layers.push_back(std::move(l));
  }
  return snapshot_image::from_files(std::move(layers), top().info().memory_size);
}

} // namespace kiln::memory
