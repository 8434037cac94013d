/* The program break: grown with sbrk before the wait, its contents and
 * end are the same after it, and it grows and shrinks from there.
 *
 *   cr_brk DIR */
#include "cr.h"
#include <stdint.h>

int main(void)
{
	char *start = sbrk(0);
	char *grown = sbrk(1 << 20);
	CHECK(grown == start, "sbrk");
	for (int i = 0; i < (1 << 20); i += 4096)
		grown[i] = (char)(i >> 12);

	cr_ready_and_wait();

	/* stdio may have grown it since (its buffer): never below. */
	char *end = sbrk(0);
	CHECK(end >= start + (1 << 20), "break moved back");
	int wrong = 0;
	for (int i = 0; i < (1 << 20); i += 4096)
		wrong += grown[i] != (char)(i >> 12);
	CHECK(wrong == 0, "%d pages changed", wrong);
	char *more = sbrk(1 << 16);
	CHECK(more == end, "grow");
	more[100] = 1;
	CHECK(sbrk(-(1 << 16)) != (void *)-1 && sbrk(0) == end, "shrink");
	return cr_report();
}
