/* Host -> guest calls: function registry, request decoding, result encoding, READY/RETURN loop. */
#include "internal.h"

#define KILN_MAX_FUNCTIONS 256u
#define KILN_FN_SLOTS 512u /* hash slots: a power of two, at least twice the table */

struct fn_entry {
  char name[KILN_MAX_NAME];
  uint32_t name_len;
  uint32_t hash;
  enum kiln_type ret;
  kiln_guest_fn fn;
  uint32_t nparams;
  uint8_t params[KILN_MAX_ARGS];
};

static struct fn_entry fns[KILN_MAX_FUNCTIONS];
static uint32_t nfns;
/* Open addressing over fns: 0 = empty, else index + 1. Keeps lookup (every call) and the
 * duplicate check (every registration) O(1); a linear scan made registering 256 functions cost
 * ~0.5 M guest instructions. */
static uint16_t slots[KILN_FN_SLOTS];

/* The current call's request, copied out of in_buf before dispatch so argument data survives
 * host calls (which overwrite in_buf). Small requests use the static buffer: no allocator work
 * and no stores beyond the copy itself. */
static uint8_t small_copy[4096] __attribute__((aligned(16)));
static char error_msg[KILN_ERROR_MAX];

/* kiln_call_alloc blocks, freed once the current result is encoded. */
struct call_block {
  struct call_block* next;
  uint64_t pad; /* keeps the user part 16-byte aligned */
};
static struct call_block* call_blocks;

static const char* type_name(unsigned t) {
  static const char* const names[] = {"void", "i32",  "i64",    "u64",
                                      "f64",  "bool", "string", "bytes"};
  return t <= KILN_TYPE_LAST ? names[t] : "invalid";
}

static uint32_t name_hash(const void* name, uint64_t len) {
  const uint8_t* p = name;
  uint32_t h = 2166136261u; /* FNV-1a 32 */
  for (uint64_t i = 0; i < len; ++i)
    h = (h ^ p[i]) * 16777619u;
  return h;
}

/* The slot holding `name`, or the empty slot where it would go. */
static uint16_t* find_slot(const void* name, uint64_t len, uint32_t hash) {
  for (uint32_t i = hash;; ++i) {
    uint16_t* slot = &slots[i & (KILN_FN_SLOTS - 1)];
    if (*slot == 0) return slot;
    const struct fn_entry* e = &fns[*slot - 1];
    if (e->hash == hash && e->name_len == len && memcmp(e->name, name, len) == 0) return slot;
  }
}

static struct fn_entry* find(const void* name, uint64_t len) {
  uint16_t* slot = find_slot(name, len, name_hash(name, len));
  return *slot ? &fns[*slot - 1] : 0;
}

int kiln_register(const char* name, kiln_guest_fn fn, enum kiln_type ret_type,
                  const enum kiln_type* params, uint32_t nparams) {
  if (!name || !fn || nfns == KILN_MAX_FUNCTIONS || nparams > KILN_MAX_ARGS) return -1;
  if ((unsigned)ret_type > KILN_TYPE_LAST || (nparams && !params)) return -1;
  size_t len = strnlen(name, KILN_MAX_NAME + 1);
  if (len == 0 || len > KILN_MAX_NAME) return -1;
  uint32_t hash = name_hash(name, len);
  uint16_t* slot = find_slot(name, len, hash);
  if (*slot) return -1; /* already registered */
  for (uint32_t i = 0; i < nparams; ++i)
    if (params[i] == KILN_TYPE_VOID || (unsigned)params[i] > KILN_TYPE_LAST) return -1;
  struct fn_entry* e = &fns[nfns];
  memcpy(e->name, name, len);
  e->name_len = (uint32_t)len;
  e->hash = hash;
  e->ret = ret_type;
  e->fn = fn;
  e->nparams = nparams;
  for (uint32_t i = 0; i < nparams; ++i)
    e->params[i] = (uint8_t)params[i];
  *slot = (uint16_t)(++nfns);
  return 0;
}

