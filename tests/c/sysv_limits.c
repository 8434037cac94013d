/* The SysV limits changed at run time in /proc/sys/kernel (kernel.shmmax,
 * shmmni, shmall, sem) and the errors when they are reached. Changes the
 * limits of the IPC namespace it runs in (run it in one of its own) and
 * puts them back.
 *
 *   sysv_limits */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/sem.h>
#include <sys/shm.h>

static void show(const char *what, long r) {
    if (r < 0)
        printf("%-40s -1 %s\n", what, strerrorname_np(errno));
    else
        printf("%-40s ok\n", what);
}

static char saved[4][128];
static const char *names[4] = {"shmmax", "shmmni", "shmall", "sem"};

static void set(const char *name, const char *value) {
    char path[64];
    snprintf(path, sizeof path, "/proc/sys/kernel/%s", name);
    FILE *f = fopen(path, "w");
    if (!f || fprintf(f, "%s\n", value) < 0 || fclose(f) != 0)
        printf("cannot set %s\n", name);
}

static void save(void) {
    for (int i = 0; i < 4; i++) {
        char path[64];
        snprintf(path, sizeof path, "/proc/sys/kernel/%s", names[i]);
        FILE *f = fopen(path, "r");
        if (!f || !fgets(saved[i], sizeof saved[i], f))
            saved[i][0] = 0;
        if (f)
            fclose(f);
        saved[i][strcspn(saved[i], "\n")] = 0;
    }
}

static void restore(void) {
    for (int i = 0; i < 4; i++)
        if (saved[i][0])
            set(names[i], saved[i]);
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    save();
    int ids[8], n = 0;
    struct shminfo si;

    set("shmmni", "3");
    shmctl(0, IPC_INFO, (struct shmid_ds *)&si);
    printf("%-40s %lu\n", "IPC_INFO shmmni", si.shmmni);
    for (int i = 0; i < 3; i++)
        show("shmget under shmmni", ids[n++] = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600));
    show("shmget at shmmni", shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600));
    show("shmget at shmmni, too big", shmget(IPC_PRIVATE, (size_t)1 << 62, IPC_CREAT | 0600));
    show("shmget at shmmni, existing key", shmget(IPC_PRIVATE, 4096, 0600));
    shmctl(ids[--n], IPC_RMID, NULL);
    show("shmget after a removal", ids[n++] = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600));
    set("shmmni", "4096");

    set("shmmax", "8192");
    shmctl(0, IPC_INFO, (struct shmid_ds *)&si);
    printf("%-40s %lu\n", "IPC_INFO shmmax", si.shmmax);
    show("shmget 8192 at shmmax", ids[n++] = shmget(IPC_PRIVATE, 8192, IPC_CREAT | 0600));
    show("shmget 8193 above shmmax", shmget(IPC_PRIVATE, 8193, IPC_CREAT | 0600));
    set("shmmax", saved[0]);

    struct shm_info use;
    shmctl(0, SHM_INFO, (struct shmid_ds *)&use);
    printf("%-40s %lu\n", "SHM_INFO shm_tot", use.shm_tot);
    char all[32];
    snprintf(all, sizeof all, "%lu", use.shm_tot + 3);
    set("shmall", all);
    show("shmget 2 pages under shmall", ids[n++] = shmget(IPC_PRIVATE, 8192, IPC_CREAT | 0600));
    show("shmget 2 pages above shmall", shmget(IPC_PRIVATE, 8192, IPC_CREAT | 0600));
    show("shmget 1 page at shmall", ids[n++] = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600));
    show("shmget 1 page above shmall", shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600));
    set("shmall", saved[2]);
    for (int i = 0; i < n; i++)
        shmctl(ids[i], IPC_RMID, NULL);

    int sets[8], m = 0;
    set("sem", "10 20 4 3");
    struct seminfo sem;
    semctl(0, 0, IPC_INFO, &sem);
    printf("%-40s %d %d %d %d\n", "IPC_INFO semmsl semmns semopm semmni", sem.semmsl, sem.semmns,
           sem.semopm, sem.semmni);
    show("semget nsems 11 above semmsl", semget(IPC_PRIVATE, 11, IPC_CREAT | 0600));
    show("semget nsems 10", sets[m++] = semget(IPC_PRIVATE, 10, IPC_CREAT | 0600));
    show("semget nsems 10, semmns reached", sets[m++] = semget(IPC_PRIVATE, 10, IPC_CREAT | 0600));
    show("semget nsems 1 above semmns", semget(IPC_PRIVATE, 1, IPC_CREAT | 0600));
    semctl(sets[--m], 0, IPC_RMID);
    show("semget nsems 1", sets[m++] = semget(IPC_PRIVATE, 1, IPC_CREAT | 0600));
    show("semget nsems 1, semmni reached", sets[m++] = semget(IPC_PRIVATE, 1, IPC_CREAT | 0600));
    show("semget nsems 1 above semmni", semget(IPC_PRIVATE, 1, IPC_CREAT | 0600));
    struct sembuf ops[5] = {{0, 1, 0}, {0, 1, 0}, {0, 1, 0}, {0, 1, 0}, {0, -4, 0}};
    show("semop 5 ops above semopm", semop(sets[0], ops, 5));
    show("semop 4 ops at semopm", semop(sets[0], ops, 4));
    printf("%-40s %d\n", "value", semctl(sets[0], 0, GETVAL));
    set("sem", "10 20 2 3");
    show("semop 4 ops, semopm lowered to 2", semop(sets[0], ops, 4));
    show("semop 1 op", semop(sets[0], ops, 1));
    set("sem", saved[3]);
    for (int i = 0; i < m; i++)
        semctl(sets[i], 0, IPC_RMID);
    restore();
    return 0;
}
