/* Attaches a segment, then closes every descriptor it did not open (as
 * some daemons do), then waits for another process, on another node, to
 * write word 512 (page 1): its memory must stay coherent. Then, told on
 * stdin that the writer is gone, it attaches again and counts attachments.
 *
 *   closefrom_shm KEY     prints the value it saw, or "timeout"
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/ipc.h>
#include <sys/shm.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	key_t key = (key_t)strtol(argv[1], NULL, 0);
	int id = shmget(key, 256 * 4096, IPC_CREAT | 0666);
	volatile unsigned long *w = shmat(id, NULL, 0);
	if (w == (void *)-1)
		return 1;
	w[0] = 1;
	unsigned long seen = w[512];
	for (int fd = 3; fd < 1024; fd++)
		close(fd);
	printf("closed %lu\n", seen);
	fflush(stdout);
	for (int i = 0; i < 10000; i++) {
		if (w[512] != 0) {
			printf("saw %lu\n", w[512]);
			break;
		}
		usleep(1000);
	}
	if (w[512] == 0)
		printf("timeout\n");
	fflush(stdout);
	/* A line on stdin says the writer is gone (detached, exited): only
	 * then does the count below mean the same as natively. */
	char line[16];
	if (!fgets(line, sizeof line, stdin))
		return 3;
	/* Segment calls work again (the library reconnects). */
	volatile unsigned long *again = shmat(id, NULL, SHM_RDONLY);
	printf("second shmat: %s\n", again == (void *)-1 ? "failed" : "ok");
	if (again != (void *)-1)
		printf("second mapping sees %lu\n", again[512]);
	struct shmid_ds ds;
	int stat = shmctl(id, IPC_STAT, &ds);
	printf("IPC_STAT: %s, nattch %lu\n", stat == 0 ? "ok" : "failed",
	       stat == 0 ? (unsigned long)ds.shm_nattch : 0UL);
	shmctl(id, IPC_RMID, NULL);
	return 0;
}
