/* A parent and its forked child ping-pong through anonymous shared memory
 * (mmap MAP_SHARED|MAP_ANONYMOUS made before the fork): the child writes
 * turn N into word 0, the parent answers N in word 1, and each checks it
 * sees exactly the turn it expects (status 3 or 4 otherwise). Prints
 * "child PID" first and "turns N" every 1000 turns; on SIGTERM the parent
 * raises the stop flag (word 2), waits for the child and prints
 * "done N child-status S", exiting 0 if the child ended well.
 * With SHARED_POSIX=NAME the memory is POSIX shared memory instead:
 * shm_open(NAME, O_CREAT|O_RDWR), ftruncate, mmap(MAP_SHARED), close, and
 * shm_unlink(NAME) at the end ("unlink 0" or "unlink ERRNO"). */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

int main(void) {
    const char *posix = getenv("SHARED_POSIX");
    volatile long *w;
    if (posix) {
        int fd = shm_open(posix, O_CREAT | O_RDWR, 0600);
        if (fd < 0 || ftruncate(fd, 4096) < 0)
            return 2;
        w = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
    } else {
        w = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    }
    if (w == MAP_FAILED)
        return 2;
    setvbuf(stdout, NULL, _IOLBF, 0);
    pid_t child = fork();
    if (child == 0) {
        for (long n = 1; !w[2]; n++) {
            w[0] = n;
            while (w[1] != n && !w[2])
                sched_yield();
            if (w[1] != n && !w[2])
                return 3;
        }
        return 0;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    printf("child %d\n", (int)child);
    long n = 0;
    while (!stop) {
        long seen = w[0];
        if (seen == n)
            { sched_yield(); continue; }
        if (seen != n + 1)
            return 4;
        n = seen;
        w[1] = n;
        if (n % 1000 == 0)
            printf("turns %ld\n", n);
    }
    w[2] = 1;
    int status;
    waitpid(child, &status, 0);
    printf("done %ld child-status %d\n", n, WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    munmap((void *)w, 4096);
    if (posix)
        printf("unlink %d\n", shm_unlink(posix) == 0 ? 0 : errno);
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 5;
}
