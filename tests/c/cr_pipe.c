/* Pipes and a FIFO with data in flight: bytes written before the wait are
 * read after it, in order, and the descriptors keep their flags.
 *
 *   cr_pipe DIR */
#include "cr.h"
#include <sys/stat.h>

static void expect_read(int fd, const char *want, const char *what)
{
	char got[256] = {0};
	size_t len = strlen(want), have = 0;
	while (have < len) {
		ssize_t n = read(fd, got + have, len - have);
		if (n <= 0)
			break;
		have += (size_t)n;
	}
	CHECK(have == len && memcmp(got, want, len) == 0, "%s: read %zu bytes: %s", what, have,
	      got);
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	int p[2];
	CHECK(pipe2(p, O_CLOEXEC) == 0, "pipe2");
	CHECK(write(p[1], "through the pipe\n", 17) == 17, "write pipe");
	char fifo[4096];
	snprintf(fifo, sizeof fifo, "%s/fifo", argv[1]);
	CHECK(mkfifo(fifo, 0600) == 0, "mkfifo");
	/* Read-write: opening does not wait for a peer. */
	int f = open(fifo, O_RDWR | O_NONBLOCK);
	CHECK(f >= 0, "open fifo");
	CHECK(write(f, "through the fifo\n", 17) == 17, "write fifo");

	cr_ready_and_wait();

	expect_read(p[0], "through the pipe\n", "pipe");
	CHECK((fcntl(p[0], F_GETFD) & FD_CLOEXEC) != 0, "pipe: close-on-exec lost");
	CHECK(write(p[1], "after\n", 6) == 6, "write pipe after");
	expect_read(p[0], "after\n", "pipe after");
	expect_read(f, "through the fifo\n", "fifo");
	CHECK((fcntl(f, F_GETFL) & O_NONBLOCK) != 0, "fifo: O_NONBLOCK lost");
	char none;
	errno = 0;
	CHECK(read(f, &none, 1) < 0 && errno == EAGAIN, "fifo not empty, or it blocks");
	return cr_report();
}
