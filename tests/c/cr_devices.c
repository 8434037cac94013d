/* Character devices: /dev/null, /dev/zero, /dev/urandom and /dev/full
 * open with their flags; after the wait each is the same device and
 * behaves as one.
 *
 *   cr_devices DIR */
#include "cr.h"
#include <sys/stat.h>
#include <sys/sysmacros.h>

struct device {
	const char *path;
	int flags;
	int fd;
	dev_t rdev;
};

int main(void)
{
	struct device devices[] = {
		{"/dev/null", O_WRONLY, -1, 0},
		{"/dev/zero", O_RDONLY | O_CLOEXEC, -1, 0},
		{"/dev/urandom", O_RDONLY | O_NONBLOCK, -1, 0},
		{"/dev/full", O_RDWR, -1, 0},
	};
	const int count = sizeof devices / sizeof devices[0];
	for (int i = 0; i < count; i++) {
		devices[i].fd = open(devices[i].path, devices[i].flags);
		CHECK(devices[i].fd >= 0, "open %s", devices[i].path);
		struct stat st;
		CHECK(fstat(devices[i].fd, &st) == 0, "fstat %s", devices[i].path);
		devices[i].rdev = st.st_rdev;
	}

	cr_ready_and_wait();

	for (int i = 0; i < count; i++) {
		struct device *d = &devices[i];
		struct stat st;
		CHECK(fstat(d->fd, &st) == 0 && S_ISCHR(st.st_mode) && st.st_rdev == d->rdev,
		      "%s is not the same device", d->path);
		int fl = fcntl(d->fd, F_GETFL);
		CHECK((fl & O_ACCMODE) == (d->flags & O_ACCMODE), "%s: access mode", d->path);
		CHECK((fl & O_NONBLOCK) == (d->flags & O_NONBLOCK), "%s: O_NONBLOCK", d->path);
		int cloexec = (fcntl(d->fd, F_GETFD) & FD_CLOEXEC) != 0;
		CHECK(cloexec == ((d->flags & O_CLOEXEC) != 0), "%s: close-on-exec", d->path);
	}
	char buf[64];
	memset(buf, 1, sizeof buf);
	CHECK(write(devices[0].fd, buf, sizeof buf) == sizeof buf, "write /dev/null");
	CHECK(read(devices[1].fd, buf, sizeof buf) == sizeof buf, "read /dev/zero");
	for (size_t i = 0; i < sizeof buf; i++)
		CHECK(buf[i] == 0, "/dev/zero gave %d at %zu", buf[i], i);
	CHECK(read(devices[2].fd, buf, 16) == 16, "read /dev/urandom");
	errno = 0;
	CHECK(write(devices[3].fd, buf, 1) < 0 && errno == ENOSPC, "/dev/full did not say ENOSPC");
	return cr_report();
}
