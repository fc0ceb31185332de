// guest_view: what the guest's CPU must be told when its memory changes.
#pragma once

#include <kiln/memory/address.hpp>
#include <kiln/support/result.hpp>

#include <cstdint>

namespace kiln::memory {

class guest_memory;

/// What the guest's CPU must be told when its memory changes: which ranges it can reach, and
/// the rights it enforces itself. The vCPU implements it (KVM's memory slots; the emulator's
/// mapped ranges and their rights).
class guest_view {
public:
  /// Makes every region of `mem` reachable with the region's rights; called again after
  /// regions were added or removed.
  virtual result<void> map_memory(const guest_memory& mem) = 0;
  /// Narrows the guest's rights on [gpa, gpa+size) to `p` where the CPU enforces them itself.
  virtual result<void> protect(guest_phys_addr gpa, std::uint64_t size, protection p) = 0;

protected:
  guest_view() = default;
  ~guest_view() = default;
  guest_view(const guest_view&) = default;
  guest_view& operator=(const guest_view&) = default;
};

} // namespace kiln::memory
