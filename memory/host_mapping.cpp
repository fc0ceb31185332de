// host_mapping: an anonymous mmap with PROT_NONE guard pages, released on destruction.
#include <kiln/memory/address.hpp>
#include <kiln/memory/host_mapping.hpp>
#include <kiln/memory/memory_errc.hpp>

#include <sys/mman.h>

#include <utility>

namespace kiln::memory {

host_mapping::~host_mapping() {
  reset();
}

host_mapping::host_mapping(host_mapping&& o) noexcept
    : base_(std::exchange(o.base_, nullptr)), reserved_(std::exchange(o.reserved_, 0)),
      data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)),
      extra_(std::exchange(o.extra_, 0)) {}

host_mapping& host_mapping::operator=(host_mapping&& o) noexcept {
  if (this != &o) {
    reset();
    base_ = std::exchange(o.base_, nullptr);
    reserved_ = std::exchange(o.reserved_, 0);
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
    extra_ = std::exchange(o.extra_, 0);
  }
  return *this;
}

void host_mapping::reset() noexcept {
  if (base_) ::munmap(base_, reserved_);
  base_ = nullptr;
  data_ = nullptr;
  reserved_ = size_ = extra_ = 0;
}

result<host_mapping> host_mapping::anonymous(std::uint64_t size, bool guards, std::uint64_t extra) {
  if (size == 0 || !is_aligned(size, page_size) || !is_aligned(extra, page_size))
    return error(memory_errc::bad_size, "mapping size");
  const std::uint64_t guard = guards ? page_size : 0;
  std::uint64_t reserved = 0;
  if (__builtin_add_overflow(size, 2 * guard, &reserved) ||
      __builtin_add_overflow(reserved, extra, &reserved))
    return error(memory_errc::bad_size, "mapping size overflows");
  // Reserve the whole range inaccessible, then open the middle: the guards stay PROT_NONE.
  // MAP_NORESERVE: guest memory is mostly untouched; only pages the guest writes cost RAM.
  void* base =
      ::mmap(nullptr, reserved, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED) return errno_error("mmap guest memory");
  host_mapping m;
  m.base_ = base;
  m.reserved_ = reserved;
  m.data_ = static_cast<std::byte*>(base) + guard;
  m.size_ = size;
  m.extra_ = extra;
  if (::mprotect(m.data_, size, PROT_READ | PROT_WRITE) != 0)
    return errno_error("mprotect guest memory");
  // No transparent huge pages, whatever the host's THP setting: with them one guest store
  // would make 2 MiB resident, a read would map a huge zero page that page-level accounting
  // cannot tell apart, and a discard or restore would work on 2 MiB units. Density and exact
  // per-page accounting matter more here than the TLB reach THP would give KVM guests.
  // Best effort: a kernel without THP refuses the advice, which is then moot.
  (void)::madvise(m.data_, size, MADV_NOHUGEPAGE);
  return m;
}

} // namespace kiln::memory
