/* Sleeps under way while the process moves go on for the time left:
 * nanosleep, a relative and an absolute clock_nanosleep, each with no
 * signal to end it early (SIGTERM waits blocked until they are done).
 *
 *   cr_sleep DIR */
#include "cr.h"
#include <time.h>

static double now(clockid_t clock)
{
	struct timespec t;
	clock_gettime(clock, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

int main(void)
{
	sigset_t term;
	sigemptyset(&term);
	sigaddset(&term, SIGTERM);
	sigprocmask(SIG_BLOCK, &term, NULL);
	printf("ready\n");
	fflush(stdout);

	double start = now(CLOCK_MONOTONIC);
	struct timespec req = {.tv_sec = 1, .tv_nsec = 200000000}, rem = {0};
	int r = nanosleep(&req, &rem);
	double slept = now(CLOCK_MONOTONIC) - start;
	CHECK(r == 0, "nanosleep returned %d", r);
	CHECK(slept >= 1.2, "nanosleep slept %.3f s of 1.2", slept);
	CHECK(slept < 3.0, "nanosleep slept %.3f s", slept);

	start = now(CLOCK_MONOTONIC);
	req.tv_sec = 0;
	req.tv_nsec = 300000000;
	r = clock_nanosleep(CLOCK_MONOTONIC, 0, &req, &rem);
	slept = now(CLOCK_MONOTONIC) - start;
	CHECK(r == 0 && slept >= 0.3, "clock_nanosleep relative: %d after %.3f s", r, slept);

	struct timespec until;
	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_nsec += 300000000;
	if (until.tv_nsec >= 1000000000) {
		until.tv_sec++;
		until.tv_nsec -= 1000000000;
	}
	r = clock_nanosleep(CLOCK_REALTIME, TIMER_ABSTIME, &until, NULL);
	CHECK(r == 0 && now(CLOCK_REALTIME) >= until.tv_sec + until.tv_nsec / 1e9,
	      "clock_nanosleep absolute: %d", r);

	/* SIGTERM came meanwhile (pending), or comes now. */
	sigset_t none;
	sigemptyset(&none);
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = cr_on_term;
	sigaction(SIGTERM, &sa, NULL);
	while (!cr_terminated)
		sigsuspend(&none);
	return cr_report();
}
