/* A child that stays where it was started sends 1 MiB over a socketpair,
 * part of it queued before the wait: all of it arrives, in order.
 *
 *   cr_socket_big DIR */
#include "cr.h"
#include <sys/socket.h>

#define TOTAL (1 << 20)

int main(void)
{
	int sv[2];
	CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0, "socketpair");
	pid_t pid = fork();
	if (pid == 0) {
		close(sv[0]);
		char block[4096];
		for (int sent = 0; sent < TOTAL; sent += (int)sizeof block) {
			for (int i = 0; i < (int)sizeof block; i++)
				block[i] = (char)((sent + i) % 251);
			if (write(sv[1], block, sizeof block) != sizeof block)
				_exit(3);
		}
		_exit(0);
	}
	close(sv[1]);
	usleep(100000);

	cr_ready_and_wait();

	char *got = malloc(TOTAL);
	int have = 0;
	ssize_t n;
	while (have < TOTAL && (n = read(sv[0], got + have, TOTAL - have)) > 0)
		have += (int)n;
	int wrong = 0;
	for (int i = 0; i < have; i++)
		wrong += got[i] != (char)(i % 251);
	CHECK(have == TOTAL && wrong == 0, "%d bytes, %d wrong", have, wrong);
	return cr_report();
}
