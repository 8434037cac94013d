/* Migration timing: argv[1] bytes of heap, all written once, then a loop
 * that writes one byte in each of 64 pages (a window sliding over the heap)
 * and reads the clock, until SIGTERM. At the end it prints
 *   gap_us G recover_us R iterations N baseline_ns B
 * G: the longest time between two iterations (the migration's downtime as
 * the program sees it); R: from the end of that gap until 200 iterations
 * in a row run no slower than twice the usual (B, the median of 2000
 * iterations before the gap), i.e. until it is back at full speed. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    long long x = *(const long long *)a, y = *(const long long *)b;
    return (x > y) - (x < y);
}

#define BASELINE 2000
#define STEADY 200

int main(int argc, char **argv) {
    size_t bytes = argc > 1 ? strtoul(argv[1], NULL, 0) : 1 << 20;
    size_t pages = bytes / 4096;
    unsigned char *heap = malloc(bytes);
    if (!heap || pages < 64)
        return 2;
    memset(heap, 1, bytes);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    static long long recent[BASELINE];
    long long baseline = 0, gap = 0, gap_end = 0, recovered_at = 0;
    unsigned long n = 0, steady = 0;
    long long last = now_ns();
    size_t window = 0;
    while (!stop) {
        for (int k = 0; k < 64; k++)
            heap[((window + k) % pages) * 4096] += 1;
        window = (window + 64) % pages;
        long long t = now_ns(), d = t - last;
        last = t;
        n++;
        recent[n % BASELINE] = d;
        if (n == 3 * BASELINE) {
            long long sorted[BASELINE];
            memcpy(sorted, recent, sizeof sorted);
            qsort(sorted, BASELINE, sizeof sorted[0], cmp);
            baseline = sorted[BASELINE / 2];
        }
        if (baseline && d > gap) {
            gap = d;
            gap_end = t;
            recovered_at = 0;
            steady = 0;
        } else if (gap_end && !recovered_at) {
            steady = d <= 2 * baseline ? steady + 1 : 0;
            if (steady == STEADY)
                recovered_at = t;
        }
    }
    printf("gap_us %lld recover_us %lld iterations %lu baseline_ns %lld\n", gap / 1000,
           recovered_at ? (recovered_at - gap_end) / 1000 : -1, n, baseline);
    return 0;
}
