// Builds ELF64 images in memory (loader tests, fuzz seeds), with every header field patchable.
#pragma once

#include <elf.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace kiln::test {

struct elf_segment_spec {
  std::uint32_t type = PT_LOAD;
  std::uint32_t flags = PF_R;
  std::uint64_t vaddr = 0;
  std::uint64_t memsz = 0;     // 0: the size of `data`
  std::vector<std::byte> data; // the segment's file bytes (p_filesz)
};

struct elf_spec {
  std::uint64_t entry = 0;
  std::vector<elf_segment_spec> segments;
};

/// Bytes 0, 1, 2, ... (mod 251, so no page-sized period) offset by `seed`: easy to recognise.
inline std::vector<std::byte> pattern(std::size_t n, unsigned seed = 0) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i)
    v[i] = static_cast<std::byte>((i + seed) % 251);
  return v;
}

inline constexpr std::size_t elf_phdr_offset = sizeof(Elf64_Ehdr);

/// A static little-endian x86-64 ET_EXEC: the ELF header at 0, the program headers right after
/// it, then each segment's bytes in order (16-byte aligned). p_paddr = p_vaddr.
inline std::vector<std::byte> build_elf(const elf_spec& spec) {
  const std::size_t headers = elf_phdr_offset + spec.segments.size() * sizeof(Elf64_Phdr);
  std::vector<std::byte> out(headers);

  Elf64_Ehdr eh{};
  std::memcpy(eh.e_ident, ELFMAG, SELFMAG);
  eh.e_ident[EI_CLASS] = ELFCLASS64;
  eh.e_ident[EI_DATA] = ELFDATA2LSB;
  eh.e_ident[EI_VERSION] = EV_CURRENT;
  eh.e_type = ET_EXEC;
  eh.e_machine = EM_X86_64;
  eh.e_version = EV_CURRENT;
  eh.e_entry = spec.entry;
  eh.e_phoff = elf_phdr_offset;
  eh.e_ehsize = sizeof(Elf64_Ehdr);
  eh.e_phentsize = sizeof(Elf64_Phdr);
  eh.e_phnum = static_cast<std::uint16_t>(spec.segments.size());
  std::memcpy(out.data(), &eh, sizeof eh);

  for (std::size_t i = 0; i < spec.segments.size(); ++i) {
    const auto& s = spec.segments[i];
    out.resize((out.size() + 15) & ~std::size_t{15});
    Elf64_Phdr ph{};
    ph.p_type = s.type;
    ph.p_flags = s.flags;
    ph.p_offset = out.size();
    ph.p_vaddr = ph.p_paddr = s.vaddr;
    ph.p_filesz = s.data.size();
    ph.p_memsz = s.memsz ? s.memsz : s.data.size();
    ph.p_align = 4096;
    std::memcpy(out.data() + elf_phdr_offset + i * sizeof ph, &ph, sizeof ph);
    out.insert(out.end(), s.data.begin(), s.data.end());
  }
  return out;
}

/// Rewrites the ELF header of `file` through `fn(Elf64_Ehdr&)`.
template <class F> void patch_ehdr(std::vector<std::byte>& file, F fn) {
  Elf64_Ehdr eh;
  std::memcpy(&eh, file.data(), sizeof eh);
  fn(eh);
  std::memcpy(file.data(), &eh, sizeof eh);
}

/// Rewrites program header `i` of `file` through `fn(Elf64_Phdr&)`.
template <class F> void patch_phdr(std::vector<std::byte>& file, std::size_t i, F fn) {
  Elf64_Phdr ph;
  const std::size_t off = elf_phdr_offset + i * sizeof ph;
  std::memcpy(&ph, file.data() + off, sizeof ph);
  fn(ph);
  std::memcpy(file.data() + off, &ph, sizeof ph);
}

} // namespace kiln::test
