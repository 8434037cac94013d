/* A process with several reasons to stay home at once: a second thread,
 * a userfaultfd, a listening unix seqpacket socket, and a deleted file mapped (the
 * deleted file open is no reason: it is served at home).
 * Prints "ready", then waits to be killed.
 *
 *   cantmove DIR */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/mman.h>
#include <unistd.h>

static void *idle(void *arg)
{
	(void)arg;
	for (;;)
		pause();
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	char path[4096];
	snprintf(path, sizeof path, "%s/deleted", argv[1]);
	int deleted = open(path, O_CREAT | O_RDWR, 0600);
	if (deleted < 0 || ftruncate(deleted, 4096) != 0)
		return 2;
	void *mapped = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, deleted, 0);
	if (mapped == MAP_FAILED)
		return 2;
	unlink(path);
	if (syscall(SYS_userfaultfd, O_CLOEXEC) < 0)
		return 2;
	int listener = socket(AF_UNIX, SOCK_SEQPACKET, 0);
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	snprintf(addr.sun_path, sizeof addr.sun_path, "%s/sock", argv[1]);
	if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) != 0 ||
	    listen(listener, 1) != 0)
		return 2;
	pthread_t thread;
	if (pthread_create(&thread, NULL, idle, NULL) != 0)
		return 2;
	printf("ready\n");
	fflush(stdout);
	for (;;)
		pause();
}
