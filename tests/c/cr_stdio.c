/* stdio buffers: output written through a FILE before the wait and not
 * yet flushed reaches the file after it, in order; a FILE read part-way
 * goes on where it was.
 *
 *   cr_stdio DIR */
#include "cr.h"

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	char out_path[4096], in_path[4096];
	snprintf(out_path, sizeof out_path, "%s/out", argv[1]);
	snprintf(in_path, sizeof in_path, "%s/in", argv[1]);
	FILE *in = fopen(in_path, "w");
	for (int i = 0; i < 1000; i++)
		fprintf(in, "line %d\n", i);
	fclose(in);
	in = fopen(in_path, "r");
	FILE *out = fopen(out_path, "w");
	CHECK(in && out, "fopen");
	char line[64];
	for (int i = 0; i < 10; i++)
		CHECK(fgets(line, sizeof line, in) != NULL, "fgets");
	fprintf(out, "before\n");

	cr_ready_and_wait();

	CHECK(fgets(line, sizeof line, in) && strcmp(line, "line 10\n") == 0, "next line: %s", line);
	fprintf(out, "after\n");
	fclose(out);
	out = fopen(out_path, "r");
	char all[64] = {0};
	CHECK(out && fread(all, 1, sizeof all - 1, out) == 13 && strcmp(all, "before\nafter\n") == 0,
	      "file holds \"%s\"", all);
	return cr_report();
}
