/* The call wire format (abi.h) on the guest side: bounded encode/decode of typed values. */
#include "internal.h"

static bool writer_room(struct kiln_writer* w, uint64_t n) {
  if (!w->ok || n > w->cap - w->pos) {
    w->ok = false;
    return false;
  }
  return true;
}

static void put_u8(struct kiln_writer* w, uint8_t v) {
  if (writer_room(w, 1)) w->buf[w->pos++] = v;
}

static void put_bytes(struct kiln_writer* w, const void* data, uint64_t n) {
  if (!writer_room(w, n)) return;
  if (n) memcpy(w->buf + w->pos, data, n);
  w->pos += n;
}

static void put_u32(struct kiln_writer* w, uint32_t v) {
  if (!writer_room(w, 4)) return;
  kiln_st32(w->buf + w->pos, v);
  w->pos += 4;
}

static void put_u64(struct kiln_writer* w, uint64_t v) {
  if (!writer_room(w, 8)) return;
  kiln_st64(w->buf + w->pos, v);
  w->pos += 8;
}

uint64_t kiln_wire_value_size(const struct kiln_value* v) {
  switch (v->type) {
  case KILN_TYPE_VOID:
    return 1;
  case KILN_TYPE_I32:
    return 5;
  case KILN_TYPE_I64:
  case KILN_TYPE_U64:
  case KILN_TYPE_F64:
    return 9;
  case KILN_TYPE_BOOL:
    return 2;
  case KILN_TYPE_STRING:
  case KILN_TYPE_BYTES:
    return 5 + (uint64_t)v->buf.len;
  }
  return 1;
}

void kiln_wire_put_string(struct kiln_writer* w, const void* data, uint64_t len) {
  if (len > UINT32_MAX) {
    w->ok = false;
    return;
  }
  put_u8(w, KILN_TYPE_STRING);
  put_u32(w, (uint32_t)len);
  put_bytes(w, data, len);
}

void kiln_wire_put_value(struct kiln_writer* w, const struct kiln_value* v) {
  switch (v->type) {
  case KILN_TYPE_VOID:
    put_u8(w, KILN_TYPE_VOID);
    return;
  case KILN_TYPE_I32:
    put_u8(w, KILN_TYPE_I32);
    put_u32(w, (uint32_t)v->i32);
    return;
  case KILN_TYPE_I64:
  case KILN_TYPE_U64:
    put_u8(w, (uint8_t)v->type);
    put_u64(w, v->u64);
    return;
  case KILN_TYPE_F64: {
    uint64_t bits;
    __builtin_memcpy(&bits, &v->f64, 8);
    put_u8(w, KILN_TYPE_F64);
    put_u64(w, bits);
    return;
  }
  case KILN_TYPE_BOOL:
    put_u8(w, KILN_TYPE_BOOL);
    put_u8(w, v->b ? 1 : 0);
    return;
  case KILN_TYPE_STRING:
  case KILN_TYPE_BYTES:
    put_u8(w, (uint8_t)v->type);
    put_u32(w, v->buf.len);
    put_bytes(w, v->buf.data, v->buf.len);
    return;
  }
  w->ok = false; /* an out-of-range type set by the caller */
}

void kiln_wire_put_header(uint8_t* buf, uint16_t kind, uint16_t count, uint32_t status,
                          uint32_t size) {
  struct kiln_msg_header h = {
      .magic = KILN_MSG_MAGIC, .kind = kind, .count = count, .status = status, .size = size};
  __builtin_memcpy(buf, &h, sizeof h);
}

bool kiln_wire_get_value(struct kiln_reader* r, struct kiln_value* out) {
  if (r->pos >= r->size) return false;
  uint8_t tag = r->buf[r->pos++];
  uint64_t left = r->size - r->pos;
  const uint8_t* p = r->buf + r->pos;
  switch (tag) {
  case KILN_TYPE_VOID:
    out->type = KILN_TYPE_VOID;
    out->u64 = 0;
    return true;
  case KILN_TYPE_I32:
    if (left < 4) return false;
    out->type = KILN_TYPE_I32;
    out->u64 = 0;
    out->i32 = (int32_t)kiln_ld32(p);
    r->pos += 4;
    return true;
  case KILN_TYPE_I64:
  case KILN_TYPE_U64:
  case KILN_TYPE_F64:
    if (left < 8) return false;
    out->type = (enum kiln_type)tag;
    out->u64 = kiln_ld64(p); /* the union shares the bits for i64, u64 and f64 */
    r->pos += 8;
    return true;
  case KILN_TYPE_BOOL:
    if (left < 1 || p[0] > 1) return false;
    out->type = KILN_TYPE_BOOL;
    out->u64 = 0;
    out->b = p[0] == 1;
    r->pos += 1;
    return true;
  case KILN_TYPE_STRING:
  case KILN_TYPE_BYTES: {
    if (left < 4) return false;
    uint32_t len = kiln_ld32(p);
    if (len > left - 4) return false;
    out->type = (enum kiln_type)tag;
    out->buf.data = p + 4;
    out->buf.len = len;
    r->pos += 4 + (uint64_t)len;
    return true;
  }
  default:
    return false;
  }
}

/* ---- message formatting ---- */

void kiln_str_append_n(char* dst, size_t cap, const char* src, size_t n) {
  if (cap == 0) return;
  size_t used = strlen(dst);
  size_t room = cap - 1 - used;
  if (n > room) n = room;
  memcpy(dst + used, src, n);
  dst[used + n] = '\0';
}

void kiln_str_append(char* dst, size_t cap, const char* src) {
  kiln_str_append_n(dst, cap, src, strlen(src));
}

void kiln_str_append_u64(char* dst, size_t cap, uint64_t v) {
  char digits[21];
  size_t i = sizeof digits;
  do {
    digits[--i] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  kiln_str_append_n(dst, cap, digits + i, sizeof digits - i);
}

const char* kiln_status_name(enum kiln_status s) {
  switch (s) {
  case KILN_STATUS_OK:
    return "OK";
  case KILN_STATUS_NOT_FOUND:
    return "NOT_FOUND";
  case KILN_STATUS_ARG_COUNT:
    return "ARG_COUNT";
  case KILN_STATUS_ARG_TYPE:
    return "ARG_TYPE";
  case KILN_STATUS_FAILED:
    return "FAILED";
  case KILN_STATUS_MALFORMED:
    return "MALFORMED";
  case KILN_STATUS_TOO_LARGE:
    return "TOO_LARGE";
  case KILN_STATUS_HOST_ERROR:
    return "HOST_ERROR";
  }
  return "UNKNOWN_STATUS";
}
