// A guest's working set as a snapshot saves it: the RAM pages it touched, in first-touch order.
#pragma once

#include <kiln/support/byte_codec.hpp>
#include <kiln/support/result.hpp>

#include <cstdint>
#include <span>
#include <vector>

namespace kiln::memory {

/// Appends `pages` (guest page numbers in first-touch order) as runs of consecutive pages: a u64
/// run count, then {u32 first page, u32 page count} per run, in order.
void encode_working_set(byte_writer& w, std::span<const std::uint32_t> pages);
/// Reads what encode_working_set() wrote for a guest of `memory_size` bytes of RAM: the run
/// count must match the bytes left (checked before anything is allocated), every run be
/// non-empty and inside RAM, and no page listed twice. Errors: the reader's, naming the run.
result<std::vector<std::uint32_t>> decode_working_set(byte_reader& r, std::uint64_t memory_size);

} // namespace kiln::memory
