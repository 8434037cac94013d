/* Directories: a DIR stream read part way, a directory descriptor whose
 * getdents offset is part way, an O_PATH descriptor of it, and the current
 * directory. After the wait each goes on where it was.
 *
 *   cr_dir DIR      (a fresh directory of its own) */
#include "cr.h"
#include <dirent.h>
#include <sys/stat.h>
#include <sys/syscall.h>

#define ENTRIES 40

struct linux_dirent64 {
	unsigned long long d_ino;
	long long d_off;
	unsigned short d_reclen;
	unsigned char d_type;
	char d_name[];
};

/* Names seen, by index e00..e39 (".", ".." ignored). */
static void note(int *seen, const char *name)
{
	if (name[0] == 'e' && strlen(name) == 3)
		seen[atoi(name + 1)]++;
}

/* Read up to `batch` bytes of entries from `fd`; returns bytes read. */
static long read_entries(int fd, int *seen, size_t batch)
{
	char buf[8192];
	long n = syscall(SYS_getdents64, fd, buf, batch < sizeof buf ? batch : sizeof buf);
	for (long at = 0; at < n;) {
		struct linux_dirent64 *d = (struct linux_dirent64 *)(buf + at);
		note(seen, d->d_name);
		at += d->d_reclen;
	}
	return n;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	char path[4096];
	snprintf(path, sizeof path, "%s/entries", argv[1]);
	if (mkdir(path, 0755) != 0 && errno != EEXIST)
		return 2;
	for (int i = 0; i < ENTRIES; i++) {
		char name[4200];
		snprintf(name, sizeof name, "%s/e%02d", path, i);
		int fd = open(name, O_CREAT | O_WRONLY, 0644);
		if (fd < 0)
			return 2;
		close(fd);
	}
	int stream_seen[ENTRIES] = {0}, raw_seen[ENTRIES] = {0};
	DIR *stream = opendir(path);
	CHECK(stream != NULL, "opendir");
	for (int i = 0; i < 10 && stream; i++) {
		struct dirent *e = readdir(stream);
		if (e)
			note(stream_seen, e->d_name);
	}
	int raw = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	CHECK(raw >= 0, "open O_DIRECTORY");
	/* A small buffer: a few entries only, so the offset is part way. */
	long first = read_entries(raw, raw_seen, 200);
	CHECK(first > 0, "getdents64");
	off_t raw_offset = lseek(raw, 0, SEEK_CUR);
	int opath = open(path, O_PATH | O_DIRECTORY);
	CHECK(opath >= 0, "open O_PATH");
	CHECK(chdir(path) == 0, "chdir");

	cr_ready_and_wait();

	CHECK(lseek(raw, 0, SEEK_CUR) == raw_offset, "the getdents offset moved");
	CHECK((fcntl(raw, F_GETFD) & FD_CLOEXEC) != 0, "close-on-exec lost");
	while (read_entries(raw, raw_seen, 8192) > 0)
		;
	struct dirent *e;
	while (stream && (e = readdir(stream)) != NULL)
		note(stream_seen, e->d_name);
	for (int i = 0; i < ENTRIES; i++) {
		CHECK(stream_seen[i] == 1, "DIR stream: e%02d seen %d times", i, stream_seen[i]);
		CHECK(raw_seen[i] == 1, "getdents: e%02d seen %d times", i, raw_seen[i]);
	}
	CHECK((fcntl(opath, F_GETFL) & O_PATH) != 0, "O_PATH lost");
	struct stat st;
	CHECK(fstatat(opath, "e07", &st, 0) == 0, "fstatat through the O_PATH descriptor");
	int inner = openat(raw, "e05", O_RDONLY);
	CHECK(inner >= 0, "openat through the directory descriptor");
	int here = open("e09", O_RDONLY);
	CHECK(here >= 0, "open relative to the current directory");
	char cwd[4096];
	CHECK(getcwd(cwd, sizeof cwd) && strcmp(cwd, path) == 0, "cwd is %s", cwd);
	return cr_report();
}
