/* Files unlinked while open: written before the wait and read after, at
 * their offsets, appended to, truncated, with fstat showing them gone.
 *
 *   cr_deleted DIR */
#include "cr.h"
#include <sys/stat.h>
#include <sys/uio.h>

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	char path[4096], log[4096];
	snprintf(path, sizeof path, "%s/gone", argv[1]);
	snprintf(log, sizeof log, "%s/log", argv[1]);
	int f = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	int a = open(log, O_WRONLY | O_APPEND | O_CREAT | O_TRUNC, 0600);
	int r = open(log, O_RDONLY);
	CHECK(f >= 0 && a >= 0 && r >= 0, "open");
	CHECK(write(f, "hello world", 11) == 11, "write");
	CHECK(write(a, "a", 1) == 1, "append");
	CHECK(unlink(path) == 0 && unlink(log) == 0, "unlink");
	CHECK(lseek(f, 6, SEEK_SET) == 6, "lseek");

	cr_ready_and_wait();

	struct stat st;
	CHECK(fstat(f, &st) == 0 && st.st_nlink == 0 && st.st_size == 11, "fstat");
	char buf[16] = {0};
	CHECK(read(f, buf, 5) == 5 && memcmp(buf, "world", 5) == 0, "read at the offset");
	CHECK(lseek(f, 0, SEEK_CUR) == 11, "offset after read");
	CHECK(pwrite(f, "HELLO", 5, 0) == 5, "pwrite");
	memset(buf, 0, sizeof buf);
	CHECK(pread(f, buf, 11, 0) == 11 && strcmp(buf, "HELLO world") == 0, "pread %s", buf);
	struct iovec iov[2] = {{.iov_base = "ab", .iov_len = 2}, {.iov_base = "cd", .iov_len = 2}};
	CHECK(writev(f, iov, 2) == 4, "writev");
	char x[2], y[2];
	struct iovec in[2] = {{.iov_base = x, .iov_len = 2}, {.iov_base = y, .iov_len = 2}};
	CHECK(preadv(f, in, 2, 11) == 4 && memcmp(x, "ab", 2) == 0 && memcmp(y, "cd", 2) == 0,
	      "preadv");
	CHECK(ftruncate(f, 5) == 0 && fstat(f, &st) == 0 && st.st_size == 5, "ftruncate");
	CHECK(lseek(f, 0, SEEK_END) == 5, "seek to the end");
	CHECK(fsync(f) == 0 && fdatasync(f) == 0, "fsync");
	CHECK((fcntl(f, F_GETFL) & O_ACCMODE) == O_RDWR, "access mode");

	CHECK(write(a, "b", 1) == 1, "append again");
	memset(buf, 0, sizeof buf);
	CHECK(pread(r, buf, sizeof buf, 0) == 2 && strcmp(buf, "ab") == 0, "appended %s", buf);
	CHECK(write(r, "x", 1) < 0 && errno == EBADF, "write to a read-only descriptor");
	CHECK(close(r) == 0, "close");
	CHECK(read(r, buf, 1) < 0 && errno == EBADF, "read after close");
	return cr_report();
}
