/* A process with several reasons to stay home at once: a second thread,
 * an eventfd, a timerfd, a deleted file open, and a deleted file mapped.
 * Prints "ready", then waits to be killed.
 *
 *   cantmove DIR */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/timerfd.h>
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
	if (eventfd(0, 0) < 0 || timerfd_create(CLOCK_MONOTONIC, 0) < 0)
		return 2;
	pthread_t thread;
	if (pthread_create(&thread, NULL, idle, NULL) != 0)
		return 2;
	printf("ready\n");
	fflush(stdout);
	for (;;)
		pause();
}
