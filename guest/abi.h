/* The kiln guest/host ABI: hypercall ports, boot info, the call wire format. Shared by the host
 * (C++) and the freestanding guest library (C). Fixed-width types only; every shared struct's
 * size and field offsets are checked below. Boot info is append-only: new fields go at the end
 * and are announced by a feature bit, so an older guest keeps working on a newer host.
 *
 * A guest runs in 64-bit long mode, ring 0, on identity-mapped page tables built by the host.
 *
 * Guest -> host: a 4-byte `out dx, eax` to one of the ports below, followed by a `jmp` to the
 * next instruction (the emulated backend stops exactly only when the `out` ends a block). Any
 * other size or an `in` on these ports is a protocol violation that poisons the sandbox.
 *
 * Memory the two sides share (addresses from boot info):
 *   in_buf  : host writes, guest reads  (call requests, host-call results)
 *   out_buf : guest writes, host reads  (call results, host-call requests, log, abort, exception)
 * The host copies out_buf once and parses only its copy.
 *
 * Call protocol:
 *   boot   -> guest init (registers its functions) -> out KILN_PORT_READY
 *   call   host writes KILN_MSG_CALL into in_buf and resumes the vCPU;
 *          guest dispatches; it may `out KILN_PORT_HOST_CALL` (request in out_buf, eax = length;
 *          the host answers with KILN_MSG_HOST_RESULT in in_buf and resumes) any number of times;
 *          guest writes KILN_MSG_RESULT into out_buf and `out KILN_PORT_RETURN` (eax = length),
 *          which is also where it waits for the next call.
 *
 * Wire format (little-endian, unaligned; read with memcpy):
 *   message = kiln_msg_header, then `size` payload bytes
 *   CALL / HOST_CALL payload:      name (a STRING value), then `count` argument values
 *   RESULT / HOST_RESULT payload:  if status == KILN_STATUS_OK: one value (VOID for none)
 *                                  else: one STRING value, the error message
 *   value = u8 tag (enum kiln_type), then:
 *     VOID: nothing      I32: 4 bytes    I64, U64, F64: 8 bytes    BOOL: 1 byte, 0 or 1
 *     STRING, BYTES: u32 length, then that many bytes (STRING: UTF-8, no terminator)
 */
#ifndef KILN_GUEST_ABI_H
#define KILN_GUEST_ABI_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KILN_ABI_MAGIC 0x4e4c494bu /* "KILN" */
#define KILN_ABI_VERSION_MAJOR 1u
#define KILN_ABI_VERSION_MINOR 1u /* 1: KILN_PORT_MEMORY, KILN_FEATURE_MEMORY_OPS */

/* ---- hypercall ports (4-byte `out dx, eax`) ---- */
enum kiln_port {
  KILN_PORT_READY = 0x7a00,     /* init finished; eax = 0 */
  KILN_PORT_RETURN = 0x7a01,    /* a call finished; KILN_MSG_RESULT in out_buf; eax = its length */
  KILN_PORT_HOST_CALL = 0x7a02, /* KILN_MSG_HOST_CALL in out_buf; eax = its length */
  KILN_PORT_LOG = 0x7a03,       /* eax = length of a UTF-8 line in out_buf */
  KILN_PORT_ABORT = 0x7a04,     /* eax = guest's code; struct kiln_abort_record in out_buf */
  KILN_PORT_EXCEPTION = 0x7a05, /* struct kiln_exception_record in out_buf (from the guest IDT) */
  KILN_PORT_MEMORY = 0x7a06,    /* struct kiln_memory_request in out_buf; eax = its size; the
                                   host writes the outcome into its `status` before resuming */
};
#define KILN_PORT_FIRST 0x7a00u
#define KILN_PORT_LAST 0x7a06u

/* ---- boot info: at `rdi` on entry; the page is read-only to the guest ---- */
enum kiln_feature {
  KILN_FEATURE_NX = 1u << 0,         /* page tables carry NX on data (KVM) */
  KILN_FEATURE_EMULATED = 1u << 1,   /* running on the emulated backend (Unicorn) */
  KILN_FEATURE_FILE_TABLE = 1u << 2, /* files/file_count are meaningful */
  KILN_FEATURE_MEMORY_OPS = 1u << 3  /* KILN_PORT_MEMORY is served (ABI minor >= 1) */
};

#define KILN_FILE_NAME_MAX 56u

/* One host file mapped read-only into the guest. The host rewrites the table (and file_count)
 * only while the guest is stopped between calls; entries may be removed (unmapped files), so a
 * guest looks a file up by name when it needs it rather than caching addresses across calls. */
