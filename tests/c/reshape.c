/* Every way a program reshapes a mapping of shared memory, on anonymous
 * shared memory (also from /dev/zero), a SysV segment and a POSIX object:
 * partial and whole munmap, mremap (move, grow, shrink), mprotect,
 * madvise (MADV_DONTNEED, MADV_REMOVE), MAP_FIXED over part of it,
 * fallocate of the POSIX object (and data written through its descriptor
 * before it is mapped), then fork. Each step prints what the memory
 * holds; the kernel is the reference. (Under omrun a POSIX object that is
 * mapped keeps its size: ftruncate to another size is EPERM.)
 *
 *   reshape [pause]    (with "pause", waits for a line on stdin between
 *                       the two halves: a test moves it meanwhile) */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORD(base, page) (*(volatile uint64_t *)((char *)(base) + (page) * PAGE))

static sigjmp_buf recover;
static volatile int faulted;

static void on_fault(int sig) {
    faulted = sig;
    siglongjmp(recover, 1);
}

/* Read the first word of a page, or the signal it raised. */
static const char *probe(void *base, long page) {
    static char buf[8][40];
    static int next;
    char *out = buf[next++ % 8];
    faulted = 0;
    if (sigsetjmp(recover, 1) == 0) {
        uint64_t v = WORD(base, page);
        snprintf(out, 40, "%llu", (unsigned long long)v);
    } else {
        snprintf(out, 40, "%s", faulted == SIGBUS ? "SIGBUS" : "SIGSEGV");
    }
    return out;
}

/* Write the first word of a page; "ok" or the signal. */
static const char *poke(void *base, long page, uint64_t v) {
    faulted = 0;
    if (sigsetjmp(recover, 1) == 0) {
        WORD(base, page) = v;
        return "ok";
    }
    return faulted == SIGBUS ? "SIGBUS" : "SIGSEGV";
}

static void fill(void *base, long first, long count, uint64_t tag) {
    for (long p = first; p < first + count; p++)
        WORD(base, p) = tag * 100000 + p;
}

