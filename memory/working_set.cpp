// working_set: the recorded first-touch order as runs, read back with every page checked.
#include <kiln/memory/address.hpp>
#include <kiln/memory/working_set.hpp>

#include <fmt/format.h>

#include <utility>

namespace kiln::memory {

void encode_working_set(byte_writer& w, std::span<const std::uint32_t> pages) {
  std::vector<std::pair<std::uint32_t, std::uint32_t>> runs;
  for (std::uint32_t pg : pages)
    if (!runs.empty() && runs.back().first + runs.back().second == pg)
      ++runs.back().second;
    else
      runs.emplace_back(pg, 1);
  w.put(static_cast<std::uint64_t>(runs.size()));
  for (const auto& [first, count] : runs) {
    w.put(first);
    w.put(count);
  }
}

result<std::vector<std::uint32_t>> decode_working_set(byte_reader& r, std::uint64_t memory_size) {
  const std::size_t bytes = r.remaining();
  KILN_TRY_ASSIGN(const auto n, r.get<std::uint64_t>());
  const std::uint64_t pages = memory_size / page_size;
  if (n > pages || n * 8 + 8 != bytes) return r.bad("run count");
  std::vector<bool> seen(pages);
  std::vector<std::uint32_t> out;
  for (std::uint64_t i = 0; i < n; ++i) {
    KILN_TRY_ASSIGN(const auto first, r.get<std::uint32_t>());
    KILN_TRY_ASSIGN(const auto count, r.get<std::uint32_t>());
    if (count == 0 || first >= pages || count > pages - first)
      return r.bad(fmt::format("run {} of {} pages at page {} outside memory", i, count, first));
    for (std::uint32_t pg = first; pg < first + count; ++pg) {
      if (seen[pg]) return r.bad(fmt::format("page {} listed twice", pg));
      seen[pg] = true;
      out.push_back(pg);
    }
  }
  return out;
}

} // namespace kiln::memory
