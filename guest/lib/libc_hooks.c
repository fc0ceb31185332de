/* libc functions the guest library owns, so musl's syscall-bearing versions stay out of guests. */

/* musl's versions use futex locks, raise, exit_group or writes to stderr; none may be linked. */
#include "internal.h"

/* Every libc-named definition in the library is weak (KILN_LIBC in internal.h): the library
 * is linked whole before libc.a, so a weak definition is enough to keep musl's member out (the
 * linker only pulls archive members for undefined symbols), while a guest program may still
 * supply its own. */

/* musl's stdio calls these around FILE operations. A guest has one thread and no interrupts,
 * so there is nothing to lock; returning 0 tells musl there is nothing to unlock either. */
struct _IO_FILE;
int __lockfile(struct _IO_FILE* f);
void __unlockfile(struct _IO_FILE* f);
KILN_LIBC int __lockfile(struct _IO_FILE* f) {
  (void)f;
  return 0;
}
KILN_LIBC void __unlockfile(struct _IO_FILE* f) {
  (void)f;
}

/* musl's versions end in raise()/exit_group syscalls; in a guest they stop the sandbox with a
 * message the host reports instead. */
_Noreturn void abort(void);
KILN_LIBC _Noreturn void abort(void) {
  kiln_abort(KILN_ABORT_LIBC, "abort() called");
}

static _Noreturn void exit_called(const char* fn, int status) {
  char msg[64];
  msg[0] = '\0';
  kiln_str_append(msg, sizeof msg, fn);
  kiln_str_append(msg, sizeof msg, "(");
  if (status < 0) kiln_str_append(msg, sizeof msg, "-");
  kiln_str_append_u64(msg, sizeof msg, status < 0 ? -(uint64_t)status : (uint64_t)status);
  kiln_str_append(msg, sizeof msg, ") called");
  kiln_abort(KILN_ABORT_LIBC, msg);
}

_Noreturn void exit(int status);
_Noreturn void _Exit(int status);
_Noreturn void _exit(int status);
KILN_LIBC _Noreturn void exit(int status) {
  exit_called("exit", status);
}
KILN_LIBC _Noreturn void _Exit(int status) {
  exit_called("_Exit", status);
}
KILN_LIBC _Noreturn void _exit(int status) {
  exit_called("_exit", status);
}

_Noreturn void __assert_fail(const char* expr, const char* file, int line, const char* func);
KILN_LIBC _Noreturn void __assert_fail(const char* expr, const char* file, int line,
                                       const char* func) {
  char msg[512];
  msg[0] = '\0';
  kiln_str_append(msg, sizeof msg, "assertion failed: ");
  kiln_str_append(msg, sizeof msg, expr ? expr : "?");
  kiln_str_append(msg, sizeof msg, " (");
  kiln_str_append(msg, sizeof msg, file ? file : "?");
  kiln_str_append(msg, sizeof msg, ":");
  kiln_str_append_u64(msg, sizeof msg, line < 0 ? 0u : (uint64_t)line);
  kiln_str_append(msg, sizeof msg, ", ");
  kiln_str_append(msg, sizeof msg, func ? func : "?");
  kiln_str_append(msg, sizeof msg, ")");
  kiln_abort(KILN_ABORT_LIBC, msg);
}

/* musl's version executes `hlt`, which the host would see as a bare halt with no reason. */
_Noreturn void __stack_chk_fail(void);
KILN_LIBC _Noreturn void __stack_chk_fail(void) {
  kiln_abort(KILN_ABORT_STACK_CHK, "stack smashing detected (canary overwritten)");
}

/* C++ guests (built with -fno-use-cxa-atexit and no exceptions) still reference these. */
KILN_LIBC void* __dso_handle = &__dso_handle;
int __cxa_atexit(void (*fn)(void*), void* arg, void* dso);
KILN_LIBC int __cxa_atexit(void (*fn)(void*), void* arg, void* dso) {
  (void)fn, (void)arg, (void)dso;
  return 0; /* a guest never exits, so destructors never run */
}
int atexit(void (*fn)(void));
KILN_LIBC int atexit(void (*fn)(void)) {
  (void)fn;
  return 0; /* musl's pulls in its futex lock */
}
void __cxa_pure_virtual(void);
KILN_LIBC void __cxa_pure_virtual(void) {
  kiln_abort(KILN_ABORT_LIBC, "pure virtual function called");
}
