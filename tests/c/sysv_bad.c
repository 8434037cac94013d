/* Wrong ids, bad pointers and bad arguments to the SysV calls: prints the
 * errno of each, which must be the same natively and under omrun.
 *
 *   sysv_bad KEY
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <time.h>

static void show(const char *what, long r)
{
	if (r == -1)
		printf("%-44s errno %s\n", what, strerrorname_np(errno));
	else
		printf("%-44s ok\n", what);
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	key_t key = (key_t)strtol(argv[1], NULL, 0);
	struct shmid_ds ds;
	struct sembuf op = {0, 1, 0};
	int shm = shmget(key, 4096, IPC_CREAT | IPC_EXCL | 0600);
	int sem = semget(key, 2, IPC_CREAT | IPC_EXCL | 0600);
	show("create", shm == -1 || sem == -1 ? -1 : 0);

	show("shmat id -1", shmat(-1, NULL, 0) == (void *)-1 ? -1 : 0);
	show("shmat an id never issued", shmat(0x7ffffff0, NULL, 0) == (void *)-1 ? -1 : 0);
	show("shmdt an address never attached", shmdt((void *)0x10000));
	show("shmdt NULL", shmdt(NULL));
	show("shmctl IPC_STAT, NULL buffer", shmctl(shm, IPC_STAT, NULL));
	show("shmctl IPC_STAT, bad id, NULL buffer", shmctl(-5, IPC_STAT, NULL));
	show("shmctl IPC_SET, NULL buffer", shmctl(shm, IPC_SET, NULL));
	show("shmctl unknown command", shmctl(shm, 9999, &ds));
	show("shmctl IPC_RMID, id -1", shmctl(-1, IPC_RMID, NULL));
	show("shmget IPC_PRIVATE, 1 << 60 bytes", shmget(IPC_PRIVATE, 1UL << 60, 0600));

	show("semget nsems -1", semget(IPC_PRIVATE, -1, 0600));
	show("semget nsems 1000000", semget(IPC_PRIVATE, 1000000, 0600));
	show("semop NULL array", semop(sem, NULL, 1));
	show("semop 0 operations", semop(sem, &op, 0));
	show("semop 100000 operations", semop(sem, &op, 100000));
	show("semop id -1", semop(-1, &op, 1));
	struct timespec bad = {0, 2000000000L};
	show("semtimedop tv_nsec 2e9", semtimedop(sem, &op, 1, &bad));
	struct timespec neg = {-1, 0};
	show("semtimedop tv_sec -1", semtimedop(sem, &op, 1, &neg));
	show("semctl unknown command", semctl(sem, 0, 9999));
	show("semctl GETVAL semnum 2", semctl(sem, 2, GETVAL));
	show("semctl GETVAL semnum -1", semctl(sem, -1, GETVAL));
	show("semctl GETALL, NULL array", semctl(sem, 0, GETALL, NULL));
	show("semctl IPC_STAT, NULL buffer", semctl(sem, 0, IPC_STAT, NULL));
	show("semctl IPC_STAT, bad id, NULL buffer", semctl(-7, 0, IPC_STAT, NULL));
	show("semctl IPC_SET, NULL buffer", semctl(sem, 0, IPC_SET, NULL));
	show("semctl GETVAL id never issued", semctl(0x7ffffff0, 0, GETVAL));

	show("remove segment", shmctl(shm, IPC_RMID, NULL));
	show("remove set", semctl(sem, 0, IPC_RMID));
	show("remove set again", semctl(sem, 0, IPC_RMID));
	return 0;
}
