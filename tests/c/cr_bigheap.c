/* A large heap (64 MiB, moved lazily), a deep stack and a pattern in
 * both: every byte is as it was after the wait.
 *
 *   cr_bigheap DIR */
#include "cr.h"
#include <stdint.h>

static int deep(int n, volatile uint64_t *sink)
{
	volatile char frame[4096];
	for (int i = 0; i < 4096; i += 512)
		frame[i] = (char)(n + i);
	if (n > 0)
		return deep(n - 1, sink);
	cr_ready_and_wait();
	int bad = 0;
	for (int i = 0; i < 4096; i += 512)
		bad += frame[i] != (char)(n + i);
	*sink = (uint64_t)bad;
	return bad;
}

int main(void)
{
	size_t len = 64 << 20;
	uint64_t *heap = malloc(len);
	CHECK(heap != NULL, "malloc");
	for (size_t i = 0; i < len / 8; i++)
		heap[i] = i * 0x9e3779b97f4a7c15ull;
	volatile uint64_t sink = 0;
	CHECK(deep(200, &sink) == 0, "the deep stack changed");
	size_t wrong = 0;
	for (size_t i = 0; i < len / 8; i++)
		wrong += heap[i] != i * 0x9e3779b97f4a7c15ull;
	CHECK(wrong == 0, "%zu heap words changed", wrong);
	return cr_report();
}