struct kiln_file_entry {
  char name[KILN_FILE_NAME_MAX]; /* NUL-terminated */
  uint64_t addr;
  uint64_t size;
};

struct kiln_boot_info {
  uint32_t magic;     /* KILN_ABI_MAGIC */
  uint16_t abi_major; /* KILN_ABI_VERSION_MAJOR */
  uint16_t abi_minor; /* KILN_ABI_VERSION_MINOR */
  uint64_t features;  /* enum kiln_feature bits */
  uint64_t memory_size;
  uint64_t heap_start; /* the guest's heap: one contiguous RW region, owned by the guest */
  uint64_t heap_size;
  uint64_t stack_bottom;  /* lowest stack address; the page below it is an unmapped guard */
  uint64_t stack_top;     /* initial rsp */
  uint64_t ist_stack_top; /* stack for exception handlers (TSS IST1), with its own guard */
  uint64_t in_buf;
  uint64_t in_buf_size;
  uint64_t out_buf;
  uint64_t out_buf_size;
  uint64_t files; /* struct kiln_file_entry[file_count] */
  uint64_t file_count;
  uint64_t cmdline; /* UTF-8, cmdline_len bytes, NUL-terminated */
  uint64_t cmdline_len;
};

/* ---- records in out_buf ---- */
struct kiln_exception_record {
  uint64_t vector;
  uint64_t error_code;
  uint64_t rip;
  uint64_t cr2;
  uint64_t rsp;
};

struct kiln_abort_record {
  uint32_t message_len; /* bytes of message following; the host truncates to its cap */
  uint32_t reserved;
  /* char message[message_len]; */
};

/* ---- memory requests (KILN_PORT_MEMORY), the guest-owned memory contract ----
 * PROTECT: set the protection of [addr, addr+size) of the guest's own memory (image, heap,
 *   stack). Only tightening is allowed: every page's new protection must be a subset of its
 *   current one (RW -> R -> none). The host updates the page tables; the guest must reload CR3
 *   (or invlpg the range) afterwards so its TLB drops the old rights. A request that changes
 *   nothing costs the host nothing.
 * RELEASE: hand [addr, addr+size) of writable heap or stack pages back to the host, which
 *   discards them: they read as zero afterwards and no longer count as resident memory. The
 *   pages stay mapped; writing them again simply takes fresh zeroed pages.
 * addr and size must be page-aligned (4096) and size > 0. */
enum kiln_memory_op {
  KILN_MEMORY_PROTECT = 1,
  KILN_MEMORY_RELEASE = 2,
};

enum kiln_prot {
  KILN_PROT_NONE = 0,
  KILN_PROT_READ = 1,
  KILN_PROT_WRITE = 2,
  KILN_PROT_EXEC = 4,
};

enum kiln_memory_status {
  KILN_MEMORY_OK = 0,
  KILN_MEMORY_UNALIGNED = 1,   /* addr or size not page-aligned, size 0, or the range wraps */
  KILN_MEMORY_NOT_OWNED = 2,   /* some page is not the guest's own image, heap or stack memory */
  KILN_MEMORY_WIDENS = 3,      /* PROTECT would widen some page's current protection */
  KILN_MEMORY_BAD_REQUEST = 4, /* unknown op or protection bits, bad record size */
  KILN_MEMORY_LIMIT = 5,       /* the host's cap on distinct protection ranges is reached */
  KILN_MEMORY_NOT_WRITABLE = 6 /* RELEASE of a page the guest made read-only or inaccessible */
};

struct kiln_memory_request {
  uint32_t op;   /* enum kiln_memory_op */
  uint32_t prot; /* PROTECT: enum kiln_prot bits; RELEASE: 0 */
  uint64_t addr;
  uint64_t size;
  uint32_t status; /* written by the host: enum kiln_memory_status */
  uint32_t reserved;
};

/* ---- call wire format ---- */
#define KILN_MSG_MAGIC 0x47534d4bu /* "KMSG" */

enum kiln_msg_kind {
  KILN_MSG_CALL = 1,        /* host -> guest */
  KILN_MSG_RESULT = 2,      /* guest -> host */
  KILN_MSG_HOST_CALL = 3,   /* guest -> host */
  KILN_MSG_HOST_RESULT = 4, /* host -> guest */
};

