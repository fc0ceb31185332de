/* Test guest linked with musl's libc.a: snprintf, strtod and errno through the FS-base block. */

/* musl reads its stack canary at %fs:0x28 and errno through %fs:0: both need the thread block
 * the guest library points FS base at. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <kiln_guest.h>

static enum kiln_status format_f64(const struct kiln_value* a, uint32_t n, struct kiln_value* r) {
  (void)n;
  char* out = kiln_call_alloc(64);
  if (!out) return KILN_STATUS_FAILED;
  int len = snprintf(out, 64, "%.3f", a[0].f64);
  if (len < 0 || len >= 64) {
    kiln_set_error("format_f64: snprintf failed");
    return KILN_STATUS_FAILED;
  }
  r->buf.data = out;
  r->buf.len = (uint32_t)len;
  return KILN_STATUS_OK;
}

static enum kiln_status parse_f64(const struct kiln_value* a, uint32_t n, struct kiln_value* r) {
  (void)n;
  char* text = kiln_call_alloc((size_t)a[0].buf.len + 1); /* strtod needs a terminator */
  if (!text) return KILN_STATUS_FAILED;
  memcpy(text, a[0].buf.data, a[0].buf.len);
  text[a[0].buf.len] = '\0';
  char* end;
  r->f64 = strtod(text, &end);
  if (end == text || *end != '\0') {
    kiln_set_error("parse_f64: not a number");
    return KILN_STATUS_FAILED;
  }
  return KILN_STATUS_OK;
}

/* strtol overflow sets errno = ERANGE (34) through musl's __errno_location (%fs:0 + 0x34). */
static enum kiln_status errno_check(const struct kiln_value* a, uint32_t n, struct kiln_value* r) {
  (void)a, (void)n;
  errno = 0;
  long v = strtol("99999999999999999999999999", 0, 10);
  r->i32 = v == LONG_MAX ? errno : -1;
  return KILN_STATUS_OK;
}

void kiln_guest_init(void) {
  static const enum kiln_type f64[] = {KILN_TYPE_F64}, str[] = {KILN_TYPE_STRING};
  if (kiln_register("format_f64", format_f64, KILN_TYPE_STRING, f64, 1) != 0 ||
      kiln_register("parse_f64", parse_f64, KILN_TYPE_F64, str, 1) != 0 ||
      kiln_register("errno_check", errno_check, KILN_TYPE_I32, 0, 0) != 0)
    kiln_abort(1, "musl_demo: cannot register");
}
