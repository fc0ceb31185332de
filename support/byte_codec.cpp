// byte_codec: strings and errors of the byte writer and reader.
#include <kiln/support/byte_codec.hpp>

namespace kiln {

void byte_writer::str(std::string_view s) {
  put(static_cast<std::uint32_t>(s.size()));
  // SAFETY: chars and bytes have the same size and alignment.
  const auto* p = reinterpret_cast<const std::byte*>(s.data());
  out_.insert(out_.end(), p, p + s.size());
}

result<std::string> byte_reader::str(std::uint64_t max) {
  KILN_TRY_ASSIGN(const auto n, get<std::uint32_t>());
  if (n > max) return bad("string of " + std::to_string(n) + " bytes, above the cap");
  if (remaining() < n) return bad("truncated");
  // SAFETY: bytes and chars have the same size and alignment; the range was checked above.
  std::string s(reinterpret_cast<const char*>(in_.data() + pos_), n);
  pos_ += n;
  return s;
}

result<void> byte_reader::done() const {
  if (remaining() != 0) return bad("trailing bytes");
  return {};
}

error byte_reader::bad(std::string_view why) const {
  std::string detail = what_;
  detail += ": ";
  detail += why;
  return error(malformed_, std::move(detail));
}

} // namespace kiln
