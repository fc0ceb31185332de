// plan_layout: places heap, stack guard and stack after the image, with checked arithmetic.
#include <kiln/memory/layout.hpp>
#include <kiln/memory/memory_errc.hpp>

namespace kiln::memory {

result<layout> plan_layout(const layout_config& cfg, guest_phys_addr image_end) {
  if (cfg.memory_size < fixed::min_memory || cfg.memory_size > fixed::max_memory)
    return error(memory_errc::bad_size, "memory size must be 4 MiB..64 GiB");
  if (!is_aligned(cfg.memory_size, large_page_size))
    return error(memory_errc::unaligned, "memory size must be a multiple of 2 MiB");
  if (cfg.stack_size < 4 * page_size || !is_aligned(cfg.stack_size, page_size))
    return error(memory_errc::bad_size, "stack size must be page-aligned and at least 16 KiB");
  if (!is_aligned(cfg.heap_size, page_size))
    return error(memory_errc::unaligned, "heap size must be page-aligned");
  if (image_end < fixed::image_base || !is_aligned(image_end.value, page_size))
    return error(memory_errc::out_of_bounds, "image end");
  if (image_end.value > cfg.memory_size) // also keeps align_up below from wrapping
    return error(memory_errc::layout_too_small, "image larger than guest memory");

  layout l;
  l.memory_size = cfg.memory_size;
  l.image_end = image_end;
  l.stack_top = guest_phys_addr{cfg.memory_size};
  if (cfg.stack_size >= cfg.memory_size - page_size) // memory_size >= 4 MiB: no wrap
    return error(memory_errc::layout_too_small, "stack does not fit");
  l.stack_bottom = guest_phys_addr{cfg.memory_size - cfg.stack_size};
  l.stack_guard = guest_phys_addr{l.stack_bottom.value - page_size};
  l.heap_start = guest_phys_addr{align_up(image_end.value, large_page_size)};
  if (l.heap_start >= l.stack_guard)
    return error(memory_errc::layout_too_small, "no room for a heap between image and stack");
  const std::uint64_t room = l.stack_guard.value - l.heap_start.value;
  if (cfg.heap_size == 0) {
    l.heap_size = room;
  } else if (cfg.heap_size > room) {
    return error(memory_errc::layout_too_small, "heap size larger than the room left");
  } else {
    l.heap_size = cfg.heap_size;
  }
  return l;
}

} // namespace kiln::memory
