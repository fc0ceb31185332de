/* The kiln guest library's public API: register functions, call the host, log, abort, memory
 * requests and host files. */
#ifndef KILN_GUEST_H
#define KILN_GUEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <kiln/guest/abi.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A typed value, as passed to and returned from guest and host functions.
 * STRING/BYTES: `buf.data` points at `buf.len` bytes; strings are NOT NUL-terminated (the
 * library adds a terminator after host-call results, as a convenience, not counted in len). */
struct kiln_value {
  enum kiln_type type;
  union {
    int32_t i32;
    int64_t i64;
    uint64_t u64;
    double f64;
    bool b;
    struct {
      const void* data;
      uint32_t len;
    } buf;
  };
};

/* A function the host can call. `args` holds exactly the registered parameters, already
 * type-checked; STRING/BYTES argument data stays valid until the function returns (it lives in
 * a guest-owned copy of the request, so host calls made meanwhile do not disturb it).
 * `ret->type` is preset to the registered return type and its value zeroed; fill the value.
 * A STRING/BYTES result must stay valid until the function returns and may point into the
 * arguments, static data, or kiln_call_alloc() memory.
 * Return KILN_STATUS_OK, or KILN_STATUS_FAILED after kiln_set_error() (any other status is
 * passed through with the message set, or a generic one). */
typedef enum kiln_status (*kiln_guest_fn)(const struct kiln_value* args, uint32_t nargs,
                                          struct kiln_value* ret);

/* Defined by the guest program: called once at boot, before READY; register functions here.
 * The state after it returns is the sandbox's natural base snapshot. */
void kiln_guest_init(void);

/* Register `fn` under `name` (copied; at most KILN_MAX_NAME bytes) with its signature
 * (`params` copied; at most KILN_MAX_ARGS entries, none VOID). Returns 0, or -1 when the name
 * is empty/too long/already registered, the signature is invalid, or the table is full. */
int kiln_register(const char* name, kiln_guest_fn fn, enum kiln_type ret_type,
                  const enum kiln_type* params, uint32_t nparams);

/* Message returned with KILN_STATUS_FAILED for the current call (copied, truncated to
 * KILN_ERROR_MAX - 1 bytes). */
#define KILN_ERROR_MAX 1024u
void kiln_set_error(const char* msg);

/* Memory that stays valid until the current guest call has returned its result, then is freed
 * by the library; for STRING/BYTES results. NULL when the heap is exhausted. */
void* kiln_call_alloc(size_t size);

/* Call host function `name` with `nargs` typed arguments and wait for its result.
 * On KILN_STATUS_OK `*result` (may be NULL) holds the value; STRING/BYTES data is a guest copy,
 * NUL-terminated, valid until the next host call. On any other status kiln_host_error() has the
 * message. Statuses raised locally: ARG_COUNT (nargs > KILN_MAX_ARGS), NOT_FOUND (bad name),
 * TOO_LARGE (request does not fit out_buf), MALFORMED (the host's reply did not parse). */
enum kiln_status kiln_host_call(const char* name, const struct kiln_value* args, uint32_t nargs,
                                struct kiln_value* result);
/* The same with a name that is not NUL-terminated (e.g. a STRING argument). */
enum kiln_status kiln_host_call_n(const char* name, size_t name_len, const struct kiln_value* args,
                                  uint32_t nargs, struct kiln_value* result);
/* Message of the last failed host call (NUL-terminated; "" after a successful one). */
const char* kiln_host_error(void);

/* "OK", "NOT_FOUND", ... for messages. */
const char* kiln_status_name(enum kiln_status s);

/* One log line to the host (truncated to out_buf). */
void kiln_log(const char* msg, size_t len);
void kiln_print(const char* nul_terminated);

/* Stop the sandbox: struct kiln_abort_record + message (truncated to out_buf) in out_buf, then
 * `out KILN_PORT_ABORT` with eax = code. Never returns. */
_Noreturn void kiln_abort(uint32_t code, const char* msg);
_Noreturn void kiln_abort_n(uint32_t code, const char* msg, size_t len);

