/* A program that closes every descriptor it did not open itself (as some
 * daemons do), then reuses the numbers: its semaphore calls still work,
 * and nothing is ever written into the files it opened since.
 *
 *   closefrom     prints what it saw
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/sem.h>
#include <sys/stat.h>
#include <unistd.h>

int main(void)
{
	int sem = semget(IPC_PRIVATE, 1, 0600);
	struct sembuf v = {0, 1, 0}, p = {0, -1, 0};
	printf("first V: %s\n", semop(sem, &v, 1) == 0 ? "ok" : strerror(errno));
	for (int fd = 3; fd < 1024; fd++)
		close(fd);
	/* New files take the numbers the library's descriptors had. */
	int files[8];
	for (int i = 0; i < 8; i++) {
		char name[] = "/tmp/migshm-closefrom-XXXXXX";
		files[i] = mkstemp(name);
		unlink(name);
	}
	printf("P after closing: %s\n", semop(sem, &p, 1) == 0 ? "ok" : strerror(errno));
	printf("V after closing: %s\n", semop(sem, &v, 1) == 0 ? "ok" : strerror(errno));
	printf("GETVAL: %d\n", semctl(sem, 0, GETVAL));
	long written = 0;
	for (int i = 0; i < 8; i++) {
		struct stat st;
		if (fstat(files[i], &st) == 0)
			written += st.st_size;
	}
	printf("bytes written into the program's files: %ld\n", written);
	semctl(sem, 0, IPC_RMID);
	return 0;
}
