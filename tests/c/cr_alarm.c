/* alarm(): an alarm set before the wait has its time left after it, and
 * one set after it fires (once).
 *
 *   cr_alarm DIR */
#include "cr.h"
#include <time.h>

static volatile sig_atomic_t rang;
static void on_alarm(int sig)
{
	(void)sig;
	rang++;
}

int main(void)
{
	signal(SIGALRM, on_alarm);
	alarm(1000);

	cr_ready_and_wait();

	unsigned left = alarm(1);
	CHECK(left > 900 && left <= 1000, "%u s left of 1000", left);
	struct timespec t = {.tv_sec = 1, .tv_nsec = 500000000};
	while (nanosleep(&t, &t) != 0)
		;
	CHECK(rang == 1, "the alarm rang %d times", rang);
	return cr_report();
}
