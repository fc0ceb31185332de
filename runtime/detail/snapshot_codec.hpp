// The runtime's sections of a .ksnap file: encoding a snapshot's state, and decoding it with
// every value checked before anything is built from it.
#pragma once

#include <kiln/memory/snapshot_file.hpp>
#include <kiln/runtime/detail/sandbox_impl.hpp>

#include <vector>

namespace kiln::detail {

/// The runtime's sections of a .ksnap file, by tag: memory/ frames them (its own tags stop at
/// memory::ksnap::tag::parent) and keeps them as bytes. The values are part of the file format:
/// a new section takes a new value, and none is ever renumbered or reused.
namespace section_tag {
inline constexpr memory::ksnap::tag layout{16};
inline constexpr memory::ksnap::tag regions{17};
inline constexpr memory::ksnap::tag vcpu{18};
inline constexpr memory::ksnap::tag protection{19};
inline constexpr memory::ksnap::tag page_tables{20};
inline constexpr memory::ksnap::tag files{21};
inline constexpr memory::ksnap::tag host_functions{22};
inline constexpr memory::ksnap::tag working_set{23}; // format 1.1, optional
} // namespace section_tag

/// The runtime's sections for `s`, in tag order; working_set only when `s` has one. Each
/// section's bytes are written by the component that owns that state (memory::saved_layout,
/// memory::encode_regions, vcpu::x86_64::cpu_state, memory::protection_map, the page-table
/// editor's state, memory::encode_working_set; files and host functions by the runtime).
std::vector<memory::snapshot_section> encode_sections(const snapshot_state& s);

/// Fills `out` (all but the image) from `sections` of a file whose RAM is `memory_size`. Every
/// required section must be present (working_set is optional: format 1.1); tags no owner claims
/// are ignored; a repeated tag is refused by memory/ before this. Each section is read by its
/// owner, in tag order, with every field checked against kiln's fixed layout and caps (fixed
/// regions where kiln puts them, heap and stack as the layout says, image regions inside the
/// image area, protections never wider than their region's, page-table bookkeeping inside its
/// area, mapped files in the file room, reserved register bits clear), and must be read to its
/// last byte. Special registers are rebuilt from the layout (only FS/GS base, IDT and CR2 come
/// from the file), so a file cannot hand a backend descriptor state kiln did not build.
/// Errors: snapshot_corrupt, "<section> section: <field>".
result<void> decode_sections(const std::vector<memory::snapshot_section>& sections,
                             std::uint64_t memory_size, snapshot_state& out);

/// The state a snapshot file describes (the top file of a chain: its `info`), with every check
/// a load makes of it: the guest ABI's major version, then decode_sections. snapshot::load,
/// snapshot::verify and the fuzzers share it. Errors: snapshot_unsupported (guest ABI),
/// decode_sections'.
result<void> decode_state(const memory::snapshot_file_info& info, snapshot_state& out);

} // namespace kiln::detail
