/* kernel.shm_next_id and sem_next_id: the next object created takes the
 * id written there, once; a taken id is ENOSPC. The ids used (0x01000123,
 * 0x02000456) are valid on Linux and name nodes 1 and 2 of a cluster.
 * Changes the sysctls of the IPC namespace it runs in. (The value read
 * back after a creation is not printed: the kernel makes it -1, which
 * user space cannot write; under omrun it reads 2147483647.)
 *
 *   sysv_next_id */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/sem.h>
#include <sys/shm.h>

static void put(const char *name, int value) {
    char path[64];
    snprintf(path, sizeof path, "/proc/sys/kernel/%s", name);
    FILE *f = fopen(path, "w");
    if (!f || fprintf(f, "%d\n", value) < 0 || fclose(f) != 0)
        printf("cannot write %s\n", name);
}

static void check(const char *what, int id, int want) {
    if (id < 0)
        printf("%-36s -1 %s\n", what, strerrorname_np(errno));
    else
        printf("%-36s %s\n", what, id == want ? "the id asked for" : "another id");
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    put("shm_next_id", 0x01000123);
    int a = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
    check("shmget after shm_next_id", a, 0x01000123);
    int b = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
    check("shmget without", b, 0x01000123);
    put("shm_next_id", 0x01000123);
    check("shmget of a taken id", shmget(0x5e500001, 4096, IPC_CREAT | 0600), 0x01000123);
    put("shm_next_id", 0x02000456);
    int c = shmget(0x5e500002, 4096, IPC_CREAT | 0600);
    check("shmget with a key", c, 0x02000456);
    check("shmget of that key", shmget(0x5e500002, 0, 0), 0x02000456);
    put("sem_next_id", 0x02000456);
    int s = semget(IPC_PRIVATE, 2, IPC_CREAT | 0600);
    check("semget after sem_next_id", s, 0x02000456);
    put("sem_next_id", 0x01000777);
    int t = semget(0x5e500003, 1, IPC_CREAT | 0600);
    check("semget with a key", t, 0x01000777);
    struct sembuf up = {0, 1, 0};
    printf("%-36s %s\n", "semop on it", semop(t, &up, 1) == 0 ? "ok" : strerrorname_np(errno));
    printf("%-36s %d\n", "GETVAL", semctl(t, 0, GETVAL));
    shmctl(a, IPC_RMID, NULL);
    shmctl(b, IPC_RMID, NULL);
    shmctl(c, IPC_RMID, NULL);
    semctl(s, 0, IPC_RMID);
    semctl(t, 0, IPC_RMID);
    return 0;
}
