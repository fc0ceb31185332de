// Wire codec: a bounded writer and a bounded reader over byte spans, no trust in lengths.
#include <kiln/runtime/errc.hpp>
#include <kiln/runtime/wire.hpp>

#include <cstring>
#include <limits>

namespace kiln::wire {
namespace {

class writer {
public:
  explicit writer(std::span<std::byte> out) : out_(out) {}
  bool put(const void* p, std::size_t n) {
    if (n > out_.size() - pos_) return ok_ = false;
    if (n) std::memcpy(out_.data() + pos_, p, n);
    pos_ += n;
    return true;
  }
  template <class T> bool put(T v) { return put(&v, sizeof v); }
  bool put_blob(std::uint8_t tag, std::string_view s) {
    if (s.size() > std::numeric_limits<std::uint32_t>::max()) return ok_ = false;
    return put(tag) && put(static_cast<std::uint32_t>(s.size())) && put(s.data(), s.size());
  }
  bool put_value(const value& v) {
    const auto tag = static_cast<std::uint8_t>(v.index());
    switch (type_of(v)) {
    case KILN_TYPE_VOID:
      return put(tag);
    case KILN_TYPE_I32:
      return put(tag) && put(std::get<std::int32_t>(v));
    case KILN_TYPE_I64:
      return put(tag) && put(std::get<std::int64_t>(v));
    case KILN_TYPE_U64:
      return put(tag) && put(std::get<std::uint64_t>(v));
    case KILN_TYPE_F64:
      return put(tag) && put(std::get<double>(v));
    case KILN_TYPE_BOOL:
      return put(tag) && put(static_cast<std::uint8_t>(std::get<bool>(v)));
    case KILN_TYPE_STRING:
      return put_blob(tag, std::get<std::string>(v));
    case KILN_TYPE_BYTES: {
      const auto& b = std::get<bytes>(v);
      return put_blob(tag, std::string_view(reinterpret_cast<const char*>(b.data()), b.size()));
    }
    }
    return ok_ = false;
  }
  bool ok() const { return ok_; }
  std::size_t pos() const { return pos_; }
  std::byte* at(std::size_t off) { return out_.data() + off; }

private:
  std::span<std::byte> out_;
  std::size_t pos_ = 0;
  bool ok_ = true;
};

class reader {
public:
  explicit reader(std::span<const std::byte> in) : in_(in) {}
  template <class T> bool get(T& v) {
    if (sizeof v > in_.size() - pos_) return false;
    std::memcpy(&v, in_.data() + pos_, sizeof v);
    pos_ += sizeof v;
    return true;
  }
  std::size_t remaining() const { return in_.size() - pos_; }

  result<value> get_value() {
    std::uint8_t tag = 0;
    if (!get(tag)) return bad("truncated value tag");
    switch (tag) {
    case KILN_TYPE_VOID:
      return value{};
    case KILN_TYPE_I32:
      return get_scalar<std::int32_t>();
    case KILN_TYPE_I64:
      return get_scalar<std::int64_t>();
    case KILN_TYPE_U64:
      return get_scalar<std::uint64_t>();
    case KILN_TYPE_F64:
      return get_scalar<double>();
    case KILN_TYPE_BOOL: {
      std::uint8_t b = 0;
      if (!get(b)) return bad("truncated bool");
      if (b > 1) return bad("bool that is neither 0 nor 1");
      return value{b == 1};
    }
    case KILN_TYPE_STRING:
    case KILN_TYPE_BYTES: {
      std::uint32_t len = 0;
      if (!get(len)) return bad("truncated length prefix");
      if (len > remaining()) return bad("length prefix " + std::to_string(len) + " past the end");
      value v;
      const auto* p = in_.data() + pos_;
      if (tag == KILN_TYPE_STRING)
        v.emplace<std::string>(reinterpret_cast<const char*>(p), len);
      else
        v.emplace<bytes>(p, p + len);
      pos_ += len;
      return v;
    }
    default:
      return bad("unknown type tag " + std::to_string(tag));
    }
  }

