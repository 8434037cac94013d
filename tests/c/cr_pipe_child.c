/* A pipe from a child that stays where it was started: it writes before
 * and after the wait; every line arrives, in order, then end of file.
 *
 *   cr_pipe_child DIR */
#include "cr.h"

int main(void)
{
	int p[2];
	CHECK(pipe(p) == 0, "pipe");
	pid_t pid = fork();
	if (pid == 0) {
		close(p[0]);
		for (int i = 0; i < 20; i++) {
			char line[16];
			int n = snprintf(line, sizeof line, "%02d\n", i);
			if (write(p[1], line, n) != n)
				_exit(3);
			usleep(20000);
		}
		_exit(0);
	}
	close(p[1]);
	usleep(50000);

	cr_ready_and_wait();

	char all[128] = {0};
	size_t have = 0;
	ssize_t n;
	while ((n = read(p[0], all + have, sizeof all - 1 - have)) > 0)
		have += (size_t)n;
	CHECK(n == 0, "end of file");
	char want[128] = {0};
	for (int i = 0; i < 20; i++)
		snprintf(want + 3 * i, 4, "%02d\n", i);
	CHECK(have == 60 && strcmp(all, want) == 0, "read %zu bytes", have);
	return cr_report();
}