/* Abort codes the library itself uses (a guest program should pick codes below 0xFFFF0000). */
#define KILN_ABORT_BOOT_INFO 0xFFFF0001u /* bad boot-info magic or ABI major */
#define KILN_ABORT_HEAP 0xFFFF0002u      /* invalid free/realloc pointer, heap corruption */
#define KILN_ABORT_STACK_CHK 0xFFFF0003u /* a stack-protector canary was overwritten */
#define KILN_ABORT_LIBC 0xFFFF0004u      /* abort(), exit(), a failed assert() */

/* The boot info the host passed at entry (read-only). */
const struct kiln_boot_info* kiln_boot_info(void);

/* Heap statistics of the guest allocator (bytes). */
struct kiln_heap_stats {
  uint64_t heap_size;      /* the region the host gave */
  uint64_t in_use;         /* bytes in allocated blocks, headers included */
  uint64_t high_water;     /* bytes from the heap's start up to the highest byte that may hold
                              data; above it the heap reads as zero (never written, or handed
                              back to the host) */
  uint64_t free_blocks;    /* blocks on the free lists */
  uint64_t released_bytes; /* bytes handed back to the host by the allocator (successful
                              kiln_release calls), cumulative */
  uint64_t release_calls;  /* kiln_release calls the allocator made, failed ones included */
};
void kiln_heap_stats(struct kiln_heap_stats* out);

/* ---- the guest-owned memory contract (KILN_PORT_MEMORY) ----
 * Both requests go through out_buf, whose first bytes they save and restore: they may be made
 * while a call's result is already encoded there (the library frees memory after encoding).
 * addr and len are passed through unchecked; the host validates them (enum kiln_memory_status).
 * On a host without KILN_FEATURE_MEMORY_OPS both return KILN_MEMORY_BAD_REQUEST and make no
 * hypercall. Not reentrant (one vCPU, no interrupts: nothing can interleave). */

/* Tighten the protection of [addr, addr + len) to `prot` (enum kiln_prot bits; only removing
 * rights is allowed). On KILN_MEMORY_OK the TLB is flushed (CR3 reload), so the new rights hold
 * from the next instruction. Returns an enum kiln_memory_status. */
int kiln_protect(void* addr, size_t len, unsigned prot);

/* Hand the pages of [addr, addr + len) back to the host: they read as zero afterwards and stop
 * counting as resident; writing them again takes fresh zeroed pages. The caller must not rely
 * on their contents. Returns an enum kiln_memory_status. */
int kiln_release(void* addr, size_t len);

/* "OK", "UNALIGNED", ... for messages; "UNKNOWN" for a value outside the enum. */
const char* kiln_memory_status_name(int status);

/* The allocator hands a free range back to the host (kiln_release) once it holds at least this
 * many bytes that are not already handed back; only when the host sets KILN_FEATURE_MEMORY_OPS
 * and the heap region ends on a page boundary. */
#define KILN_RELEASE_MIN (256u * 1024u)
/* Switches the allocator's hand-back on or off (on by default where the host allows it; off
 * trades resident memory for fewer exits). Returns the previous setting. */
bool kiln_heap_set_hand_back(bool on);

/* ---- host files mapped read-only into the guest (KILN_FEATURE_FILE_TABLE) ----
 * The host may change the file table between calls, so these read it afresh every time, and a
 * struct kiln_file (its data and name) is valid only until the current call returns. Entries
 * whose name is not NUL-terminated within KILN_FILE_NAME_MAX, or whose range wraps, are skipped;
 * at most 32 entries are read. Without KILN_FEATURE_FILE_TABLE there are no files. Writing a
 * file's data faults. */
struct kiln_file {
  const void* data;
  uint64_t size;
  const char* name; /* NUL-terminated, inside the host's table */
};

/* Number of (valid) files. */
uint32_t kiln_file_count(void);
/* The index-th valid file, in table order; false when index >= kiln_file_count(). */
bool kiln_file_at(uint32_t index, struct kiln_file* out);
/* The file named `name` (NUL-terminated); false when there is none. */
bool kiln_file_find(const char* name, struct kiln_file* out);
/* The same with a name that is not NUL-terminated (e.g. a STRING argument). */
bool kiln_file_find_n(const char* name, size_t name_len, struct kiln_file* out);

#ifdef __cplusplus
}
#endif

#endif /* KILN_GUEST_H */
