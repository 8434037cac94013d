/* A non-blocking socket to a child that stays where it was started:
 * nothing to read is EAGAIN after the wait, data is read when it comes.
 *
 *   cr_nonblock_socket DIR */
#include "cr.h"
#include <poll.h>
#include <sys/socket.h>

int main(void)
{
	int sv[2], go[2];
	CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv) == 0 && pipe(go) == 0, "make");
	pid_t pid = fork();
	if (pid == 0) {
		close(sv[0]);
		close(go[1]);
		char c;
		if (read(go[0], &c, 1) != 1 || write(sv[1], "late", 4) != 4)
			_exit(3);
		_exit(0);
	}
	close(sv[1]);
	close(go[0]);

	cr_ready_and_wait();

	char buf[8];
	CHECK(read(sv[0], buf, sizeof buf) < 0 && errno == EAGAIN, "read of nothing");
	CHECK((fcntl(sv[0], F_GETFL) & O_NONBLOCK) != 0, "O_NONBLOCK lost");
	CHECK(write(go[1], "g", 1) == 1, "go");
	struct pollfd p = {.fd = sv[0], .events = POLLIN};
	CHECK(poll(&p, 1, 2000) == 1 && read(sv[0], buf, sizeof buf) == 4, "data came");
	return cr_report();
}
