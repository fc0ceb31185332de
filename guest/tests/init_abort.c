/* Test guest whose init aborts: creating a sandbox from it must fail cleanly with the message. */
#include <kiln_guest.h>

void kiln_guest_init(void) {
  kiln_abort(7, "init_abort: refusing to start");
}
