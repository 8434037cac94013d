/* epoll over a pipe, a socketpair and an eventfd: level and edge
 * triggered, one-shot, with their data, before and after the wait.
 *
 *   cr_epoll DIR */
#include "cr.h"
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

int main(void)
{
	int p[2], sv[2];
	CHECK(pipe(p) == 0 && socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0, "pipe, socketpair");
	int ev = eventfd(0, EFD_NONBLOCK);
	int ep = epoll_create1(EPOLL_CLOEXEC);
	struct epoll_event e = {.events = EPOLLIN, .data.u64 = 1};
	CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &e) == 0, "add pipe");
	e.events = EPOLLIN | EPOLLET;
	e.data.u64 = 2;
	CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, sv[0], &e) == 0, "add socket");
	e.events = EPOLLIN | EPOLLONESHOT;
	e.data.u64 = 3;
	CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, ev, &e) == 0, "add eventfd");
	CHECK(write(p[1], "x", 1) == 1, "pipe data before");

	cr_ready_and_wait();

	struct epoll_event got[4];
	int n = epoll_wait(ep, got, 4, 1000);
	CHECK(n == 1 && got[0].data.u64 == 1, "pipe ready: %d", n);
	char c;
	CHECK(read(p[0], &c, 1) == 1 && c == 'x', "pipe byte");
	CHECK(epoll_wait(ep, got, 4, 0) == 0, "nothing ready");
	CHECK(write(sv[1], "y", 1) == 1, "socket data");
	n = epoll_wait(ep, got, 4, 1000);
	CHECK(n == 1 && got[0].data.u64 == 2, "socket ready: %d", n);
	CHECK(epoll_wait(ep, got, 4, 0) == 0, "edge-triggered: reported once");
	uint64_t one = 1;
	CHECK(write(ev, &one, sizeof one) == sizeof one, "eventfd write");
	n = epoll_wait(ep, got, 4, 1000);
	CHECK(n == 1 && got[0].data.u64 == 3, "eventfd ready: %d", n);
	CHECK(epoll_wait(ep, got, 4, 0) == 0, "one-shot: reported once");
	return cr_report();
}
