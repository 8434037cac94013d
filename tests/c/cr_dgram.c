/* Datagram and seqpacket sockets shared with a child at home keep their
 * message boundaries: messages the child sent before the wait (one of them
 * empty, one large) are read after it one at a time with their sizes, and
 * messages the process sends after it reach the child one by one; the
 * sockets are still of their type, and the seqpacket one ends with end of
 * file when the child is done.
 *
 *   cr_dgram DIR */
#include "cr.h"
#include <sys/socket.h>
#include <sys/wait.h>

#define LARGE 60000

static char large[LARGE];

/* The child: sends "one", "", a large message and "three" on `s`, then
 * echoes each message it gets back with its length as text, until "end". */
static int child_side(int s)
{
	if (send(s, "one", 3, 0) != 3 || send(s, "", 0, 0) != 0 ||
	    send(s, large, LARGE, 0) != LARGE || send(s, "three", 5, 0) != 5)
		return 2;
	char buf[LARGE + 1];
	for (;;) {
		ssize_t n = recv(s, buf, sizeof buf, 0);
		if (n < 0)
			return 3;
		if (n == 3 && memcmp(buf, "end", 3) == 0)
			return 0;
		char len[16];
		int m = snprintf(len, sizeof len, "%zd", n);
		if (send(s, len, (size_t)m, 0) != m)
			return 4;
	}
}

/* The process's checks on one socket of type `type`. */
static void check_socket(int s, int type, const char *name)
{
	int got_type = 0;
	socklen_t len = sizeof got_type;
	CHECK(getsockopt(s, SOL_SOCKET, SO_TYPE, &got_type, &len) == 0 && got_type == type,
	      "%s: type %d", name, got_type);
	static char buf[LARGE + 16];
	ssize_t n = recv(s, buf, sizeof buf, 0);
	CHECK(n == 3 && memcmp(buf, "one", 3) == 0, "%s: first message, %zd bytes", name, n);
	n = recv(s, buf, sizeof buf, 0);
	CHECK(n == 0, "%s: the empty message, %zd bytes", name, n);
	n = recv(s, buf, sizeof buf, 0);
	CHECK(n == LARGE && memcmp(buf, large, LARGE) == 0, "%s: the large one, %zd bytes", name, n);
	n = recv(s, buf, sizeof buf, 0);
	CHECK(n == 5 && memcmp(buf, "three", 5) == 0, "%s: the last, %zd bytes", name, n);
	const char *sizes[] = {"1", "22", "333"};
	for (int i = 0; i < 3; i++) {
		CHECK(send(s, "abcdefgh", (size_t)(i + 1) * 2, 0) == (i + 1) * 2, "%s: send", name);
		memset(buf, 0, 16);
		n = recv(s, buf, sizeof buf, 0);
		char want[16];
		snprintf(want, sizeof want, "%d", (i + 1) * 2);
		CHECK(n > 0 && strcmp(buf, want) == 0, "%s: the child got %s bytes, not %s (%s)", name,
		      buf, want, sizes[i]);
	}
	CHECK(send(s, "end", 3, 0) == 3, "%s: end", name);
}

int main(void)
{
	for (int i = 0; i < LARGE; i++)
		large[i] = (char)(i * 7);
	int dgram[2], seqpacket[2];
	CHECK(socketpair(AF_UNIX, SOCK_DGRAM, 0, dgram) == 0 &&
		      socketpair(AF_UNIX, SOCK_SEQPACKET, 0, seqpacket) == 0,
	      "socketpairs");
	int bigger = 4 << 20;
	setsockopt(dgram[1], SOL_SOCKET, SO_SNDBUF, &bigger, sizeof bigger);
	pid_t child = fork();
	if (child == 0) {
		close(dgram[0]);
		close(seqpacket[0]);
		int a = child_side(dgram[1]);
		int b = a ? a : child_side(seqpacket[1]);
		_exit(b);
	}
	close(dgram[1]);
	close(seqpacket[1]);
	/* The dgram messages are queued before the wait. */
	usleep(100000);

	cr_ready_and_wait();

	check_socket(dgram[0], SOCK_DGRAM, "dgram");
	check_socket(seqpacket[0], SOCK_SEQPACKET, "seqpacket");
	char buf[8];
	CHECK(recv(seqpacket[0], buf, sizeof buf, 0) == 0, "seqpacket: end of file");
	int status;
	CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0,
	      "the child: %d", status);
	return cr_report();
}
