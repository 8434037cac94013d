/* timerfd: an interval timer that keeps firing, a long one-shot timer
 * with its remaining time, and a read that waits for an expiry.
 *
 *   cr_timerfd DIR */
#include "cr.h"
#include <poll.h>
#include <stdint.h>
#include <sys/timerfd.h>

int main(void)
{
	int ticking = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	int later = timerfd_create(CLOCK_REALTIME, 0);
	CHECK(ticking >= 0 && later >= 0, "timerfd_create");
	struct itimerspec every = {.it_interval = {.tv_nsec = 20000000}, .it_value = {.tv_nsec = 20000000}};
	CHECK(timerfd_settime(ticking, 0, &every, NULL) == 0, "settime ticking");
	struct itimerspec hour = {.it_value = {.tv_sec = 3600}};
	CHECK(timerfd_settime(later, 0, &hour, NULL) == 0, "settime later");

	cr_ready_and_wait();

	struct pollfd p = {.fd = ticking, .events = POLLIN};
	CHECK(poll(&p, 1, 1000) == 1, "ticking timer not readable");
	uint64_t n = 0;
	CHECK(read(ticking, &n, sizeof n) == sizeof n && n >= 1, "expirations %llu",
	      (unsigned long long)n);
	struct itimerspec now;
	CHECK(timerfd_gettime(ticking, &now) == 0 && now.it_interval.tv_nsec == 20000000,
	      "interval kept");
	CHECK(timerfd_gettime(later, &now) == 0 && now.it_value.tv_sec < 3600 &&
		      now.it_value.tv_sec > 3000,
	      "remaining %ld s", (long)now.it_value.tv_sec);
	/* Reset to fire soon, and wait for it in read. */
	struct itimerspec soon = {.it_value = {.tv_nsec = 30000000}};
	struct itimerspec old;
	CHECK(timerfd_settime(later, 0, &soon, &old) == 0 && old.it_value.tv_sec > 3000,
	      "settime returns the old setting");
	n = 0;
	CHECK(read(later, &n, sizeof n) == sizeof n && n == 1, "waited expiry %llu",
	      (unsigned long long)n);
	return cr_report();
}
