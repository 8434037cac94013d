/* An eventfd shared with a child that stays where it was started: each
 * side's writes are read by the other, before and after the wait.
 *
 *   cr_eventfd_child DIR */
#include "cr.h"
#include <stdint.h>
#include <sys/eventfd.h>

int main(void)
{
	int to_child = eventfd(0, 0), to_parent = eventfd(0, 0);
	CHECK(to_child >= 0 && to_parent >= 0, "eventfd");
	pid_t pid = fork();
	if (pid == 0) {
		uint64_t v;
		/* Answer every value with value + 1, until 0. */
		while (read(to_child, &v, sizeof v) == sizeof v) {
			v += 1;
			if (write(to_parent, &v, sizeof v) != sizeof v)
				_exit(3);
			if (v > 100)
				_exit(0);
		}
		_exit(4);
	}
	uint64_t v = 10;
	CHECK(write(to_child, &v, sizeof v) == sizeof v && read(to_parent, &v, sizeof v) == sizeof v &&
		      v == 11,
	      "before: %llu", (unsigned long long)v);

	cr_ready_and_wait();

	for (uint64_t i = 20; i < 25; i++) {
		v = i;
		CHECK(write(to_child, &v, sizeof v) == sizeof v, "write %llu", (unsigned long long)i);
		CHECK(read(to_parent, &v, sizeof v) == sizeof v && v == i + 1, "answer %llu",
		      (unsigned long long)v);
	}
	v = 200;
	CHECK(write(to_child, &v, sizeof v) == sizeof v, "last");
	return cr_report();
}