enum kiln_type {
  KILN_TYPE_VOID = 0,
  KILN_TYPE_I32 = 1,
  KILN_TYPE_I64 = 2,
  KILN_TYPE_U64 = 3,
  KILN_TYPE_F64 = 4,
  KILN_TYPE_BOOL = 5,
  KILN_TYPE_STRING = 6,
  KILN_TYPE_BYTES = 7,
};
#define KILN_TYPE_LAST KILN_TYPE_BYTES

/* Status of a call or host call, carried in kiln_msg_header.status. */
enum kiln_status {
  KILN_STATUS_OK = 0,
  KILN_STATUS_NOT_FOUND = 1,  /* no function of that name */
  KILN_STATUS_ARG_COUNT = 2,  /* wrong number of arguments */
  KILN_STATUS_ARG_TYPE = 3,   /* an argument of the wrong type */
  KILN_STATUS_FAILED = 4,     /* the function itself reported an error (message follows) */
  KILN_STATUS_MALFORMED = 5,  /* the message did not parse */
  KILN_STATUS_TOO_LARGE = 6,  /* the result or request does not fit its buffer */
  KILN_STATUS_HOST_ERROR = 7, /* a host function threw or failed inside the host */
};
#define KILN_STATUS_LAST KILN_STATUS_HOST_ERROR

struct kiln_msg_header {
  uint32_t magic;  /* KILN_MSG_MAGIC */
  uint16_t kind;   /* enum kiln_msg_kind */
  uint16_t count;  /* CALL/HOST_CALL: number of arguments; otherwise 0 */
  uint32_t status; /* RESULT/HOST_RESULT: enum kiln_status; otherwise 0 */
  uint32_t size;   /* payload bytes following this header */
};

/* Caps shared by both sides. */
#define KILN_MAX_ARGS 32u
#define KILN_MAX_NAME 128u

/* ---- fixed layout facts ---- */
#define KILN_GDT_CODE64 0x08u
#define KILN_GDT_DATA 0x10u
#define KILN_GDT_TSS 0x18u

#if defined(__cplusplus)
#define KILN_STATIC_ASSERT static_assert
#else
#define KILN_STATIC_ASSERT _Static_assert
#endif
#define KILN_OFFSET(t, f) __builtin_offsetof(t, f)

KILN_STATIC_ASSERT(sizeof(struct kiln_file_entry) == 72, "kiln_file_entry size");
KILN_STATIC_ASSERT(KILN_OFFSET(struct kiln_file_entry, addr) == 56, "kiln_file_entry.addr");
KILN_STATIC_ASSERT(sizeof(struct kiln_boot_info) == 128, "kiln_boot_info size");
KILN_STATIC_ASSERT(KILN_OFFSET(struct kiln_boot_info, features) == 8, "boot_info.features");
KILN_STATIC_ASSERT(KILN_OFFSET(struct kiln_boot_info, heap_start) == 24, "boot_info.heap_start");
KILN_STATIC_ASSERT(KILN_OFFSET(struct kiln_boot_info, stack_top) == 48, "boot_info.stack_top");
KILN_STATIC_ASSERT(KILN_OFFSET(struct kiln_boot_info, in_buf) == 64, "boot_info.in_buf");
KILN_STATIC_ASSERT(KILN_OFFSET(struct kiln_boot_info, out_buf) == 80, "boot_info.out_buf");
KILN_STATIC_ASSERT(KILN_OFFSET(struct kiln_boot_info, files) == 96, "boot_info.files");
KILN_STATIC_ASSERT(KILN_OFFSET(struct kiln_boot_info, cmdline) == 112, "boot_info.cmdline");
KILN_STATIC_ASSERT(KILN_OFFSET(struct kiln_boot_info, cmdline_len) == 120, "boot_info.cmdline_len");
KILN_STATIC_ASSERT(sizeof(struct kiln_exception_record) == 40, "kiln_exception_record size");
KILN_STATIC_ASSERT(sizeof(struct kiln_abort_record) == 8, "kiln_abort_record size");
KILN_STATIC_ASSERT(sizeof(struct kiln_memory_request) == 32, "kiln_memory_request size");
KILN_STATIC_ASSERT(KILN_OFFSET(struct kiln_memory_request, status) == 24,
                   "kiln_memory_request.status");
KILN_STATIC_ASSERT(sizeof(struct kiln_msg_header) == 16, "kiln_msg_header size");
KILN_STATIC_ASSERT(KILN_OFFSET(struct kiln_msg_header, status) == 8, "kiln_msg_header.status");
KILN_STATIC_ASSERT(KILN_OFFSET(struct kiln_msg_header, size) == 12, "kiln_msg_header.size");

#ifdef __cplusplus
}
#endif

#endif /* KILN_GUEST_ABI_H */
