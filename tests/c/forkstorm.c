/* Many short-lived children that inherit a segment, attach it again, count
 * in it, post a semaphore and exit. At the end the counts are exact, only
 * the parent is attached, and everything is removed.
 *
 *   forkstorm N     prints "ok N" or what went wrong
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/ipc.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long n = argc > 1 ? strtol(argv[1], NULL, 0) : 100;
	int shm = shmget(IPC_PRIVATE, 4096, 0600);
	int sem = semget(IPC_PRIVATE, 1, 0600);
	if (shm == -1 || sem == -1) {
		perror("create");
		return 1;
	}
	long *count = shmat(shm, NULL, 0);
	if (count == (void *)-1) {
		perror("shmat");
		return 1;
	}
	long started = 0, failed = 0;
	while (started < n) {
		long batch = 0;
		for (; batch < 32 && started < n; batch++, started++) {
			pid_t pid = fork();
			if (pid == -1) {
				perror("fork");
				return 1;
			}
			if (pid == 0) {
				long *again = shmat(shm, NULL, 0);
				if (again == (void *)-1)
					_exit(2);
				__atomic_fetch_add(again, 1, __ATOMIC_SEQ_CST);
				struct sembuf v = {0, 1, 0};
				if (semop(sem, &v, 1) == -1)
					_exit(3);
				shmdt(again);
				_exit(0);
			}
		}
		for (; batch > 0; batch--) {
			int status;
			if (wait(&status) == -1 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
				failed++;
		}
	}
	struct shmid_ds ds;
	shmctl(shm, IPC_STAT, &ds);
	long value = semctl(sem, 0, GETVAL);
	printf("children failed %ld, count %ld, semaphore %ld, nattch %ld\n", failed, *count,
	       value, (long)ds.shm_nattch);
	int good = failed == 0 && *count == n && value == n && ds.shm_nattch == 1;
	shmctl(shm, IPC_RMID, NULL);
	semctl(sem, 0, IPC_RMID);
	shmdt(count);
	if (good)
		printf("ok %ld\n", n);
	return 0;
}
