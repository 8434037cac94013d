/* What /proc shows of the process about itself: its command line, its
 * environment and its name (prctl PR_SET_NAME), after the wait as before.
 *
 *   cr_cmdline DIR */
#include "cr.h"
#include <sys/prctl.h>

static size_t slurp(const char *path, char *buf, size_t len)
{
	int fd = open(path, O_RDONLY);
	ssize_t n = fd < 0 ? -1 : read(fd, buf, len);
	if (fd >= 0)
		close(fd);
	return n < 0 ? 0 : (size_t)n;
}

int main(int argc, char **argv)
{
	(void)argc;
	setenv("CR_MARK", "moved-env", 1);
	CHECK(prctl(PR_SET_NAME, "cr-named") == 0, "set name");
	char cmd_before[4096], cmd_after[4096], comm[32] = {0};
	size_t before = slurp("/proc/self/cmdline", cmd_before, sizeof cmd_before);
	CHECK(before > 0 && strcmp(cmd_before, argv[0]) == 0, "cmdline before");

	cr_ready_and_wait();

	size_t after = slurp("/proc/self/cmdline", cmd_after, sizeof cmd_after);
	CHECK(after == before && memcmp(cmd_before, cmd_after, before) == 0, "cmdline changed");
	CHECK(slurp("/proc/self/comm", comm, sizeof comm - 1) > 0 && strcmp(comm, "cr-named\n") == 0,
	      "comm %s", comm);
	char name[32] = {0};
	CHECK(prctl(PR_GET_NAME, name) == 0 && strcmp(name, "cr-named") == 0, "name %s", name);
	CHECK(getenv("CR_MARK") && strcmp(getenv("CR_MARK"), "moved-env") == 0, "environment");
	return cr_report();
}
