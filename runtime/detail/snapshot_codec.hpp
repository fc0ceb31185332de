// The runtime's sections of a .ksnap file: encoding a snapshot's state, and decoding it with
// every value checked before anything is built from it.
#pragma once

#include <kiln/memory/snapshot_file.hpp>
#include <kiln/runtime/detail/sandbox_impl.hpp>

#include <vector>

namespace kiln::detail {

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
