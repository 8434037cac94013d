/* A session leader (setsid): still the leader of its session and process
 * group after the wait, and a signal to its own group reaches it once.
 *
 *   cr_session DIR */
#include "cr.h"

static volatile sig_atomic_t got;
static void on_usr1(int sig)
{
	(void)sig;
	got++;
}

int main(void)
{
	pid_t me = getpid();
	CHECK(setsid() == me, "setsid");
	signal(SIGUSR1, on_usr1);

	cr_ready_and_wait();

	CHECK(getsid(0) == getpid() && getpgrp() == getpid(), "no longer the leader");
	CHECK(kill(0, SIGUSR1) == 0, "kill(0)");
	CHECK(got == 1, "the group signal arrived %d times", got);
	return cr_report();
}
