// snapshot_codec: fixed-width little-endian encoding of the runtime's snapshot state, and a
// bounds-checked decoder that validates every value against kiln's layout.
#include <kiln/memory/memory_errc.hpp>
#include <kiln/memory/x86_64/system_tables.hpp>
#include <kiln/runtime/detail/snapshot_codec.hpp>
#include <kiln/vcpu/x86_64/long_mode.hpp>

#include <fmt/format.h>

#include <cstring>
#include <type_traits>

namespace kiln::detail {
namespace {

using memory::guest_phys_addr;
namespace tag = section_tag;
namespace fixed = memory::fixed;

constexpr std::uint64_t max_string = 4096;
constexpr std::uint64_t max_regions = 64;
constexpr std::uint64_t max_prot_ranges = 1u << 16;
constexpr std::uint64_t max_host_functions = 4096;

class writer {
public:
  template <class T>
  requires std::is_trivially_copyable_v<T>
  void put(T v) {
    const auto* p = reinterpret_cast<const std::byte*>(&v);
    out_.insert(out_.end(), p, p + sizeof v);
  }
  void str(const std::string& s) {
    put(static_cast<std::uint32_t>(s.size()));
    const auto* p = reinterpret_cast<const std::byte*>(s.data());
    out_.insert(out_.end(), p, p + s.size());
  }
  std::vector<std::byte> take() { return std::move(out_); }

private:
  std::vector<std::byte> out_;
};

class reader {
public:
  reader(std::span<const std::byte> in, const char* section) : in_(in), section_(section) {}
  template <class T>
  requires std::is_trivially_copyable_v<T> result<T> get() {
    if (in_.size() - pos_ < sizeof(T)) return short_read();
    T v;
    std::memcpy(&v, in_.data() + pos_, sizeof v);
    pos_ += sizeof v;
    return v;
  }
  result<std::string> str() {
    KILN_TRY_ASSIGN(auto n, get<std::uint32_t>());
    if (n > max_string || in_.size() - pos_ < n) return short_read();
    std::string s(reinterpret_cast<const char*>(in_.data() + pos_), n);
    pos_ += n;
    return s;
  }
  result<void> done() const {
    if (pos_ != in_.size()) return bad("trailing bytes");
    return {};
  }
  error bad(const std::string& what) const {
    return error(memory::memory_errc::snapshot_corrupt,
                 fmt::format("{} section: {}", section_, what));
  }

private:
  error short_read() const { return bad("truncated"); }
  std::span<const std::byte> in_;
  std::size_t pos_ = 0;
  const char* section_;
};

void put_segment(writer& w, const vcpu::segment& s) {
  w.put(s.base);
  w.put(s.limit);
  w.put(s.selector);
}

void put_fpu(writer& w, const vcpu::fpu_state& f) {
  for (const auto& r : f.st)
    w.put(r);
  w.put(f.fcw);
  w.put(f.fsw);
  w.put(f.ftw);
  w.put(f.last_opcode);
  w.put(f.last_ip);
  w.put(f.last_dp);
  w.put(f.mxcsr);
  for (const auto& x : f.xmm)
    w.put(x);
}

bool owned_kind(memory::region_kind k) {
  return k == memory::region_kind::image || k == memory::region_kind::heap ||
         k == memory::region_kind::stack;
}

} // namespace

std::vector<memory::snapshot_section> encode_sections(const snapshot_state& s) {
  std::vector<memory::snapshot_section> out;
  {
    writer w;
    w.put(s.file_room);
    w.put(s.heap_size);
    w.put(s.stack_size);
    w.put(s.layout.memory_size);
    w.put(s.layout.image_end.value);
    w.put(s.layout.heap_start.value);
    w.put(s.layout.heap_size);
    w.put(s.layout.stack_guard.value);
    w.put(s.layout.stack_bottom.value);
    w.put(s.layout.stack_top.value);
    w.put(static_cast<std::uint8_t>(s.taken_on == vcpu::backend_kind::kvm));
    w.put(static_cast<std::uint8_t>(s.nx));
    w.str(s.guest_path);
    out.push_back({tag::layout, w.take()});
  }
  {
    writer w;
    w.put(static_cast<std::uint32_t>(s.regions.size()));
    for (const auto& r : s.regions) {
      w.put(r.start.value);
      w.put(r.size);
      w.put(static_cast<std::uint8_t>(r.kind));
      w.put(static_cast<std::uint8_t>(r.prot));
      w.put(static_cast<std::uint8_t>(r.guest_visible));
      w.str(r.name);
    }
    out.push_back({tag::regions, w.take()});
  }
  {
    writer w;
    for (std::uint64_t v : vcpu::to_array(s.regs))
      w.put(v);
    put_segment(w, s.sregs.fs);
    put_segment(w, s.sregs.gs);
    w.put(s.sregs.idt.base);
    w.put(s.sregs.idt.limit);
    w.put(s.sregs.cr2);
    put_fpu(w, s.fpu);
    out.push_back({tag::vcpu, w.take()});
  }
  {
    writer w;
    const auto list = s.prot.list();
    w.put(static_cast<std::uint64_t>(s.prot.max_ranges()));
    w.put(static_cast<std::uint32_t>(list.size()));
    for (const auto& c : list) {
      w.put(c.start.value);
      w.put(c.size);
      w.put(static_cast<std::uint8_t>(c.to));
    }
    out.push_back({tag::protection, w.take()});
  }
  {
    writer w;
    w.put(s.tables.root.value);
    w.put(s.tables.pd_count);
    w.put(s.tables.used_tables);
    w.put(s.tables.max_tables);
    w.put(static_cast<std::uint32_t>(s.tables.free.size()));
    for (std::uint64_t f : s.tables.free)
      w.put(f);
    out.push_back({tag::page_tables, w.take()});
  }
  {
    writer w;
    w.put(static_cast<std::uint32_t>(s.files.size()));
    for (const auto& f : s.files) {
      w.str(f.name);
      w.str(f.identity.path);
      w.put(f.identity.device);
      w.put(f.identity.inode);
      w.put(f.identity.size);
      w.put(f.identity.mtime_ns);
      w.put(f.addr.value);
      w.put(f.mapped_size);
    }
    out.push_back({tag::files, w.take()});
  }
  {
    writer w;
    w.put(static_cast<std::uint32_t>(s.host_functions.size()));
    for (const auto& f : s.host_functions) {
      w.str(f.name);
      w.put(static_cast<std::uint8_t>(f.returns));
      w.put(static_cast<std::uint8_t>(f.params.size()));
      for (kiln_type t : f.params)
        w.put(static_cast<std::uint8_t>(t));
    }
    out.push_back({tag::host_functions, w.take()});
  }
  if (!s.working_set.empty()) {
    // Runs of consecutive pages in first-touch order: {u32 first page, u32 count}.
    std::vector<std::pair<std::uint32_t, std::uint32_t>> runs;
    for (std::uint32_t pg : s.working_set)
      if (!runs.empty() && runs.back().first + runs.back().second == pg)
        ++runs.back().second;
      else
        runs.emplace_back(pg, 1);
    writer w;
    w.put(static_cast<std::uint64_t>(runs.size()));
    for (const auto& [first, count] : runs) {
      w.put(first);
      w.put(count);
    }
    out.push_back({tag::working_set, w.take()});
  }
  return out;
}

result<void> decode_sections(const std::vector<memory::snapshot_section>& sections,
                             std::uint64_t memory_size, snapshot_state& s) {
  auto find = [&](memory::ksnap::tag t) -> const memory::snapshot_section* {
    for (const auto& sec : sections)
      if (sec.tag == t) return &sec;
    return nullptr;
  };
  for (auto t : {tag::layout, tag::regions, tag::vcpu, tag::protection, tag::page_tables,
                 tag::files, tag::host_functions})
    if (!find(t))
      return error(memory::memory_errc::snapshot_corrupt,
                   fmt::format("section {} missing", static_cast<unsigned>(t)));
  s.memory_size = memory_size;

  { // layout
    reader r(find(tag::layout)->payload, "layout");
    KILN_TRY_ASSIGN(s.file_room, r.get<std::uint64_t>());
    KILN_TRY_ASSIGN(s.heap_size, r.get<std::uint64_t>());
    KILN_TRY_ASSIGN(s.stack_size, r.get<std::uint64_t>());
    std::uint64_t v[7];
    for (auto& x : v) {
      KILN_TRY_ASSIGN(x, r.get<std::uint64_t>());
    }
    KILN_TRY_ASSIGN(auto kvm, r.get<std::uint8_t>());
    KILN_TRY_ASSIGN(auto nx, r.get<std::uint8_t>());
    KILN_TRY_ASSIGN(s.guest_path, r.str());
    KILN_TRY(r.done());
    s.taken_on = kvm ? vcpu::backend_kind::kvm : vcpu::backend_kind::emulated;
    s.nx = nx != 0;
    // The layout must be the one kiln plans for these sizes and this image end.
    auto planned =
        memory::plan_layout({memory_size, s.heap_size, s.stack_size}, guest_phys_addr{v[1]});
    if (!planned) return r.bad("layout does not plan: " + planned.err().message());
    const memory::layout& l = *planned;
    if (v[0] != l.memory_size || v[2] != l.heap_start.value || v[3] != l.heap_size ||
        v[4] != l.stack_guard.value || v[5] != l.stack_bottom.value || v[6] != l.stack_top.value)
      return r.bad("layout differs from kiln's plan for its sizes");
    if (s.file_room > fixed::max_file_room ||
        !memory::is_aligned(s.file_room, memory::large_page_size))
      return r.bad("file room");
    s.layout = l;
  }
  { // regions: kiln's fixed ones where kiln puts them, heap and stack per the layout, image
    // segments inside the image area; add_region() later refuses overlaps.
    reader r(find(tag::regions)->payload, "regions");
    KILN_TRY_ASSIGN(auto n, r.get<std::uint32_t>());
    if (n > max_regions) return r.bad("too many regions");
    s.regions.clear();
    for (std::uint32_t i = 0; i < n; ++i) {
      memory::region reg;
      KILN_TRY_ASSIGN(reg.start.value, r.get<std::uint64_t>());
      KILN_TRY_ASSIGN(reg.size, r.get<std::uint64_t>());
      KILN_TRY_ASSIGN(auto kind, r.get<std::uint8_t>());
      KILN_TRY_ASSIGN(auto prot, r.get<std::uint8_t>());
      KILN_TRY_ASSIGN(auto visible, r.get<std::uint8_t>());
      KILN_TRY_ASSIGN(reg.name, r.str());
      if (kind > static_cast<std::uint8_t>(memory::region_kind::stack) || prot > 7 || visible > 1)
        return r.bad("region enum out of range");
      reg.kind = static_cast<memory::region_kind>(kind);
      reg.prot = static_cast<memory::protection>(prot);
      reg.guest_visible = visible != 0;
      using k = memory::region_kind;
      struct fixed_region {
        k kind;
        std::uint64_t start, size;
        memory::protection prot;
        bool visible;
      };
      const fixed_region expected[] = {
          {k::boot_info, fixed::boot_info.value, fixed::boot_info_size, memory::prot_r, true},
          {k::system_tables, fixed::system_tables.value, fixed::system_tables_size, memory::prot_r,
           true},
          {k::page_tables, fixed::page_tables.value, fixed::page_tables_max, memory::prot_r, false},
          {k::ist_stack, fixed::ist_stack.value, fixed::ist_stack_size, memory::prot_rw, true},
          {k::io_in, fixed::io_in.value, fixed::io_buffer_size, memory::prot_rw, true},
          {k::io_out, fixed::io_out.value, fixed::io_buffer_size, memory::prot_rw, true},
          {k::heap, s.layout.heap_start.value, s.layout.heap_size, memory::prot_rw, true},
          {k::stack, s.layout.stack_bottom.value, s.stack_size, memory::prot_rw, true},
      };
      bool ok = false;
      if (reg.kind == k::image) {
        std::uint64_t end = 0;
        ok = reg.guest_visible && reg.prot != memory::protection::none &&
             reg.start >= fixed::image_base &&
             !__builtin_add_overflow(reg.start.value, reg.size, &end) &&
             end <= s.layout.image_end.value &&
             !(memory::has(reg.prot, memory::protection::write) &&
               memory::has(reg.prot, memory::protection::exec));
      } else {
        for (const auto& e : expected)
          if (e.kind == reg.kind)
            ok = reg.start.value == e.start && reg.size == e.size && reg.prot == e.prot &&
                 reg.guest_visible == e.visible;
      }
      if (!ok) return r.bad(fmt::format("region '{}' is not where kiln puts it", reg.name));
      s.regions.push_back(std::move(reg));
    }
    KILN_TRY(r.done());
  }
  { // vCPU: general registers, FS/GS base, IDT, CR2 and FPU from the file; the rest rebuilt.
    reader r(find(tag::vcpu)->payload, "vcpu");
    auto& g = s.regs;
    for (const auto& f : vcpu::register_fields) {
      KILN_TRY_ASSIGN(g.*f.field, r.get<std::uint64_t>());
    }
    vcpu::segment fs, gs;
    for (vcpu::segment* seg : {&fs, &gs}) {
      KILN_TRY_ASSIGN(seg->base, r.get<std::uint64_t>());
      KILN_TRY_ASSIGN(seg->limit, r.get<std::uint32_t>());
      KILN_TRY_ASSIGN(seg->selector, r.get<std::uint16_t>());
    }
    KILN_TRY_ASSIGN(auto idt_base, r.get<std::uint64_t>());
    KILN_TRY_ASSIGN(auto idt_limit, r.get<std::uint16_t>());
    KILN_TRY_ASSIGN(auto cr2, r.get<std::uint64_t>());
    auto& f = s.fpu;
    for (auto& st : f.st) {
      KILN_TRY_ASSIGN(st, (r.get<std::array<std::uint8_t, 16>>()));
    }
    KILN_TRY_ASSIGN(f.fcw, r.get<std::uint16_t>());
    KILN_TRY_ASSIGN(f.fsw, r.get<std::uint16_t>());
    KILN_TRY_ASSIGN(f.ftw, r.get<std::uint8_t>());
    KILN_TRY_ASSIGN(f.last_opcode, r.get<std::uint16_t>());
    KILN_TRY_ASSIGN(f.last_ip, r.get<std::uint64_t>());
    KILN_TRY_ASSIGN(f.last_dp, r.get<std::uint64_t>());
    KILN_TRY_ASSIGN(f.mxcsr, r.get<std::uint32_t>());
    for (auto& x : f.xmm) {
      KILN_TRY_ASSIGN(x, (r.get<std::array<std::uint8_t, 16>>()));
    }
    KILN_TRY(r.done());
    // Reserved bits: RFLAGS bit 1 set, MXCSR's upper half clear (KVM refuses otherwise).
    if (!(g.rflags & 2) || (g.rflags >> 22) != 0) return r.bad("rflags");
    if (f.mxcsr >> 16) return r.bad("mxcsr reserved bits");
    std::uint64_t idt_end = 0;
    if (__builtin_add_overflow(idt_base, std::uint64_t{idt_limit} + 1, &idt_end) ||
        idt_end > memory_size)
      return r.bad("IDT outside guest memory");
    // FS/GS selectors and limits are recorded but not used: the segments are rebuilt from
    // kiln's GDT, and only their 64-bit bases (the guest's thread block) come from the file.
    const auto sys = memory::x86_64::build_system_tables(
        fixed::system_tables, fixed::ist_stack.value + fixed::ist_stack_size);
    s.sregs = vcpu::x86_64::long_mode_state(fixed::page_tables, sys, s.nx);
    s.sregs.fs.base = fs.base;
    s.sregs.gs.base = gs.base;
    s.sregs.idt = {idt_base, idt_limit};
    s.sregs.cr2 = cr2;
  }
  { // protection: inside owned regions, never wider than the region allows
    reader r(find(tag::protection)->payload, "protection");
    KILN_TRY_ASSIGN(auto max, r.get<std::uint64_t>());
    KILN_TRY_ASSIGN(auto n, r.get<std::uint32_t>());
    if (max > max_prot_ranges || n > max) return r.bad("too many protection ranges");
    s.prot = memory::protection_map(static_cast<std::size_t>(max));
    for (std::uint32_t i = 0; i < n; ++i) {
      KILN_TRY_ASSIGN(auto start, r.get<std::uint64_t>());
      KILN_TRY_ASSIGN(auto size, r.get<std::uint64_t>());
      KILN_TRY_ASSIGN(auto p, r.get<std::uint8_t>());
      const auto prot = static_cast<memory::protection>(p);
      std::uint64_t end = 0;
      if (p > 7 || __builtin_add_overflow(start, size, &end)) return r.bad("protection range");
      // Every page must lie in one owned region whose rights include these.
      for (std::uint64_t at = start; at < end;) {
        const memory::region* owner = nullptr;
        for (const auto& reg : s.regions)
          if (reg.contains(guest_phys_addr{at})) owner = &reg;
        if (!owner || !owned_kind(owner->kind) || !memory::is_subset(prot, owner->prot))
          return r.bad("protection range outside the guest's memory or wider than its region");
        at = std::min(end, owner->end().value);
      }
      if (auto a = s.prot.add(guest_phys_addr{start}, size, prot); !a)
        return r.bad("protection range: " + a.err().message());
    }
    KILN_TRY(r.done());
  }
  { // page tables
    reader r(find(tag::page_tables)->payload, "page_tables");
    KILN_TRY_ASSIGN(s.tables.root.value, r.get<std::uint64_t>());
    KILN_TRY_ASSIGN(s.tables.pd_count, r.get<std::uint64_t>());
    KILN_TRY_ASSIGN(s.tables.used_tables, r.get<std::uint64_t>());
    KILN_TRY_ASSIGN(s.tables.max_tables, r.get<std::uint64_t>());
    KILN_TRY_ASSIGN(auto n, r.get<std::uint32_t>());
    const std::uint64_t max_tables = fixed::page_tables_max / memory::page_size;
    if (s.tables.root != fixed::page_tables || s.tables.max_tables != max_tables ||
        s.tables.used_tables > max_tables || s.tables.pd_count > 512 || s.tables.pd_count == 0 ||
        n > s.tables.used_tables || s.tables.pd_count * (1ull << 30) < memory_size + s.file_room)
      return r.bad("page-table bookkeeping");
    s.tables.free.clear();
    for (std::uint32_t i = 0; i < n; ++i) {
      KILN_TRY_ASSIGN(auto page, r.get<std::uint64_t>());
      if (page < fixed::page_tables.value + (2 + s.tables.pd_count) * memory::page_size ||
          page >= fixed::page_tables.value + s.tables.used_tables * memory::page_size ||
          !memory::is_aligned(page, memory::page_size))
        return r.bad("free page-table page");
      s.tables.free.push_back(page);
    }
    KILN_TRY(r.done());
  }
  { // files
    reader r(find(tag::files)->payload, "files");
    KILN_TRY_ASSIGN(auto n, r.get<std::uint32_t>());
    if (n > fixed::max_files) return r.bad("too many files");
    s.files.clear();
    for (std::uint32_t i = 0; i < n; ++i) {
      snapshot_file f;
      KILN_TRY_ASSIGN(f.name, r.str());
      KILN_TRY_ASSIGN(f.identity.path, r.str());
      KILN_TRY_ASSIGN(f.identity.device, r.get<std::uint64_t>());
      KILN_TRY_ASSIGN(f.identity.inode, r.get<std::uint64_t>());
      KILN_TRY_ASSIGN(f.identity.size, r.get<std::uint64_t>());
      KILN_TRY_ASSIGN(f.identity.mtime_ns, r.get<std::int64_t>());
      KILN_TRY_ASSIGN(f.addr.value, r.get<std::uint64_t>());
      KILN_TRY_ASSIGN(f.mapped_size, r.get<std::uint64_t>());
      std::uint64_t end = 0;
      if (f.name.empty() || f.name.size() >= KILN_FILE_NAME_MAX || f.identity.size == 0 ||
          f.mapped_size != memory::align_up(f.identity.size, memory::page_size) ||
          !memory::is_aligned(f.addr.value, memory::page_size) || f.addr.value < memory_size ||
          __builtin_add_overflow(f.addr.value, f.mapped_size, &end) ||
          end > memory_size + s.file_room)
        return r.bad(fmt::format("mapped file '{}'", f.name));
      s.files.push_back(std::move(f));
    }
    KILN_TRY(r.done());
  }
  { // host functions
    reader r(find(tag::host_functions)->payload, "host_functions");
    KILN_TRY_ASSIGN(auto n, r.get<std::uint32_t>());
    if (n > max_host_functions) return r.bad("too many host functions");
    s.host_functions.clear();
    for (std::uint32_t i = 0; i < n; ++i) {
      recorded_function f;
      KILN_TRY_ASSIGN(f.name, r.str());
      KILN_TRY_ASSIGN(auto ret, r.get<std::uint8_t>());
      KILN_TRY_ASSIGN(auto np, r.get<std::uint8_t>());
      if (ret > KILN_TYPE_LAST || np > KILN_MAX_ARGS || f.name.empty() ||
          f.name.size() > KILN_MAX_NAME)
        return r.bad("host function signature");
      f.returns = static_cast<kiln_type>(ret);
      for (unsigned j = 0; j < np; ++j) {
        KILN_TRY_ASSIGN(auto t, r.get<std::uint8_t>());
        if (t == KILN_TYPE_VOID || t > KILN_TYPE_LAST) return r.bad("host function parameter");
        f.params.push_back(static_cast<kiln_type>(t));
      }
      s.host_functions.push_back(std::move(f));
    }
    KILN_TRY(r.done());
  }
  s.working_set.clear();
  if (const auto* ws = find(tag::working_set)) { // optional (format 1.1)
    reader r(ws->payload, "working_set");
    KILN_TRY_ASSIGN(auto n, r.get<std::uint64_t>());
    const std::uint64_t pages = memory_size / memory::page_size;
    if (n > pages || n * 8 + 8 != ws->payload.size()) return r.bad("run count");
    std::vector<bool> seen(pages);
    for (std::uint64_t i = 0; i < n; ++i) {
      KILN_TRY_ASSIGN(auto first, r.get<std::uint32_t>());
      KILN_TRY_ASSIGN(auto count, r.get<std::uint32_t>());
      if (count == 0 || first >= pages || count > pages - first)
        return r.bad(fmt::format("run {} of {} pages at page {} outside memory", i, count, first));
      for (std::uint32_t pg = first; pg < first + count; ++pg) {
        if (seen[pg]) return r.bad(fmt::format("page {} listed twice", pg));
        seen[pg] = true;
        s.working_set.push_back(pg);
      }
    }
    KILN_TRY(r.done());
  }
  return {};
}

} // namespace kiln::detail
