/* Shared by the checkpoint/restore programs (tests/c/cr_*.c), in the style
 * of checkpoint/restore test suites: a program sets its state up, says
 * "ready", waits for SIGTERM (moved meanwhile, or not), then checks that
 * its state is what it was and prints PASS, or a FAIL line per check. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t cr_terminated;
static int cr_failures;

static void cr_on_term(int sig)
{
	(void)sig;
	cr_terminated = 1;
}

#define CHECK(cond, ...)                                                   \
	do {                                                                   \
		if (!(cond)) {                                                     \
			int saved = errno;                                             \
			cr_failures++;                                                 \
			printf("FAIL %s:%d: ", __FILE__, __LINE__);                    \
			printf(__VA_ARGS__);                                           \
			printf(" (errno: %s)\n", strerror(saved));                     \
		}                                                                  \
	} while (0)

/* Say ready, then wait for SIGTERM (and only for it: a wait interrupted
 * for any other reason goes on waiting). */
static __attribute__((unused)) void cr_ready_and_wait(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = cr_on_term;
	sigaction(SIGTERM, &sa, NULL);
	sigset_t term, old;
	sigemptyset(&term);
	sigaddset(&term, SIGTERM);
	sigprocmask(SIG_BLOCK, &term, &old);
	printf("ready\n");
	fflush(stdout);
	sigset_t waiting = old;
	sigdelset(&waiting, SIGTERM);
	while (!cr_terminated)
		sigsuspend(&waiting);
	sigprocmask(SIG_SETMASK, &old, NULL);
}

/* Read exactly `len` bytes (0), or fail (-1) at end of file or error. */
static __attribute__((unused)) int cr_read_all(int fd, char *buf, size_t len)
{
	size_t have = 0;
	while (have < len) {
		ssize_t n = read(fd, buf + have, len - have);
		if (n <= 0)
			return -1;
		have += (size_t)n;
	}
	return 0;
}

static int cr_report(void)
{
	if (cr_failures == 0)
		printf("PASS\n");
	fflush(stdout);
	return cr_failures == 0 ? 0 : 1;
}
