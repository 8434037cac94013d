/* Open-file-description locks (F_OFD_SETLK) on a file: held across the
 * wait, they exclude a child that stays where it was started; released,
 * the child gets them.
 *
 *   cr_ofd_locks DIR */
#include "cr.h"

static int ofd(int fd, short type)
{
	struct flock l = {.l_type = type, .l_whence = SEEK_SET, .l_start = 0, .l_len = 100};
	return fcntl(fd, F_OFD_SETLK, &l);
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	char path[4096];
	snprintf(path, sizeof path, "%s/ofd", argv[1]);
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	CHECK(fd >= 0 && ofd(fd, F_WRLCK) == 0, "lock");
	int cmd[2], ans[2];
	CHECK(pipe(cmd) == 0 && pipe(ans) == 0, "pipes");
	pid_t pid = fork();
	if (pid == 0) {
		close(cmd[1]);
		close(ans[0]);
		int mine = open(path, O_RDWR);
		char c;
		while (read(cmd[0], &c, 1) == 1) {
			char r = ofd(mine, F_WRLCK) == 0 ? 'y' : 'n';
			if (r == 'y')
				ofd(mine, F_UNLCK);
			if (write(ans[1], &r, 1) != 1)
				_exit(3);
		}
		_exit(0);
	}
	close(cmd[0]);
	close(ans[1]);

	cr_ready_and_wait();

	char r = '?';
	CHECK(write(cmd[1], "t", 1) == 1 && read(ans[0], &r, 1) == 1 && r == 'n',
	      "the child got our lock: %c", r);
	CHECK(ofd(fd, F_UNLCK) == 0, "unlock");
	CHECK(write(cmd[1], "t", 1) == 1 && read(ans[0], &r, 1) == 1 && r == 'y',
	      "the child did not get the released lock: %c", r);
	close(cmd[1]);
	return cr_report();
}
