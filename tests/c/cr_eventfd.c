/* eventfd: values, semaphore mode, non-blocking and blocking reads (one
 * woken by a signal handler's write), poll and epoll readiness.
 *
 *   cr_eventfd DIR */
#include "cr.h"
#include <poll.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/time.h>

static int blocking;

static void on_alarm(int sig)
{
	(void)sig;
	uint64_t one = 1;
	if (write(blocking, &one, sizeof one) != sizeof one)
		_exit(3);
}

static int readable(int fd)
{
	struct pollfd p = {.fd = fd, .events = POLLIN};
	return poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

int main(void)
{
	int counter = eventfd(5, EFD_NONBLOCK);
	int sem = eventfd(2, EFD_SEMAPHORE | EFD_NONBLOCK);
	blocking = eventfd(0, 0);
	int ep = epoll_create1(0);
	struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 77};
	CHECK(counter >= 0 && sem >= 0 && blocking >= 0 && ep >= 0, "eventfds");
	CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, counter, &ev) == 0, "epoll_ctl");

	cr_ready_and_wait();

	CHECK(readable(counter), "counter not readable");
	struct epoll_event got;
	CHECK(epoll_wait(ep, &got, 1, 1000) == 1 && got.data.u64 == 77, "epoll_wait");
	uint64_t v = 0;
	CHECK(read(counter, &v, sizeof v) == sizeof v && v == 5, "counter read %llu",
	      (unsigned long long)v);
	CHECK(read(counter, &v, sizeof v) < 0 && errno == EAGAIN, "empty counter read");
	CHECK(!readable(counter), "empty counter readable");
	CHECK(epoll_wait(ep, &got, 1, 0) == 0, "epoll_wait on an empty counter");
	uint64_t three = 3;
	CHECK(write(counter, &three, sizeof three) == sizeof three, "counter write");
	CHECK(readable(counter), "counter readable again");
	CHECK(epoll_wait(ep, &got, 1, 1000) == 1, "epoll_wait again");
	CHECK(read(counter, &v, sizeof v) == sizeof v && v == 3, "counter read again");
	char small[4];
	CHECK(read(counter, small, sizeof small) < 0 && errno == EINVAL, "short read");

	CHECK(read(sem, &v, sizeof v) == sizeof v && v == 1, "semaphore read");
	CHECK(read(sem, &v, sizeof v) == sizeof v && v == 1, "semaphore read 2");
	CHECK(read(sem, &v, sizeof v) < 0 && errno == EAGAIN, "semaphore empty");
	CHECK((fcntl(sem, F_GETFL) & O_NONBLOCK) != 0, "semaphore flags");

	/* A read that waits, woken by a write from a signal handler. */
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_alarm;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGALRM, &sa, NULL);
	struct itimerval once = {.it_value = {.tv_usec = 50000}};
	setitimer(ITIMER_REAL, &once, NULL);
	v = 0;
	CHECK(read(blocking, &v, sizeof v) == sizeof v && v == 1, "blocking read %llu",
	      (unsigned long long)v);
	CHECK(!readable(blocking), "blocking eventfd readable after its read");
	return cr_report();
}
