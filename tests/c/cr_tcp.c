/* TCP on loopback within the process: a listener, a connection to it with
 * bytes queued both ways before the wait, and after it more bytes, a
 * half-close each way, and a new connection accepted.
 *
 *   cr_tcp DIR */
#include "cr.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

static int connect_to(struct sockaddr_in *addr)
{
	int c = socket(AF_INET, SOCK_STREAM, 0);
	if (c < 0 || connect(c, (struct sockaddr *)addr, sizeof *addr) != 0)
		return -1;
	return c;
}

int main(void)
{
	int l = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t len = sizeof addr;
	CHECK(l >= 0 && bind(l, (struct sockaddr *)&addr, sizeof addr) == 0 && listen(l, 4) == 0 &&
		      getsockname(l, (struct sockaddr *)&addr, &len) == 0,
	      "listen");
	int c = connect_to(&addr);
	int s = accept(l, NULL, NULL);
	CHECK(c >= 0 && s >= 0, "connect and accept");
	CHECK(write(c, "client->", 8) == 8 && write(s, "server->", 8) == 8, "queue");

	cr_ready_and_wait();

	char buf[16] = {0};
	CHECK(cr_read_all(s, buf, 8) == 0 && memcmp(buf, "client->", 8) == 0, "server got %s", buf);
	CHECK(cr_read_all(c, buf, 8) == 0 && memcmp(buf, "server->", 8) == 0, "client got %s", buf);
	CHECK(write(c, "more", 4) == 4 && cr_read_all(s, buf, 4) == 0 && memcmp(buf, "more", 4) == 0,
	      "more");
	CHECK(shutdown(c, SHUT_WR) == 0 && read(s, buf, 1) == 0, "half-close client->server");
	CHECK(write(s, "late", 4) == 4 && cr_read_all(c, buf, 4) == 0 && memcmp(buf, "late", 4) == 0,
	      "the other way still open");
	CHECK(shutdown(s, SHUT_WR) == 0 && read(c, buf, 1) == 0, "half-close server->client");
	int c2 = connect_to(&addr);
	int s2 = c2 >= 0 ? accept(l, NULL, NULL) : -1;
	CHECK(c2 >= 0 && s2 >= 0 && write(c2, "new", 3) == 3 && cr_read_all(s2, buf, 3) == 0,
	      "a new connection");
	return cr_report();
}
