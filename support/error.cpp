// errno_error: turns the current errno into a kiln::error naming the failed call.
#include <kiln/support/result.hpp>

#include <cerrno>

namespace kiln {

error errno_error(const char* what) {
  return error(std::error_code(errno, std::generic_category()), what);
}

} // namespace kiln
