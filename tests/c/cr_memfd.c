/* A memfd and an O_TMPFILE file (open, never mapped, no name): written
 * before the wait, read after it at their offsets, sealed as they were.
 *
 *   cr_memfd DIR */
#include "cr.h"
#include <sys/mman.h>

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	int m = memfd_create("cr-memfd", MFD_ALLOW_SEALING);
	int t = open(argv[1], O_TMPFILE | O_RDWR, 0600);
	CHECK(m >= 0 && t >= 0, "memfd_create, O_TMPFILE");
	CHECK(write(m, "memory file", 11) == 11 && write(t, "nameless", 8) == 8, "write");
	CHECK(fcntl(m, F_ADD_SEALS, F_SEAL_SHRINK) == 0, "seal");

	cr_ready_and_wait();

	char buf[16] = {0};
	CHECK(pread(m, buf, 11, 0) == 11 && strcmp(buf, "memory file") == 0, "memfd: %s", buf);
	CHECK(lseek(m, 0, SEEK_CUR) == 11 && lseek(t, 0, SEEK_CUR) == 8, "offsets");
	memset(buf, 0, sizeof buf);
	CHECK(pread(t, buf, 8, 0) == 8 && strcmp(buf, "nameless") == 0, "tmpfile: %s", buf);
	CHECK(fcntl(m, F_GET_SEALS) == F_SEAL_SHRINK, "seals %d", fcntl(m, F_GET_SEALS));
	CHECK(ftruncate(m, 1) < 0 && errno == EPERM, "a shrink past the seal");
	return cr_report();
}
