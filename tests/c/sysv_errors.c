/* Every kind of bad argument to the SysV calls, and the order in which
 * the kernel checks them: each line is a call and what it returned.
 * Bad pointers must give EFAULT (never a crash). Run as root; part runs
 * as nobody (forked). Prints the same in a fresh IPC namespace and in a
 * fresh cluster under omrun.
 *
 *   sysv_errors */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

union semun {
    int val;
    struct semid_ds *buf;
    unsigned short *array;
    void *ptr;
};

#define BAD ((void *)8)

static void show(const char *what, long r) {
    if (r == -1)
        printf("%-44s -1 %s\n", what, strerrorname_np(errno));
    else
        printf("%-44s ok\n", what);
}

/* A pointer to the last bytes of a page followed by an unmapped one. */
static void *edge(size_t room) {
    char *p = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    munmap(p + 4096, 4096);
    return p + 4096 - room;
}

static int semopm(void) {
    int a, b, c, d;
    FILE *f = fopen("/proc/sys/kernel/sem", "r");
    if (!f || fscanf(f, "%d %d %d %d", &a, &b, &c, &d) != 4)
        c = 500;
    if (f)
        fclose(f);
    return c;
}

static void as_nobody(int shm, int sem, int wsem) {
    struct shmid_ds ds;
    struct semid_ds sds;
    unsigned short vals[3] = {1, 2, 3};
    union semun arg;
    show("nobody shmat 0600", (long)shmat(shm, NULL, 0) == -1 ? -1 : 0);
    show("nobody shmget key 0600", shmget(0x5e300001, 0, 0));
    show("nobody shmctl IPC_STAT 0600", shmctl(shm, IPC_STAT, &ds));
    show("nobody shmctl IPC_STAT 0600 bad buf", shmctl(shm, IPC_STAT, BAD));
    show("nobody shmctl IPC_SET", shmctl(shm, IPC_SET, &ds));
    show("nobody shmctl IPC_SET bad buf", shmctl(shm, IPC_SET, BAD));
    show("nobody shmctl IPC_RMID", shmctl(shm, IPC_RMID, NULL));
    show("nobody shmget SHM_HUGETLB", shmget(IPC_PRIVATE, 2 << 20, IPC_CREAT | SHM_HUGETLB | 0600));
    struct sembuf op = {0, 1, IPC_NOWAIT}, zero = {0, 0, IPC_NOWAIT};
    show("nobody semop alter 0600", semop(sem, &op, 1));
    show("nobody semop wait-zero 0600", semop(sem, &zero, 1));
    show("nobody semctl GETVAL 0600", semctl(sem, 0, GETVAL));
    show("nobody semctl GETVAL 0600 bad semnum", semctl(sem, 99, GETVAL));
    arg.val = 1;
    show("nobody semctl SETVAL 0600", semctl(sem, 0, SETVAL, arg));
    arg.array = vals;
    show("nobody semctl SETALL 0600", semctl(sem, 0, SETALL, arg));
    arg.ptr = BAD;
    show("nobody semctl SETALL 0600 bad array", semctl(sem, 0, SETALL, arg));
    arg.ptr = BAD;
    show("nobody semctl GETALL 0600 bad array", semctl(sem, 0, GETALL, arg));
    arg.buf = &sds;
    show("nobody semctl IPC_STAT 0600", semctl(sem, 0, IPC_STAT, arg));
    show("nobody semctl IPC_RMID", semctl(sem, 0, IPC_RMID));
    arg.array = vals;
    show("nobody semctl SETALL 0622 write-only", semctl(wsem, 0, SETALL, arg));
    arg.ptr = BAD;
    show("nobody semctl SETALL 0622 bad array", semctl(wsem, 0, SETALL, arg));
    arg.buf = &sds;
    show("nobody semctl IPC_STAT 0622", semctl(wsem, 0, IPC_STAT, arg));
    show("nobody semop alter 0622", semop(wsem, &op, 1));
    show("nobody semop wait-zero 0622", semop(wsem, &zero, 1));
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct shmid_ds ds;
    struct semid_ds sds;
    union semun arg;
    unsigned short vals[3] = {1, 2, 3};
    int shm = shmget(0x5e300001, 8192, IPC_CREAT | IPC_EXCL | 0600);
    int sem = semget(0x5e300002, 3, IPC_CREAT | IPC_EXCL | 0600);
    int wsem = semget(IPC_PRIVATE, 3, IPC_CREAT | 0622);
    if (shm < 0 || sem < 0 || wsem < 0) {
        perror("setup");
        return 1;
    }

    /* shmget */
    show("shmget size 0 new", shmget(IPC_PRIVATE, 0, IPC_CREAT | 0600));
    show("shmget size 0 existing", shmget(0x5e300001, 0, 0));
    show("shmget larger than existing", shmget(0x5e300001, 8193, 0));
    show("shmget excl existing", shmget(0x5e300001, 4096, IPC_CREAT | IPC_EXCL | 0600));
    show("shmget excl existing larger", shmget(0x5e300001, 1 << 20, IPC_CREAT | IPC_EXCL));
    show("shmget absent", shmget(0x5e3000ff, 4096, 0));
    show("shmget size huge", shmget(IPC_PRIVATE, (size_t)-4096, IPC_CREAT | 0600));
    show("shmget SHM_HUGETLB root", shmget(IPC_PRIVATE, 2 << 20, IPC_CREAT | SHM_HUGETLB | 0600));
    show("shmget SHM_HUGETLB bad size log",
         shmget(IPC_PRIVATE, 2 << 20, IPC_CREAT | SHM_HUGETLB | (13 << 26) | 0600));

    /* shmat / shmdt */
    show("shmat id -1", (long)shmat(-1, NULL, 0) == -1 ? -1 : 0);
    show("shmat absent id", (long)shmat(0x7ffffff0, NULL, 0) == -1 ? -1 : 0);
    show("shmat unaligned", (long)shmat(shm, (void *)0x10001001, 0) == -1 ? -1 : 0);
    char *at = shmat(shm, NULL, 0);
    show("shmat", (long)at == -1 ? -1 : 0);
    show("shmat over it", (long)shmat(shm, at, 0) == -1 ? -1 : 0);
    char *rnd = shmat(shm, at + 8192 + 17, SHM_RND);
    show("shmat SHM_RND at", rnd == at + 8192 ? 0 : -1);
    show("shmdt SHM_RND one", shmdt(rnd));
    show("shmdt NULL", shmdt(NULL));
    show("shmdt inside", shmdt(at + 4096));
    show("shmdt bad", shmdt(BAD));
    show("shmdt never attached", shmdt((void *)0x10000000));

    /* shmctl */
    show("shmctl id -1 IPC_STAT", shmctl(-1, IPC_STAT, &ds));
    show("shmctl cmd -1", shmctl(shm, -1, &ds));
    show("shmctl cmd 99", shmctl(shm, 99, &ds));
    show("shmctl IPC_STAT|IPC_64", shmctl(shm, IPC_STAT | 0x100, &ds));
    show("shmctl IPC_STAT NULL", shmctl(shm, IPC_STAT, NULL));
    show("shmctl IPC_STAT bad", shmctl(shm, IPC_STAT, BAD));
    show("shmctl IPC_STAT edge", shmctl(shm, IPC_STAT, edge(16)));
    show("shmctl IPC_STAT absent id NULL", shmctl(0x7ffffff0, IPC_STAT, NULL));
    show("shmctl IPC_SET bad", shmctl(shm, IPC_SET, BAD));
    show("shmctl IPC_SET bad, absent id", shmctl(0x7ffffff0, IPC_SET, BAD));
    show("shmctl IPC_SET absent id", shmctl(0x7ffffff0, IPC_SET, &ds));
    shmctl(shm, IPC_STAT, &ds);
    ds.shm_perm.uid = (uid_t)-1;
    show("shmctl IPC_SET uid -1", shmctl(shm, IPC_SET, &ds));
    shmctl(shm, IPC_STAT, &ds);
    ds.shm_perm.mode = 07640;
    show("shmctl IPC_SET mode 07640", shmctl(shm, IPC_SET, &ds));
    shmctl(shm, IPC_STAT, &ds);
    printf("%-44s %o\n", "mode after IPC_SET 07640", ds.shm_perm.mode);
    ds.shm_perm.mode = 0600;
    shmctl(shm, IPC_SET, &ds);
    show("shmctl IPC_RMID absent", shmctl(0x7ffffff0, IPC_RMID, NULL));
    show("shmctl SHM_LOCK absent", shmctl(0x7ffffff0, SHM_LOCK, NULL));
    show("shmctl IPC_INFO NULL", shmctl(0, IPC_INFO, NULL));

    /* semget */
    show("semget nsems 0 new", semget(IPC_PRIVATE, 0, IPC_CREAT | 0600));
    show("semget nsems -1", semget(IPC_PRIVATE, -1, IPC_CREAT | 0600));
    show("semget nsems 0 existing", semget(0x5e300002, 0, 0));
    show("semget nsems more than existing", semget(0x5e300002, 4, 0));
    show("semget nsems huge existing", semget(0x5e300002, 1 << 30, 0));
    show("semget excl existing", semget(0x5e300002, 3, IPC_CREAT | IPC_EXCL | 0600));
    show("semget absent", semget(0x5e3000fe, 1, 0));

    /* semop / semtimedop */
    struct sembuf op = {0, 1, 0}, many[1024];
    for (int i = 0; i < 1024; i++)
        many[i] = (struct sembuf){0, 0, IPC_NOWAIT};
    int opm = semopm();
    show("semop nsops 0", semop(sem, &op, 0));
    show("semop nsops semopm+1", semop(sem, many, opm + 1));
    show("semop nsops semopm+1 bad sops", semop(sem, BAD, opm + 1));
    show("semop NULL", semop(sem, NULL, 1));
    show("semop bad", semop(sem, BAD, 1));
    show("semop edge (2 ops, 1 readable)", semop(sem, edge(sizeof(struct sembuf)), 2));
    show("semop id -1", semop(-1, &op, 1));
    show("semop id -1 bad sops", semop(-1, BAD, 1));
    show("semop absent id", semop(0x7ffffff0, &op, 1));
    struct sembuf big = {7, 1, 0};
    show("semop sem_num 7 of 3", semop(sem, &big, 1));
    struct sembuf bigneg = {(unsigned short)-1, 1, 0};
    show("semop sem_num 65535", semop(sem, &bigneg, 1));
    struct sembuf over = {0, 32767, IPC_NOWAIT};
    show("semop +32767 on 0", semop(sem, &over, 1));
    show("semop +32767 again (ERANGE)", semop(sem, &over, 1));
    arg.val = 0;
    semctl(sem, 0, SETVAL, arg);
    struct sembuf undo_big[2] = {{1, 20000, SEM_UNDO | IPC_NOWAIT}, {1, -20000, IPC_NOWAIT}};
    show("semop undo 20000 (+ plain -20000)", semop(sem, undo_big, 2));
    show("semop undo 20000 again (SEMAEM)", semop(sem, undo_big, 2));
    struct sembuf take = {2, -1, IPC_NOWAIT};
    show("semop -1 on 0 nowait", semop(sem, &take, 1));
    struct timespec ts = {0, 1000000};
    take.sem_flg = 0;
    show("semtimedop 1 ms", semtimedop(sem, &take, 1, &ts));
    show("semtimedop bad timeout", semtimedop(sem, &take, 1, BAD));
    show("semtimedop bad timeout, nsops 0", semtimedop(sem, &take, 0, BAD));
    show("semtimedop bad timeout, bad sops", semtimedop(sem, BAD, 1, BAD));
    struct timespec bad_ns = {0, 1000000000}, neg = {-1, 0};
    show("semtimedop tv_nsec 1e9", semtimedop(sem, &take, 1, &bad_ns));
    show("semtimedop tv_sec -1", semtimedop(sem, &take, 1, &neg));
    show("semtimedop tv_nsec 1e9, absent id", semtimedop(0x7ffffff0, &take, 1, &bad_ns));
    show("semtimedop tv_nsec 1e9, nsops 0", semtimedop(sem, &take, 0, &bad_ns));

    /* semctl */
    show("semctl id -1 GETVAL", semctl(-1, 0, GETVAL));
    show("semctl id -1 IPC_INFO", semctl(-1, 0, IPC_INFO, &sds));
    show("semctl cmd 99", semctl(sem, 0, 99));
    show("semctl cmd -1", semctl(sem, 0, -1));
    show("semctl GETVAL|IPC_64", semctl(sem, 0, GETVAL | 0x100));
    show("semctl GETVAL semnum 3", semctl(sem, 3, GETVAL));
    show("semctl GETVAL semnum -1", semctl(sem, -1, GETVAL));
    show("semctl GETPID semnum 3", semctl(sem, 3, GETPID));
    show("semctl GETNCNT semnum 3", semctl(sem, 3, GETNCNT));
    show("semctl GETZCNT semnum -1", semctl(sem, -1, GETZCNT));
    arg.val = -1;
    show("semctl SETVAL -1", semctl(sem, 0, SETVAL, arg));
    arg.val = 32768;
    show("semctl SETVAL 32768", semctl(sem, 0, SETVAL, arg));
    show("semctl SETVAL 32768 absent id", semctl(0x7ffffff0, 0, SETVAL, arg));
    arg.val = 1;
    show("semctl SETVAL semnum 3", semctl(sem, 3, SETVAL, arg));
    show("semctl SETVAL absent id", semctl(0x7ffffff0, 0, SETVAL, arg));
    arg.ptr = NULL;
    show("semctl GETALL NULL", semctl(sem, 0, GETALL, arg));
    arg.ptr = BAD;
    show("semctl GETALL bad", semctl(sem, 0, GETALL, arg));
    arg.ptr = edge(4);
    show("semctl GETALL edge (3 values, room for 2)", semctl(sem, 0, GETALL, arg));
    arg.ptr = BAD;
    show("semctl SETALL bad", semctl(sem, 0, SETALL, arg));
    arg.ptr = BAD;
    show("semctl SETALL bad, absent id", semctl(0x7ffffff0, 0, SETALL, arg));
    unsigned short too_big[3] = {1, 40000, 2};
    arg.array = too_big;
    show("semctl SETALL 40000", semctl(sem, 0, SETALL, arg));
    arg.array = vals;
    show("semctl SETALL", semctl(sem, 0, SETALL, arg));
    arg.ptr = NULL;
    show("semctl IPC_STAT NULL", semctl(sem, 0, IPC_STAT, arg));
    arg.ptr = BAD;
    show("semctl IPC_STAT bad", semctl(sem, 0, IPC_STAT, arg));
    arg.ptr = BAD;
    show("semctl IPC_SET bad", semctl(sem, 0, IPC_SET, arg));
    arg.ptr = BAD;
    show("semctl IPC_SET bad, absent id", semctl(0x7ffffff0, 0, IPC_SET, arg));
    arg.ptr = BAD;
    show("semctl IPC_INFO bad", semctl(0, 0, IPC_INFO, arg));
    arg.ptr = BAD;
    show("semctl SEM_STAT bad, index 999", semctl(999, 0, SEM_STAT, arg));
    arg.buf = &sds;
    semctl(sem, 0, IPC_STAT, arg);
    sds.sem_perm.gid = (gid_t)-1;
    show("semctl IPC_SET gid -1", semctl(sem, 0, IPC_SET, arg));
    show("semctl IPC_RMID absent", semctl(0x7ffffff0, 0, IPC_RMID));

    /* As nobody. */
    pid_t child = fork();
    if (child == 0) {
        if (setgid(65534) || setuid(65534))
            _exit(9);
        as_nobody(shm, sem, wsem);
        _exit(0);
    }
    int status;
    waitpid(child, &status, 0);
    printf("%-44s %d\n", "nobody child exit", WEXITSTATUS(status));

    /* Removal while attached; calls on what is left. */
    show("shmctl IPC_RMID attached", shmctl(shm, IPC_RMID, NULL));
    show("shmctl IPC_RMID again", shmctl(shm, IPC_RMID, NULL));
    show("shmget key after IPC_RMID", shmget(0x5e300001, 0, 0));
    shmctl(shm, IPC_STAT, &ds);
    printf("%-44s key %#x mode %o nattch %lu\n", "IPC_STAT after IPC_RMID", ds.shm_perm.__key,
           ds.shm_perm.mode, (unsigned long)ds.shm_nattch);
    char *again = shmat(shm, NULL, 0);
    show("shmat after IPC_RMID (attached)", (long)again == -1 ? -1 : 0);
    if ((long)again != -1)
        shmdt(again);
    show("shmdt", shmdt(at));
    show("shmctl IPC_STAT after last detach", shmctl(shm, IPC_STAT, &ds));
    show("shmat after last detach", (long)shmat(shm, NULL, 0) == -1 ? -1 : 0);
    show("semctl IPC_RMID", semctl(sem, 0, IPC_RMID));
    show("semctl GETVAL removed", semctl(sem, 0, GETVAL));
    struct sembuf one = {0, 1, 0};
    show("semop removed", semop(sem, &one, 1));
    semctl(wsem, 0, IPC_RMID);
    return 0;
}
