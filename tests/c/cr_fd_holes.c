/* Descriptors at high numbers with holes between them: the same numbers
 * are open after the wait, and the holes are still free.
 *
 *   cr_fd_holes DIR */
#include "cr.h"

int main(void)
{
	int nums[] = {20, 77, 500, 1000};
	for (unsigned i = 0; i < sizeof nums / sizeof *nums; i++)
		CHECK(dup2(1, nums[i]) == nums[i], "dup2 %d", nums[i]);
	int low = open("/dev/null", O_RDONLY);
	CHECK(low >= 0, "open");

	cr_ready_and_wait();

	for (unsigned i = 0; i < sizeof nums / sizeof *nums; i++)
		CHECK(fcntl(nums[i], F_GETFD) >= 0, "fd %d gone", nums[i]);
	CHECK(fcntl(low, F_GETFD) >= 0, "fd %d gone", low);
	CHECK(fcntl(21, F_GETFD) < 0 && errno == EBADF, "fd 21 open");
	CHECK(fcntl(999, F_GETFD) < 0 && errno == EBADF, "fd 999 open");
	int next = open("/dev/null", O_RDONLY);
	CHECK(next == low + 1, "the lowest free number is %d, not %d", next, low + 1);
	return cr_report();
}
