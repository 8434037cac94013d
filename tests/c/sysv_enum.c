/* Enumeration of SysV objects by index, the info commands and SHM_LOCK,
 * printed so that a run in a fresh IPC namespace (natively) and a run in
 * a fresh cluster (under omrun) print the same lines.
 *
 *   sysv_enum            (as root; forks a child that drops to nobody) */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/resource.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef SHM_STAT_ANY
#define SHM_STAT_ANY 15
#endif
#ifndef SEM_STAT_ANY
#define SEM_STAT_ANY 20
#endif

static const char *err(int r) {
    static char buf[32];
    if (r >= 0)
        return "ok";
    snprintf(buf, sizeof buf, "%s", strerrorname_np(errno));
    return buf;
}

static int shm[4], sem[3];
static const key_t shm_keys[4] = {0x5e100001, 0x5e100002, 0x5e100003, IPC_PRIVATE};
static const size_t shm_sizes[4] = {4096, 10000, 65536, 8192};
static const int shm_modes[4] = {0600, 0640, 0000, 0666};
static const key_t sem_keys[3] = {0x5e200001, 0x5e200002, IPC_PRIVATE};
static const int sem_nsems[3] = {1, 5, 3};
static const int sem_modes[3] = {0600, 0000, 0644};

/* Walk 0..=max with SHM_STAT (or _ANY), print what is found of ours. */
static void walk_shm(int cmd, const char *name) {
    struct shm_info info;
    int max = shmctl(0, SHM_INFO, (struct shmid_ds *)&info);
    printf("%s: SHM_INFO %s used_ids=%d shm_tot=%lu\n", name, err(max), info.used_ids,
           info.shm_tot);
    int found[4] = {0}, others = 0, denied = 0;
    for (int i = 0; i <= max; i++) {
        struct shmid_ds ds;
        int id = shmctl(i, cmd, &ds);
        if (id < 0) {
            if (errno == EACCES)
                denied++;
            else if (errno != EINVAL)
                printf("  index %d: %s\n", i, err(id));
            continue;
        }
        int mine = 0;
        for (int k = 0; k < 4; k++)
            if (id == shm[k]) {
                found[k]++;
                mine = 1;
                printf("  segment %d: key %#x size %zu mode %o nattch %lu\n", k,
                       ds.shm_perm.__key, (size_t)ds.shm_segsz, ds.shm_perm.mode & 07777,
                       (unsigned long)ds.shm_nattch);
            }
        if (!mine)
            others++;
    }
    printf("  found %d %d %d %d, others %d, denied %d\n", found[0], found[1], found[2],
           found[3], others, denied);
    struct shmid_ds ds;
    printf("  index max+1: %s\n", err(shmctl(max + 1, cmd, &ds)));
}

static void walk_sem(int cmd, const char *name) {
    struct seminfo info;
    int max = semctl(0, 0, SEM_INFO, &info);
    printf("%s: SEM_INFO %s semusz=%d semaem=%d\n", name, err(max), info.semusz, info.semaem);
    int found[3] = {0}, others = 0, denied = 0;
    for (int i = 0; i <= max; i++) {
        struct semid_ds ds;
        int id = semctl(i, 0, cmd, &ds);
        if (id < 0) {
            if (errno == EACCES)
                denied++;
            else if (errno != EINVAL)
                printf("  index %d: %s\n", i, err(id));
            continue;
        }
        int mine = 0;
        for (int k = 0; k < 3; k++)
            if (id == sem[k]) {
                found[k]++;
                mine = 1;
                printf("  set %d: key %#x nsems %lu mode %o\n", k, ds.sem_perm.__key,
                       (unsigned long)ds.sem_nsems, ds.sem_perm.mode & 0777);
            }
        if (!mine)
            others++;
    }
    printf("  found %d %d %d, others %d, denied %d\n", found[0], found[1], found[2], others,
           denied);
    struct semid_ds ds;
    printf("  index max+1: %s\n", err(semctl(max + 1, 0, cmd, &ds)));
}

