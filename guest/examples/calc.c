/* Example guest: arithmetic on every wire type, strings, bytes, and calls back into the host. */
#include <kiln_guest.h>

static enum kiln_status add_i32(const struct kiln_value* a, uint32_t n, struct kiln_value* r) {
  (void)n;
  r->i32 = (int32_t)((uint32_t)a[0].i32 + (uint32_t)a[1].i32); /* wraps, no UB */
  return KILN_STATUS_OK;
}

static enum kiln_status mul_i32(const struct kiln_value* a, uint32_t n, struct kiln_value* r) {
  (void)n;
  r->i32 = (int32_t)((uint32_t)a[0].i32 * (uint32_t)a[1].i32);
  return KILN_STATUS_OK;
}

static enum kiln_status add_i64(const struct kiln_value* a, uint32_t n, struct kiln_value* r) {
  (void)n;
  r->i64 = (int64_t)((uint64_t)a[0].i64 + (uint64_t)a[1].i64);
  return KILN_STATUS_OK;
}

static enum kiln_status mul_i64(const struct kiln_value* a, uint32_t n, struct kiln_value* r) {
  (void)n;
  r->i64 = (int64_t)((uint64_t)a[0].i64 * (uint64_t)a[1].i64);
  return KILN_STATUS_OK;
}

static enum kiln_status add_f64(const struct kiln_value* a, uint32_t n, struct kiln_value* r) {
  (void)n;
  r->f64 = a[0].f64 + a[1].f64;
  return KILN_STATUS_OK;
}

static enum kiln_status mul_f64(const struct kiln_value* a, uint32_t n, struct kiln_value* r) {
  (void)n;
  r->f64 = a[0].f64 * a[1].f64;
  return KILN_STATUS_OK;
}

static enum kiln_status concat(const struct kiln_value* a, uint32_t n, struct kiln_value* r) {
  (void)n;
  uint64_t len = (uint64_t)a[0].buf.len + a[1].buf.len;
  if (len > UINT32_MAX) {
    kiln_set_error("concat: result longer than 4 GiB");
    return KILN_STATUS_FAILED;
  }
  char* out = kiln_call_alloc(len ? len : 1);
  if (!out) {
    kiln_set_error("concat: guest heap exhausted");
    return KILN_STATUS_FAILED;
  }
  __builtin_memcpy(out, a[0].buf.data, a[0].buf.len);
  __builtin_memcpy(out + a[0].buf.len, a[1].buf.data, a[1].buf.len);
  r->buf.data = out;
  r->buf.len = (uint32_t)len;
  return KILN_STATUS_OK;
}

/* The argument lives in the library's copy of the request until the result is encoded, so the
 * result may point straight at it. */
static enum kiln_status echo(const struct kiln_value* a, uint32_t n, struct kiln_value* r) {
  (void)n;
  r->buf = a[0].buf;
  return KILN_STATUS_OK;
}

static enum kiln_status checksum(const struct kiln_value* a, uint32_t n, struct kiln_value* r) {
  (void)n;
  uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a 64 */
  const uint8_t* p = a[0].buf.data;
  for (uint32_t i = 0; i < a[0].buf.len; ++i) {
    h ^= p[i];
    h *= 0x100000001b3ull;
  }
  r->u64 = h;
  return KILN_STATUS_OK;
}

static enum kiln_status negate(const struct kiln_value* a, uint32_t n, struct kiln_value* r) {
  (void)n;
  r->b = !a[0].b;
  return KILN_STATUS_OK;
}

static enum kiln_status nothing(const struct kiln_value* a, uint32_t n, struct kiln_value* r) {
  (void)a, (void)n, (void)r;
  return KILN_STATUS_OK;
}

/* call_host(name, a, b): the host function `name`(a, b) must return an i64. */
static enum kiln_status call_host(const struct kiln_value* a, uint32_t n, struct kiln_value* r) {
  (void)n;
  struct kiln_value args[2] = {{.type = KILN_TYPE_I64, .i64 = a[1].i64},
                               {.type = KILN_TYPE_I64, .i64 = a[2].i64}};
  struct kiln_value res;
  enum kiln_status st = kiln_host_call_n(a[0].buf.data, a[0].buf.len, args, 2, &res);
  if (st != KILN_STATUS_OK) {
    static char msg[KILN_ERROR_MAX];
    size_t used = 0;
    const char* parts[] = {"host call failed with ", kiln_status_name(st), ": ", kiln_host_error()};
    for (unsigned i = 0; i < 4; ++i)
      for (const char* s = parts[i]; *s && used + 1 < sizeof msg; ++s)
        msg[used++] = *s;
    msg[used] = '\0';
    kiln_set_error(msg);
    return KILN_STATUS_FAILED;
  }
  if (res.type != KILN_TYPE_I64) {
    kiln_set_error("host function did not return an i64");
    return KILN_STATUS_FAILED;
  }
  r->i64 = res.i64;
  return KILN_STATUS_OK;
}

/* call_host_status(name): calls `name`() and returns the status number, so the host can check
 * what reached the guest (NOT_FOUND, ARG_COUNT...) without the call failing. */
static enum kiln_status call_host_status(const struct kiln_value* a, uint32_t n,
                                         struct kiln_value* r) {
  (void)n;
  r->i32 = (int32_t)kiln_host_call_n(a[0].buf.data, a[0].buf.len, 0, 0, 0);
  return KILN_STATUS_OK;
}

#define T(x) KILN_TYPE_##x
#define REGISTER(name, ret, ...)                                                                   \
  do {                                                                                             \
    static const enum kiln_type params[] = {__VA_ARGS__};                                          \
    if (kiln_register(#name, name, ret, params, sizeof params / sizeof params[0]) != 0)            \
      kiln_abort(1, "calc: cannot register " #name);                                               \
  } while (0)

void kiln_guest_init(void) {
  REGISTER(add_i32, T(I32), T(I32), T(I32));
  REGISTER(mul_i32, T(I32), T(I32), T(I32));
  REGISTER(add_i64, T(I64), T(I64), T(I64));
  REGISTER(mul_i64, T(I64), T(I64), T(I64));
  REGISTER(add_f64, T(F64), T(F64), T(F64));
  REGISTER(mul_f64, T(F64), T(F64), T(F64));
  REGISTER(concat, T(STRING), T(STRING), T(STRING));
  REGISTER(echo, T(BYTES), T(BYTES));
  REGISTER(checksum, T(U64), T(BYTES));
  REGISTER(negate, T(BOOL), T(BOOL));
  REGISTER(call_host, T(I64), T(STRING), T(I64), T(I64));
  REGISTER(call_host_status, T(I32), T(STRING));
  if (kiln_register("nothing", nothing, KILN_TYPE_VOID, 0, 0) != 0)
    kiln_abort(1, "calc: cannot register nothing");
  // Short names for the CLI: `kiln run calc.elf add 2 3` prints 5.
  static const enum kiln_type two_i32[] = {T(I32), T(I32)};
  if (kiln_register("add", add_i32, T(I32), two_i32, 2) != 0 ||
      kiln_register("mul", mul_i32, T(I32), two_i32, 2) != 0)
    kiln_abort(1, "calc: cannot register add/mul");
}
