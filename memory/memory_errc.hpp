// Errors of the memory layer: guest memory access, layout and ELF loading.
#pragma once

#include <kiln/support/error_category.hpp>

namespace kiln::memory {

enum class memory_errc {
  out_of_bounds = 1,  // an access or range outside guest memory or outside one region
  overlapping_region, // a region overlaps another
  unaligned,          // an address or size that must be page-aligned is not
  bad_size,           // a size of zero, too small or too large
  layout_too_small,   // the requested sizes do not fit in the guest memory size
  // ELF loading
  elf_truncated,            // the file ends before a header, table or segment it declares
  elf_bad_magic,            // not an ELF file
  elf_not_x86_64,           // not a 64-bit little-endian x86-64 ELF
  elf_not_static,           // not ET_EXEC, or asks for an interpreter or dynamic linking
  elf_bad_segment,          // a loadable segment is malformed (filesz > memsz, bad alignment)
  elf_segment_overlap,      // two loadable segments share a page
  elf_segment_outside,      // a segment lies outside the image area of guest memory
  elf_writable_executable,  // a segment asks to be both writable and executable
  elf_entry_not_executable, // the entry point is not inside an executable segment
  elf_too_large,            // file or header counts above kiln's caps
  // Bookkeeping and mapped files
  protection_widened, // a change would give a page a right it does not have
  too_many_ranges,    // the cap on distinct protection ranges or page tables is reached
  file_not_regular,   // a file to map is a directory, device, socket...
  file_empty,         // a file to map has no bytes
  file_too_large,     // a file to map does not fit the guest's free file address room
  file_name_invalid,  // a mapped file's name is empty, too long or already in use
  file_not_mapped,    // no mapped file of that name
  file_truncated,     // a mapped file shrank after it was mapped; its lost pages were touched
  // Snapshot files
  snapshot_truncated,       // the file ends before a part its header declares (or shrank)
  snapshot_bad_magic,       // not a kiln snapshot file
  snapshot_unsupported,     // another format version, architecture or page size
  snapshot_corrupt,         // a checksum or structural check failed
  snapshot_too_large,       // a size above kiln's caps
  snapshot_parent_mismatch, // a layered file's parent is not the file it was written against
  file_not_allowed, // a snapshot file names a host file to map that the caller did not allow
};

} // namespace kiln::memory

template <> struct kiln::errc_traits<kiln::memory::memory_errc> {
  static constexpr const char* name = "kiln.memory";
  static const char* message(kiln::memory::memory_errc e) noexcept {
    using enum kiln::memory::memory_errc;
    switch (e) {
    case out_of_bounds:
      return "guest memory access out of bounds";
    case overlapping_region:
      return "overlapping memory region";
    case unaligned:
      return "address or size not page-aligned";
    case bad_size:
      return "bad size";
    case layout_too_small:
      return "guest memory too small for the requested layout";
    case elf_truncated:
      return "ELF file truncated";
    case elf_bad_magic:
      return "not an ELF file";
    case elf_not_x86_64:
      return "ELF file is not 64-bit little-endian x86-64";
    case elf_not_static:
      return "ELF file is not a static executable";
    case elf_bad_segment:
      return "malformed ELF segment";
    case elf_segment_overlap:
      return "ELF segments overlap";
    case elf_segment_outside:
      return "ELF segment outside the guest image area";
    case elf_writable_executable:
      return "ELF segment is both writable and executable";
    case elf_entry_not_executable:
      return "ELF entry point is not in an executable segment";
    case elf_too_large:
      return "ELF file exceeds size limits";
    case protection_widened:
      return "protection change would widen access";
    case too_many_ranges:
      return "too many distinct protection ranges";
    case file_not_regular:
      return "not a regular file";
    case file_empty:
      return "file is empty";
    case file_too_large:
      return "file does not fit the guest's file address room";
    case file_name_invalid:
      return "invalid or duplicate mapped-file name";
    case file_not_mapped:
      return "no mapped file of that name";
    case file_truncated:
      return "mapped file was truncated under the guest";
    case snapshot_truncated:
      return "snapshot file truncated";
    case snapshot_bad_magic:
      return "not a kiln snapshot file";
    case snapshot_unsupported:
      return "unsupported snapshot format, architecture or page size";
    case snapshot_corrupt:
      return "snapshot file corrupt";
    case snapshot_too_large:
      return "snapshot file exceeds size limits";
    case file_not_allowed:
      return "snapshot file maps a host file the caller did not allow";
    case snapshot_parent_mismatch:
      return "snapshot file's parent changed or does not match";
    }
    return nullptr;
  }
};
KILN_DECLARE_ERRC(kiln::memory, memory_errc)