void kiln_set_error(const char* msg) {
  error_msg[0] = '\0';
  kiln_str_append(error_msg, sizeof error_msg, msg ? msg : "");
}

void* kiln_call_alloc(size_t size) {
  if (size > SIZE_MAX - sizeof(struct call_block)) return 0;
  struct call_block* b = malloc(sizeof *b + size);
  if (!b) return 0;
  b->next = call_blocks;
  call_blocks = b;
  return b + 1;
}

static void free_call_blocks(void) {
  while (call_blocks) {
    struct call_block* next = call_blocks->next;
    free(call_blocks);
    call_blocks = next;
  }
}

/* An error reply: status + STRING message, the message truncated to what out_buf holds. */
static uint32_t reply_error(enum kiln_status status, const char* msg) {
  uint64_t cap = kiln_io_.out_size - sizeof(struct kiln_msg_header);
  uint64_t len = strlen(msg);
  if (len > cap - 5) len = cap - 5;
  struct kiln_writer w = {kiln_io_.out_buf + sizeof(struct kiln_msg_header), cap, 0, true};
  kiln_wire_put_string(&w, msg, len);
  kiln_wire_put_header(kiln_io_.out_buf, KILN_MSG_RESULT, 0, status, (uint32_t)w.pos);
  return (uint32_t)(sizeof(struct kiln_msg_header) + w.pos);
}

static uint32_t reply_value(const struct fn_entry* e, const struct kiln_value* ret) {
  char msg[256];
  msg[0] = '\0'; /* not `= ""`: that would zero all 256 bytes, slow stores when emulated */
  if (ret->type != e->ret) {
    kiln_str_append(msg, sizeof msg, "guest function returned a ");
    kiln_str_append(msg, sizeof msg, type_name(ret->type));
    kiln_str_append(msg, sizeof msg, ", registered to return ");
    kiln_str_append(msg, sizeof msg, type_name(e->ret));
    return reply_error(KILN_STATUS_FAILED, msg);
  }
  if ((ret->type == KILN_TYPE_STRING || ret->type == KILN_TYPE_BYTES) && ret->buf.len &&
      !ret->buf.data)
    return reply_error(KILN_STATUS_FAILED, "guest function returned a NULL buffer");
  uint64_t cap = kiln_io_.out_size - sizeof(struct kiln_msg_header);
  struct kiln_writer w = {kiln_io_.out_buf + sizeof(struct kiln_msg_header), cap, 0, true};
  kiln_wire_put_value(&w, ret);
  if (!w.ok) {
    kiln_str_append(msg, sizeof msg, "result of ");
    kiln_str_append_u64(msg, sizeof msg, kiln_wire_value_size(ret));
    kiln_str_append(msg, sizeof msg, " bytes does not fit out_buf (");
    kiln_str_append_u64(msg, sizeof msg, cap);
    kiln_str_append(msg, sizeof msg, " payload bytes)");
    return reply_error(KILN_STATUS_TOO_LARGE, msg);
  }
  kiln_wire_put_header(kiln_io_.out_buf, KILN_MSG_RESULT, 0, KILN_STATUS_OK, (uint32_t)w.pos);
  return (uint32_t)(sizeof(struct kiln_msg_header) + w.pos);
}

