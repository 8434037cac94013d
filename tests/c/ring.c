/* A producer/consumer ring buffer in a SysV segment, guarded by a SysV
 * semaphore set (empty slots, full slots, a mutex), as a C program would
 * write it. Run under omrun with producers and a consumer on different
 * nodes, the consumer's sum must be exact.
 *
 *   ring init KEY              create the segment and the set
 *   ring produce KEY ID COUNT  put COUNT items ID*1000000+i
 *   ring consume KEY COUNT     take COUNT items; print their sum
 *   ring remove KEY            remove the segment and the set
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/sem.h>
#include <sys/shm.h>

#define SLOTS 16
enum { EMPTY, FULL, MUTEX };

struct ring {
	long head, tail;
	long slot[SLOTS];
};

union semun {
	int val;
	unsigned short *array;
};

static void die(const char *what)
{
	fprintf(stderr, "ring: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void op(int sems, int num, int delta)
{
	struct sembuf b = {(unsigned short)num, (short)delta, SEM_UNDO};
	/* The undo keeps the mutex released if this process dies holding it;
	 * the counting semaphores would be wrong to undo, so not for them. */
	if (num != MUTEX)
		b.sem_flg = 0;
	while (semop(sems, &b, 1) == -1)
		if (errno != EINTR)
			die("semop");
}

int main(int argc, char **argv)
{
	if (argc < 3)
		return 2;
	key_t key = (key_t)strtol(argv[2], NULL, 0);
	const char *mode = argv[1];
	if (!strcmp(mode, "init")) {
		int shm = shmget(key, sizeof(struct ring), IPC_CREAT | IPC_EXCL | 0600);
		int sems = semget(key, 3, IPC_CREAT | IPC_EXCL | 0600);
		if (shm == -1 || sems == -1)
			die("create");
		unsigned short init[3] = {SLOTS, 0, 1};
		union semun arg = {.array = init};
		if (semctl(sems, 0, SETALL, arg) == -1)
			die("SETALL");
		return 0;
	}
	int shm = shmget(key, 0, 0);
	int sems = semget(key, 0, 0);
	if (shm == -1 || sems == -1)
		die("lookup");
	if (!strcmp(mode, "remove")) {
		shmctl(shm, IPC_RMID, NULL);
		semctl(sems, 0, IPC_RMID);
		return 0;
	}
	struct ring *r = shmat(shm, NULL, 0);
	if (r == (void *)-1)
		die("shmat");
	if (!strcmp(mode, "produce") && argc == 5) {
		long id = strtol(argv[3], NULL, 0), count = strtol(argv[4], NULL, 0);
		for (long i = 0; i < count; i++) {
			op(sems, EMPTY, -1);
			op(sems, MUTEX, -1);
			r->slot[r->head % SLOTS] = id * 1000000 + i;
			r->head++;
			op(sems, MUTEX, 1);
			op(sems, FULL, 1);
		}
		return 0;
	}
	if (!strcmp(mode, "consume") && argc == 4) {
		long count = strtol(argv[3], NULL, 0), sum = 0;
		for (long i = 0; i < count; i++) {
			op(sems, FULL, -1);
			op(sems, MUTEX, -1);
			sum += r->slot[r->tail % SLOTS];
			r->tail++;
			op(sems, MUTEX, 1);
			op(sems, EMPTY, 1);
		}
		printf("%ld\n", sum);
		return 0;
	}
	return 2;
}
