// Fixed-width little-endian byte encoding for persisted state: a writer, and a bounds-checked
// reader whose every failure is one typed error naming what it was reading.
#pragma once

#include <kiln/support/result.hpp>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <vector>

namespace kiln {

// The bytes are the host's own representation; kiln runs on x86-64 only, which is little-endian,
// so they are the format's little-endian bytes. A big-endian port would swap here.
static_assert(std::endian::native == std::endian::little, "byte_codec assumes little-endian");

/// Appends values to a growing byte buffer: trivially-copyable values as their bytes (fixed
/// width, no padding between them), strings as a u32 length and their bytes (no NUL).
/// Thread-safety: none.
class byte_writer {
public:
  template <class T>
  requires std::is_trivially_copyable_v<T>
  void put(const T& v) {
    // SAFETY: T is trivially copyable, so its object representation is its value's bytes.
    const auto* p = reinterpret_cast<const std::byte*>(&v);
    out_.insert(out_.end(), p, p + sizeof v);
  }
  /// A u32 length, then the bytes. The caller keeps strings far below 4 GiB (readers cap them).
  void str(std::string_view s);

  std::size_t size() const noexcept { return out_.size(); }
  /// The bytes written; the writer is empty afterwards.
  std::vector<std::byte> take() noexcept { return std::move(out_); }

private:
  std::vector<std::byte> out_;
};

/// Reads what a byte_writer wrote, from a span it does not own (which must outlive it), checking
/// every length against the bytes left before copying. Every failure is an error with the code
/// the owner of the bytes chose (the reader knows no layer's error enum) and the detail
/// "<what>: <why>", e.g. "layout section: truncated". Thread-safety: none.
class byte_reader {
public:
  byte_reader(std::span<const std::byte> in, std::error_code malformed, std::string what)
      : in_(in), malformed_(malformed), what_(std::move(what)) {}

  /// The next sizeof(T) bytes as a T. Errors: truncated.
  template <class T>
  requires std::is_trivially_copyable_v<T> result<T> get() {
    if (remaining() < sizeof(T)) return bad("truncated");
    T v;
    std::memcpy(&v, in_.data() + pos_, sizeof v);
    pos_ += sizeof v;
    return v;
  }
  /// A string as byte_writer::str() wrote it, at most `max` bytes long. Errors: a length above
  /// `max` (checked before anything is allocated), truncated.
  result<std::string> str(std::uint64_t max);

  /// Succeeds when every byte was read. Errors: trailing bytes.
  result<void> done() const;
  /// An error of this reader's code, naming what it reads and `why`.
  error bad(std::string_view why) const;

  std::size_t remaining() const noexcept { return in_.size() - pos_; }

private:
  std::span<const std::byte> in_;
  std::size_t pos_ = 0;
  std::error_code malformed_;
  std::string what_;
};

} // namespace kiln