/* A free range of `pages` pages (mapped then unmapped). */
static void *hole(long pages) {
    void *p = mmap(NULL, pages * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    munmap(p, pages * PAGE);
    return p;
}

static void line(const char *what, void *base, const long *pages, int n) {
    printf("%-34s", what);
    for (int i = 0; i < n; i++)
        printf(" %ld=%s", pages[i], probe(base, pages[i]));
    printf("\n");
}

/* In a forked child: every page listed, then a write the parent checks. */
static void forked(const char *what, void *base, const long *pages, int n, long wpage) {
    fflush(stdout);
    pid_t c = fork();
    if (c == 0) {
        char label[64];
        snprintf(label, sizeof label, "%s (child)", what);
        line(label, base, pages, n);
        poke(base, wpage, 777);
        fflush(stdout);
        _exit(0);
    }
    int st;
    waitpid(c, &st, 0);
    printf("%-34s %ld=%s\n", "  parent sees the child's write", wpage, probe(base, wpage));
}

static void anonymous(const char *name, int devzero) {
    const long total = 262144; /* 1 GiB */
    int fd = devzero ? open("/dev/zero", O_RDWR) : -1;
    char *m = mmap(NULL, total * PAGE, PROT_READ | PROT_WRITE,
                   MAP_SHARED | (devzero ? 0 : MAP_ANONYMOUS), fd, 0);
    if (m == MAP_FAILED) {
        printf("%s: mmap failed\n", name);
        return;
    }
    if (fd >= 0)
        close(fd);
    for (long p = 0; p < total; p += 997)
        WORD(m, p) = p + 1;
    fill(m, 0, 64, 1);
    fill(m, 1000, 64, 2);
    fill(m, 5000, 64, 3);
    fill(m, 9000, 64, 4);
    fill(m, 200000, 16, 5);
    printf("== %s\n", name);
    long a[] = {0, 10, 63, 997, 1000, 5000, 9000, 200000, 261709};
    line("filled", m, a, 9);
    /* Partial munmap in the middle, then of the head. */
    munmap(m + 2000 * PAGE, 1000 * PAGE);
    long b[] = {1994, 1999, 2000, 2990, 3000, 3988};
    line("after munmap 2000..3000", m, b, 6);
    munmap(m, 8 * PAGE);
    long c[] = {0, 7, 8, 63};
    line("after munmap of the head", m, c, 4);
    /* mremap: move 5000..5064 elsewhere, grow, shrink. */
    char *moved = mremap(m + 5000 * PAGE, 64 * PAGE, 64 * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED,
                         hole(64));
    long d[] = {0, 1, 63};
    line("moved 5000..5064", moved, d, 3);
    long d2[] = {4999, 5000, 5064};
    line("  where it was", m, d2, 3);
    char *tail = m + 200000 * PAGE;
    char *shrunk = mremap(tail, (total - 200000) * PAGE, 32 * PAGE, 0);
    long e[] = {0, 15, 31};
    line("tail shrunk to 32 pages", shrunk, e, 3);
    long e2[] = {32, 40};
    line("  beyond it", shrunk, e2, 2);
    char *grown = mremap(shrunk, 32 * PAGE, 128 * PAGE, MREMAP_MAYMOVE);
    long f[] = {0, 15, 31, 32, 100, 127};
    line("tail grown to 128 pages", grown, f, 6);
    poke(grown, 100, 4242);
    line("  written at 100", grown, f + 4, 1);
    /* mprotect part read-only; writes fault, reads work. */
    mprotect(m + 1000 * PAGE, 16 * PAGE, PROT_READ);
    printf("%-34s 1005 write=%s read=%s\n", "mprotect 1000..1016 read-only", poke(m, 1005, 9),
           probe(m, 1005));
    mprotect(m + 1000 * PAGE, 16 * PAGE, PROT_READ | PROT_WRITE);
    printf("%-34s 1005 write=%s read=%s\n", "  read-write again", poke(m, 1005, 9), probe(m, 1005));
    /* madvise: DONTNEED keeps shared data, REMOVE frees it (zeros). */
    madvise(m + 9000 * PAGE, 8 * PAGE, MADV_DONTNEED);
    long g[] = {9000, 9007, 9008};
    line("after MADV_DONTNEED 9000..9008", m, g, 3);
    int r = madvise(m + 9010 * PAGE, 8 * PAGE, MADV_REMOVE);
    long h[] = {9009, 9010, 9017, 9018};
    printf("%-34s %s\n", "MADV_REMOVE 9010..9018", r == 0 ? "ok" : strerrorname_np(errno));
    line("  after it", m, h, 4);
    poke(m, 9012, 55);
    long h2[] = {9012};
    line("  written at 9012", m, h2, 1);
    /* MAP_FIXED private memory over 1020..1030. */
    mmap(m + 1020 * PAGE, 10 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
         -1, 0);
    long i[] = {1019, 1020, 1029, 1030};
    line("MAP_FIXED private over 1020..1030", m, i, 4);
    /* Fork: the child sees every surviving piece, shares them. */
    long j[] = {8, 63, 1000, 1019, 1030, 1994, 3000, 9012, 9018};
    forked("fork", m, j, 9, 1030);
    long k[] = {0, 63};
    forked("fork, moved piece", moved, k, 2, 1);
    long l[] = {100, 127};
    forked("fork, grown tail", grown, l, 2, 127);
    poke(m, 1025, 5);
    fflush(stdout);
    pid_t c2 = fork();
    if (c2 == 0) {
        printf("%-34s 1025=%s\n", "private page in the child", probe(m, 1025));
        poke(m, 1025, 6);
        fflush(stdout);
        _exit(0);
    }
    waitpid(c2, NULL, 0);
    printf("%-34s 1025=%s\n", "  parent keeps its own", probe(m, 1025));
}

static void sysv(void) {
    printf("== SysV segment\n");
    int id = shmget(IPC_PRIVATE, 256 * PAGE, IPC_CREAT | 0600);
    char *s = shmat(id, NULL, 0);
    fill(s, 0, 256, 7);
    struct shmid_ds ds;
    long a[] = {0, 100, 255};
    line("attached", s, a, 3);
    munmap(s + 64 * PAGE, 16 * PAGE);
    long b[] = {63, 64, 79, 80};
    line("after munmap 64..80", s, b, 4);
    shmctl(id, IPC_STAT, &ds);
    printf("%-34s %lu\n", "nattch", (unsigned long)ds.shm_nattch);
    mprotect(s + 100 * PAGE, 4 * PAGE, PROT_READ);
    printf("%-34s write=%s read=%s\n", "mprotect 100..104 read-only", poke(s, 101, 1),
           probe(s, 101));
    int r = madvise(s + 120 * PAGE, 4 * PAGE, MADV_REMOVE);
    long c[] = {119, 120, 123, 124};
    printf("%-34s %s\n", "MADV_REMOVE 120..124", r == 0 ? "ok" : strerrorname_np(errno));
    line("  after it", s, c, 4);
    madvise(s + 130 * PAGE, 4 * PAGE, MADV_DONTNEED);
    long d[] = {130, 133};
    line("after MADV_DONTNEED 130..134", s, d, 2);
    char *moved = mremap(s + 200 * PAGE, 8 * PAGE, 8 * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, hole(8));
    long e[] = {0, 7};
    line("moved 200..208", moved, e, 2);
    long f[] = {0, 63, 80, 120, 130, 255};
    forked("fork", s, f, 6, 255);
    forked("fork, moved piece", moved, e, 2, 7);
    printf("%-34s %s\n", "shmdt", shmdt(s) == 0 ? "ok" : strerrorname_np(errno));
    long g[] = {90, 255};
    line("  the rest after shmdt", s, g, 2);
    shmctl(id, IPC_STAT, &ds);
    printf("%-34s %lu\n", "nattch after shmdt", (unsigned long)ds.shm_nattch);
    munmap(s, 256 * PAGE);
    munmap(moved, 8 * PAGE);
    shmctl(id, IPC_STAT, &ds);
    printf("%-34s %lu\n", "nattch after munmap of the rest", (unsigned long)ds.shm_nattch);
    shmctl(id, IPC_RMID, NULL);
}

static void posix(void) {
    printf("== POSIX object\n");
    char name[64];
    snprintf(name, sizeof name, "/reshape-%d", getpid());
    int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
    ftruncate(fd, 64 * PAGE);
    /* Written through the descriptor before the first mapping. */
    uint64_t early = 4711;
    pwrite(fd, &early, 8, 5 * PAGE);
    char *p = mmap(NULL, 64 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    long w[] = {4, 5, 6};
    line("mapped after a pwrite at page 5", p, w, 3);
    fill(p, 0, 64, 8);
    long a[] = {0, 10, 20, 63};
    line("filled", p, a, 4);
    int r = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 10 * PAGE, 4 * PAGE);
    printf("%-34s %s\n", "fallocate punch 10..14", r == 0 ? "ok" : strerrorname_np(errno));
    long b[] = {9, 10, 13, 14};
    line("  after it", p, b, 4);
    r = fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 20 * PAGE + 8, 8);
    printf("%-34s %s\n", "fallocate zero range in page 20", r == 0 ? "ok" : strerrorname_np(errno));
    long c[] = {19, 20, 21};
    line("  after it", p, c, 3);
    r = ftruncate(fd, 64 * PAGE);
    printf("%-34s %s\n", "ftruncate to its size", r == 0 ? "ok" : strerrorname_np(errno));
    long e[] = {0, 10, 20, 31, 40};
    forked("fork", p, e, 5, 40);
    munmap(p + 16 * PAGE, 16 * PAGE);
    long f[] = {15, 16, 32};
    line("after munmap 16..32", p, f, 3);
    munmap(p, 64 * PAGE);
    close(fd);
    shm_unlink(name);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_fault;
    sa.sa_flags = SA_NODEFER;
    sigaction(SIGSEGV, &sa, NULL);
    sigaction(SIGBUS, &sa, NULL);
    anonymous("anonymous shared", 0);
    if (argc > 1 && strcmp(argv[1], "pause") == 0) {
        printf("paused\n");
        char l[8];
        if (!fgets(l, sizeof l, stdin))
            return 1;
    }
    anonymous("/dev/zero shared", 1);
    sysv();
    posix();
    return 0;
}
