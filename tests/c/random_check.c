/* Reads (and with "write", rewrites with the same bytes) random words of a
 * SysV segment and of a private heap forever; every word must hold its
 * pattern (0xAB.. in the segment, made by another process; 0xCD.. in the
 * heap, made here), else it prints "BAD ..." and exits 3.
 *
 *   random_check KEY SEGMENT_PAGES HEAP_MIB [write]
 *
 * Prints "checking" once everything is in place. Used to show that a
 * process whose node loses its daemon (or agents) never reads memory that
 * nobody wrote, moved or not. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/shm.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: random_check KEY PAGES HEAP_MIB [write]\n");
        return 2;
    }
    key_t key = (key_t)strtol(argv[1], NULL, 0);
    size_t words = (size_t)strtoul(argv[2], NULL, 0) * 4096 / 8;
    size_t heap_words = (size_t)strtoul(argv[3], NULL, 0) * 1024 * 1024 / 8;
    int write = argc > 4 && strcmp(argv[4], "write") == 0;
    int id = shmget(key, 0, 0);
    if (id < 0) {
        perror("shmget");
        return 1;
    }
    volatile uint64_t *seg = shmat(id, NULL, 0);
    if (seg == (void *)-1) {
        perror("shmat");
        return 1;
    }
    volatile uint64_t *heap = malloc(heap_words * 8);
    if (!heap)
        return 1;
    const uint64_t seg_pattern = 0xABABABABABABABABull;
    const uint64_t heap_pattern = 0xCDCDCDCDCDCDCDCDull;
    for (size_t i = 0; i < heap_words; i++)
        heap[i] = heap_pattern;
    printf("checking\n");
    fflush(stdout);
    uint64_t x = (uint64_t)getpid() | 1, checked = 0;
    for (;;) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        size_t i = x % words, j = (x >> 20) % heap_words;
        uint64_t s = seg[i], h = heap[j];
        if (s != seg_pattern || h != heap_pattern) {
            printf("BAD segment word %zu = %#llx, heap word %zu = %#llx after %llu good reads\n", i,
                   (unsigned long long)s, j, (unsigned long long)h, (unsigned long long)checked);
            fflush(stdout);
            return 3;
        }
        if (write && (x & 3) == 0)
            seg[i] = seg_pattern;
        checked++;
    }
}
