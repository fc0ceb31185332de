// snapshot_codec: the runtime's .ksnap sections as a table of owners, one per tag, each writing
// and checking its own bytes; this file only frames them.
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/saved_layout.hpp>
#include <kiln/memory/working_set.hpp>
#include <kiln/memory/x86_64/system_tables.hpp>
#include <kiln/runtime/detail/snapshot_codec.hpp>
#include <kiln/support/byte_codec.hpp>
#include <kiln/vcpu/x86_64/cpu_state.hpp>
#include <kiln/vcpu/x86_64/long_mode.hpp>

#include <fmt/format.h>

#include <utility>

namespace kiln::detail {
namespace {

namespace tag = section_tag;
namespace fixed = memory::fixed;

constexpr std::uint64_t max_string = 4096; // a guest path, a mapped file's name or path
constexpr std::uint64_t max_host_functions = 4096;

memory::saved_layout saved_layout_of(const snapshot_state& s) {
  return {s.file_room, s.heap_size, s.stack_size, s.layout};
}

// Layout: memory's plan, then the runtime's own fields (backend taken on, NX, guest path).
void encode_layout(const snapshot_state& s, byte_writer& w) {
  saved_layout_of(s).encode(w);
  w.put(static_cast<std::uint8_t>(s.taken_on == vcpu::backend_kind::kvm));
  w.put(static_cast<std::uint8_t>(s.nx));
  w.str(s.guest_path);
}

result<void> decode_layout(byte_reader& r, std::uint64_t memory_size, snapshot_state& s) {
  KILN_TRY_ASSIGN(const auto l, memory::saved_layout::decode(r, memory_size));
  KILN_TRY_ASSIGN(const auto kvm, r.get<std::uint8_t>());
  KILN_TRY_ASSIGN(const auto nx, r.get<std::uint8_t>());
  KILN_TRY_ASSIGN(s.guest_path, r.str(max_string));
  s.file_room = l.file_room;
  s.heap_size = l.heap_size;
  s.stack_size = l.stack_size;
  s.layout = l.plan;
  s.taken_on = kvm ? vcpu::backend_kind::kvm : vcpu::backend_kind::emulated;
  s.nx = nx != 0;
  return {};
}

void encode_regions(const snapshot_state& s, byte_writer& w) {
  memory::encode_regions(w, s.regions);
}

result<void> decode_regions(byte_reader& r, std::uint64_t, snapshot_state& s) {
  KILN_TRY_ASSIGN(s.regions, memory::decode_regions(r, saved_layout_of(s)));
  return {};
}

void encode_vcpu(const snapshot_state& s, byte_writer& w) {
  vcpu::x86_64::cpu_state{s.regs, s.sregs, s.fpu}.encode(w);
}

result<void> decode_vcpu(byte_reader& r, std::uint64_t memory_size, snapshot_state& s) {
  // The special registers kiln builds for every guest; the CPU state takes only a few from the
  // file.
  const auto sys = memory::x86_64::build_system_tables(
      fixed::system_tables, fixed::ist_stack.value + fixed::ist_stack_size);
  const auto built = vcpu::x86_64::long_mode_state(fixed::page_tables, sys, s.nx);
  KILN_TRY_ASSIGN(auto cpu, vcpu::x86_64::cpu_state::decode(r, built, memory_size));
  s.regs = cpu.regs;
  s.sregs = cpu.sregs;
  s.fpu = cpu.fpu;
  return {};
}

void encode_protection(const snapshot_state& s, byte_writer& w) {
  s.prot.encode(w);
}

result<void> decode_protection(byte_reader& r, std::uint64_t, snapshot_state& s) {
  KILN_TRY_ASSIGN(s.prot, memory::protection_map::decode(r, s.regions));
  return {};
}

void encode_page_tables(const snapshot_state& s, byte_writer& w) {
  s.tables.encode(w);
}

result<void> decode_page_tables(byte_reader& r, std::uint64_t memory_size, snapshot_state& s) {
  using editor = memory::x86_64::page_table_editor;
  KILN_TRY_ASSIGN(s.tables, editor::state::decode(r, fixed::page_tables, fixed::page_tables_max,
                                                  memory_size + s.file_room));
  return {};
}

void encode_files(const snapshot_state& s, byte_writer& w) {
  memory::encode_saved_files(w, s.files);
}

result<void> decode_files(byte_reader& r, std::uint64_t memory_size, snapshot_state& s) {
  KILN_TRY_ASSIGN(s.files, memory::decode_saved_files(r, memory_size, s.file_room));
  return {};
}

// Host functions: {name, u8 return type, u8 parameter count, u8 per parameter}, for each.
void encode_host_functions(const snapshot_state& s, byte_writer& w) {
  w.put(static_cast<std::uint32_t>(s.host_functions.size()));
  for (const auto& f : s.host_functions) {
    w.str(f.name);
    w.put(static_cast<std::uint8_t>(f.returns));
    w.put(static_cast<std::uint8_t>(f.params.size()));
    for (kiln_type t : f.params)
      w.put(static_cast<std::uint8_t>(t));
  }
}

result<recorded_function> decode_host_function(byte_reader& r) {
  recorded_function f;
  KILN_TRY_ASSIGN(f.name, r.str(max_string));
  KILN_TRY_ASSIGN(const auto ret, r.get<std::uint8_t>());
  KILN_TRY_ASSIGN(const auto np, r.get<std::uint8_t>());
  if (ret > KILN_TYPE_LAST || np > KILN_MAX_ARGS || f.name.empty() || f.name.size() > KILN_MAX_NAME)
    return r.bad("host function signature");
  f.returns = static_cast<kiln_type>(ret);
  for (unsigned j = 0; j < np; ++j) {
    KILN_TRY_ASSIGN(const auto t, r.get<std::uint8_t>());
    if (t == KILN_TYPE_VOID || t > KILN_TYPE_LAST) return r.bad("host function parameter");
    f.params.push_back(static_cast<kiln_type>(t));
  }
  return f;
}

result<void> decode_host_functions(byte_reader& r, std::uint64_t, snapshot_state& s) {
  KILN_TRY_ASSIGN(const auto n, r.get<std::uint32_t>());
  if (n > max_host_functions) return r.bad("too many host functions");
  s.host_functions.clear();
  for (std::uint32_t i = 0; i < n; ++i) {
    KILN_TRY_ASSIGN(auto f, decode_host_function(r));
    s.host_functions.push_back(std::move(f));
  }
  return {};
}

bool has_working_set(const snapshot_state& s) {
  return !s.working_set.empty();
}

void encode_working_set(const snapshot_state& s, byte_writer& w) {
  memory::encode_working_set(w, s.working_set);
}

result<void> decode_working_set(byte_reader& r, std::uint64_t memory_size, snapshot_state& s) {
  KILN_TRY_ASSIGN(s.working_set, memory::decode_working_set(r, memory_size));
  return {};
}

void clear_working_set(snapshot_state& s) {
  s.working_set.clear();
}

/// Who writes and reads one section. A required section is always written and must be present;
/// an optional one (added by a later minor format) is written when `written` says the state
/// has something to put there, and `absent` sets the state when a file lacks it.
struct section_owner {
  memory::ksnap::tag tag;
  const char* name; // errors say "<name> section: ..."
  void (*encode)(const snapshot_state&, byte_writer&);
  result<void> (*decode)(byte_reader&, std::uint64_t memory_size, snapshot_state&);
  bool (*written)(const snapshot_state&) = nullptr; // null: required
  void (*absent)(snapshot_state&) = nullptr;
  bool required() const noexcept { return written == nullptr; }
};

/// In tag order, which is also the order decoding needs: the regions are checked against the
/// layout, the vCPU state against the NX bit, the protections against the regions, the page
/// tables and files against the file room.
constexpr section_owner owners[] = {
    {tag::layout, "layout", encode_layout, decode_layout},
    {tag::regions, "regions", encode_regions, decode_regions},
    {tag::vcpu, "vcpu", encode_vcpu, decode_vcpu},
    {tag::protection, "protection", encode_protection, decode_protection},
    {tag::page_tables, "page_tables", encode_page_tables, decode_page_tables},
    {tag::files, "files", encode_files, decode_files},
    {tag::host_functions, "host_functions", encode_host_functions, decode_host_functions},
    {tag::working_set, "working_set", encode_working_set, decode_working_set, has_working_set,
     clear_working_set},
};

/// The first section tagged `t` (memory/ refuses files that repeat a tag), or null.
const memory::snapshot_section* find(const std::vector<memory::snapshot_section>& sections,
                                     memory::ksnap::tag t) {
  for (const auto& sec : sections)
    if (sec.tag == t) return &sec;
  return nullptr;
}

} // namespace

std::vector<memory::snapshot_section> encode_sections(const snapshot_state& s) {
  std::vector<memory::snapshot_section> out;
  for (const auto& o : owners) {
    if (!o.required() && !o.written(s)) continue;
    byte_writer w;
    o.encode(s, w);
    out.push_back({o.tag, w.take()});
  }
  return out;
}

result<void> decode_sections(const std::vector<memory::snapshot_section>& sections,
                             std::uint64_t memory_size, snapshot_state& s) {
  for (const auto& o : owners)
    if (o.required() && !find(sections, o.tag))
      return error(memory::memory_errc::snapshot_corrupt,
                   fmt::format("section {} missing", static_cast<unsigned>(o.tag)));
  s.memory_size = memory_size;
  // Sections with tags no owner claims are ignored.
  for (const auto& o : owners) {
    const auto* sec = find(sections, o.tag);
    if (!sec) {
      o.absent(s); // only optional sections can be absent here
      continue;
    }
    byte_reader r(sec->payload, memory::memory_errc::snapshot_corrupt,
                  fmt::format("{} section", o.name));
    KILN_TRY(o.decode(r, memory_size, s));
    KILN_TRY(r.done());
  }
  return {};
}

result<void> decode_state(const memory::snapshot_file_info& info, snapshot_state& s) {
  if (info.guest_abi_major != KILN_ABI_VERSION_MAJOR)
    return error(
        memory::memory_errc::snapshot_unsupported,
        fmt::format("guest ABI {} (kiln speaks {})", info.guest_abi_major, KILN_ABI_VERSION_MAJOR));
  return decode_sections(info.sections, info.memory_size, s);
}

} // namespace kiln::detail
