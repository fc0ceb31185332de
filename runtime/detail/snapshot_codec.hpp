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

/// The opaque sections (layout, regions, vCPU, protection, page tables, files, host functions)
/// for `s`.
std::vector<memory::snapshot_section> encode_sections(const snapshot_state& s);

/// Fills `out` (all but the image) from `sections` of a file whose RAM is `memory_size`.
/// Every field is checked against kiln's fixed layout and caps: fixed regions where kiln puts
/// them, heap and stack as the layout says, image regions inside the image area, protections
/// never wider than their region's, page-table bookkeeping inside its area, mapped files in the
/// file room, FPU control words valid. Special registers are not taken from the file: they are
/// rebuilt from the layout (only FS/GS base, IDT and CR2 come from it, checked), so a file
/// cannot hand a backend descriptor state kiln did not build. Errors: snapshot_corrupt naming
/// the field.
result<void> decode_sections(const std::vector<memory::snapshot_section>& sections,
                             std::uint64_t memory_size, snapshot_state& out);

} // namespace kiln::detail
