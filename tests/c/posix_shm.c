/* POSIX shared memory between two processes (two nodes under omrun).
 *   posix_shm create NAME: shm_open(O_CREAT|O_EXCL), ftruncate 8192, mmap,
 *     close; writes 4242 in word 0, prints "ready", waits for the joiner's
 *     1 in word 1, answers 2 in word 2, waits for 3 in word 3; "creator done".
 *   posix_shm join NAME: shm_open without O_CREAT (the object may have been
 *     made on another node), checks its size, mmap, close; waits for 4242,
 *     writes 1, waits for 2, writes 3, shm_unlink: "unlink 0" or errno;
 *     then a second shm_open must fail with ENOENT: "reopen ENOENT".
 * Status 0 when all went as said, 2..9 at the step that failed; every wait
 * gives up after 20 s (status 9). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define SIZE 8192

static int wait_for(volatile long *word, long value) {
    for (int i = 0; i < 20000; i++) {
        if (*word == value)
            return 1;
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3)
        return 2;
    setvbuf(stdout, NULL, _IOLBF, 0);
    int create = strcmp(argv[1], "create") == 0;
    int fd = create ? shm_open(argv[2], O_CREAT | O_EXCL | O_RDWR, 0640) : shm_open(argv[2], O_RDWR, 0);
    if (fd < 0) {
        printf("shm_open errno %d\n", errno);
        return 3;
    }
    if (create && ftruncate(fd, SIZE) < 0)
        return 4;
    struct stat st;
    if (fstat(fd, &st) < 0 || st.st_size != SIZE) {
        printf("size %ld\n", (long)st.st_size);
        return 5;
    }
    volatile long *w = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (w == MAP_FAILED)
        return 6;
    if (create) {
        w[0] = 4242;
        printf("ready\n");
        if (!wait_for(&w[1], 1))
            return 9;
        w[2] = 2;
        if (!wait_for(&w[3], 3))
            return 9;
        printf("creator done\n");
        munmap((void *)w, SIZE);
        return 0;
    }
    if (!wait_for(&w[0], 4242))
        return 9;
    w[1] = 1;
    if (!wait_for(&w[2], 2))
        return 9;
    w[3] = 3;
    printf("unlink %d\n", shm_unlink(argv[2]) == 0 ? 0 : errno);
    int again = shm_open(argv[2], O_RDWR, 0);
    printf("reopen %s\n", again < 0 && errno == ENOENT ? "ENOENT" : "found");
    munmap((void *)w, SIZE);
    return 0;
}
