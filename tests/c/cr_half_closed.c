/* Sockets shut down before the wait: a TCP connection within the process
 * whose client side was shut for writing (the server reads what was sent,
 * then end of file, and can still answer), a unix socketpair shared with a
 * child at home where the process shut its own writing side (its writes
 * fail with EPIPE, it still reads what the child sends), and one where the
 * child shut its side for writing (the process reads the bytes, then end
 * of file, and can still write to the child).
 *
 *   cr_half_closed DIR */
#include "cr.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>

int main(void)
{
	signal(SIGPIPE, SIG_IGN);
	int l = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t len = sizeof addr;
	CHECK(l >= 0 && bind(l, (struct sockaddr *)&addr, sizeof addr) == 0 && listen(l, 4) == 0 &&
		      getsockname(l, (struct sockaddr *)&addr, &len) == 0,
	      "listen");
	int c = socket(AF_INET, SOCK_STREAM, 0);
	CHECK(c >= 0 && connect(c, (struct sockaddr *)&addr, sizeof addr) == 0, "connect");
	int s = accept(l, NULL, NULL);
	CHECK(s >= 0 && write(c, "sent", 4) == 4 && shutdown(c, SHUT_WR) == 0, "shut client");
	close(l);

	/* mine: the process shut its writing side; theirs: the child did. */
	int mine[2], theirs[2];
	CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, mine) == 0 &&
		      socketpair(AF_UNIX, SOCK_STREAM, 0, theirs) == 0,
	      "socketpairs");
	pid_t child = fork();
	if (child == 0) {
		close(mine[0]);
		close(theirs[0]);
		char buf[8];
		/* `mine`: end of file from the process, then answer. */
		if (read(mine[1], buf, 1) != 0)
			_exit(2);
		/* `theirs`: send, shut, wait for the process's bytes. */
		if (write(theirs[1], "bye", 3) != 3 || shutdown(theirs[1], SHUT_WR) != 0)
			_exit(3);
		if (cr_read_all(theirs[1], buf, 5) != 0 || memcmp(buf, "after", 5) != 0)
			_exit(4);
		if (write(mine[1], "answer", 6) != 6)
			_exit(5);
		_exit(0);
	}
	close(mine[1]);
	close(theirs[1]);
	CHECK(shutdown(mine[0], SHUT_WR) == 0, "shut mine");
	/* The child has sent and shut `theirs` before the wait. */
	usleep(100000);

	cr_ready_and_wait();

	char buf[8] = {0};
	CHECK(cr_read_all(s, buf, 4) == 0 && memcmp(buf, "sent", 4) == 0, "server got %s", buf);
	CHECK(read(s, buf, 1) == 0, "then end of file");
	CHECK(write(s, "reply", 5) == 5 && cr_read_all(c, buf, 5) == 0 && memcmp(buf, "reply", 5) == 0,
	      "the server still answers");
	errno = 0;
	CHECK(write(c, "x", 1) == -1 && errno == EPIPE, "the shut client cannot write");

	CHECK(write(mine[0], "x", 1) == -1 && errno == EPIPE, "writing after my shutdown");
	memset(buf, 0, sizeof buf);
	CHECK(cr_read_all(theirs[0], buf, 3) == 0 && memcmp(buf, "bye", 3) == 0, "theirs: %s", buf);
	CHECK(read(theirs[0], buf, 1) == 0, "then their end of file");
	CHECK(write(theirs[0], "after", 5) == 5, "writing to a child that shut its side");
	memset(buf, 0, sizeof buf);
	CHECK(cr_read_all(mine[0], buf, 6) == 0 && memcmp(buf, "answer", 6) == 0,
	      "reading after my shutdown: %s", buf);
	int status;
	CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0,
	      "the child: %d", status);
	return cr_report();
}
