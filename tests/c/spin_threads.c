/* Spins on the CPU until SIGTERM with a second thread asleep beside it (a
 * stay reason while threads cannot move); prints "spinning" first. */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static void *sleeper(void *arg)
{
	(void)arg;
	for (;;)
		pause();
	return NULL;
}

int main(void)
{
	pthread_t t;
	signal(SIGTERM, on_term);
	if (pthread_create(&t, NULL, sleeper, NULL) != 0)
		return 1;
	printf("spinning\n");
	fflush(stdout);
	while (!stop) {
	}
	return 0;
}
