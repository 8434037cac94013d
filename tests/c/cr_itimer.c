/* Interval timers move with their remaining time and interval: a real
 * one firing every 50 ms (at that rate after the move too, not twice as
 * often), a virtual and a profiling one, whose time only CPU time
 * consumes.
 *
 *   cr_itimer DIR */
#include "cr.h"
#include <sys/time.h>
#include <time.h>

static volatile sig_atomic_t alarms;
static void on_alarm(int sig)
{
	(void)sig;
	alarms++;
}

static double seconds(struct timeval t)
{
	return t.tv_sec + t.tv_usec / 1e6;
}

int main(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_alarm;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGALRM, &sa, NULL);
	signal(SIGVTALRM, SIG_IGN);
	signal(SIGPROF, SIG_IGN);
	struct itimerval every = {.it_interval = {.tv_usec = 50000}, .it_value = {.tv_usec = 50000}};
	struct itimerval virt = {.it_value = {.tv_sec = 100}};
	struct itimerval prof = {.it_interval = {.tv_sec = 1}, .it_value = {.tv_sec = 50}};
	CHECK(setitimer(ITIMER_REAL, &every, NULL) == 0, "setitimer real");
	CHECK(setitimer(ITIMER_VIRTUAL, &virt, NULL) == 0, "setitimer virtual");
	CHECK(setitimer(ITIMER_PROF, &prof, NULL) == 0, "setitimer prof");

	cr_ready_and_wait();

	struct itimerval now;
	CHECK(getitimer(ITIMER_REAL, &now) == 0 && now.it_interval.tv_usec == 50000 &&
		      now.it_interval.tv_sec == 0,
	      "real interval %.3f", seconds(now.it_interval));
	CHECK(getitimer(ITIMER_VIRTUAL, &now) == 0 && seconds(now.it_value) <= 100.1 &&
		      seconds(now.it_value) > 95,
	      "virtual remaining %.3f", seconds(now.it_value));
	CHECK(getitimer(ITIMER_PROF, &now) == 0 && seconds(now.it_value) <= 50.1 &&
		      seconds(now.it_value) > 45 && now.it_interval.tv_sec == 1,
	      "prof remaining %.3f", seconds(now.it_value));
	/* The rate: about 10 in half a second (20 would be two timers). */
	int before = alarms;
	struct timespec half = {.tv_nsec = 500000000};
	while (nanosleep(&half, &half) != 0)
		;
	int fired = alarms - before;
	CHECK(fired >= 6 && fired <= 13, "%d alarms in 0.5 s at 50 ms", fired);
	return cr_report();
}
