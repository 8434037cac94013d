/* A timerfd set for an absolute time on the real-time clock, a second
 * after the wait began: it expires at that time.
 *
 *   cr_timerfd_abs DIR */
#include "cr.h"
#include <stdint.h>
#include <sys/timerfd.h>
#include <time.h>

int main(void)
{
	int t = timerfd_create(CLOCK_REALTIME, 0);
	struct timespec now;
	clock_gettime(CLOCK_REALTIME, &now);
	struct itimerspec at = {.it_value = {.tv_sec = now.tv_sec + 2, .tv_nsec = now.tv_nsec}};
	CHECK(t >= 0 && timerfd_settime(t, TFD_TIMER_ABSTIME, &at, NULL) == 0, "set");

	cr_ready_and_wait();

	uint64_t n = 0;
	CHECK(read(t, &n, sizeof n) == sizeof n && n == 1, "expiry %llu", (unsigned long long)n);
	clock_gettime(CLOCK_REALTIME, &now);
	CHECK(now.tv_sec > at.it_value.tv_sec ||
		      (now.tv_sec == at.it_value.tv_sec && now.tv_nsec >= at.it_value.tv_nsec),
	      "expired early");
	return cr_report();
}
