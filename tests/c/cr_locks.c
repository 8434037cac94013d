/* fcntl record locks and flock locks, on a file and on a deleted file (as
 * PHP's opcache holds its lock file), held across the wait: a child that
 * stays where it was started checks that they exclude it, then takes them
 * once released and the process checks that they exclude it in turn.
 *
 *   cr_locks DIR */
#include "cr.h"
#include <sys/file.h>
#include <sys/wait.h>

static int set_lock(int fd, short type, int cmd)
{
	struct flock l = {.l_type = type, .l_whence = SEEK_SET, .l_start = 0, .l_len = 10};
	return fcntl(fd, cmd, &l);
}

static pid_t holder_of(int fd)
{
	struct flock l = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 10};
	if (fcntl(fd, F_GETLK, &l) != 0)
		return -1;
	return l.l_type == F_UNLCK ? 0 : l.l_pid;
}

/* The child: for each command byte, try every lock and answer a byte per
 * lock ('y' got it, 'n' refused). 'r' releases what it holds. */
static void child(int commands, int answers, int file, int deleted, const char *flock_path)
{
	int mine = open(flock_path, O_RDWR);
	char c;
	while (read(commands, &c, 1) == 1) {
		char out[3];
		if (c == 'r') {
			set_lock(file, F_UNLCK, F_SETLK);
			set_lock(deleted, F_UNLCK, F_SETLK);
			flock(mine, LOCK_UN);
			if (write(answers, "ok!", 3) != 3)
				_exit(3);
			continue;
		}
		out[0] = set_lock(file, F_WRLCK, F_SETLK) == 0 ? 'y' : 'n';
		out[1] = set_lock(deleted, F_WRLCK, F_SETLK) == 0 ? 'y' : 'n';
		out[2] = flock(mine, LOCK_EX | LOCK_NB) == 0 ? 'y' : 'n';
		if (write(answers, out, 3) != 3)
			_exit(3);
	}
	_exit(0);
}

static void ask(int commands, int answers, char c, char *out)
{
	memset(out, 0, 4);
	if (write(commands, &c, 1) != 1 || read(answers, out, 3) != 3)
		strcpy(out, "???");
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	char path[4096], gone[4096], flock_path[4096];
	snprintf(path, sizeof path, "%s/records", argv[1]);
	snprintf(gone, sizeof gone, "%s/opcache.lock", argv[1]);
	snprintf(flock_path, sizeof flock_path, "%s/whole", argv[1]);
	int file = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	int deleted = open(gone, O_RDWR | O_CREAT | O_TRUNC, 0600);
	int whole = open(flock_path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	CHECK(file >= 0 && deleted >= 0 && whole >= 0, "open");
	CHECK(unlink(gone) == 0, "unlink");
	int to_child[2], from_child[2];
	CHECK(pipe(to_child) == 0 && pipe(from_child) == 0, "pipe");
	pid_t pid = fork();
	if (pid == 0) {
		close(to_child[1]);
		close(from_child[0]);
		child(to_child[0], from_child[1], file, deleted, flock_path);
	}
	close(to_child[0]);
	close(from_child[1]);
	CHECK(set_lock(file, F_WRLCK, F_SETLK) == 0, "lock records");
	CHECK(set_lock(deleted, F_WRLCK, F_SETLK) == 0, "lock the deleted file");
	CHECK(flock(whole, LOCK_EX) == 0, "flock");

	cr_ready_and_wait();

	char got[4];
	/* Our own locks are no conflict for us. */
	CHECK(holder_of(file) == 0, "own lock reported as a conflict");
	ask(to_child[1], from_child[0], 't', got);
	CHECK(strcmp(got, "nnn") == 0, "the child got locks we hold: %s", got);
	CHECK(set_lock(file, F_UNLCK, F_SETLK) == 0 && set_lock(deleted, F_UNLCK, F_SETLK) == 0,
	      "unlock");
	CHECK(flock(whole, LOCK_UN) == 0, "funlock");
	ask(to_child[1], from_child[0], 't', got);
	CHECK(strcmp(got, "yyy") == 0, "the child did not get the released locks: %s", got);
	CHECK(set_lock(file, F_WRLCK, F_SETLK) < 0 && (errno == EAGAIN || errno == EACCES),
	      "we got a lock the child holds");
	CHECK(set_lock(deleted, F_WRLCK, F_SETLK) < 0, "we got the deleted file's lock");
	CHECK(holder_of(file) == pid, "holder %d, not the child %d", holder_of(file), pid);
	CHECK(flock(whole, LOCK_EX | LOCK_NB) < 0 && errno == EWOULDBLOCK, "flock while held");
	/* A wait for the lock, ended by the child's release. */
	ask(to_child[1], from_child[0], 'r', got);
	CHECK(set_lock(deleted, F_WRLCK, F_SETLKW) == 0, "wait for the lock");
	ask(to_child[1], from_child[0], 't', got);
	CHECK(got[1] == 'n', "the child got the lock we waited for: %s", got);
	close(to_child[1]);
	return cr_report();
}
