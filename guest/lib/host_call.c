/* Guest -> host hypercalls: host calls, log lines and aborts. */
#include "internal.h"

static char host_error[KILN_ERROR_MAX];

/* The last host result's payload, copied out of in_buf so STRING/BYTES results survive until
 * the next host call. Grows on the heap when a result is larger than the static buffer. */
static uint8_t small_result[4096] __attribute__((aligned(16)));
static uint8_t* result_buf = small_result;
static uint64_t result_cap = sizeof small_result;

static enum kiln_status local_error(enum kiln_status st, const char* msg) {
  host_error[0] = '\0';
  kiln_str_append(host_error, sizeof host_error, msg);
  return st;
}

const char* kiln_host_error(void) {
  return host_error;
}

/* Room for `size` payload bytes plus the NUL added after a STRING/BYTES result. */
static bool reserve_result(uint64_t size) {
  if (size + 1 <= result_cap) return true;
  uint8_t* bigger = malloc(size + 1);
  if (!bigger) return false;
  if (result_buf != small_result) free(result_buf);
  result_buf = bigger;
  result_cap = size + 1;
  return true;
}

static enum kiln_status read_host_result(struct kiln_value* result) {
  struct kiln_msg_header h;
  __builtin_memcpy(&h, kiln_io_.in_buf, sizeof h);
  if (h.magic != KILN_MSG_MAGIC || h.kind != KILN_MSG_HOST_RESULT ||
      h.size > kiln_io_.in_size - sizeof h)
    return local_error(KILN_STATUS_MALFORMED, "host call: malformed reply header");
  if (!reserve_result(h.size))
    return local_error(KILN_STATUS_TOO_LARGE, "host call: reply does not fit the guest heap");
  memcpy(result_buf, kiln_io_.in_buf + sizeof h, h.size);
  struct kiln_reader r = {result_buf, h.size, 0};
  struct kiln_value v;
  if (!kiln_wire_get_value(&r, &v) || r.pos != r.size)
    return local_error(KILN_STATUS_MALFORMED, "host call: malformed reply value");
  /* The byte after the last value is free (capacity is size + 1): terminate strings there. */
  result_buf[h.size] = '\0';
  if (h.status == KILN_STATUS_OK) {
    if (result) *result = v;
    return KILN_STATUS_OK;
  }
  if (h.status > KILN_STATUS_LAST || v.type != KILN_TYPE_STRING)
    return local_error(KILN_STATUS_MALFORMED, "host call: reply has a bad error status");
  host_error[0] = '\0';
  kiln_str_append_n(host_error, sizeof host_error, v.buf.data, v.buf.len);
  return (enum kiln_status)h.status;
}

enum kiln_status kiln_host_call_n(const char* name, size_t name_len, const struct kiln_value* args,
                                  uint32_t nargs, struct kiln_value* result) {
  host_error[0] = '\0';
  if (result) {
    result->type = KILN_TYPE_VOID;
    result->u64 = 0;
  }
  if (nargs > KILN_MAX_ARGS || (nargs && !args))
    return local_error(KILN_STATUS_ARG_COUNT, "host call: too many arguments");
  if (!name || name_len == 0 || name_len > KILN_MAX_NAME)
    return local_error(KILN_STATUS_NOT_FOUND, "host call: invalid function name");
  for (uint32_t i = 0; i < nargs; ++i)
    if ((unsigned)args[i].type > KILN_TYPE_LAST)
      return local_error(KILN_STATUS_ARG_TYPE, "host call: argument with an invalid type");

  const uint64_t hdr = sizeof(struct kiln_msg_header);
  struct kiln_writer w = {kiln_io_.out_buf + hdr, kiln_io_.out_size - hdr, 0, true};
  kiln_wire_put_string(&w, name, name_len);
  for (uint32_t i = 0; i < nargs; ++i)
    kiln_wire_put_value(&w, &args[i]);
  if (!w.ok || w.pos > UINT32_MAX - hdr)
    return local_error(KILN_STATUS_TOO_LARGE, "host call: request does not fit out_buf");
  kiln_wire_put_header(kiln_io_.out_buf, KILN_MSG_HOST_CALL, (uint16_t)nargs, 0, (uint32_t)w.pos);
  kiln_hypercall(KILN_PORT_HOST_CALL, (uint32_t)(hdr + w.pos));
  return read_host_result(result);
}

enum kiln_status kiln_host_call(const char* name, const struct kiln_value* args, uint32_t nargs,
                                struct kiln_value* result) {
  return kiln_host_call_n(name, name ? strlen(name) : 0, args, nargs, result);
}

void kiln_log(const char* msg, size_t len) {
  if (len > kiln_io_.out_size) len = kiln_io_.out_size;
  if (len) memcpy(kiln_io_.out_buf, msg, len);
  kiln_hypercall(KILN_PORT_LOG, (uint32_t)len);
}

void kiln_print(const char* s) {
  kiln_log(s, strlen(s));
}

_Noreturn void kiln_abort_n(uint32_t code, const char* msg, size_t len) {
  struct kiln_abort_record rec = {0, 0};
  const uint64_t cap = kiln_io_.out_size > sizeof rec ? kiln_io_.out_size - sizeof rec : 0;
  if (!msg) len = 0;
  if (len > cap) len = cap;
  if (kiln_io_.out_buf && kiln_io_.out_size >= sizeof rec) {
    rec.message_len = (uint32_t)len;
    __builtin_memcpy(kiln_io_.out_buf, &rec, sizeof rec);
    if (len) memcpy(kiln_io_.out_buf + sizeof rec, msg, len);
  }
  kiln_hypercall(KILN_PORT_ABORT, code);
  kiln_halt_forever();
}

_Noreturn void kiln_abort(uint32_t code, const char* msg) {
  kiln_abort_n(code, msg, msg ? strlen(msg) : 0);
}
