/* Thread-local storage, errno and a value cached in a static: the same
 * after the wait.
 *
 *   cr_tls DIR */
#include "cr.h"

static __thread int tls_counter = 5;
static __thread char tls_text[32] = "thread-local";

int main(void)
{
	tls_counter = 77;
	strcpy(tls_text, "changed before");
	errno = ERANGE;
	int saved = errno;

	cr_ready_and_wait();

	CHECK(saved == ERANGE, "saved errno");
	CHECK(tls_counter == 77 && strcmp(tls_text, "changed before") == 0, "tls %d %s", tls_counter,
	      tls_text);
	tls_counter++;
	CHECK(tls_counter == 78, "tls writable");
	errno = 0;
	CHECK(close(-1) < 0 && errno == EBADF, "errno works");
	return cr_report();
}
