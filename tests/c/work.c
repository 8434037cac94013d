/* CPU-bound work of a fixed size: `work N` runs N rounds of arithmetic
 * and exits 0 (prints the result, so the work cannot be optimised away). */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	unsigned long long n = strtoull(argv[1], NULL, 10);
	volatile unsigned long long x = 1;
	for (unsigned long long i = 0; i < n; i++)
		x = x * 6364136223846793005ULL + 1442695040888963407ULL;
	printf("%llu\n", (unsigned long long)x);
	return 0;
}
