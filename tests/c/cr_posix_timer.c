/* POSIX timers move with their ids, clocks, signals, values, remaining
 * time and interval: one firing every 40 ms with a real-time signal that
 * carries a value, one without notification, one long one-shot.
 *
 *   cr_posix_timer DIR */
#include "cr.h"
#include <time.h>

static volatile sig_atomic_t fired, wrong_value;
static void on_rt(int sig, siginfo_t *info, void *ctx)
{
	(void)sig;
	(void)ctx;
	if (info->si_value.sival_int != 42 || info->si_code != SI_TIMER)
		wrong_value = 1;
	fired++;
}

static double remaining(timer_t t)
{
	struct itimerspec s;
	if (timer_gettime(t, &s) != 0)
		return -1;
	return s.it_value.tv_sec + s.it_value.tv_nsec / 1e9;
}

int main(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = on_rt;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sigaction(SIGRTMIN + 1, &sa, NULL);
	signal(SIGUSR2, SIG_IGN);

	timer_t ticking, silent, later;
	struct sigevent ev = {.sigev_notify = SIGEV_SIGNAL, .sigev_signo = SIGRTMIN + 1};
	ev.sigev_value.sival_int = 42;
	CHECK(timer_create(CLOCK_MONOTONIC, &ev, &ticking) == 0, "timer_create ticking");
	struct sigevent none = {.sigev_notify = SIGEV_NONE};
	CHECK(timer_create(CLOCK_REALTIME, &none, &silent) == 0, "timer_create silent");
	struct sigevent usr2 = {.sigev_notify = SIGEV_SIGNAL, .sigev_signo = SIGUSR2};
	CHECK(timer_create(CLOCK_BOOTTIME, &usr2, &later) == 0, "timer_create later");
	struct itimerspec every = {.it_interval = {.tv_nsec = 40000000}, .it_value = {.tv_nsec = 40000000}};
	struct itimerspec hour = {.it_value = {.tv_sec = 3600}};
	struct itimerspec day = {.it_value = {.tv_sec = 86400}, .it_interval = {.tv_sec = 7}};
	CHECK(timer_settime(ticking, 0, &every, NULL) == 0, "settime ticking");
	CHECK(timer_settime(silent, 0, &hour, NULL) == 0, "settime silent");
	CHECK(timer_settime(later, 0, &day, NULL) == 0, "settime later");

	cr_ready_and_wait();

	double left = remaining(silent);
	CHECK(left > 3000 && left <= 3600, "silent timer: %.3f s left", left);
	left = remaining(later);
	CHECK(left > 86000 && left <= 86400, "later timer: %.3f s left", left);
	struct itimerspec s;
	CHECK(timer_gettime(later, &s) == 0 && s.it_interval.tv_sec == 7, "later interval");
	CHECK(timer_gettime(ticking, &s) == 0 && s.it_interval.tv_nsec == 40000000, "ticking interval");
	int before = fired;
	struct timespec half = {.tv_nsec = 400000000};
	while (nanosleep(&half, &half) != 0)
		;
	int n = fired - before;
	CHECK(n >= 5 && n <= 13, "%d expiries in 0.4 s at 40 ms", n);
	CHECK(!wrong_value, "a timer signal without its value");
	CHECK(timer_getoverrun(ticking) >= 0, "getoverrun");
	CHECK(timer_delete(silent) == 0 && timer_gettime(silent, &s) < 0 && errno == EINVAL,
	      "delete");
	return cr_report();
}
