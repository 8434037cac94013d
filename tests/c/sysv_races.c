/* IPC_RMID racing other calls: waiters (in other processes and in other
 * threads, with and without a timeout, waiting for zero or to decrement)
 * get EIDRM; lookups and attaches racing creation and removal only ever
 * get the errors the kernel gives for that; nothing hangs (an alarm
 * ends the program if anything does).
 *
 *   sysv_races */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void pause_ms(int ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

static const char *name(int r) { return r == 0 ? "ok" : strerrorname_np(errno); }

struct wait_arg {
    int set;
    short op;
    int timed;
    int result;
    int err;
};

static void *waiter(void *p) {
    struct wait_arg *a = p;
    struct sembuf op = {0, a->op, SEM_UNDO};
    struct timespec ten = {10, 0};
    a->result = a->timed ? semtimedop(a->set, &op, 1, &ten) : semop(a->set, &op, 1);
    a->err = errno;
    return NULL;
}

/* A thread waits; another removes the set. */
static void thread_waiter(short opv, int timed, const char *what) {
    int set = semget(IPC_PRIVATE, 1, IPC_CREAT | 0600);
    if (opv == 0) {
        struct sembuf up = {0, 1, 0};
        semop(set, &up, 1);
    }
    struct wait_arg a = {set, opv, timed, 0, 0};
    pthread_t t;
    pthread_create(&t, NULL, waiter, &a);
    /* Until it waits (GETNCNT/GETZCNT count it). */
    for (int i = 0; i < 2000; i++) {
        if (semctl(set, 0, opv == 0 ? GETZCNT : GETNCNT) == 1)
            break;
        pause_ms(1);
    }
    printf("%-40s waiting %d\n", what, semctl(set, 0, opv == 0 ? GETZCNT : GETNCNT));
    printf("%-40s IPC_RMID %s\n", what, name(semctl(set, 0, IPC_RMID)));
    pthread_join(t, NULL);
    errno = a.err;
    printf("%-40s waiter %s\n", what, a.result == 0 ? "ok" : strerrorname_np(a.err));
}

/* A child process waits; the parent removes the set. */
static void process_waiter(void) {
    int set = semget(IPC_PRIVATE, 2, IPC_CREAT | 0600);
    pid_t child = fork();
    if (child == 0) {
        struct sembuf op[2] = {{0, -1, 0}, {1, 0, 0}};
        int r = semop(set, op, 2);
        _exit(r == 0 ? 0 : errno == EIDRM ? 43 : 44);
    }
    for (int i = 0; i < 2000 && semctl(set, 0, GETNCNT) != 1; i++)
        pause_ms(1);
    printf("%-40s waiting %d\n", "process waiter", semctl(set, 0, GETNCNT));
    printf("%-40s IPC_RMID %s\n", "process waiter", name(semctl(set, 0, IPC_RMID)));
    int status;
    waitpid(child, &status, 0);
    printf("%-40s child exit %d\n", "process waiter", WEXITSTATUS(status));
}

/* One process creates and removes key K over and over; another looks it
 * up, attaches, stats and detaches: every error must be one the kernel
 * gives for an object that comes and goes. */
static void lookup_race(void) {
    const key_t key = 0x5e400001;
    pid_t churn = fork();
    if (churn == 0) {
        for (int i = 0; i < 300; i++) {
            int id = shmget(key, 4096, IPC_CREAT | 0600);
            if (id >= 0)
                shmctl(id, IPC_RMID, NULL);
        }
        _exit(0);
    }
    int unexpected = 0, attached = 0;
    for (int i = 0; i < 300; i++) {
        int id = shmget(key, 4096, 0600);
        if (id < 0) {
            if (errno != ENOENT)
                unexpected++;
            continue;
        }
        void *p = shmat(id, NULL, 0);
        if (p == (void *)-1) {
            if (errno != EINVAL && errno != EIDRM)
                unexpected++;
            continue;
        }
        attached++;
        struct shmid_ds ds;
        if (shmctl(id, IPC_STAT, &ds) < 0 && errno != EINVAL && errno != EIDRM)
            unexpected++;
        if (shmdt(p) < 0)
            unexpected++;
    }
    int status;
    waitpid(churn, &status, 0);
    printf("%-40s unexpected errors %d, churn exit %d\n", "lookup race", unexpected,
           WEXITSTATUS(status));
    (void)attached;
    int id = shmget(key, 0, 0);
    printf("%-40s %s\n", "key after the race", id < 0 ? strerrorname_np(errno) : "present");
}

/* The same with semaphores: operations on a set that is removed and made
 * again under the same key. */
static void semop_race(void) {
    const key_t key = 0x5e400002;
    pid_t churn = fork();
    if (churn == 0) {
        for (int i = 0; i < 200; i++) {
            int id = semget(key, 1, IPC_CREAT | 0600);
            if (id >= 0)
                semctl(id, 0, IPC_RMID);
        }
        _exit(0);
    }
    int unexpected = 0;
    for (int i = 0; i < 200; i++) {
        int id = semget(key, 1, 0600);
        if (id < 0) {
            if (errno != ENOENT)
                unexpected++;
            continue;
        }
        struct sembuf op = {0, 1, IPC_NOWAIT | SEM_UNDO};
        if (semop(id, &op, 1) < 0 && errno != EINVAL && errno != EIDRM)
            unexpected++;
        if (semctl(id, 0, GETVAL) < 0 && errno != EINVAL && errno != EIDRM)
            unexpected++;
    }
    int status;
    waitpid(churn, &status, 0);
    printf("%-40s unexpected errors %d, churn exit %d\n", "semop race", unexpected,
           WEXITSTATUS(status));
}

/* Removal of an attached segment by another process; the attacher goes on
 * using it, detaches, and the id is gone. */
static void remove_attached_elsewhere(void) {
    int id = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
    int *p = shmat(id, NULL, 0);
    p[0] = 41;
    pid_t child = fork();
    if (child == 0)
        _exit(shmctl(id, IPC_RMID, NULL) == 0 ? 0 : 1);
    int status;
    waitpid(child, &status, 0);
    p[0]++;
    struct shmid_ds ds;
    shmctl(id, IPC_STAT, &ds);
    printf("%-40s child %d, value %d, nattch %lu, dest %s\n", "removed elsewhere",
           WEXITSTATUS(status), p[0], (unsigned long)ds.shm_nattch,
           ds.shm_perm.mode & 01000 ? "yes" : "no");
    printf("%-40s %s\n", "shmdt", name(shmdt(p)));
    printf("%-40s %s\n", "IPC_STAT after", name(shmctl(id, IPC_STAT, &ds)));
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    alarm(60);
    thread_waiter(-1, 0, "thread waiting to decrement");
    thread_waiter(-1, 1, "thread in semtimedop");
    thread_waiter(0, 0, "thread waiting for zero");
    process_waiter();
    lookup_race();
    semop_race();
    remove_attached_elsewhere();
    return 0;
}
