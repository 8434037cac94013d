/* A process to migrate: loops writing values into its heap, its stack and
 * an FP accumulator and reading them back; counts SIGUSR1; on SIGTERM ends
 * with exit status 42 after a last line. Any value read back wrong ends it
 * at once with status 3 (heap), 4 (stack) or 5 (FP).
 *
 * argv[1]: heap bytes (default 1 MiB). argv[2] "shm": also a SysV segment
 * (IPC_PRIVATE, 64 KiB): each loop writes its number into word 0 and reads
 * it back (status 6 if wrong); word 1 is for others to write ("peer").
 * Prints "shmid ID" first, then "loop N pid P usr1 U peer V" every 100
 * loops and whenever the pid, the SIGUSR1 count or the peer word changes.
 * Counts SIGRTMIN+1 (queued signals) and prints the count in its last line
 * ("done N usr1 U rt R").
 * On SIGTERM, with a segment: IPC_RMID, and "rmid 0" or "rmid ERRNO".
 * With MIGRATE_SEM=plain (or =undo): also a semaphore set (IPC_PRIVATE, three
 * semaphores): each loop a P and a V on semaphore 0 (at 1; with SEM_UNDO
 * for =undo), its value checked after, then a wait for semaphore 1 (a gate
 * a test closes by setting it to 1) to be zero; with =undo, every 50 loops
 * also +1 with SEM_UNDO on semaphore 2, whose value must then equal the
 * count of them (undo applied early or lost shows). Any failure: status 10.
 * "semid ID" first, and on SIGTERM "semrmid 0" or "semrmid ERRNO".
 * With MIGRATE_ECHO_PORT set: connects to 127.0.0.1:PORT and, each loop,
 * answers whatever arrived there with "echo " and the same bytes.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <signal.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t usr1_count, rt_count, stop;

static void on_usr1(int sig) { (void)sig; usr1_count++; }
/* SIGRTMIN+1 is queued, not merged: every one sent is counted. */
static void on_rt(int sig) { (void)sig; rt_count++; }
static void on_term(int sig) { (void)sig; stop = 1; }

