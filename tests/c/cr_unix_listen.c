/* Listening unix stream sockets, one bound to a path in DIR and one to an
 * abstract name: a connection made before the wait and not accepted yet
 * is accepted after it with its bytes; after the wait a child connects to
 * each by name, the process accepts (accept4 with flags, and through poll)
 * and both ways of each connection carry bytes and end of file.
 *
 *   cr_unix_listen DIR */
#include "cr.h"
#include <poll.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>

static socklen_t named(struct sockaddr_un *addr, const char *dir)
{
	memset(addr, 0, sizeof *addr);
	addr->sun_family = AF_UNIX;
	snprintf(addr->sun_path, sizeof addr->sun_path, "%s/listen.sock", dir);
	return sizeof *addr;
}

static socklen_t abstract(struct sockaddr_un *addr)
{
	memset(addr, 0, sizeof *addr);
	addr->sun_family = AF_UNIX;
	int len = snprintf(addr->sun_path + 1, sizeof addr->sun_path - 1, "cr-unix-listen-%d",
			   (int)getpid());
	return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + len);
}

static int listen_on(struct sockaddr_un *addr, socklen_t len)
{
	int l = socket(AF_UNIX, SOCK_STREAM, 0);
	if (l < 0 || bind(l, (struct sockaddr *)addr, len) != 0 || listen(l, 8) != 0)
		return -1;
	return l;
}

static int connect_to(struct sockaddr_un *addr, socklen_t len)
{
	int c = socket(AF_UNIX, SOCK_STREAM, 0);
	if (c < 0 || connect(c, (struct sockaddr *)addr, len) != 0)
		return -1;
	return c;
}

/* A child that connects, sends `hello`, reads the echo and end of file. */
static pid_t client(struct sockaddr_un *addr, socklen_t len, const char *hello)
{
	pid_t pid = fork();
	if (pid != 0)
		return pid;
	int c = connect_to(addr, len);
	size_t n = strlen(hello);
	char buf[32];
	if (c < 0 || write(c, hello, n) != (ssize_t)n || shutdown(c, SHUT_WR) != 0)
		_exit(2);
	if (cr_read_all(c, buf, n) != 0 || memcmp(buf, hello, n) != 0)
		_exit(3);
	_exit(read(c, buf, 1) == 0 ? 0 : 4);
}

/* Read everything until end of file from `s`, echo it, close. */
static int echo(int s, const char *expected)
{
	char buf[32] = {0};
	size_t n = strlen(expected);
	if (cr_read_all(s, buf, n) != 0 || memcmp(buf, expected, n) != 0 || read(s, buf, 1) != 0)
		return -1;
	if (write(s, expected, n) != (ssize_t)n)
		return -1;
	close(s);
	return 0;
}

static int wait_ok(pid_t pid)
{
	int status;
	return waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0
		       ? 0
		       : -1;
}

int main(int argc, char **argv)
{
	const char *dir = argc > 1 ? argv[1] : "/tmp";
	struct sockaddr_un by_path, by_name;
	socklen_t path_len = named(&by_path, dir), name_len = abstract(&by_name);
	unlink(by_path.sun_path);
	int lp = listen_on(&by_path, path_len);
	int ln = listen_on(&by_name, name_len);
	CHECK(lp >= 0 && ln >= 0, "listen");
	/* Queued in the listener's backlog, not accepted before the wait. */
	int early = connect_to(&by_path, path_len);
	CHECK(early >= 0 && write(early, "early", 5) == 5, "an early connection");

	cr_ready_and_wait();

	struct sockaddr_un self;
	socklen_t self_len = sizeof self;
	CHECK(getsockname(lp, (struct sockaddr *)&self, &self_len) == 0 &&
		      self.sun_family == AF_UNIX,
	      "getsockname");
	int type = 0;
	socklen_t type_len = sizeof type;
	CHECK(getsockopt(lp, SOL_SOCKET, SO_TYPE, &type, &type_len) == 0 && type == SOCK_STREAM,
	      "type %d", type);
	int accepting = 0;
	socklen_t accepting_len = sizeof accepting;
	CHECK(getsockopt(ln, SOL_SOCKET, SO_ACCEPTCONN, &accepting, &accepting_len) == 0 &&
		      accepting == 1,
	      "still listening");

	int s = accept(lp, NULL, NULL);
	char buf[8] = {0};
	CHECK(s >= 0 && cr_read_all(s, buf, 5) == 0 && memcmp(buf, "early", 5) == 0,
	      "the early connection: %s", buf);
	CHECK(s >= 0 && write(s, "late", 4) == 4 && cr_read_all(early, buf, 4) == 0 &&
		      memcmp(buf, "late", 4) == 0,
	      "its other way");
	close(s);
	CHECK(read(early, buf, 1) == 0, "its end of file");

	pid_t by_path_client = client(&by_path, path_len, "by path");
	int a = accept4(lp, NULL, NULL, SOCK_CLOEXEC);
	CHECK(a >= 0 && (fcntl(a, F_GETFD) & FD_CLOEXEC), "accept4 by path");
	CHECK(a >= 0 && echo(a, "by path") == 0, "a connection by path");
	CHECK(wait_ok(by_path_client) == 0, "the client by path");

	pid_t by_name_client = client(&by_name, name_len, "by name");
	struct pollfd p = {.fd = ln, .events = POLLIN};
	CHECK(poll(&p, 1, 10000) == 1 && (p.revents & POLLIN), "poll for a connection");
	int b = accept(ln, NULL, NULL);
	CHECK(b >= 0 && echo(b, "by name") == 0, "a connection by abstract name");
	CHECK(wait_ok(by_name_client) == 0, "the client by name");
	unlink(by_path.sun_path);
	return cr_report();
}
