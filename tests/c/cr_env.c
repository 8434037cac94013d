/* What a process carries besides memory and descriptors: its current
 * directory, umask, resource limits, environment, arguments, priority and
 * its ignored and caught signals.
 *
 *   cr_env DIR */
#include "cr.h"
#include <sys/resource.h>
#include <sys/stat.h>

static volatile sig_atomic_t usr1_seen;

static void on_usr1(int sig)
{
	(void)sig;
	usr1_seen = 1;
}

/* /proc/self/cmdline (the arguments as the kernel shows them); its length. */
static long read_cmdline(char *buf)
{
	int fd = open("/proc/self/cmdline", O_RDONLY);
	if (fd < 0)
		return -1;
	long n = read(fd, buf, 4096);
	close(fd);
	return n;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	char cmdline[4096];
	long cmdline_len = read_cmdline(cmdline);
	CHECK(cmdline_len > 0, "read /proc/self/cmdline");
	char cwd[4096];
	CHECK(chdir(argv[1]) == 0, "chdir");
	CHECK(getcwd(cwd, sizeof cwd) != NULL, "getcwd");
	umask(0027);
	struct rlimit files = {.rlim_cur = 200, .rlim_max = 4000};
	CHECK(setrlimit(RLIMIT_NOFILE, &files) == 0, "setrlimit NOFILE");
	struct rlimit core = {.rlim_cur = 0, .rlim_max = 0};
	CHECK(setrlimit(RLIMIT_CORE, &core) == 0, "setrlimit CORE");
	CHECK(setenv("CR_ENV_SET", "before the move", 1) == 0, "setenv");
	CHECK(setpriority(PRIO_PROCESS, 0, 7) == 0, "setpriority");
	signal(SIGUSR2, SIG_IGN);
	signal(SIGUSR1, on_usr1);

	cr_ready_and_wait();

	char now[4096];
	CHECK(getcwd(now, sizeof now) && strcmp(now, cwd) == 0, "cwd is %s, not %s", now, cwd);
	mode_t mask = umask(0);
	umask(mask);
	CHECK(mask == 0027, "umask is %o", mask);
	struct rlimit got;
	CHECK(getrlimit(RLIMIT_NOFILE, &got) == 0 && got.rlim_cur == 200 && got.rlim_max == 4000,
	      "NOFILE is %lu/%lu", (unsigned long)got.rlim_cur, (unsigned long)got.rlim_max);
	CHECK(getrlimit(RLIMIT_CORE, &got) == 0 && got.rlim_cur == 0 && got.rlim_max == 0,
	      "CORE is %lu/%lu", (unsigned long)got.rlim_cur, (unsigned long)got.rlim_max);
	const char *value = getenv("CR_ENV_SET");
	CHECK(value && strcmp(value, "before the move") == 0, "environment lost");
	char cmdline_after[4096];
	CHECK(read_cmdline(cmdline_after) == cmdline_len &&
	          memcmp(cmdline_after, cmdline, cmdline_len) == 0,
	      "/proc/self/cmdline changed");
	errno = 0;
	CHECK(getpriority(PRIO_PROCESS, 0) == 7, "nice is %d", getpriority(PRIO_PROCESS, 0));
	raise(SIGUSR2);
	raise(SIGUSR1);
	CHECK(usr1_seen, "SIGUSR1 handler lost");
	FILE *f = fopen("made-after", "w");
	CHECK(f != NULL, "create a file");
	if (f) {
		fclose(f);
		struct stat st;
		CHECK(stat("made-after", &st) == 0 && (st.st_mode & 0777) == 0640,
		      "a new file has mode %o", st.st_mode & 0777);
	}
	return cr_report();
}
