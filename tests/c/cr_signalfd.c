/* signalfd: made again with its mask; a signal pending before the wait
 * and one sent after it are read from it, with poll readiness.
 *
 *   cr_signalfd DIR */
#include "cr.h"
#include <poll.h>
#include <sys/signalfd.h>

static int readable(int fd)
{
	struct pollfd p = {.fd = fd, .events = POLLIN};
	return poll(&p, 1, 1000) == 1;
}

int main(void)
{
	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGUSR1);
	sigaddset(&mask, SIGUSR2);
	CHECK(sigprocmask(SIG_BLOCK, &mask, NULL) == 0, "block");
	int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	CHECK(sfd >= 0, "signalfd");
	union sigval v = {.sival_int = 7};
	CHECK(sigqueue(getpid(), SIGUSR1, v) == 0, "sigqueue");

	cr_ready_and_wait();

	struct signalfd_siginfo si;
	CHECK(readable(sfd), "pending signal not readable");
	CHECK(read(sfd, &si, sizeof si) == sizeof si && si.ssi_signo == SIGUSR1 && si.ssi_int == 7,
	      "pending signal %u value %d", si.ssi_signo, si.ssi_int);
	CHECK(read(sfd, &si, sizeof si) < 0 && errno == EAGAIN, "empty signalfd");
	raise(SIGUSR2);
	CHECK(readable(sfd) && read(sfd, &si, sizeof si) == sizeof si && si.ssi_signo == SIGUSR2,
	      "a signal sent after the wait");
	CHECK((fcntl(sfd, F_GETFL) & O_NONBLOCK) && (fcntl(sfd, F_GETFD) & FD_CLOEXEC), "flags");
	return cr_report();
}
