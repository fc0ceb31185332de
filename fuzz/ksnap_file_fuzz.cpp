// libFuzzer target: .ksnap files (and a parent) read by the real reader, as `kiln verify` and a
// load read them: header, sections, PARENT and the chain, the runtime state, the chunk table and
// the mapping (ADVERSARIAL case 19).
//
// The input describes one or two files rather than being one, so that a few KiB can stand for a
// file of several MiB of mostly holes (a real guest's memory), and so that mutations reach past
// the checksums (the harness can recompute them, as a writer would; a bit says whether):
//
//   input := u8 flags, file [, file]        the second file (flags & has_parent) is the parent
//   file  := u64 size, u8 count, piece × count
//   piece := u64 offset, u16 length, length bytes   (written at offset; what passes size is cut)
//
// The first file is written as top.ksnap, the second as parent.ksnap beside it (a PARENT section
// reaches it as "parent.ksnap"); both live in a private directory under /dev/shm (or $TMPDIR).
#include <kiln/memory/detail/ksnap_io.hpp>
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/snapshot_file.hpp>
#include <kiln/runtime/snapshot.hpp>
#include <kiln/support/crc32c.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <span>
#include <string>
#include <system_error>

namespace {

using namespace kiln;
namespace ksnap = memory::ksnap;

enum flag : std::uint8_t {
  fix_header_crc = 1, // recompute each file's header checksum after writing it
  fix_meta_crc = 2,   // recompute each file's meta-area checksum (before the header's)
  has_parent = 4,     // a second file follows: parent.ksnap
};

// Files past this are not written: a guest's memory of a few MiB is enough to reach every check,
// and bigger ones only make each run slower (the data is read for the chunk checksums).
constexpr std::uint64_t max_file_size = 16ull << 20;

[[noreturn]] void fail() {
  __builtin_trap();
}

/// The bytes left of the input, taken from the front.
struct reader {
  std::span<const std::uint8_t> in;
  template <class T> bool take(T& v) {
    if (in.size() < sizeof v) return false;
    std::memcpy(&v, in.data(), sizeof v);
    in = in.subspan(sizeof v);
    return true;
  }
};

/// One file the harness rewrites on every run: kept open, emptied, then written anew.
struct scratch_file {
  std::string path;
  int fd = -1;

  void open(const std::string& p) {
    path = p;
    fd = ::open(p.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) fail();
  }
  void empty() const {
    if (::ftruncate(fd, 0) != 0) fail();
  }
  void pwrite_all(const void* p, std::size_t n, std::uint64_t off) const {
    if (::pwrite(fd, p, n, static_cast<off_t>(off)) != static_cast<ssize_t>(n)) fail();
  }

  /// Writes one `file` description from `r`; false when the input ends early or the file would
  /// be too big (the file is then left empty).
  bool write(reader& r, std::uint8_t flags) const {
    empty();
    std::uint64_t size = 0;
    std::uint8_t count = 0;
    if (!r.take(size) || !r.take(count) || size > max_file_size) return false;
    if (::ftruncate(fd, static_cast<off_t>(size)) != 0) fail();
    for (unsigned i = 0; i < count; ++i) {
      std::uint64_t off = 0;
      std::uint16_t len = 0;
      if (!r.take(off) || !r.take(len) || r.in.size() < len) return false;
      if (off < size) pwrite_all(r.in.data(), std::min<std::uint64_t>(len, size - off), off);
      r.in = r.in.subspan(len);
    }
    fix_checksums(size, flags);
    return true;
  }

  /// What a writer would do last: the meta area's CRC32C, then the header's, wherever the
  /// header (as written) says they go, if that lies inside the file.
  void fix_checksums(std::uint64_t size, std::uint8_t flags) const {
    if (size < ksnap::header_size) return;
    memory::detail::header_block block{};
    if (::pread(fd, block.data(), block.size(), 0) != static_cast<ssize_t>(block.size())) fail();
    ksnap::header h;
    std::memcpy(&h, block.data(), sizeof h);
    if ((flags & fix_meta_crc) && h.meta_size >= 4 && h.meta_size <= ksnap::max_meta &&
        h.meta_offset <= size && h.meta_size <= size - h.meta_offset) {
      std::vector<std::byte> area(h.meta_size - 4);
      if (::pread(fd, area.data(), area.size(), static_cast<off_t>(h.meta_offset)) !=
          static_cast<ssize_t>(area.size()))
        fail();
      const std::uint32_t crc = crc32c(0, area);
      pwrite_all(&crc, sizeof crc, h.meta_offset + area.size());
    }
    if (flags & fix_header_crc) {
      const std::uint32_t crc = memory::detail::header_crc(block);
      pwrite_all(&crc, sizeof crc, offsetof(ksnap::header, header_crc));
    }
  }
};

struct harness {
  std::string dir;
  scratch_file top, parent;
  std::string copy; // where an accepted snapshot is saved again

  harness() {
    const char* base = ::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : std::getenv("TMPDIR");
    std::string tmpl = std::string(base ? base : "/tmp") + "/kiln-ksnap-fuzz-XXXXXX";
    if (!::mkdtemp(tmpl.data())) fail();
    dir = tmpl;
    top.open(dir + "/top.ksnap");
    parent.open(dir + "/parent.ksnap");
    copy = dir + "/copy.ksnap";
  }
  ~harness() {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
};

harness& the_harness() {
  static harness h; // destroyed at exit: the directory goes with it
  return h;
}

/// Every refusal is a typed error: the memory layer's, or an errno (open, read, mmap).
void check_error(const error& e) {
  const auto& cat = e.code.category();
  if (cat != category_of<memory::memory_errc>() && cat != std::generic_category() &&
      cat != std::system_category())
    fail();
  if (e.message().empty()) fail();
}

/// What holds for a snapshot the reader accepted: it describes itself, and saved again (whole)
/// it passes every check, chunk checksums included.
void check_accepted(const snapshot& s, const std::string& copy) {
  if (s.memory_size() == 0 || s.memory_size() > ksnap::max_memory) fail();
  if (!s.stored_bytes()) fail();
  if (s.describe().empty()) fail();
  auto saved = s.save(copy, {.layered = false});
  if (!saved) {
    check_error(saved.err());
    return; // e.g. ENOSPC: the reader's side is what this target checks
  }
  if (auto again = snapshot::verify(copy); !again) fail();
  auto reloaded = snapshot::load(copy, mapped_file_policy::any());
  if (!reloaded || reloaded->memory_size() != s.memory_size()) fail();
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  harness& h = the_harness();
  reader r{{data, size}};
  std::uint8_t flags = 0;
  if (!r.take(flags)) return 0;
  // Both files are rewritten (or emptied) on every run, and the last run's copy is gone, so no
  // run sees another's files (a PARENT section may name any of them).
  h.parent.empty();
  ::unlink(h.copy.c_str());
  if (!h.top.write(r, flags)) return 0;
  if ((flags & has_parent) && !h.parent.write(r, flags)) return 0;

  auto verified = snapshot::verify(h.top.path);
  // Which mapped files to allow is the caller's trust decision, not a check of the file: allow
  // whatever is recorded, so that the load checks exactly what verify does.
  auto loaded = snapshot::load(h.top.path, mapped_file_policy::any());
  if (!verified) check_error(verified.err());
  if (!loaded) {
    check_error(loaded.err());
    // A load checks all that verify does but the chunk checksums: what it refuses, verify must.
    if (verified) fail();
    return 0;
  }
  check_accepted(*loaded, h.copy);
  return 0;
}
