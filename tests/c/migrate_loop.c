/* A process to migrate: loops writing values into its heap, its stack and
 * an FP accumulator and reading them back; counts SIGUSR1; on SIGTERM ends
 * with exit status 42 after a last line. Any value read back wrong ends it
 * at once with status 3 (heap), 4 (stack) or 5 (FP).
 *
 * argv[1]: heap bytes (default 1 MiB). Prints "loop N pid P usr1 U" every
 * 100 loops and whenever the pid or the SIGUSR1 count changes.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t usr1_count, stop;

static void on_usr1(int sig) { (void)sig; usr1_count++; }
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
    if (!heap)
        return 2;
    setvbuf(stdout, NULL, _IOLBF, 0);
    pid_t last_pid = 0;
    int last_usr1 = -1;
    unsigned long i;
    for (i = 0; !stop; i++) {
        for (size_t k = 0; k < heap_bytes; k += 4096)
            heap[k] = (unsigned char)(i + k / 4096);
        for (int k = 0; k < 512; k++)
            stack[k] = i * 512 + k;
        acc += 0.5;
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL); /* EINTR is fine */
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
        pid_t pid = getpid();
        if (i % 100 == 0 || pid != last_pid || usr1_count != last_usr1) {
            printf("loop %lu pid %d usr1 %d\n", i, (int)pid, (int)usr1_count);
            last_pid = pid;
            last_usr1 = usr1_count;
        }
    }
    printf("done %lu usr1 %d\n", i, (int)usr1_count);
    free(heap);
    return 42;
}
