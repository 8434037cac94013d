/* Regular files: offsets, O_APPEND, O_NONBLOCK, O_NOATIME, close-on-exec,
 * a read-only and a write-only descriptor of one file, data written before
 * the wait and read after it.
 *
 *   cr_files DIR */
#include "cr.h"
#include <sys/stat.h>

static int open_in(const char *dir, const char *name, int flags)
{
	char path[4096];
	snprintf(path, sizeof path, "%s/%s", dir, name);
	return open(path, flags, 0644);
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	const char *dir = argv[1];
	int log = open_in(dir, "log", O_CREAT | O_WRONLY | O_APPEND | O_TRUNC);
	CHECK(log >= 0, "open log");
	CHECK(write(log, "one\n", 4) == 4, "write log");
	/* Appending ignores the offset: set it back, it must not matter. */
	lseek(log, 0, SEEK_SET);

	int data = open_in(dir, "data", O_CREAT | O_RDWR | O_TRUNC);
	CHECK(data >= 0, "open data");
	char block[10000];
	for (size_t i = 0; i < sizeof block; i++)
		block[i] = (char)(i * 7);
	CHECK(write(data, block, sizeof block) == sizeof block, "write data");
	CHECK(lseek(data, 1234, SEEK_SET) == 1234, "lseek data");

	int reader = open_in(dir, "data", O_RDONLY | O_NONBLOCK | O_NOATIME | O_CLOEXEC);
	CHECK(reader >= 0, "open data again");
	char first[100];
	CHECK(read(reader, first, sizeof first) == sizeof first, "read data");

	int writer = open_in(dir, "data", O_WRONLY);
	CHECK(writer >= 0, "open data write-only");
	CHECK(lseek(writer, 5000, SEEK_SET) == 5000, "lseek writer");

	cr_ready_and_wait();

	CHECK(write(log, "two\n", 4) == 4, "write log again");
	char text[16] = {0};
	int check = open_in(dir, "log", O_RDONLY);
	CHECK(read(check, text, sizeof text - 1) == 8 && strcmp(text, "one\ntwo\n") == 0,
	      "log holds %s", text);
	CHECK((fcntl(log, F_GETFL) & O_APPEND) != 0, "O_APPEND lost");

	CHECK(lseek(data, 0, SEEK_CUR) == 1234, "data offset");
	char got[10];
	CHECK(read(data, got, sizeof got) == sizeof got && memcmp(got, block + 1234, sizeof got) == 0,
	      "data read after the offset");

	CHECK(lseek(reader, 0, SEEK_CUR) == 100, "reader offset");
	int fl = fcntl(reader, F_GETFL);
	CHECK((fl & O_ACCMODE) == O_RDONLY, "reader access mode");
	CHECK((fl & O_NONBLOCK) != 0, "O_NONBLOCK lost");
	CHECK((fl & O_NOATIME) != 0, "O_NOATIME lost");
	CHECK((fcntl(reader, F_GETFD) & FD_CLOEXEC) != 0, "close-on-exec lost");
	CHECK((fcntl(data, F_GETFD) & FD_CLOEXEC) == 0, "close-on-exec gained");

	CHECK((fcntl(writer, F_GETFL) & O_ACCMODE) == O_WRONLY, "writer access mode");
	CHECK(lseek(writer, 0, SEEK_CUR) == 5000, "writer offset");
	CHECK(write(writer, "X", 1) == 1, "write through the writer");
	char x;
	CHECK(pread(reader, &x, 1, 5000) == 1 && x == 'X', "the writer's byte is in the file");
	return cr_report();
}
