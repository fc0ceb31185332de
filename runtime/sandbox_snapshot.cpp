// sandbox snapshots: taking one, restoring to one (memory by the address space, the vCPU here),
// and sandboxes made from one.
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/snapshot_file.hpp>
#include <kiln/runtime/detail/sandbox_impl.hpp>
#include <kiln/runtime/detail/snapshot_codec.hpp>

#include <fmt/format.h>

#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <filesystem>

namespace kiln {

using memory::protection;
namespace fixed = memory::fixed;

namespace {

std::atomic<std::uint64_t> next_snapshot_id{1};

/// The special registers for a backend with or without NX (EFER.NXE follows the page tables).
vcpu::special_registers for_backend(vcpu::special_registers s, bool nx) {
  if (nx)
    s.efer |= vcpu::x86::efer_nxe;
  else
    s.efer &= ~vcpu::x86::efer_nxe;
  return s;
}

/// Whether two descriptors or paths name one file.
bool same_file(const struct stat& a, const struct stat& b) {
  return a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

/// How many bottom layers of `image` a layered save to `target` can leave to their files: the
/// layers mapped from files, provided the top one's path still names the file it was loaded
/// from and `target` names none of them (a child must not replace an ancestor). 0: write all.
std::size_t parent_layers(const memory::snapshot_image& image, const std::string& target) {
  const std::size_t n = image.file_layers();
  if (n == 0) return 0;
  const auto& layers = image.layers();
  struct stat parent_now {
  }, parent_loaded{};
  if (::stat(layers[n - 1]->file()->path.c_str(), &parent_now) != 0 ||
      ::fstat(layers[n - 1]->fd(), &parent_loaded) != 0 || !same_file(parent_now, parent_loaded))
    return 0;
  struct stat t {};
  if (::stat(target.c_str(), &t) == 0)
    for (std::size_t i = 0; i < n; ++i) {
      struct stat l {};
      if (::fstat(layers[i]->fd(), &l) != 0 || same_file(l, t)) return 0;
    }
  return n;
}

/// The parent's path as a child at `child` records it: its file name when both lie in one
/// directory (the pair can move together), else absolute.
std::string stored_parent_path(const std::string& parent, const std::string& child) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path c = fs::absolute(child, ec).lexically_normal();
  const fs::path p(parent);
  return !ec && c.parent_path() == p.parent_path() ? p.filename().string() : parent;
}

} // namespace

std::uint64_t snapshot::id() const noexcept {
  return state_ ? state_->id : 0;
}
std::uint64_t snapshot::memory_size() const noexcept {
  return state_ ? state_->memory_size : 0;
}
result<std::uint64_t> snapshot::stored_bytes() const {
  if (!state_) return error(errc::not_ready, "empty snapshot");
  return state_->image->data_bytes();
}

result<snapshot> snapshot::with_working_set(const working_set& ws) const {
  if (!state_) return error(errc::not_ready, "empty snapshot");
  if (ws.snapshot_id != state_->id)
    return error(errc::bad_arguments,
                 "the working set was recorded in a sandbox that did not start from this snapshot");
  const std::uint64_t pages = state_->memory_size / memory::page_size;
  std::vector<bool> seen(pages);
  for (std::uint32_t pg : ws.pages) {
    if (pg >= pages || seen[pg])
      return error(errc::bad_arguments,
                   fmt::format("working-set page {} outside memory or repeated", pg));
    seen[pg] = true;
  }
  auto s = std::make_shared<detail::snapshot_state>(*state_);
  s->working_set = ws.pages;
  return snapshot(std::move(s));
}

std::size_t snapshot::working_set_pages() const noexcept {
  return state_ ? state_->working_set.size() : 0;
}

std::vector<std::string> snapshot::files() const {
  std::vector<std::string> out;
  if (!state_) return out;
  const auto& layers = state_->image->layers();
  for (std::size_t i = 0; i < state_->image->file_layers(); ++i)
    out.push_back(layers[i]->file()->path);
  return out;
}

result<void> snapshot::save(const std::string& path, const save_options& options) const {
  if (!state_) return error(errc::not_ready, "empty snapshot");
  memory::snapshot_file_info info;
  info.memory_size = state_->memory_size;
  info.guest_abi_major = KILN_ABI_VERSION_MAJOR;
  info.guest_abi_minor = KILN_ABI_VERSION_MINOR;
  info.sections = detail::encode_sections(*state_);
  const std::size_t base = options.layered ? parent_layers(*state_->image, path) : 0;
  if (base != 0) {
    const memory::layer_file& parent = *state_->image->layers()[base - 1]->file();
    info.parent = memory::snapshot_parent{stored_parent_path(parent.path, path), parent.id,
                                          parent.header_crc, parent.meta_crc};
  }
  return memory::write_snapshot_file(path, *state_->image, info, base);
}

namespace {

/// `path` with symlinks, `.` and `..` resolved; the file must exist.
result<std::string> resolved(const std::string& path) {
  std::unique_ptr<char, decltype(&std::free)> r(::realpath(path.c_str(), nullptr), &std::free);
  if (!r) return errno_error(("resolve " + path).c_str());
  return std::string(r.get());
}

bool lies_under(const std::string& file, const std::string& dir) {
  if (dir == "/") return true;
  return file.size() > dir.size() && file.compare(0, dir.size(), dir) == 0 &&
         file[dir.size()] == '/';
}

/// Applies `policy` to the host files a loaded snapshot maps, and has them opened by their
/// resolved paths.
result<void> admit_files(const std::string& source, std::vector<memory::saved_file>& files,
                         const mapped_file_policy& policy) {
  if (files.empty() || policy.any_recorded) return {};
  std::vector<std::string> dirs;
  for (const auto& d : policy.directories)
    if (auto r = resolved(d)) dirs.push_back(std::move(*r));
  for (auto& f : files) {
    KILN_TRY_ASSIGN(std::string real, resolved(f.identity.path));
    const bool ok = std::any_of(dirs.begin(), dirs.end(),
                                [&](const std::string& d) { return lies_under(real, d); }) ||
                    (policy.allow && policy.allow(f.name, real));
    if (!ok)
      return error(memory::memory_errc::file_not_allowed,
                   fmt::format("{} maps '{}' from {}: not under an allowed directory, and not "
                               "allowed by the policy",
                               source, f.name, real));
    f.identity.path = std::move(real);
  }
  return {};
}

} // namespace

result<snapshot> snapshot::load(const std::string& path, const mapped_file_policy& files) {
  KILN_TRY_ASSIGN(auto chain, memory::snapshot_chain::open(path));
  const auto& top = chain.top();
  auto s = std::make_shared<detail::snapshot_state>();
  KILN_TRY(detail::decode_state(top.info(), *s));
  KILN_TRY(admit_files(top.path(), s->files, files));
  KILN_TRY_ASSIGN(s->image, chain.image());
  s->id = next_snapshot_id.fetch_add(1);
  s->source = top.path();
  return snapshot(std::move(s));
}

std::string snapshot::describe() const {
  if (!state_) return "empty snapshot\n";
  const auto& s = *state_;
  std::string out;
  auto line = [&out](const std::string& l) { out += l + "\n"; };
  if (!s.source.empty()) line("file: " + s.source);
  line(fmt::format("guest: {}", s.guest_path));
  line(fmt::format("taken on: {} backend (page tables {} NX)", vcpu::to_string(s.taken_on),
                   s.nx ? "with" : "without"));
  line(fmt::format("memory: {} MiB, file room {} MiB; heap {:#x} +{:#x}, stack {:#x} +{:#x}",
                   s.memory_size >> 20, s.file_room >> 20, s.layout.heap_start.value,
                   s.layout.heap_size, s.layout.stack_bottom.value, s.stack_size));
  line(fmt::format("stored: {} KiB of data in {} layer(s), {} extent(s)",
                   s.image->data_bytes() / 1024, s.image->layers().size(),
                   s.image->extents().size()));
  for (std::size_t i = 0; i < s.image->layers().size(); ++i) {
    const auto& l = *s.image->layers()[i];
    line(fmt::format("  layer {}: {} KiB, {}", i, l.data_bytes() / 1024,
                     l.file() ? "file " + l.file()->path : std::string("in memory")));
  }
  line("regions:");
  for (const auto& r : s.regions)
    line(fmt::format("  {:<16} {:#10x} +{:#x} {}{}{}", r.name, r.start.value, r.size,
                     memory::has(r.prot, protection::read) ? 'r' : '-',
                     memory::has(r.prot, protection::write) ? 'w' : '-',
                     memory::has(r.prot, protection::exec) ? 'x' : '-'));
  line(fmt::format("protection ranges: {}", s.prot.ranges()));
  line(
      s.working_set.empty()
          ? std::string("working set: none recorded")
          : fmt::format("working set: {} pages ({:.1f} MiB), prefetched first in that order",
                        s.working_set.size(),
                        static_cast<double>(s.working_set.size()) * memory::page_size / (1 << 20)));
  for (const auto& f : s.files)
    line(fmt::format("mapped file '{}': {} ({} bytes, inode {}) at {:#x}", f.name, f.identity.path,
                     f.identity.size, f.identity.inode, f.addr.value));
  for (const auto& f : s.host_functions)
    line(fmt::format("host function {} ({} parameters)", f.name, f.params.size()));
  line(fmt::format("rip {:#x}, rsp {:#x}", s.regs.rip, s.regs.rsp));
  return out;
}

result<void> snapshot::verify(const std::string& path) {
  KILN_TRY_ASSIGN(auto chain, memory::snapshot_chain::open(path));
  KILN_TRY(chain.verify());
  // Matching checksums are not enough: a file whose state a load refuses must not pass.
  detail::snapshot_state s;
  KILN_TRY(detail::decode_state(chain.top().info(), s));
  KILN_TRY(chain.image());
  return {};
}

result<snapshot> sandbox::impl::take_snapshot() {
  if (calling) return error(errc::not_ready, "snapshots are taken between calls");
  end_recording(); // capture writes RAM to a file: no page may be armed
  if (is_poisoned) return error(errc::poisoned, poison.message());
  if (!ready) return error(errc::not_ready, "the guest is not ready");

  KILN_TRY_ASSIGN(auto image, space.capture());

  auto s = std::make_shared<detail::snapshot_state>();
  s->id = next_snapshot_id.fetch_add(1);
  s->taken_on = cpu->kind();
  s->nx = (cpu->abi_features() & KILN_FEATURE_NX) != 0;
  const auto& mem = space.ram();
  s->memory_size = mem.size();
  s->file_room = mem.address_limit() - mem.size();
  s->heap_size = config.heap_size;
  s->stack_size = config.stack_size;
  s->guest_path = config.guest_path;
  s->layout = layout;
  for (const auto& r : mem.regions())
    if (r.kind != memory::region_kind::file) s->regions.push_back(r);
  s->image = image;
  KILN_TRY_ASSIGN(s->regs, cpu->get_registers());
  KILN_TRY_ASSIGN(s->sregs, cpu->get_special_registers());
  KILN_TRY_ASSIGN(s->fpu, cpu->get_fpu());
  s->prot = space.protections();
  s->tables = space.saved_tables();
  s->files = space.saved_files();
  functions.for_each([&](const host_function& fn) {
    s->host_functions.push_back({fn.name, fn.params, fn.returns});
  });

  // From now on RAM is a copy-on-write mapping of the new image: a restore to it drops only
  // what the guest dirties from here, and the image's pages are shared.
  KILN_TRY(space.rebase(image));
  base = s;
  ++stats.snapshots;
  return snapshot(std::move(s));
}

result<void> sandbox::impl::restore(const detail::snapshot_state& s) {
  const auto t0 = std::chrono::steady_clock::now();
  if (calling) return error(errc::not_ready, "restore happens between calls");
  end_recording();
  if (!space.same_layout(s.regions, s.memory_size, s.file_room))
    return error(memory::memory_errc::out_of_bounds,
                 "the snapshot has another memory layout than this sandbox");
  if (space.restore_remaps(s.image.get())) cancel_loading(); // it would read another image
  const bool nx = (cpu->abi_features() & KILN_FEATURE_NX) != 0;
  KILN_TRY_ASSIGN(const auto figures, space.restore(detail::saved_memory_of(s), nx));
  KILN_TRY(cpu->set_registers(s.regs));
  KILN_TRY(cpu->set_special_registers(for_backend(s.sregs, nx)));
  KILN_TRY(cpu->set_fpu(s.fpu));
  if (figures.remapped)
    for (const auto& r : s.regions)
      if (memory::has(r.prot, protection::exec)) cpu->invalidate_code(r.start, r.size);

  is_poisoned = false;
  poison = {};
  calling = false;
  ready = true;
  ++stats.restores;
  stats.last_restore_pages = figures.pages;
  stats.last_restore_copied = figures.copied;
  stats.last_restore_time = std::chrono::steady_clock::now() - t0;
  return {};
}

// ---- public API ---------------------------------------------------------------------------------

result<snapshot> sandbox::take_snapshot() {
  return impl_->take_snapshot();
}

result<void> sandbox::restore(const snapshot& snap) {
  if (!snap.state_) return error(errc::not_ready, "empty snapshot");
  auto r = impl_->restore(*snap.state_);
  if (r) impl_->base = snap.state_;
  return r;
}

result<std::unique_ptr<sandbox>> sandbox::create(const snapshot& snap, host_functions functions,
                                                 const sandbox_config& config) {
  return detail::sandbox_access::create_from_snapshot(snap, std::move(functions), config, {});
}

result<std::unique_ptr<sandbox>>
detail::sandbox_access::create_from_snapshot(const snapshot& snap, host_functions functions,
                                             const sandbox_config& config,
                                             boost::asio::any_io_executor ex) {
  const auto t0 = std::chrono::steady_clock::now();
  if (!snap.state_) return error(errc::not_ready, "empty snapshot");
  if (functions.refused()) return *functions.refused();
  const detail::snapshot_state& s = *snap.state_;
  KILN_TRY_ASSIGN(auto kind, vcpu::resolve(config.backend));
  // Host functions cannot be saved: the caller registers them again, and the guest was built
  // against these names and signatures, so a missing or different one fails here, not at the
  // guest's first call.
  for (const auto& want : s.host_functions) {
    const host_function* have = functions.find(want.name);
    if (!have)
      return error(
          errc::function_not_found,
          fmt::format("host function '{}' recorded in the snapshot is not registered", want.name));
    if (have->params != want.params || have->returns != want.returns)
      return error(errc::bad_arguments,
                   fmt::format("host function '{}' has another signature than the snapshot "
                               "records",
                               want.name));
  }
  sandbox_config c = config;
  c.guest_path = s.guest_path;
  c.memory_size = s.memory_size;
  c.heap_size = s.heap_size;
  c.stack_size = s.stack_size;
  c.file_room = s.file_room;
  c.files.clear();

  KILN_TRY_ASSIGN(auto mem, memory::guest_memory::create(s.memory_size, s.file_room));
  for (const auto& r : s.regions)
    KILN_TRY(mem.add_region(r));
  KILN_TRY(mem.back_with(s.image));
  auto p = std::make_unique<sandbox::impl>(std::move(c), std::move(functions), std::move(mem));
  p->layout = s.layout;
  KILN_TRY_ASSIGN(p->cpu, vcpu::create(kind));
  p->attach_space();
  const bool nx = (p->cpu->abi_features() & KILN_FEATURE_NX) != 0;
  KILN_TRY(p->space.init_saved(s.tables, nx));
  KILN_TRY(p->cpu->map_memory(p->space.ram()));
  p->backend_calls_at_build = p->cpu->stats().map_calls;
  p->scratch.resize(fixed::io_buffer_size);
  KILN_TRY(p->space.adopt(detail::saved_memory_of(s), nx));
  // Boot info names the backend the guest runs on.
  const std::uint64_t features =
      p->cpu->abi_features() | KILN_FEATURE_FILE_TABLE | KILN_FEATURE_MEMORY_OPS;
  KILN_TRY(
      p->space.ram().write_object(fixed::boot_info + offsetof(kiln_boot_info, features), features));
  KILN_TRY(p->cpu->set_registers(s.regs));
  KILN_TRY(p->cpu->set_special_registers(for_backend(s.sregs, nx)));
  KILN_TRY(p->cpu->set_fpu(s.fpu));
  p->load_started = t0;
  KILN_TRY(p->start_loading(s, std::move(ex)));
  p->ready = true;
  p->base = snap.state_;
  p->stats.create_time = std::chrono::steady_clock::now() - t0;
  p->stats.load.to_start = p->stats.create_time;
  return std::unique_ptr<sandbox>(new sandbox(std::move(p)));
}

} // namespace kiln
