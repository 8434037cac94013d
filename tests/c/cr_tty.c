/* A session leader with a controlling terminal (a pseudo-terminal whose
 * master side a child holds, as a terminal emulator would): after the
 * wait it is still a terminal with its settings and window size, it is
 * still the session's controlling terminal, a line typed before the wait
 * is read, settings changed after it hold, and what the process writes
 * reaches the master side.
 *
 *   cr_tty DIR */
#include "cr.h"
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>

/* The terminal: types a line, then reads everything the process writes
 * until "bye"; exits 0 if "shown" came before it. */
static pid_t terminal(int master)
{
	pid_t pid = fork();
	if (pid != 0)
		return pid;
	alarm(20);
	struct winsize ws = {.ws_row = 33, .ws_col = 101};
	if (ioctl(master, TIOCSWINSZ, &ws) != 0 || write(master, "typed\n", 6) != 6)
		_exit(2);
	char seen[4096] = {0};
	size_t have = 0;
	while (have < sizeof seen - 1 && !strstr(seen, "bye")) {
		ssize_t n = read(master, seen + have, sizeof seen - 1 - have);
		if (n <= 0)
			_exit(3);
		have += (size_t)n;
	}
	char *shown = strstr(seen, "shown\r\n");
	_exit(shown && shown < strstr(seen, "bye") ? 0 : 4);
}

int main(void)
{
	CHECK(setsid() == getpid(), "setsid");
	/* The terminal's end hangs it up: the controlling process gets SIGHUP. */
	signal(SIGHUP, SIG_IGN);
	int master = posix_openpt(O_RDWR | O_NOCTTY);
	CHECK(master >= 0 && grantpt(master) == 0 && unlockpt(master) == 0, "a pseudo-terminal");
	char *name = ptsname(master);
	/* A session leader without one: this becomes its controlling terminal. */
	int tty = name ? open(name, O_RDWR) : -1;
	CHECK(tty >= 0, "open %s", name ? name : "?");
	pid_t term = terminal(master);
	close(master);
	/* The typed line is in the terminal's input before the wait. */
	usleep(100000);

	cr_ready_and_wait();

	CHECK(isatty(tty), "still a terminal");
	struct stat st;
	CHECK(fstat(tty, &st) == 0 && S_ISCHR(st.st_mode), "a character device");
	struct termios t;
	CHECK(tcgetattr(tty, &t) == 0 && (t.c_lflag & ICANON) && (t.c_lflag & ECHO),
	      "its settings");
	struct winsize ws = {0};
	CHECK(ioctl(tty, TIOCGWINSZ, &ws) == 0 && ws.ws_row == 33 && ws.ws_col == 101,
	      "its window size: %dx%d", ws.ws_row, ws.ws_col);
	CHECK(tcgetsid(tty) > 0, "still the session's controlling terminal");
	char line[64] = {0};
	CHECK(read(tty, line, sizeof line - 1) == 6 && strcmp(line, "typed\n") == 0,
	      "the typed line: %s", line);
	t.c_lflag &= ~ECHO;
	CHECK(tcsetattr(tty, TCSANOW, &t) == 0, "tcsetattr");
	struct termios again;
	CHECK(tcgetattr(tty, &again) == 0 && !(again.c_lflag & ECHO), "echo off");
	CHECK(write(tty, "shown\n", 6) == 6 && tcdrain(tty) == 0, "write");
	CHECK(write(tty, "bye\n", 4) == 4, "bye");
	int status;
	CHECK(waitpid(term, &status, 0) == term && WIFEXITED(status) && WEXITSTATUS(status) == 0,
	      "the terminal saw the output: %d", status);
	return cr_report();
}
