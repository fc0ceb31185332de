// ELF loader: validates a static x86-64 guest image completely before copying any byte.
#include <kiln/memory/elf_loader.hpp>
#include <kiln/memory/memory_errc.hpp>
#include <kiln/support/unique_fd.hpp>

#include <elf.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <string>

namespace kiln::memory {
namespace {

template <class T> T load(std::span<const std::byte> file, std::uint64_t off) {
  T v;
  std::memcpy(&v, file.data() + off, sizeof v);
  return v;
}

std::string hex(std::uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

} // namespace

result<elf_image> parse_elf(std::span<const std::byte> file, guest_phys_addr image_base,
                            guest_phys_addr image_limit) {
  if (file.size() > elf_max_file_size) return error(memory_errc::elf_too_large, "file size");
  if (!is_aligned(image_base.value, page_size) || !is_aligned(image_limit.value, page_size) ||
      image_limit <= image_base)
    return error(memory_errc::bad_size, "image area must be page-aligned and non-empty");
  // The magic first (as much of it as the file holds), so a short non-ELF file is named for
  // what it is, and a short prefix of an ELF file is named truncated.
  const std::size_t magic_len = std::min<std::size_t>(file.size(), SELFMAG);
  if (magic_len > 0 && std::memcmp(file.data(), ELFMAG, magic_len) != 0)
    return memory_errc::elf_bad_magic;
  if (file.size() < sizeof(Elf64_Ehdr)) return error(memory_errc::elf_truncated, "ELF header");
  const auto eh = load<Elf64_Ehdr>(file, 0);
  if (eh.e_ident[EI_CLASS] != ELFCLASS64 || eh.e_ident[EI_DATA] != ELFDATA2LSB ||
      eh.e_machine != EM_X86_64)
    return memory_errc::elf_not_x86_64;
  if (eh.e_type != ET_EXEC) return error(memory_errc::elf_not_static, "not ET_EXEC");
  if (eh.e_phnum == 0) return error(memory_errc::elf_bad_segment, "no program headers");
  if (eh.e_phnum > elf_max_segments) return error(memory_errc::elf_too_large, "program headers");
  if (eh.e_phentsize != sizeof(Elf64_Phdr))
    return error(memory_errc::elf_bad_segment, "program header entry size");
  std::uint64_t ph_end = 0;
  if (__builtin_add_overflow(eh.e_phoff, std::uint64_t{eh.e_phnum} * sizeof(Elf64_Phdr), &ph_end) ||
      ph_end > file.size())
    return error(memory_errc::elf_truncated, "program headers");

  elf_image img;
  for (unsigned i = 0; i < eh.e_phnum; ++i) {
    const auto ph = load<Elf64_Phdr>(file, eh.e_phoff + i * sizeof(Elf64_Phdr));
    if (ph.p_type == PT_INTERP || ph.p_type == PT_DYNAMIC)
      return error(memory_errc::elf_not_static, "has an interpreter or dynamic section");
    if (ph.p_type != PT_LOAD || ph.p_memsz == 0) continue;
    const std::string which = "segment " + std::to_string(i);
    if (ph.p_filesz > ph.p_memsz)
      return error(memory_errc::elf_bad_segment, which + ": filesz > memsz");
    std::uint64_t file_end = 0, mem_end = 0;
    if (__builtin_add_overflow(ph.p_offset, ph.p_filesz, &file_end) || file_end > file.size())
      return error(memory_errc::elf_truncated, which);
    if (__builtin_add_overflow(ph.p_vaddr, ph.p_memsz, &mem_end) ||
        align_up(mem_end, page_size) > image_limit.value || mem_end > image_limit.value)
      return error(memory_errc::elf_segment_outside, which + " at " + hex(ph.p_vaddr));
    if (ph.p_vaddr < image_base.value)
      return error(memory_errc::elf_segment_outside, which + " at " + hex(ph.p_vaddr));
    if (ph.p_paddr != ph.p_vaddr)
      return error(memory_errc::elf_bad_segment, which + ": physical and virtual address differ");
    if ((ph.p_flags & PF_W) && (ph.p_flags & PF_X))
      return error(memory_errc::elf_writable_executable, which);
    protection prot = protection::read;
    if (ph.p_flags & PF_W) prot = prot | protection::write;
    if (ph.p_flags & PF_X) prot = prot | protection::exec;
    elf_segment s;
    s.start = guest_phys_addr{align_down(ph.p_vaddr, page_size)};
    s.size = align_up(mem_end, page_size) - s.start.value;
    s.vaddr = guest_phys_addr{ph.p_vaddr};
    s.file_offset = ph.p_offset;
    s.file_size = ph.p_filesz;
    s.mem_size = ph.p_memsz;
    s.prot = prot;
    img.segments.push_back(s);
  }
  if (img.segments.empty()) return error(memory_errc::elf_bad_segment, "no loadable segment");
  std::sort(img.segments.begin(), img.segments.end(),
            [](const elf_segment& a, const elf_segment& b) { return a.start < b.start; });
  for (std::size_t i = 1; i < img.segments.size(); ++i)
    if (img.segments[i - 1].start + img.segments[i - 1].size > img.segments[i].start)
      return error(memory_errc::elf_segment_overlap,
                   "segments at " + hex(img.segments[i - 1].vaddr.value) + " and " +
                       hex(img.segments[i].vaddr.value) + " share a page");
  img.entry = guest_phys_addr{eh.e_entry};
  const bool entry_ok =
      std::any_of(img.segments.begin(), img.segments.end(), [&](const elf_segment& s) {
        return has(s.prot, protection::exec) && img.entry >= s.vaddr &&
               img.entry.value < s.vaddr.value + s.mem_size;
      });
  if (!entry_ok) return error(memory_errc::elf_entry_not_executable, hex(eh.e_entry));
  img.end = img.segments.back().start + img.segments.back().size;
  img.file.assign(file.begin(), file.end());
  return img;
}

result<elf_image> read_elf_file(const std::string& path, guest_phys_addr image_base,
                                guest_phys_addr image_limit) {
  // Non-blocking, so that a FIFO (or a device) given as the guest is refused below instead of
  // blocking here until something writes to it; a regular file reads as ever.
  unique_fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY));
  if (!fd) return errno_error(("open " + path).c_str());
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return errno_error("fstat");
  if (!S_ISREG(st.st_mode))
    return error(memory_errc::elf_bad_magic, path + " is not a regular file");
  if (static_cast<std::uint64_t>(st.st_size) > elf_max_file_size)
    return error(memory_errc::elf_too_large, path);
  std::vector<std::byte> buf(static_cast<std::size_t>(st.st_size));
  std::size_t got = 0;
  while (got < buf.size()) {
    const ssize_t n = ::read(fd.get(), buf.data() + got, buf.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno_error("read");
    if (n == 0) break;
    got += static_cast<std::size_t>(n);
  }
  buf.resize(got);
  return parse_elf(buf, image_base, image_limit);
}

result<void> load_elf(const elf_image& image, guest_memory& mem) {
  for (std::size_t i = 0; i < image.segments.size(); ++i) {
    const auto& s = image.segments[i];
    KILN_TRY(mem.add_region(
        region{"image." + std::to_string(i), region_kind::image, s.start, s.size, s.prot, true}));
    const auto bytes = std::span<const std::byte>(image.file).subspan(s.file_offset, s.file_size);
    KILN_TRY(mem.write(s.vaddr, bytes));
  }
  return {};
}

} // namespace kiln::memory