  static error bad(std::string what) { return error(errc::malformed_message, std::move(what)); }

private:
  template <class T> result<value> get_scalar() {
    T v{};
    if (!get(v)) return bad("truncated scalar");
    return value{v};
  }
  std::span<const std::byte> in_;
  std::size_t pos_ = 0;
};

result<std::size_t> finish(writer& w, kiln_msg_kind kind, std::uint16_t count, kiln_status status) {
  if (!w.ok()) return error(errc::result_too_large, "message does not fit the I/O buffer");
  kiln_msg_header h{KILN_MSG_MAGIC, static_cast<std::uint16_t>(kind), count,
                    static_cast<std::uint32_t>(status),
                    static_cast<std::uint32_t>(w.pos() - sizeof(kiln_msg_header))};
  std::memcpy(w.at(0), &h, sizeof h);
  return w.pos();
}

} // namespace

result<std::size_t> encode_call(std::span<std::byte> out, kiln_msg_kind kind, std::string_view name,
                                std::span<const value> args) {
  if (args.size() > KILN_MAX_ARGS) return error(errc::bad_arguments, "more than 32 arguments");
  if (name.size() > KILN_MAX_NAME) return error(errc::bad_arguments, "function name too long");
  writer w(out);
  w.put(kiln_msg_header{});
  w.put_blob(KILN_TYPE_STRING, name);
  for (const auto& a : args)
    w.put_value(a);
  return finish(w, kind, static_cast<std::uint16_t>(args.size()), KILN_STATUS_OK);
}

result<std::size_t> encode_result(std::span<std::byte> out, kiln_msg_kind kind, const value& v) {
  writer w(out);
  w.put(kiln_msg_header{});
  w.put_value(v);
  return finish(w, kind, 0, KILN_STATUS_OK);
}

result<std::size_t> encode_error(std::span<std::byte> out, kiln_msg_kind kind, kiln_status status,
                                 std::string_view message) {
  const std::size_t room =
      out.size() > sizeof(kiln_msg_header) + 5 ? out.size() - sizeof(kiln_msg_header) - 5 : 0;
  std::string_view cut = message.substr(0, room);
  if (cut.size() < message.size()) {
    // Do not end inside a UTF-8 sequence: find the last lead byte; drop it and what follows
    // unless the whole sequence fits.
    std::size_t lead = cut.size();
    while (lead > 0 && cut.size() - lead < 4 &&
           (static_cast<unsigned char>(cut[lead - 1]) & 0xc0) == 0x80)
      --lead;
    if (lead > 0) {
      const auto c = static_cast<unsigned char>(cut[lead - 1]);
      const std::size_t need = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc0 ? 2 : 1;
      if (cut.size() - (lead - 1) < need) cut = cut.substr(0, lead - 1);
    }
  }
  writer w(out);
  w.put(kiln_msg_header{});
  w.put_blob(KILN_TYPE_STRING, cut);
  return finish(w, kind, 0, status);
}

result<message> decode(std::span<const std::byte> in, kiln_msg_kind expected) {
  reader r(in);
  kiln_msg_header h{};
  if (!r.get(h)) return reader::bad("shorter than a message header");
  if (h.magic != KILN_MSG_MAGIC) return reader::bad("bad message magic");
  if (h.kind != expected)
    return reader::bad("message kind " + std::to_string(h.kind) + ", expected " +
                       std::to_string(expected));
  if (h.size != r.remaining())
    return reader::bad("header says " + std::to_string(h.size) + " payload bytes, record has " +
                       std::to_string(r.remaining()));
  message m;
  m.kind = expected;
  const bool is_call = expected == KILN_MSG_CALL || expected == KILN_MSG_HOST_CALL;
  if (is_call && h.status != 0) return reader::bad("a call carries a status");
  if (!is_call && h.count != 0) return reader::bad("a result carries an argument count");
  if (is_call) {
    if (h.count > KILN_MAX_ARGS) return reader::bad("argument count " + std::to_string(h.count));
    KILN_TRY_ASSIGN(value name, r.get_value());
    if (!std::holds_alternative<std::string>(name))
      return reader::bad("function name is not a string");
    m.name = std::move(std::get<std::string>(name));
    if (m.name.size() > KILN_MAX_NAME) return reader::bad("function name too long");
    m.values.reserve(h.count);
    for (unsigned i = 0; i < h.count; ++i) {
      KILN_TRY_ASSIGN(value v, r.get_value());
      m.values.push_back(std::move(v));
    }
  } else {
    if (h.status > KILN_STATUS_LAST)
      return reader::bad("unknown status " + std::to_string(h.status));
    m.status = static_cast<kiln_status>(h.status);
    KILN_TRY_ASSIGN(value v, r.get_value());
    if (m.status == KILN_STATUS_OK) {
      m.values.push_back(std::move(v));
    } else {
      if (!std::holds_alternative<std::string>(v))
        return reader::bad("error message is not a string");
      m.error_message = std::move(std::get<std::string>(v));
    }
  }
  if (r.remaining() != 0) return reader::bad("trailing bytes after the last value");
  return m;
}

} // namespace kiln::wire
