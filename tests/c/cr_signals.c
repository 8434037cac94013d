/* Signal state: a blocked mask, standard and real-time signals pending
 * (the real-time ones queued with their values, in order), an alternate
 * signal stack, handlers with their flags (SA_SIGINFO, SA_RESTART,
 * SA_ONSTACK) and an ignored signal. After the wait the same, and the
 * pending signals arrive once each.
 *
 *   cr_signals DIR */
#include "cr.h"

#define QUEUED 5

static stack_t alt;
static volatile int rt_values[QUEUED], rt_count, usr1_count, on_alt_stack;

static void on_rt(int sig, siginfo_t *info, void *ctx)
{
	(void)sig;
	(void)ctx;
	if (rt_count < QUEUED)
		rt_values[rt_count] = info->si_value.sival_int;
	rt_count++;
}

static void on_usr1(int sig, siginfo_t *info, void *ctx)
{
	(void)sig;
	(void)info;
	(void)ctx;
	char here;
	char *base = alt.ss_sp;
	on_alt_stack = &here >= base && &here < base + alt.ss_size;
	usr1_count++;
}

int main(void)
{
	alt.ss_sp = malloc(SIGSTKSZ * 4);
	alt.ss_size = SIGSTKSZ * 4;
	alt.ss_flags = 0;
	CHECK(sigaltstack(&alt, NULL) == 0, "sigaltstack");
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = on_rt;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	CHECK(sigaction(SIGRTMIN + 3, &sa, NULL) == 0, "sigaction rt");
	sa.sa_sigaction = on_usr1;
	sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
	CHECK(sigaction(SIGUSR1, &sa, NULL) == 0, "sigaction usr1");
	signal(SIGHUP, SIG_IGN);
	sigset_t blocked;
	sigemptyset(&blocked);
	sigaddset(&blocked, SIGUSR1);
	sigaddset(&blocked, SIGRTMIN + 3);
	sigaddset(&blocked, SIGWINCH);
	CHECK(sigprocmask(SIG_BLOCK, &blocked, NULL) == 0, "block");
	for (int i = 0; i < QUEUED; i++) {
		union sigval v = {.sival_int = 100 + i};
		CHECK(sigqueue(getpid(), SIGRTMIN + 3, v) == 0, "sigqueue");
	}
	raise(SIGUSR1);
	raise(SIGUSR1); /* a standard signal is pending once */
	raise(SIGHUP);  /* ignored: never pending */

	cr_ready_and_wait();

	sigset_t mask, pending;
	sigprocmask(SIG_BLOCK, NULL, &mask);
	CHECK(sigismember(&mask, SIGUSR1) && sigismember(&mask, SIGRTMIN + 3) &&
	          sigismember(&mask, SIGWINCH) && !sigismember(&mask, SIGTERM),
	      "the blocked mask changed");
	sigpending(&pending);
	CHECK(sigismember(&pending, SIGUSR1) && sigismember(&pending, SIGRTMIN + 3),
	      "pending signals lost");
	CHECK(!sigismember(&pending, SIGHUP) && !sigismember(&pending, SIGWINCH),
	      "signals pending that were never sent");
	struct sigaction now;
	sigaction(SIGUSR1, NULL, &now);
	CHECK(now.sa_sigaction == on_usr1 && (now.sa_flags & (SA_SIGINFO | SA_ONSTACK)) ==
	                                         (SA_SIGINFO | SA_ONSTACK),
	      "SIGUSR1's action changed");
	sigaction(SIGRTMIN + 3, NULL, &now);
	CHECK((now.sa_flags & SA_RESTART) != 0, "SA_RESTART lost");
	sigaction(SIGHUP, NULL, &now);
	CHECK(now.sa_handler == SIG_IGN, "SIGHUP no longer ignored");
	stack_t got;
	CHECK(sigaltstack(NULL, &got) == 0 && got.ss_sp == alt.ss_sp && got.ss_size == alt.ss_size,
	      "the alternate stack changed");
	sigprocmask(SIG_UNBLOCK, &blocked, NULL);
	CHECK(usr1_count == 1, "SIGUSR1 arrived %d times", usr1_count);
	CHECK(on_alt_stack, "SIGUSR1 ran off the alternate stack");
	CHECK(rt_count == QUEUED, "%d of %d queued signals arrived", rt_count, QUEUED);
	for (int i = 0; i < QUEUED && i < rt_count; i++)
		CHECK(rt_values[i] == 100 + i, "queued signal %d carried %d", i, rt_values[i]);
	return cr_report();
}
