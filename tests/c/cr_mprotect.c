/* Mappings with different protections (read-only, none, read-write, one
 * made read-only after being written): the same after the wait, and a
 * write to the read-only one faults.
 *
 *   cr_mprotect DIR */
#include "cr.h"
#include <setjmp.h>
#include <sys/mman.h>

static sigjmp_buf back;
static void on_segv(int sig)
{
	(void)sig;
	siglongjmp(back, 1);
}

int main(void)
{
	long page = sysconf(_SC_PAGESIZE);
	char *m = mmap(NULL, 4 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(m != MAP_FAILED, "mmap");
	memset(m, 'a', 4 * page);
	CHECK(mprotect(m, page, PROT_READ) == 0 && mprotect(m + page, page, PROT_NONE) == 0, "mprotect");

	cr_ready_and_wait();

	CHECK(m[0] == 'a' && m[2 * page] == 'a' && m[3 * page] == 'a', "contents");
	m[2 * page] = 'b';
	signal(SIGSEGV, on_segv);
	volatile int faulted = 0;
	if (sigsetjmp(back, 1) == 0)
		m[0] = 'x';
	else
		faulted = 1;
	CHECK(faulted, "a write to the read-only page did not fault");
	faulted = 0;
	if (sigsetjmp(back, 1) == 0)
		(void)*(volatile char *)(m + page);
	else
		faulted = 1;
	CHECK(faulted, "a read of the PROT_NONE page did not fault");
	CHECK(mprotect(m + page, page, PROT_READ) == 0 && m[page] == 'a', "the guard page's data");
	return cr_report();
}
