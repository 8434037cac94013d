/* A pipe filled to its capacity (64 KiB) before the wait: every byte is
 * read after it, in order.
 *
 *   cr_pipe_full DIR */
#include "cr.h"

int main(void)
{
	int p[2];
	CHECK(pipe(p) == 0, "pipe");
	int size = fcntl(p[0], F_GETPIPE_SZ);
	if (size <= 0)
		size = 65536;
	char *data = malloc(size);
	for (int i = 0; i < size; i++)
		data[i] = (char)(i * 31 + 7);
	CHECK(write(p[1], data, size) == size, "fill");

	cr_ready_and_wait();

	char *got = malloc(size);
	int have = 0;
	while (have < size) {
		ssize_t n = read(p[0], got + have, size - have);
		if (n <= 0)
			break;
		have += (int)n;
	}
	CHECK(have == size && memcmp(got, data, size) == 0, "read %d of %d", have, size);
	return cr_report();
}