static void info_commands(void) {
    struct shminfo si;
    int r = shmctl(0, IPC_INFO, (struct shmid_ds *)&si);
    FILE *f = fopen("/proc/sys/kernel/shmmax", "r");
    unsigned long shmmax = 0, shmall = 0, shmmni = 0;
    if (f) {
        if (fscanf(f, "%lu", &shmmax) != 1)
            shmmax = 0;
        fclose(f);
    }
    f = fopen("/proc/sys/kernel/shmall", "r");
    if (f) {
        if (fscanf(f, "%lu", &shmall) != 1)
            shmall = 0;
        fclose(f);
    }
    f = fopen("/proc/sys/kernel/shmmni", "r");
    if (f) {
        if (fscanf(f, "%lu", &shmmni) != 1)
            shmmni = 0;
        fclose(f);
    }
    printf("shm IPC_INFO: %s max index %d, shmmax %s shmall %s shmmni %s shmseg %s shmmin %lu\n",
           err(r), r, si.shmmax == shmmax ? "= sysctl" : "differs",
           si.shmall == shmall ? "= sysctl" : "differs", si.shmmni == shmmni ? "= sysctl" : "differs",
           si.shmseg == shmmni ? "= shmmni" : "differs", si.shmmin);
    struct seminfo s;
    r = semctl(0, 0, IPC_INFO, &s);
    int semmsl, semmns, semopm, semmni;
    f = fopen("/proc/sys/kernel/sem", "r");
    if (!f || fscanf(f, "%d %d %d %d", &semmsl, &semmns, &semopm, &semmni) != 4)
        semmsl = semmns = semopm = semmni = -1;
    if (f)
        fclose(f);
    printf("sem IPC_INFO: %s max index %d, semmsl %s semmns %s semopm %s semmni %s semvmx %d "
           "semmnu %d semmap %d semume %d semusz %d semaem %d\n",
           err(r), r, s.semmsl == semmsl ? "= sysctl" : "differs",
           s.semmns == semmns ? "= sysctl" : "differs", s.semopm == semopm ? "= sysctl" : "differs",
           s.semmni == semmni ? "= sysctl" : "differs", s.semvmx, s.semmnu, s.semmap, s.semume,
           s.semusz, s.semaem);
    /* Bad buffers: the kernel copies out and fails. */
    printf("shm IPC_INFO bad buf: %s\n", err(shmctl(0, IPC_INFO, (void *)8)));
    printf("shm SHM_INFO bad buf: %s\n", err(shmctl(0, SHM_INFO, (void *)8)));
    printf("sem SEM_INFO bad buf: %s\n", err(semctl(0, 0, SEM_INFO, (void *)8)));
    printf("shm IPC_INFO id -1: %s\n", err(shmctl(-1, IPC_INFO, (struct shmid_ds *)&si)));
    printf("sem IPC_INFO id -1: %s\n", err(semctl(-1, 0, IPC_INFO, &s)));
}

static void locking(const char *who) {
    struct shmid_ds ds;
    for (int k = 0; k < 2; k++) {
        int r = shmctl(shm[k], SHM_LOCK, NULL);
        printf("%s: SHM_LOCK segment %d: %s", who, k, err(r));
        if (shmctl(shm[k], IPC_STAT, &ds) == 0)
            printf(", locked bit %s", ds.shm_perm.mode & SHM_LOCKED ? "set" : "clear");
        r = shmctl(shm[k], SHM_UNLOCK, NULL);
        printf(", SHM_UNLOCK: %s", err(r));
        if (shmctl(shm[k], IPC_STAT, &ds) == 0)
            printf(", locked bit %s", ds.shm_perm.mode & SHM_LOCKED ? "set" : "clear");
        printf("\n");
    }
    printf("%s: SHM_LOCK bad id: %s\n", who, err(shmctl(0x7ffffff0, SHM_LOCK, NULL)));
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int k = 0; k < 4; k++) {
        shm[k] = shmget(shm_keys[k], shm_sizes[k], IPC_CREAT | IPC_EXCL | shm_modes[k]);
        if (shm[k] < 0) {
            perror("shmget");
            return 1;
        }
    }
    for (int k = 0; k < 3; k++) {
        sem[k] = semget(sem_keys[k], sem_nsems[k], IPC_CREAT | IPC_EXCL | sem_modes[k]);
        if (sem[k] < 0) {
            perror("semget");
            return 1;
        }
    }
    void *at = shmat(shm[1], NULL, 0);
    info_commands();
    walk_shm(SHM_STAT, "root SHM_STAT");
    walk_shm(SHM_STAT_ANY, "root SHM_STAT_ANY");
    walk_sem(SEM_STAT, "root SEM_STAT");
    walk_sem(SEM_STAT_ANY, "root SEM_STAT_ANY");
    locking("root");
    /* Segment 1 handed to nobody, segment 0 stays root's. */
    struct shmid_ds ds;
    shmctl(shm[1], IPC_STAT, &ds);
    ds.shm_perm.uid = 65534;
    shmctl(shm[1], IPC_SET, &ds);
    pid_t child = fork();
    if (child == 0) {
        if (setgid(65534) || setuid(65534))
            _exit(9);
        walk_shm(SHM_STAT, "nobody SHM_STAT");
        walk_shm(SHM_STAT_ANY, "nobody SHM_STAT_ANY");
        walk_sem(SEM_STAT, "nobody SEM_STAT");
        walk_sem(SEM_STAT_ANY, "nobody SEM_STAT_ANY");
        struct rlimit none = {0, 0};
        setrlimit(RLIMIT_MEMLOCK, &none);
        locking("nobody, no memlock");
        _exit(0);
    }
    int status;
    waitpid(child, &status, 0);
    printf("child: %d\n", WEXITSTATUS(status));
    /* After a removal: counts and lookups follow. */
    shmdt(at);
    shmctl(shm[2], IPC_RMID, NULL);
    semctl(sem[1], 0, IPC_RMID);
    shm[2] = -2;
    sem[1] = -2;
    walk_shm(SHM_STAT_ANY, "after removal");
    walk_sem(SEM_STAT_ANY, "after removal");
    for (int k = 0; k < 4; k++)
        if (shm[k] >= 0)
            shmctl(shm[k], IPC_RMID, NULL);
    for (int k = 0; k < 3; k++)
        if (sem[k] >= 0)
            semctl(sem[k], 0, IPC_RMID);
    walk_shm(SHM_STAT_ANY, "all removed");
    walk_sem(SEM_STAT_ANY, "all removed");
    return 0;
}
