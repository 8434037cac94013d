/* Descriptors that share one open file (dup, dup2 as a shell's 2>&1
 * makes, an inherited pair): after the wait they still share its offset
 * and flags, so writes through each never overwrite each other.
 *
 *   cr_dup DIR */
#include "cr.h"

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	char path[4096];
	snprintf(path, sizeof path, "%s/out", argv[1]);
	int out = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	int err = dup(out);
	int high = fcntl(out, F_DUPFD_CLOEXEC, 50);
	CHECK(out >= 0 && err >= 0 && high >= 50, "open and dup");
	CHECK(write(out, "one ", 4) == 4 && write(err, "two ", 4) == 4, "write before");

	cr_ready_and_wait();

	CHECK(lseek(err, 0, SEEK_CUR) == 8, "offset not shared: %ld", (long)lseek(err, 0, SEEK_CUR));
	CHECK(write(out, "three ", 6) == 6 && write(err, "four", 4) == 4, "write after");
	CHECK(lseek(high, 0, SEEK_CUR) == 18, "third descriptor's offset");
	CHECK((fcntl(high, F_GETFD) & FD_CLOEXEC) && !(fcntl(err, F_GETFD) & FD_CLOEXEC),
	      "close-on-exec per descriptor");
	CHECK(fcntl(out, F_SETFL, O_APPEND) == 0 && (fcntl(err, F_GETFL) & O_APPEND), "flags shared");
	char buf[32] = {0};
	CHECK(pread(out, buf, sizeof buf - 1, 0) == 18 && strcmp(buf, "one two three four") == 0,
	      "file holds \"%s\"", buf);
	return cr_report();
}
