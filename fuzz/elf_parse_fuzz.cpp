// libFuzzer target: parse_elf on arbitrary bytes, then load_elf of whatever it accepts (case 19).
#include <kiln/memory/elf_loader.hpp>
#include <kiln/memory/guest_memory.hpp>
#include <kiln/memory/layout.hpp>
#include <kiln/memory/memory_errc.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

namespace {

using namespace kiln::memory;

[[noreturn]] void fail() {
  __builtin_trap();
}

// What the sandbox uses for 16 MiB of memory and a 256 KiB stack.
constexpr std::uint64_t memory_size = 16ull << 20;
constexpr guest_phys_addr image_limit{memory_size - (256ull << 10) - page_size};

// Everything parse_elf promises about an image it accepts.
void check_image(const elf_image& img, std::span<const std::byte> in) {
  if (img.file.size() != in.size() || !std::equal(img.file.begin(), img.file.end(), in.begin()))
    fail();
  if (img.segments.empty() || img.segments.size() > elf_max_segments) fail();
  bool entry_ok = false;
  for (std::size_t i = 0; i < img.segments.size(); ++i) {
    const elf_segment& s = img.segments[i];
    if (!is_aligned(s.start.value, page_size) || !is_aligned(s.size, page_size) || s.size == 0)
      fail();
    if (s.start < fixed::image_base || s.start.value + s.size > image_limit.value) fail();
    if (s.vaddr < s.start || s.vaddr.value + s.mem_size > s.start.value + s.size) fail();
    if (s.file_size > s.mem_size || s.file_offset + s.file_size > in.size()) fail();
    if (has(s.prot, protection::write) && has(s.prot, protection::exec)) fail();
    if (i > 0 && img.segments[i - 1].start.value + img.segments[i - 1].size > s.start.value) fail();
    if (has(s.prot, protection::exec) && img.entry >= s.vaddr &&
        img.entry.value < s.vaddr.value + s.mem_size)
      entry_ok = true;
  }
  if (!entry_ok) fail();
  if (img.end != img.segments.back().start + img.segments.back().size) fail();
}

// Loading an accepted image into fresh memory succeeds and puts the file bytes where they belong.
void check_load(const elf_image& img) {
  auto mem = guest_memory::create(memory_size);
  if (!mem) fail();
  if (!load_elf(img, *mem)) fail();
  // Empty reads are skipped: guest_memory::read memcpy()s from a null pointer for an empty span
  // without data (UB that UBSan reports; a known bug, see tests/memory/guest_memory_test.cpp).
  std::vector<std::byte> got;
  for (const elf_segment& s : img.segments) {
    if (s.file_size > 0) {
      got.resize(s.file_size);
      if (!mem->read(s.vaddr, got)) fail();
      if (!std::equal(got.begin(), got.end(),
                      img.file.begin() + static_cast<std::ptrdiff_t>(s.file_offset)))
        fail();
    }
    // The first bytes past the file part (.bss) are zero.
    const std::uint64_t bss = std::min<std::uint64_t>(s.mem_size - s.file_size, 256);
    if (bss > 0) {
      got.assign(bss, std::byte{0xff});
      if (!mem->read(s.vaddr + s.file_size, got)) fail();
      if (std::any_of(got.begin(), got.end(), [](std::byte b) { return b != std::byte{0}; }))
        fail();
    }
  }
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> in(reinterpret_cast<const std::byte*>(data), size);
  auto img = parse_elf(in, fixed::image_base, image_limit);
  if (!img) {
    if (img.code().category() != kiln::category_of<memory_errc>()) fail();
    return 0;
  }
  check_image(*img, in);
  check_load(*img);
  return 0;
}
