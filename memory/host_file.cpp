// host_file: open + fstat checks for files mapped into guests.
#include <kiln/memory/host_file.hpp>
#include <kiln/memory/memory_errc.hpp>

#include <cerrno>

#include <fcntl.h>
#include <sys/stat.h>

namespace kiln::memory {
namespace {

error errno_for(const std::string& what) {
  const int err = errno; // before the message allocates
  return error(std::error_code(err, std::generic_category()), what);
}

} // namespace

result<host_file> host_file::open(const std::string& path) {
  int raw;
  do {
    // Non-blocking, so that a FIFO is refused below instead of blocking here until something
    // writes to it (under kiln::runtime that would stall every sandbox of the worker).
    raw = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  } while (raw < 0 && errno == EINTR);
  if (raw < 0) return errno_for("open " + path);
  unique_fd fd(raw);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return errno_for("fstat " + path);
  if (!S_ISREG(st.st_mode)) return error(memory_errc::file_not_regular, path);
  if (st.st_size <= 0) return error(memory_errc::file_empty, path);
  file_identity id{path, static_cast<std::uint64_t>(st.st_dev),
                   static_cast<std::uint64_t>(st.st_ino), static_cast<std::uint64_t>(st.st_size),
                   static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 +
                       st.st_mtim.tv_nsec};
  return host_file(std::move(fd), std::move(id));
}

result<std::uint64_t> host_file::current_size() const {
  struct stat st {};
  if (::fstat(fd_.get(), &st) != 0) return errno_for("fstat " + id_.path);
  return static_cast<std::uint64_t>(st.st_size);
}

} // namespace kiln::memory
