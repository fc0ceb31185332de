// One std::error_category per kiln `*_errc` enum, generated from a traits specialization.
#pragma once

#include <string>
#include <system_error>

namespace kiln {

/// Specialize for each error enum: `static constexpr const char* name` and
/// `static const char* message(E)` (an exhaustive switch, so a new enumerator needs a message).
template <class E> struct errc_traits;

template <class E> class errc_category final : public std::error_category {
public:
  const char* name() const noexcept override { return errc_traits<E>::name; }
  std::string message(int ev) const override {
    const char* m = errc_traits<E>::message(static_cast<E>(ev));
    return m ? m : "unknown error";
  }
};

template <class E> const std::error_category& category_of() noexcept {
  static const errc_category<E> category;
  return category;
}

} // namespace kiln

/// Declares make_error_code for E in the enclosing namespace and registers E with <system_error>.
#define KILN_DECLARE_ERRC(NS, E)                                                                   \
  namespace NS {                                                                                   \
  inline std::error_code make_error_code(E e) noexcept {                                           \
    return {static_cast<int>(e), ::kiln::category_of<E>()};                                        \
  }                                                                                                \
  }                                                                                                \
  template <> struct std::is_error_code_enum<NS::E> : std::true_type {};
