/* Memory requests to the host (protect, release) and the read-only host file table. */
#include "internal.h"

static bool has_feature(uint64_t bit) {
  return kiln_io_.boot && (kiln_io_.boot->features & bit) != 0;
}

/* One KILN_PORT_MEMORY request. The request's bytes of out_buf are saved and put back after
 * the host has answered: the allocator can hand pages back from free() after a call's result
 * is already encoded in out_buf (dispatch.c frees the request copy and kiln_call_alloc blocks
 * then), and that result must reach the host intact. */
static int memory_request(uint32_t op, uint32_t prot, void* addr, size_t len) {
  if (!has_feature(KILN_FEATURE_MEMORY_OPS)) return KILN_MEMORY_BAD_REQUEST;
  uint8_t saved[sizeof(struct kiln_memory_request)];
  __builtin_memcpy(saved, kiln_io_.out_buf, sizeof saved);
  /* Preset to an error: a host that resumes without writing the status must not look like OK. */
  struct kiln_memory_request req = {
      op, prot, (uint64_t)(uintptr_t)addr, (uint64_t)len, KILN_MEMORY_BAD_REQUEST, 0};
  __builtin_memcpy(kiln_io_.out_buf, &req, sizeof req);
  kiln_hypercall(KILN_PORT_MEMORY, sizeof req);
  int status =
      (int)kiln_ld32(kiln_io_.out_buf + __builtin_offsetof(struct kiln_memory_request, status));
  __builtin_memcpy(kiln_io_.out_buf, saved, sizeof saved);
  return status;
}

int kiln_protect(void* addr, size_t len, unsigned prot) {
  int status = memory_request(KILN_MEMORY_PROTECT, prot, addr, len);
  if (status == KILN_MEMORY_OK) {
    /* The host changed the page tables; a CR3 reload drops every cached translation, so the
     * old, wider rights cannot linger in the TLB (on the emulator it also flushes the soft TLB,
     * notes/emulated-backend.md trap 6). */
    uint64_t cr3;
    __asm__ volatile("mov %%cr3, %0\n\tmov %0, %%cr3" : "=r"(cr3) : : "memory");
  }
  return status;
}

int kiln_release(void* addr, size_t len) {
  /* No TLB flush: the pages stay mapped with the same rights, only their contents go. */
  return memory_request(KILN_MEMORY_RELEASE, 0, addr, len);
}

const char* kiln_memory_status_name(int status) {
  switch (status) {
  case KILN_MEMORY_OK:
    return "OK";
  case KILN_MEMORY_UNALIGNED:
    return "UNALIGNED";
  case KILN_MEMORY_NOT_OWNED:
    return "NOT_OWNED";
  case KILN_MEMORY_WIDENS:
    return "WIDENS";
  case KILN_MEMORY_BAD_REQUEST:
    return "BAD_REQUEST";
  case KILN_MEMORY_LIMIT:
    return "LIMIT";
  case KILN_MEMORY_NOT_WRITABLE:
    return "NOT_WRITABLE";
  }
  return "UNKNOWN";
}

/* ---- the file table ---- */

#define KILN_FILES_MAX 32u

/* The table as the host left it, read afresh on every call (the host rewrites it between calls).
 * Its entries are host-written data: each is checked before use, and a bad one is skipped. */
static const struct kiln_file_entry* file_table(uint32_t* count) {
  *count = 0;
  const struct kiln_boot_info* bi = kiln_io_.boot;
  if (!has_feature(KILN_FEATURE_FILE_TABLE) || !bi->files) return 0;
  uint64_t n = bi->file_count;
  *count = n > KILN_FILES_MAX ? KILN_FILES_MAX : (uint32_t)n;
  return (const struct kiln_file_entry*)(uintptr_t)bi->files;
}

/* The entry as a kiln_file (out may be NULL), and its name's length; false for a bad entry. */
static bool entry_file(const struct kiln_file_entry* e, struct kiln_file* out, size_t* name_len) {
  uint64_t addr = e->addr, size = e->size, end;
  size_t len = strnlen(e->name, KILN_FILE_NAME_MAX);
  if (len == KILN_FILE_NAME_MAX || __builtin_add_overflow(addr, size, &end)) return false;
  if (out) {
    out->data = (const void*)(uintptr_t)addr;
    out->size = size;
    out->name = e->name;
  }
  if (name_len) *name_len = len;
  return true;
}

uint32_t kiln_file_count(void) {
  uint32_t n, valid = 0;
  const struct kiln_file_entry* t = file_table(&n);
  for (uint32_t i = 0; i < n; ++i)
    valid += entry_file(&t[i], 0, 0);
  return valid;
}

bool kiln_file_at(uint32_t index, struct kiln_file* out) {
  uint32_t n;
  const struct kiln_file_entry* t = file_table(&n);
  for (uint32_t i = 0; i < n; ++i) {
    struct kiln_file f;
    if (entry_file(&t[i], &f, 0) && index-- == 0) {
      if (out) *out = f;
      return true;
    }
  }
  return false;
}

bool kiln_file_find_n(const char* name, size_t name_len, struct kiln_file* out) {
  if (!name || name_len == 0 || name_len >= KILN_FILE_NAME_MAX) return false;
  uint32_t n;
  const struct kiln_file_entry* t = file_table(&n);
  for (uint32_t i = 0; i < n; ++i) {
    struct kiln_file f;
    size_t len;
    /* Equal lengths first: a name with an embedded NUL then never matches a shorter one. */
    if (entry_file(&t[i], &f, &len) && len == name_len && memcmp(f.name, name, len) == 0) {
      if (out) *out = f;
      return true;
    }
  }
  return false;
}

bool kiln_file_find(const char* name, struct kiln_file* out) {
  return name && kiln_file_find_n(name, strnlen(name, KILN_FILE_NAME_MAX), out);
}
