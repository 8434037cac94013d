/* A process group leader (setpgid) with a child in its group that stays
 * where it was started: still the group's leader after the wait, and the
 * child answers a signal sent to it from where the process runs.
 *
 *   cr_pgrp DIR */
#include "cr.h"
#include <sys/wait.h>

static volatile sig_atomic_t got;
static void on_usr1(int sig)
{
	(void)sig;
	got++;
}

int main(void)
{
	CHECK(setpgid(0, 0) == 0, "setpgid");
	signal(SIGUSR1, on_usr1);
	int p[2];
	CHECK(pipe(p) == 0, "pipe");
	pid_t pid = fork();
	if (pid == 0) {
		close(p[0]);
		sigset_t usr1;
		sigemptyset(&usr1);
		sigaddset(&usr1, SIGUSR1);
		sigprocmask(SIG_BLOCK, &usr1, NULL);
		if (write(p[1], "r", 1) != 1)
			_exit(4);
		int sig;
		sigwait(&usr1, &sig);
		_exit(write(p[1], "k", 1) == 1 ? 0 : 3);
	}
	close(p[1]);
	char ready = 0;
	CHECK(read(p[0], &ready, 1) == 1 && ready == 'r', "the child did not start");
	CHECK(getpgid(pid) == getpid(), "the child's group");

	cr_ready_and_wait();

	CHECK(getpgrp() == getpid(), "no longer the group's leader");
	/* The child, at home, in the group at home: signalled by its pid
	 * (what the group holds where the process runs depends on where). */
	CHECK(kill(pid, SIGUSR1) == 0, "signal the child");
	char c = 0;
	CHECK(read(p[0], &c, 1) == 1 && c == 'k', "the child did not answer");
	return cr_report();
}
