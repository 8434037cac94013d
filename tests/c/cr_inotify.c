/* inotify: a watch set before the wait reports what happens after it; a
 * watch added after it by a relative path works too.
 *
 *   cr_inotify DIR */
#include "cr.h"
#include <poll.h>
#include <sys/inotify.h>
#include <sys/stat.h>

static int event_named(int in, const char *name, uint32_t mask)
{
	char buf[4096] __attribute__((aligned(8)));
	struct pollfd p = {.fd = in, .events = POLLIN};
	if (poll(&p, 1, 2000) != 1)
		return 0;
	ssize_t n = read(in, buf, sizeof buf);
	for (char *at = buf; n > 0 && at < buf + n;) {
		struct inotify_event *e = (struct inotify_event *)at;
		if ((e->mask & mask) && e->len && strcmp(e->name, name) == 0)
			return 1;
		at += sizeof *e + e->len;
	}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	int in = inotify_init1(IN_NONBLOCK);
	CHECK(in >= 0, "inotify_init1");
	CHECK(inotify_add_watch(in, argv[1], IN_CREATE) >= 0, "add_watch");
	CHECK(chdir(argv[1]) == 0, "chdir");
	CHECK(mkdir("sub", 0700) == 0, "mkdir");
	CHECK(event_named(in, "sub", IN_CREATE), "mkdir before the wait");

	cr_ready_and_wait();

	int f = open("new", O_CREAT | O_WRONLY, 0600);
	CHECK(f >= 0, "create");
	close(f);
	CHECK(event_named(in, "new", IN_CREATE), "create after the wait");
	int wd = inotify_add_watch(in, "sub", IN_CREATE);
	CHECK(wd >= 0, "add_watch by a relative path");
	f = open("sub/deeper", O_CREAT | O_WRONLY, 0600);
	close(f);
	CHECK(event_named(in, "deeper", IN_CREATE), "event of the new watch");
	CHECK(inotify_rm_watch(in, wd) == 0, "rm_watch");
	char buf[64];
	CHECK(read(in, buf, sizeof buf) > 0 || errno == EAGAIN, "read after rm_watch");
	return cr_report();
}
