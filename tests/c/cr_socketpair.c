/* A unix stream socketpair shared with a child that stays where it was
 * started: bytes queued both ways before the wait arrive after it, in
 * order; the child then shuts its side for writing and the process reads
 * end of file.
 *
 *   cr_socketpair DIR */
#include "cr.h"
#include <sys/socket.h>

int main(void)
{
	int sv[2];
	CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0, "socketpair");
	pid_t pid = fork();
	if (pid == 0) {
		close(sv[0]);
		char buf[6];
		if (write(sv[1], "queued", 6) != 6 || cr_read_all(sv[1], buf, 6) != 0 ||
		    memcmp(buf, "to kid", 6) != 0)
			_exit(3);
		/* Echo one more message, then no more. */
		if (cr_read_all(sv[1], buf, 4) != 0 || write(sv[1], buf, 4) != 4)
			_exit(4);
		shutdown(sv[1], SHUT_WR);
		_exit(read(sv[1], buf, 1) == 0 ? 0 : 5);
	}
	close(sv[1]);
	CHECK(write(sv[0], "to kid", 6) == 6, "write before");
	/* The child's bytes are queued for us before the wait. */
	usleep(100000);

	cr_ready_and_wait();

	char buf[8] = {0};
	CHECK(cr_read_all(sv[0], buf, 6) == 0 && memcmp(buf, "queued", 6) == 0, "queued: %s", buf);
	CHECK(write(sv[0], "echo", 4) == 4, "write after");
	memset(buf, 0, sizeof buf);
	CHECK(cr_read_all(sv[0], buf, 4) == 0 && memcmp(buf, "echo", 4) == 0, "echo: %s", buf);
	CHECK(read(sv[0], buf, 1) == 0, "end of file after the child's shutdown");
	shutdown(sv[0], SHUT_WR);
	return cr_report();
}
