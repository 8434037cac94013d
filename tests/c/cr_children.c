/* Children started before the wait, reaped after it: one that exited
 * before (a zombie), one that exits when the process writes to it, one
 * killed by a signal when the process closes its pipe, and one started
 * after the wait; by pid and by "any child", with WNOHANG, wait4 with
 * rusage, waitid, and SIGCHLD for each of them.
 *
 *   cr_children DIR */
#include "cr.h"
#include <sys/resource.h>
#include <sys/wait.h>

static volatile sig_atomic_t sigchld_count;

static void on_chld(int sig)
{
	(void)sig;
	sigchld_count++;
}

/* A child that reads `fd` to end of file: it exits `code` after a byte,
 * or raises SIGUSR1 at end of file. */
static pid_t reader(int fds[2], int code)
{
	pid_t pid = fork();
	if (pid != 0) {
		close(fds[0]);
		return pid;
	}
	close(fds[1]);
	char byte;
	if (read(fds[0], &byte, 1) == 1)
		_exit(code);
	signal(SIGUSR1, SIG_DFL);
	raise(SIGUSR1);
	_exit(99);
}

int main(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_chld;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGCHLD, &sa, NULL);

	pid_t early = fork();
	if (early == 0)
		_exit(3);
	int to_b[2], to_c[2];
	CHECK(pipe(to_b) == 0 && pipe(to_c) == 0, "pipes");
	pid_t b = reader(to_b, 5);
	pid_t c = reader(to_c, 6);
	/* `early` is a zombie before the wait. */
	siginfo_t peek;
	memset(&peek, 0, sizeof peek);
	CHECK(waitid(P_PID, early, &peek, WEXITED | WNOWAIT) == 0 && peek.si_pid == early,
	      "the early child exited");

	cr_ready_and_wait();

	int status = 0;
	CHECK(waitpid(early, &status, WNOHANG) == early && WIFEXITED(status) &&
		      WEXITSTATUS(status) == 3,
	      "the early child: %d", status);
	CHECK(waitpid(-1, &status, WNOHANG) == 0, "nothing else has ended yet");

	CHECK(write(to_b[1], "x", 1) == 1, "wake b");
	struct rusage usage;
	memset(&usage, 0xff, sizeof usage);
	CHECK(wait4(b, &status, 0, &usage) == b && WIFEXITED(status) && WEXITSTATUS(status) == 5,
	      "b: %d", status);
	CHECK(usage.ru_utime.tv_sec >= 0 && usage.ru_utime.tv_sec < 100 && usage.ru_maxrss > 0,
	      "b's rusage");

	/* One child on each side: "any child" gets both, in either order. */
	pid_t late = fork();
	if (late == 0) {
		usleep(200000);
		_exit(7);
	}
	close(to_c[1]);
	int got_c = 0, got_late = 0;
	for (int i = 0; i < 2; i++) {
		pid_t who = waitpid(-1, &status, 0);
		if (who == c && WIFSIGNALED(status) && WTERMSIG(status) == SIGUSR1)
			got_c = 1;
		else if (who == late && WIFEXITED(status) && WEXITSTATUS(status) == 7)
			got_late = 1;
		else
			CHECK(0, "waitpid(-1) gave %d with status %d", (int)who, status);
	}
	CHECK(got_c && got_late, "both children: c %d, late %d", got_c, got_late);

	siginfo_t info;
	errno = 0;
	CHECK(waitid(P_ALL, 0, &info, WEXITED | WNOHANG) == -1 && errno == ECHILD,
	      "no child left (waitid)");
	errno = 0;
	CHECK(wait(NULL) == -1 && errno == ECHILD, "no child left (wait)");
	/* A SIGCHLD for each child (standard signals merge: at least one per
	 * child that ended while none was pending; each ended apart here). */
	for (int i = 0; i < 100 && sigchld_count < 3; i++)
		usleep(10000);
	CHECK(sigchld_count >= 3, "SIGCHLD %d times", (int)sigchld_count);
	close(to_b[1]);
	return cr_report();
}
