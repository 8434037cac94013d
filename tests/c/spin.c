/* Spins on the CPU until SIGTERM; prints "spinning" first. */
#include <signal.h>
#include <stdio.h>

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

int main(void)
{
	signal(SIGTERM, on_term);
	printf("spinning\n");
	fflush(stdout);
	while (!stop) {
	}
	return 0;
}