int main(int argc, char **argv) {
    size_t heap_bytes = argc > 1 ? strtoul(argv[1], NULL, 0) : 1 << 20;
    unsigned char *heap = malloc(heap_bytes);
    volatile unsigned long stack[512];
    double acc = 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sa.sa_handler = on_rt;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGRTMIN + 1, &sa, NULL);
    if (!heap)
        return 2;
    setvbuf(stdout, NULL, _IOLBF, 0);
    int shmid = -1;
    volatile unsigned long *shm = NULL;
    if (argc > 2 && strcmp(argv[2], "shm") == 0) {
        shmid = shmget(IPC_PRIVATE, 65536, IPC_CREAT | 0600);
        if (shmid < 0)
            return 7;
        shm = shmat(shmid, NULL, 0);
        if (shm == (void *)-1)
            return 8;
        printf("shmid %d\n", shmid);
    }
    unsigned long last_peer = 0;
    int semid = -1;
    short sem_flags = 0;
    int ups = 0;
    if (getenv("MIGRATE_SEM")) {
        sem_flags = strcmp(getenv("MIGRATE_SEM"), "undo") == 0 ? SEM_UNDO : 0;
        semid = semget(IPC_PRIVATE, 3, IPC_CREAT | 0600);
        if (semid < 0 || semctl(semid, 0, SETVAL, 1) < 0)
            return 11;
        printf("semid %d\n", semid);
    }
    int echo = -1;
    if (getenv("MIGRATE_ECHO_PORT")) {
        struct sockaddr_in addr;
        memset(&addr, 0, sizeof addr);
        addr.sin_family = AF_INET;
        addr.sin_port = htons((unsigned short)atoi(getenv("MIGRATE_ECHO_PORT")));
        addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        echo = socket(AF_INET, SOCK_STREAM, 0);
        if (echo < 0 || connect(echo, (struct sockaddr *)&addr, sizeof addr) < 0)
            return 9;
    }
    pid_t last_pid = 0;
    int last_usr1 = -1;
    unsigned long i;
    for (i = 0; !stop; i++) {
        for (size_t k = 0; k < heap_bytes; k += 4096)
            heap[k] = (unsigned char)(i + k / 4096);
        for (int k = 0; k < 512; k++)
            stack[k] = i * 512 + k;
        acc += 0.5;
        if (shm)
            shm[0] = i;
        if (semid >= 0) {
            struct sembuf p = {0, -1, sem_flags}, v = {0, 1, sem_flags}, gate = {1, 0, 0},
                          up = {2, 1, SEM_UNDO};
            int count_up = sem_flags && i % 50 == 0;
            const char *what = semop(semid, &p, 1) < 0 ? "P"
                               : semop(semid, &v, 1) < 0 ? "V"
                               : semctl(semid, 0, GETVAL) != 1 ? "GETVAL"
                               : semop(semid, &gate, 1) < 0 ? "gate"
                               : count_up && semop(semid, &up, 1) < 0 ? "up"
                               : count_up && semctl(semid, 2, GETVAL) != ++ups ? "undo count"
                                                                              : NULL;
            if (what) {
                printf("sem failure in loop %lu: %s errno %d\n", i, what, errno);
                return 10;
            }
        }
        struct timespec ts = {0, 1000000};
        sigset_t rt;
        sigemptyset(&rt);
        sigaddset(&rt, SIGRTMIN + 1);
        /* With MIGRATE_BLOCK_RT: queued signals wait while it sleeps. */
        if (getenv("MIGRATE_BLOCK_RT"))
            sigprocmask(SIG_BLOCK, &rt, NULL);
        nanosleep(&ts, NULL); /* EINTR is fine */
        if (getenv("MIGRATE_BLOCK_RT"))
            sigprocmask(SIG_UNBLOCK, &rt, NULL);
        for (size_t k = 0; k < heap_bytes; k += 4096)
            if (heap[k] != (unsigned char)(i + k / 4096)) {
                printf("heap mismatch in loop %lu\n", i);
                return 3;
            }
        for (int k = 0; k < 512; k++)
            if (stack[k] != i * 512 + k) {
                printf("stack mismatch in loop %lu\n", i);
                return 4;
            }
        if (acc != 0.5 * (double)(i + 1)) {
            printf("fp mismatch in loop %lu\n", i);
            return 5;
        }
        if (shm && shm[0] != i) {
            printf("shm mismatch in loop %lu\n", i);
            return 6;
        }
        unsigned long peer = shm ? shm[1] : 0;
        struct pollfd pfd = {echo, POLLIN, 0};
        if (echo >= 0 && poll(&pfd, 1, 0) == 1) {
            char in[256], reply[300];
            ssize_t n = recv(echo, in, sizeof in, 0);
            if (n > 0) {
                memcpy(reply, "echo ", 5);
                memcpy(reply + 5, in, (size_t)n);
                send(echo, reply, (size_t)n + 5, 0);
            }
        }
        pid_t pid = getpid();
        if (i % 100 == 0 || pid != last_pid || usr1_count != last_usr1 || peer != last_peer) {
            printf("loop %lu pid %d usr1 %d peer %lu\n", i, (int)pid, (int)usr1_count, peer);
            last_pid = pid;
            last_usr1 = usr1_count;
            last_peer = peer;
        }
    }
    if (shmid >= 0)
        printf("rmid %d\n", shmctl(shmid, IPC_RMID, NULL) == 0 ? 0 : errno);
    if (semid >= 0)
        printf("semrmid %d\n", semctl(semid, 0, IPC_RMID) == 0 ? 0 : errno);
    printf("done %lu usr1 %d rt %d\n", i, (int)usr1_count, (int)rt_count);
    free(heap);
    return 42;
}