/* Decode the copied request, type-check it against the registry, run the function. */
static uint32_t dispatch(const uint8_t* msg, uint32_t size, uint16_t count) {
  char text[384];
  text[0] = '\0';
  struct kiln_reader r = {msg + sizeof(struct kiln_msg_header), size, 0};
  struct kiln_value name;
  struct kiln_value args[KILN_MAX_ARGS];
  if (count > KILN_MAX_ARGS)
    return reply_error(KILN_STATUS_MALFORMED, "call message: more than KILN_MAX_ARGS arguments");
  if (!kiln_wire_get_value(&r, &name) || name.type != KILN_TYPE_STRING)
    return reply_error(KILN_STATUS_MALFORMED, "call message: bad function name");
  for (uint32_t i = 0; i < count; ++i)
    if (!kiln_wire_get_value(&r, &args[i]))
      return reply_error(KILN_STATUS_MALFORMED, "call message: bad argument value");
  if (r.pos != r.size)
    return reply_error(KILN_STATUS_MALFORMED, "call message: trailing bytes after arguments");

  struct fn_entry* e = name.buf.len <= KILN_MAX_NAME ? find(name.buf.data, name.buf.len) : 0;
  if (!e) {
    kiln_str_append(text, sizeof text, "no guest function named '");
    kiln_str_append_n(text, sizeof text, name.buf.data, name.buf.len);
    kiln_str_append(text, sizeof text, "'");
    return reply_error(KILN_STATUS_NOT_FOUND, text);
  }
  if (count != e->nparams) {
    kiln_str_append_n(text, sizeof text, e->name, e->name_len);
    kiln_str_append(text, sizeof text, " takes ");
    kiln_str_append_u64(text, sizeof text, e->nparams);
    kiln_str_append(text, sizeof text, " arguments, got ");
    kiln_str_append_u64(text, sizeof text, count);
    return reply_error(KILN_STATUS_ARG_COUNT, text);
  }
  for (uint32_t i = 0; i < count; ++i) {
    if (args[i].type == e->params[i]) continue;
    kiln_str_append_n(text, sizeof text, e->name, e->name_len);
    kiln_str_append(text, sizeof text, ": argument ");
    kiln_str_append_u64(text, sizeof text, i);
    kiln_str_append(text, sizeof text, " is ");
    kiln_str_append(text, sizeof text, type_name(args[i].type));
    kiln_str_append(text, sizeof text, ", expected ");
    kiln_str_append(text, sizeof text, type_name(e->params[i]));
    return reply_error(KILN_STATUS_ARG_TYPE, text);
  }

  struct kiln_value ret = {.type = e->ret};
  ret.buf.data = 0;
  ret.buf.len = 0;
  error_msg[0] = '\0';
  enum kiln_status st = e->fn(args, count, &ret);
  if (st == KILN_STATUS_OK) return reply_value(e, &ret);
  if ((unsigned)st > KILN_STATUS_LAST) st = KILN_STATUS_FAILED;
  if (error_msg[0] == '\0') {
    kiln_str_append_n(error_msg, sizeof error_msg, e->name, e->name_len);
    kiln_str_append(error_msg, sizeof error_msg, " failed with ");
    kiln_str_append(error_msg, sizeof error_msg, kiln_status_name(st));
  }
  return reply_error(st, error_msg);
}

/* One call: the host has just written KILN_MSG_CALL into in_buf. Returns the length of the
 * KILN_MSG_RESULT written into out_buf. */
static uint32_t handle_call(void) {
  struct kiln_msg_header h;
  __builtin_memcpy(&h, kiln_io_.in_buf, sizeof h);
  uint64_t room = kiln_io_.in_size - sizeof h;
  if (h.magic != KILN_MSG_MAGIC || h.kind != KILN_MSG_CALL || h.size > room)
    return reply_error(KILN_STATUS_MALFORMED, "call message: bad header");
  uint64_t total = sizeof h + (uint64_t)h.size;
  uint8_t* copy = total <= sizeof small_copy ? small_copy : malloc(total);
  if (!copy) return reply_error(KILN_STATUS_TOO_LARGE, "call message does not fit the guest heap");
  memcpy(copy, kiln_io_.in_buf, total);
  uint32_t len = dispatch(copy, h.size, h.count);
  if (copy != small_copy) free(copy);
  free_call_blocks();
  return len;
}

_Noreturn void kiln_dispatch_loop(void) {
  kiln_hypercall(KILN_PORT_READY, 0);
  for (;;) {
    uint32_t len = handle_call();
    kiln_hypercall(KILN_PORT_RETURN, len);
  }
}
