/* A large deleted file (8 MiB) read and written through after the wait in
 * large calls: short counts are followed up, the data is whole.
 *
 *   cr_deleted_big DIR */
#include "cr.h"

#define SIZE (8 << 20)

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	char path[4096];
	snprintf(path, sizeof path, "%s/big", argv[1]);
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	char *data = malloc(SIZE);
	for (int i = 0; i < SIZE; i++)
		data[i] = (char)(i % 253);
	CHECK(fd >= 0 && write(fd, data, SIZE) == SIZE && unlink(path) == 0, "make");

	cr_ready_and_wait();

	char *got = calloc(1, SIZE);
	int have = 0;
	ssize_t n;
	while (have < SIZE && (n = pread(fd, got + have, SIZE - have, have)) > 0)
		have += (int)n;
	CHECK(have == SIZE && memcmp(got, data, SIZE) == 0, "read %d of %d", have, SIZE);
	for (int i = 0; i < SIZE; i++)
		data[i] = (char)(i % 241);
	int put = 0;
	while (put < SIZE && (n = pwrite(fd, data + put, SIZE - put, put)) > 0)
		put += (int)n;
	CHECK(put == SIZE, "wrote %d", put);
	memset(got, 0, SIZE);
	have = 0;
	while (have < SIZE && (n = pread(fd, got + have, SIZE - have, have)) > 0)
		have += (int)n;
	CHECK(have == SIZE && memcmp(got, data, SIZE) == 0, "read back %d", have);
	return cr_report();
}
