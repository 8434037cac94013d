/* Timing of calls on a deleted file (served at home once the process has
 * moved) beside the same call on a file of its own node.
 *
 *   forward_timing COUNT DIR
 *
 * Says "ready", and on each SIGUSR1 times COUNT 8-byte preads of each and
 * COUNT fcntl(F_GETFL) of the local file (a number the filter watches for
 * its locks: the call is looked at and let run), then prints one line:
 *   local_p50_ns N local_p99_ns N forwarded_p50_ns N forwarded_p99_ns N
 *   watched_p50_ns N watched_p99_ns N
 * SIGTERM ends it. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t go, stop;
static void on_usr1(int s) { (void)s; go = 1; }
static void on_term(int s) { (void)s; stop = 1; }

static long long now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int by_value(const void *a, const void *b)
{
	long long x = *(const long long *)a, y = *(const long long *)b;
	return (x > y) - (x < y);
}

static void timed(int fd, int pread_it, long long *samples, int count, long long *p50, long long *p99)
{
	char buf[8];
	for (int i = 0; i < count; i++) {
		long long t = now_ns();
		if (pread_it) {
			if (pread(fd, buf, sizeof buf, (i % 512) * 8) != sizeof buf)
				exit(3);
		} else if (fcntl(fd, F_GETFL) < 0) {
			exit(3);
		}
		samples[i] = now_ns() - t;
	}
	qsort(samples, count, sizeof *samples, by_value);
	*p50 = samples[count / 2];
	*p99 = samples[count * 99 / 100];
}

int main(int argc, char **argv)
{
	if (argc < 3)
		return 2;
	int count = atoi(argv[1]);
	char local_path[4096], gone_path[4096];
	snprintf(local_path, sizeof local_path, "%s/local", argv[2]);
	snprintf(gone_path, sizeof gone_path, "%s/gone", argv[2]);
	int local = open(local_path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	int gone = open(gone_path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	char page[4096];
	memset(page, 'x', sizeof page);
	if (local < 0 || gone < 0 || write(local, page, sizeof page) != sizeof page ||
	    write(gone, page, sizeof page) != sizeof page || unlink(gone_path) != 0)
		return 3;
	long long *samples = malloc(sizeof *samples * count);
	signal(SIGUSR1, on_usr1);
	signal(SIGTERM, on_term);
	printf("ready\n");
	fflush(stdout);
	while (!stop) {
		pause();
		if (!go)
			continue;
		go = 0;
		long long l50, l99, f50, f99, w50, w99;
		timed(local, 1, samples, count, &l50, &l99);
		timed(gone, 1, samples, count, &f50, &f99);
		timed(local, 0, samples, count, &w50, &w99);
		printf("local_p50_ns %lld local_p99_ns %lld forwarded_p50_ns %lld forwarded_p99_ns %lld "
		       "watched_p50_ns %lld watched_p99_ns %lld\n",
		       l50, l99, f50, f99, w50, w99);
		fflush(stdout);
	}
	return 0;
}
