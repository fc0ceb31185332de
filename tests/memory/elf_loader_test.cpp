// Tests for memory/elf_loader.hpp: every rejection provoked by a crafted image, then a real load.
#include <kiln/memory/elf_loader.hpp>
#include <kiln/memory/host_mapping.hpp>
#include <kiln/memory/layout.hpp>

#include "memory/elf_builder.hpp"

#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <optional>
#include <string>
#include <string_view>

namespace kiln::memory {
namespace {

using test::build_elf;
using test::elf_spec;
using test::patch_ehdr;
using test::patch_phdr;
using test::pattern;

constexpr guest_phys_addr base = fixed::image_base;
// As the sandbox computes it for 16 MiB of memory and a 256 KiB stack: the stack guard page.
constexpr guest_phys_addr limit{(16ull << 20) - (256ull << 10) - page_size};

// Three segments: text (RX, 300 bytes), data (RW, 40 bytes + .bss up to 0x1800) and rodata
// (R, 16 bytes at an address that is not page-aligned). Program header i is segment i.
elf_spec good_spec() {
  elf_spec s;
  s.entry = 0x100010;
  s.segments = {{PT_LOAD, PF_R | PF_X, 0x100000, 0, pattern(300, 1)},
                {PT_LOAD, PF_R | PF_W, 0x101000, 0x1800, pattern(40, 2)},
                {PT_LOAD, PF_R, 0x103010, 0, pattern(16, 3)}};
  return s;
}
constexpr std::size_t text = 0, data = 1;

result<elf_image> parse(const std::vector<std::byte>& file) {
  return parse_elf(file, base, limit);
}

std::vector<std::byte> good() {
  return build_elf(good_spec());
}

// Moves a segment, keeping p_paddr equal to p_vaddr as the loader requires.
void move_segment(std::vector<std::byte>& f, std::size_t i, std::uint64_t vaddr) {
  patch_phdr(f, i, [&](Elf64_Phdr& p) { p.p_vaddr = p.p_paddr = vaddr; });
}

TEST(ElfParse, AcceptsAGoodImageAndDescribesItsSegments) {
  const auto file = good();
  auto img = parse(file);
  ASSERT_TRUE(img) << img.err().message();
  EXPECT_EQ(img->entry, guest_phys_addr{0x100010});
  EXPECT_EQ(img->end, guest_phys_addr{0x104000});
  EXPECT_EQ(img->file, file);
  ASSERT_EQ(img->segments.size(), 3u);

  const auto& t = img->segments[0];
  EXPECT_EQ(t.start, guest_phys_addr{0x100000});
  EXPECT_EQ(t.size, 0x1000u);
  EXPECT_EQ(t.vaddr, guest_phys_addr{0x100000});
  EXPECT_EQ(t.file_size, 300u);
  EXPECT_EQ(t.mem_size, 300u);
  EXPECT_EQ(t.prot, prot_rx);

  const auto& d = img->segments[1];
  EXPECT_EQ(d.start, guest_phys_addr{0x101000});
  EXPECT_EQ(d.size, 0x2000u);
  EXPECT_EQ(d.file_size, 40u);
  EXPECT_EQ(d.mem_size, 0x1800u);
  EXPECT_EQ(d.prot, prot_rw);

  const auto& r = img->segments[2];
  EXPECT_EQ(r.start, guest_phys_addr{0x103000});
  EXPECT_EQ(r.size, 0x1000u);
  EXPECT_EQ(r.vaddr, guest_phys_addr{0x103010});
  EXPECT_EQ(r.prot, prot_r);
  EXPECT_EQ(r.file_offset + r.file_size, file.size());
}

TEST(ElfParse, WorksOnItsOwnCopyOfTheFile) {
  auto file = good();
  auto img = parse(file);
  ASSERT_TRUE(img);
  const auto before = img->file;
  std::fill(file.begin(), file.end(), std::byte{0xcc});
  EXPECT_EQ(img->file, before);
}

TEST(ElfParse, SortsSegmentsByAddress) {
  auto spec = good_spec();
  std::swap(spec.segments[0], spec.segments[2]);
  auto img = parse(build_elf(spec));
  ASSERT_TRUE(img) << img.err().message();
  ASSERT_EQ(img->segments.size(), 3u);
  EXPECT_EQ(img->segments[0].start, guest_phys_addr{0x100000});
  EXPECT_EQ(img->segments[1].start, guest_phys_addr{0x101000});
  EXPECT_EQ(img->segments[2].start, guest_phys_addr{0x103000});
}

TEST(ElfParse, SkipsNonLoadAndEmptySegments) {
  auto spec = good_spec();
  spec.segments.push_back({PT_NOTE, PF_R, 0, 0, pattern(8)});
  spec.segments.push_back({PT_GNU_STACK, PF_R | PF_W, 0, 0, {}});
  spec.segments.push_back({PT_LOAD, PF_R, 0x200000, 0, {}}); // memsz 0: nothing to load
  auto img = parse(build_elf(spec));
  ASSERT_TRUE(img) << img.err().message();
  EXPECT_EQ(img->segments.size(), 3u);
}

TEST(ElfParse, RejectsEveryTruncation) {
  const auto file = good();
  // Every prefix: inside the ELF header, inside the program headers, inside segment bytes.
  for (std::size_t n = 0; n < file.size(); ++n) {
    auto r = parse_elf(std::span(file).first(n), base, limit);
    ASSERT_FALSE(r) << "prefix of " << n << " bytes";
    EXPECT_EQ(r.code(), memory_errc::elf_truncated) << "prefix of " << n << " bytes";
  }
}

TEST(ElfParse, NamesAShortNonElfFileBadMagic) {
  using namespace std::literals;
  for (std::string_view text : {"M"sv, "MZ\x90"sv,
                                "\x7f"
                                "ELG"sv,
                                "#!/bin/sh\n"sv}) {
    const auto bytes = std::as_bytes(std::span(text.data(), text.size()));
    EXPECT_EQ(parse_elf(bytes, base, limit).code(), memory_errc::elf_bad_magic) << text;
  }
}

TEST(ElfParse, RejectsProgramHeadersPastTheEnd) {
  auto file = good();
  patch_ehdr(file, [&](Elf64_Ehdr& e) { e.e_phoff = file.size() - sizeof(Elf64_Phdr) + 1; });
  EXPECT_EQ(parse(file).code(), memory_errc::elf_truncated);
  // e_phoff + e_phnum * e_phentsize wraps 2^64.
  patch_ehdr(file, [](Elf64_Ehdr& e) { e.e_phoff = ~0ull - 8; });
  EXPECT_EQ(parse(file).code(), memory_errc::elf_truncated);
}

TEST(ElfParse, RejectsBadMagic) {
  for (int i = 0; i < SELFMAG; ++i) {
    auto file = good();
    file[i] ^= std::byte{0x20};
    EXPECT_EQ(parse(file).code(), memory_errc::elf_bad_magic) << "magic byte " << i;
  }
}

TEST(ElfParse, RejectsAnythingButX86_64LittleEndian64Bit) {
  auto f32 = good();
  patch_ehdr(f32, [](Elf64_Ehdr& e) { e.e_ident[EI_CLASS] = ELFCLASS32; });
  EXPECT_EQ(parse(f32).code(), memory_errc::elf_not_x86_64);

  auto be = good();
  patch_ehdr(be, [](Elf64_Ehdr& e) { e.e_ident[EI_DATA] = ELFDATA2MSB; });
  EXPECT_EQ(parse(be).code(), memory_errc::elf_not_x86_64);

  for (std::uint16_t machine : {EM_386, EM_AARCH64, EM_RISCV, EM_NONE}) {
    auto f = good();
    patch_ehdr(f, [&](Elf64_Ehdr& e) { e.e_machine = machine; });
    EXPECT_EQ(parse(f).code(), memory_errc::elf_not_x86_64) << "machine " << machine;
  }
}

TEST(ElfParse, RejectsAnythingButAStaticExecutable) {
  for (std::uint16_t type : {ET_DYN, ET_REL, ET_CORE, ET_NONE}) {
    auto f = good();
    patch_ehdr(f, [&](Elf64_Ehdr& e) { e.e_type = type; });
    EXPECT_EQ(parse(f).code(), memory_errc::elf_not_static) << "e_type " << type;
  }
  for (std::uint32_t type : {PT_INTERP, PT_DYNAMIC}) {
    auto spec = good_spec();
    spec.segments.push_back({type, PF_R, 0, 0, pattern(16)});
    EXPECT_EQ(parse(build_elf(spec)).code(), memory_errc::elf_not_static) << "p_type " << type;
  }
}

TEST(ElfParse, RejectsMissingOrUnloadableProgramHeaders) {
  auto none = good();
  patch_ehdr(none, [](Elf64_Ehdr& e) { e.e_phnum = 0; });
  EXPECT_EQ(parse(none).code(), memory_errc::elf_bad_segment);

  elf_spec notes;
  notes.entry = 0x100000;
  notes.segments = {{PT_NOTE, PF_R, 0x100000, 0, pattern(8)}};
  EXPECT_EQ(parse(build_elf(notes)).code(), memory_errc::elf_bad_segment);
}

TEST(ElfParse, CapsTheNumberOfProgramHeaders) {
  auto spec = good_spec();
  while (spec.segments.size() < elf_max_segments)
    spec.segments.push_back({PT_NULL, 0, 0, 0, {}});
  auto at_cap = build_elf(spec);
  EXPECT_TRUE(parse(at_cap)) << "exactly elf_max_segments headers";

  spec.segments.push_back({PT_NULL, 0, 0, 0, {}});
  EXPECT_EQ(parse(build_elf(spec)).code(), memory_errc::elf_too_large);
  // Refused from the count alone, before the table is looked at.
  auto lying = good();
  patch_ehdr(lying, [](Elf64_Ehdr& e) { e.e_phnum = 0xffff; });
  EXPECT_EQ(parse(lying).code(), memory_errc::elf_too_large);
}

TEST(ElfParse, RejectsAWrongProgramHeaderEntrySize) {
  for (std::uint16_t size : {0, 32, 55, 57, 64}) {
    auto f = good();
    patch_ehdr(f, [&](Elf64_Ehdr& e) { e.e_phentsize = size; });
    EXPECT_EQ(parse(f).code(), memory_errc::elf_bad_segment) << "e_phentsize " << size;
  }
}

TEST(ElfParse, RejectsAFileAboveTheSizeCap) {
  // Address space only: MAP_NORESERVE and never touched beyond the ELF header.
  auto big = host_mapping::anonymous(align_up(elf_max_file_size + 1, page_size), false);
  ASSERT_TRUE(big) << big.err().message();
  const auto file = good();
  std::memcpy(big->data(), file.data(), file.size());
  auto r = parse_elf(std::span<const std::byte>(big->data(), elf_max_file_size + 1), base, limit);
  EXPECT_EQ(r.code(), memory_errc::elf_too_large);
}

TEST(ElfParse, RejectsFileSizeAboveMemorySize) {
  auto f = good();
  patch_phdr(f, data, [](Elf64_Phdr& p) { p.p_memsz = p.p_filesz - 1; });
  EXPECT_EQ(parse(f).code(), memory_errc::elf_bad_segment);
}

TEST(ElfParse, RejectsSegmentBytesPastTheEndOfTheFile) {
  auto f = good();
  patch_phdr(f, text, [&](Elf64_Phdr& p) { p.p_offset = f.size() - p.p_filesz + 1; });
  EXPECT_EQ(parse(f).code(), memory_errc::elf_truncated);

  auto wraps = good();
  patch_phdr(wraps, text, [](Elf64_Phdr& p) { p.p_offset = ~0ull - 100; }); // offset+filesz wraps
  EXPECT_EQ(parse(wraps).code(), memory_errc::elf_truncated);
}

TEST(ElfParse, RejectsSegmentsOutsideTheImageArea) {
  auto wraps = good(); // vaddr + memsz wraps 2^64
  move_segment(wraps, data, 0xffff'ffff'ffff'f000);
  EXPECT_EQ(parse(wraps).code(), memory_errc::elf_segment_outside);

  auto below = good();
  move_segment(below, text, base.value - page_size);
  EXPECT_EQ(parse(below).code(), memory_errc::elf_segment_outside);

  auto one_below = good();
  move_segment(one_below, data, base.value - 1);
  EXPECT_EQ(parse(one_below).code(), memory_errc::elf_segment_outside);

  auto above = good(); // starts inside, ends past the limit
  move_segment(above, data, limit.value - 0x800);
  EXPECT_EQ(parse(above).code(), memory_errc::elf_segment_outside);

  auto beyond = good();
  move_segment(beyond, data, limit.value + page_size);
  EXPECT_EQ(parse(beyond).code(), memory_errc::elf_segment_outside);

  auto huge = good();
  patch_phdr(huge, data, [](Elf64_Phdr& p) { p.p_memsz = 1ull << 40; });
  EXPECT_EQ(parse(huge).code(), memory_errc::elf_segment_outside);
}

TEST(ElfParse, AcceptsASegmentEndingExactlyAtTheLimit) {
  auto f = good(); // data is 0x1800 bytes: ends at limit, inside [image_base, image_limit)
  move_segment(f, data, limit.value - 0x1800);
  auto img = parse(f);
  ASSERT_TRUE(img) << img.err().message();
  EXPECT_EQ(img->end, limit);
}

TEST(ElfParse, RejectsPhysicalAddressDifferentFromVirtual) {
  auto f = good();
  patch_phdr(f, data, [](Elf64_Phdr& p) { p.p_paddr += page_size; });
  EXPECT_EQ(parse(f).code(), memory_errc::elf_bad_segment);
}

TEST(ElfParse, RejectsSegmentsSharingAPage) {
  auto f = good(); // text occupies [0x100000, 0x100000+300): its page ends at 0x101000
  move_segment(f, data, 0x100800);
  EXPECT_EQ(parse(f).code(), memory_errc::elf_segment_overlap);

  auto same = good();
  move_segment(same, 2, 0x101000); // rodata on top of data
  EXPECT_EQ(parse(same).code(), memory_errc::elf_segment_overlap);

  auto last_byte = good(); // .bss reaching one byte into rodata's page
  patch_phdr(last_byte, data, [](Elf64_Phdr& p) { p.p_memsz = 0x2001; });
  EXPECT_EQ(parse(last_byte).code(), memory_errc::elf_segment_overlap);
}

TEST(ElfParse, RejectsWritableExecutableSegments) {
  auto f = good();
  patch_phdr(f, text, [](Elf64_Phdr& p) { p.p_flags = PF_R | PF_W | PF_X; });
  EXPECT_EQ(parse(f).code(), memory_errc::elf_writable_executable);

  auto wx = good();
  patch_phdr(wx, data, [](Elf64_Phdr& p) { p.p_flags = PF_W | PF_X; });
  EXPECT_EQ(parse(wx).code(), memory_errc::elf_writable_executable);
}

TEST(ElfParse, RequiresTheEntryInsideAnExecutableSegment) {
  const std::uint64_t text_end = 0x100000 + 300;
  for (std::uint64_t entry : {std::uint64_t{0}, std::uint64_t{0xfffff}, text_end, // one past text
                              std::uint64_t{0x100800}, // text's page, past its bytes
                              std::uint64_t{0x101000}, // data (RW)
                              std::uint64_t{0x103010}, // rodata (R)
                              std::uint64_t{0x200000}, std::uint64_t{~0ull}}) {
    auto f = good();
    patch_ehdr(f, [&](Elf64_Ehdr& e) { e.e_entry = entry; });
    EXPECT_EQ(parse(f).code(), memory_errc::elf_entry_not_executable) << std::hex << entry;
  }
  auto last = good();
  patch_ehdr(last, [&](Elf64_Ehdr& e) { e.e_entry = text_end - 1; });
  EXPECT_TRUE(parse(last));
}

TEST(ElfParse, ErrorsNameTheOffendingSegment) {
  auto f = good();
  patch_phdr(f, data, [](Elf64_Phdr& p) { p.p_memsz = 1; });
  auto r = parse(f);
  ASSERT_FALSE(r);
  EXPECT_NE(r.err().detail.find("segment 1"), std::string::npos) << r.err().detail;
}

class ElfLoad : public ::testing::Test {
protected:
  void SetUp() override {
    auto m = guest_memory::create(16ull << 20);
    ASSERT_TRUE(m) << m.err().message();
    mem_.emplace(std::move(m).value());
  }
  std::vector<std::byte> read(std::uint64_t addr, std::size_t n) {
    std::vector<std::byte> out(n);
    EXPECT_TRUE(mem_->read(guest_phys_addr{addr}, out));
    return out;
  }
  bool all_zero(std::uint64_t from, std::uint64_t to) {
    const auto bytes = read(from, to - from);
    return std::all_of(bytes.begin(), bytes.end(), [](std::byte b) { return b == std::byte{0}; });
  }
  std::optional<guest_memory> mem_;
};

TEST_F(ElfLoad, CopiesFileBytesAndLeavesTheRestZero) {
  auto img = parse(good());
  ASSERT_TRUE(img);
  ASSERT_TRUE(load_elf(*img, *mem_));

  ASSERT_EQ(mem_->regions().size(), 3u);
  const char* names[] = {"image.0", "image.1", "image.2"};
  for (std::size_t i = 0; i < 3; ++i) {
    const auto& r = mem_->regions()[i];
    EXPECT_EQ(r.name, names[i]);
    EXPECT_EQ(r.kind, region_kind::image);
    EXPECT_EQ(r.start, img->segments[i].start);
    EXPECT_EQ(r.size, img->segments[i].size);
    EXPECT_EQ(r.prot, img->segments[i].prot);
    EXPECT_TRUE(r.guest_visible);
  }

  EXPECT_EQ(read(0x100000, 300), pattern(300, 1));
  EXPECT_TRUE(all_zero(0x100000 + 300, 0x101000));
  EXPECT_EQ(read(0x101000, 40), pattern(40, 2));
  EXPECT_TRUE(all_zero(0x101000 + 40, 0x103000)) << ".bss and the page tail are zero";
  EXPECT_TRUE(all_zero(0x103000, 0x103010)) << "bytes below an unaligned vaddr are zero";
  EXPECT_EQ(read(0x103010, 16), pattern(16, 3));
  EXPECT_TRUE(all_zero(0x103020, 0x104000));
}

TEST_F(ElfLoad, RefusesSegmentsOverlappingExistingRegions) {
  ASSERT_TRUE(
      mem_->add_region({"heap", region_kind::heap, guest_phys_addr{0x101000}, 0x1000, prot_rw}));
  auto img = parse(good());
  ASSERT_TRUE(img);
  EXPECT_EQ(load_elf(*img, *mem_).code(), memory_errc::overlapping_region);
}

class ElfFile : public ::testing::Test {
protected:
  void TearDown() override {
    if (!path_.empty()) ::unlink(path_.c_str());
  }
  std::string write(const std::vector<std::byte>& bytes) {
    path_ = ::testing::TempDir() + "kiln_elf_loader_test_" + std::to_string(::getpid()) + ".elf";
    std::ofstream out(path_, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
    return path_;
  }
  std::string path_;
};

TEST_F(ElfFile, ReadsAndParsesAFile) {
  const auto file = good();
  auto img = read_elf_file(write(file), base, limit);
  ASSERT_TRUE(img) << img.err().message();
  EXPECT_EQ(img->file, file);
  EXPECT_EQ(img->segments.size(), 3u);
}

TEST_F(ElfFile, RejectsAnEmptyFile) {
  EXPECT_EQ(read_elf_file(write({}), base, limit).code(), memory_errc::elf_truncated);
}

TEST_F(ElfFile, ReportsAMissingFileWithItsErrno) {
  auto r = read_elf_file("/nonexistent/kiln/guest.elf", base, limit);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.code(), std::errc::no_such_file_or_directory);
  EXPECT_NE(r.err().detail.find("/nonexistent/kiln/guest.elf"), std::string::npos);
}

TEST_F(ElfFile, RejectsADirectory) {
  EXPECT_EQ(read_elf_file(::testing::TempDir(), base, limit).code(), memory_errc::elf_bad_magic);
}

} // namespace
} // namespace kiln::memory
