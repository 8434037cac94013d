/* After the wait the process starts a child, which sees its memory and
 * files, and waits for it.
 *
 *   cr_fork_after DIR */
#include "cr.h"
#include <sys/wait.h>

static int value = 1;

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	char path[4096];
	snprintf(path, sizeof path, "%s/shared", argv[1]);
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	CHECK(fd >= 0, "open");
	value = 41;

	cr_ready_and_wait();

	pid_t pid = fork();
	if (pid == 0)
		_exit(value == 41 && write(fd, "child", 5) == 5 ? 7 : 1);
	int status = 0;
	CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 7,
	      "child status %x", status);
	CHECK(lseek(fd, 0, SEEK_CUR) == 5, "the child's write moved the shared offset");
	return cr_report();
}
