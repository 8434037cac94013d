/* Memory of every kind a single process has: heap (brk) and malloc'd
 * blocks, a large private anonymous region (moved lazily), a read-only
 * one, one with a guard page (PROT_NONE), a private mapping of a file
 * with pages written (copy on write), one moved by mremap, deep stack,
 * thread-local data and anonymous shared memory (a DSM segment under
 * omrun). Every byte is checked after the wait.
 *
 *   cr_memory DIR */
#include "cr.h"
#include <sys/mman.h>

#define PAGE 4096
#define BIG (64 << 20)

static __thread unsigned long tls_word = 0x715;

static unsigned char pattern(size_t i, unsigned seed)
{
	return (unsigned char)(i * 131 + seed);
}

static void fill(unsigned char *p, size_t len, unsigned seed)
{
	for (size_t i = 0; i < len; i++)
		p[i] = pattern(i, seed);
}

static size_t first_bad(const unsigned char *p, size_t len, unsigned seed)
{
	for (size_t i = 0; i < len; i++)
		if (p[i] != pattern(i, seed))
			return i;
	return len;
}

/* The protection of the mapping holding `addr`, as /proc/self/maps shows
 * it ("rw-p"...), or "?". */
static const char *protection_of(const void *addr)
{
	static char perms[8];
	strcpy(perms, "?");
	FILE *maps = fopen("/proc/self/maps", "r");
	if (!maps)
		return perms;
	unsigned long start, end;
	char p[8];
	while (fscanf(maps, "%lx-%lx %7s%*[^\n]", &start, &end, p) == 3) {
		if ((unsigned long)addr >= start && (unsigned long)addr < end) {
			strcpy(perms, p);
			break;
		}
	}
	fclose(maps);
	return perms;
}

/* Recursion keeps a stack deeper than a few pages across the wait. */
static int deep(int depth)
{
	volatile unsigned char frame[1024];
	fill((unsigned char *)frame, sizeof frame, (unsigned)depth);
	int bad = 0;
	if (depth > 0)
		bad = deep(depth - 1);
	else
		cr_ready_and_wait();
	return bad + (first_bad((unsigned char *)frame, sizeof frame, (unsigned)depth) != sizeof frame);
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	unsigned char *heap = sbrk(0);
	CHECK(sbrk(8 * PAGE) != (void *)-1, "sbrk");
	fill(heap, 8 * PAGE, 1);
	unsigned char *block = malloc(300000);
	CHECK(block != NULL, "malloc");
	fill(block, 300000, 2);
	unsigned char *big = mmap(NULL, BIG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(big != MAP_FAILED, "mmap big");
	for (size_t i = 0; i < BIG; i += PAGE)
		fill(big + i, 64, (unsigned)(i / PAGE));
	unsigned char *readonly = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	fill(readonly, 4 * PAGE, 3);
	CHECK(mprotect(readonly, 4 * PAGE, PROT_READ) == 0, "mprotect read-only");
	unsigned char *guarded = mmap(NULL, 3 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	fill(guarded, 3 * PAGE, 4);
	CHECK(mprotect(guarded + PAGE, PAGE, PROT_NONE) == 0, "mprotect guard");
	char path[4096];
	snprintf(path, sizeof path, "%s/mapped", argv[1]);
	int fd = open(path, O_CREAT | O_RDWR | O_TRUNC, 0644);
	unsigned char file_data[4 * PAGE];
	fill(file_data, sizeof file_data, 5);
	CHECK(write(fd, file_data, sizeof file_data) == sizeof file_data, "write file");
	unsigned char *cow = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	CHECK(cow != MAP_FAILED, "mmap file");
	close(fd);
	fill(cow + PAGE, PAGE, 6); /* one page copied on write, three not */
	unsigned char *moved = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	fill(moved, 2 * PAGE, 7);
	moved = mremap(moved, 2 * PAGE, 6 * PAGE, MREMAP_MAYMOVE);
	CHECK(moved != MAP_FAILED, "mremap");
	fill(moved + 2 * PAGE, 4 * PAGE, 8);
	unsigned char *shared = mmap(NULL, 16 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	CHECK(shared != MAP_FAILED, "mmap shared");
	fill(shared, 16 * PAGE, 9);
	tls_word = 0xfeed;

	int bad_frames = deep(64);

	CHECK(bad_frames == 0, "%d stack frames changed", bad_frames);
	CHECK(first_bad(heap, 8 * PAGE, 1) == 8 * PAGE, "heap");
	CHECK(first_bad(block, 300000, 2) == 300000, "malloc block");
	for (size_t i = 0; i < BIG; i += PAGE)
		if (first_bad(big + i, 64, (unsigned)(i / PAGE)) != 64) {
			CHECK(0, "big region, page %zu", i / PAGE);
			break;
		}
	for (size_t i = 0; i < BIG; i += 8 * PAGE)
		CHECK(big[i + 100] == 0, "big region: untouched byte of page %zu", i / PAGE);
	CHECK(first_bad(readonly, 4 * PAGE, 3) == 4 * PAGE, "read-only region");
	CHECK(first_bad(guarded, PAGE, 4) == PAGE, "guarded region, first page");
	for (size_t i = 2 * PAGE; i < 3 * PAGE; i++)
		if (guarded[i] != pattern(i, 4)) {
			CHECK(0, "guarded region, third page, byte %zu", i);
			break;
		}
	CHECK(protection_of(guarded + PAGE)[0] == '-' && protection_of(guarded + PAGE)[1] == '-',
	      "the guard page is %s", protection_of(guarded + PAGE));
	CHECK(protection_of(readonly)[1] == '-', "the read-only region is %s", protection_of(readonly));
	unsigned char expect_cow[4 * PAGE];
	memcpy(expect_cow, file_data, sizeof expect_cow);
	fill(expect_cow + PAGE, PAGE, 6);
	CHECK(memcmp(cow, expect_cow, sizeof expect_cow) == 0, "private file mapping");
	CHECK(first_bad(moved, 2 * PAGE, 7) == 2 * PAGE, "mremapped region, old part");
	CHECK(first_bad(moved + 2 * PAGE, 4 * PAGE, 8) == 4 * PAGE, "mremapped region, grown part");
	CHECK(first_bad(shared, 16 * PAGE, 9) == 16 * PAGE, "anonymous shared memory");
	CHECK(tls_word == 0xfeed, "thread-local word is %#lx", tls_word);
	/* Protections stayed: writable where they were. */
	fill(moved, 6 * PAGE, 10);
	fill(shared, PAGE, 11);
	return cr_report();
}
