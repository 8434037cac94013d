/* Signals and process groups by pid, to children started before the wait
 * and to itself by the pid it had then: each child sees the signal come
 * from its parent (si_pid is its getppid(), with the right si_code and
 * value), their groups and sessions and its own parent read the same, and
 * a signal to its own earlier pid is delivered before kill returns.
 *
 *   cr_kill DIR */
#include "cr.h"
#include <sys/wait.h>

static volatile sig_atomic_t got_pid, got_code, got_value, got;

static void on_usr1(int sig, siginfo_t *info, void *ctx)
{
	(void)sig;
	(void)ctx;
	got_pid = info->si_pid;
	got_code = info->si_code;
	got_value = info->si_value.sival_int;
	got = 1;
}

/* A child that waits for SIGUSR1 and exits 0 if it came from its parent
 * with `code` (and, for SI_QUEUE, the value 42). */
static pid_t receiver(int code)
{
	pid_t pid = fork();
	if (pid != 0)
		return pid;
	alarm(20);
	sigset_t none;
	sigemptyset(&none);
	while (!got)
		sigsuspend(&none);
	if (got_pid != getppid())
		_exit(2);
	if (got_code != code)
		_exit(3);
	_exit(code == SI_QUEUE && got_value != 42 ? 4 : 0);
}

static volatile sig_atomic_t to_self;
static void on_usr2(int sig)
{
	(void)sig;
	to_self++;
}

int main(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = on_usr1;
	sa.sa_flags = SA_SIGINFO;
	sigaction(SIGUSR1, &sa, NULL);
	/* The children wait with SIGUSR1 blocked but for sigsuspend. */
	sigset_t usr1;
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	sigprocmask(SIG_BLOCK, &usr1, NULL);
	pid_t by_kill = receiver(SI_USER);
	pid_t by_queue = receiver(SI_QUEUE);
	CHECK(setpgid(by_queue, by_queue) == 0, "a group of its own for one child");
	signal(SIGUSR2, on_usr2);
	pid_t me = getpid(), parent = getppid();
	pid_t group = getpgid(by_kill), own_group = getpgid(by_queue), session = getsid(by_kill);

	cr_ready_and_wait();

	CHECK(getpgid(by_kill) == group && getpgid(by_queue) == own_group,
	      "their groups: %d %d", (int)getpgid(by_kill), (int)getpgid(by_queue));
	CHECK(getsid(by_kill) == session, "its session");
	CHECK(getppid() == parent, "its parent: %d, was %d", (int)getppid(), (int)parent);
	CHECK(kill(by_kill, SIGUSR1) == 0, "kill");
	union sigval v = {.sival_int = 42};
	CHECK(sigqueue(by_queue, SIGUSR1, v) == 0, "sigqueue");
	int status;
	CHECK(waitpid(by_kill, &status, 0) == by_kill && WIFEXITED(status) &&
		      WEXITSTATUS(status) == 0,
	      "the child signalled by kill: %d", status);
	CHECK(waitpid(by_queue, &status, 0) == by_queue && WIFEXITED(status) &&
		      WEXITSTATUS(status) == 0,
	      "the child signalled by sigqueue: %d", status);
	errno = 0;
	CHECK(kill(by_kill, 0) == -1 && errno == ESRCH, "a reaped child is gone");
	CHECK(kill(me, SIGUSR2) == 0 && to_self == 1, "to itself: %d", (int)to_self);
	return cr_report();
}
