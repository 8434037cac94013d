/* A single-threaded server on a blocking listening socket: accept, read a
 * line, answer "pid P: LINE", close, again. Prints "port N" first (an
 * ephemeral port on 127.0.0.1). Exits 0 on SIGTERM (the blocking accept
 * is interrupted: no SA_RESTART). With ACCEPT_UNIX=PATH it listens on that
 * unix stream socket instead (and prints "port 0"). */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

/* Accept, answer one line, close; until SIGTERM. */
static int serve(int l) {
    while (!stop) {
        int c = accept(l, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR)
                continue;
            return 3;
        }
        char line[256];
        ssize_t n = read(c, line, sizeof line - 1);
        if (n > 0) {
            line[n] = 0;
            char answer[320];
            int m = snprintf(answer, sizeof answer, "pid %d: %s", (int)getpid(), line);
            if (write(c, answer, m) != m)
                return 4;
        }
        close(c);
    }
    printf("stopped\n");
    return 0;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    const char *unix_path = getenv("ACCEPT_UNIX");
    if (unix_path) {
        struct sockaddr_un un;
        memset(&un, 0, sizeof un);
        un.sun_family = AF_UNIX;
        strncpy(un.sun_path, unix_path, sizeof un.sun_path - 1);
        int u = socket(AF_UNIX, SOCK_STREAM, 0);
        if (u < 0 || bind(u, (struct sockaddr *)&un, sizeof un) < 0 || listen(u, 16) < 0)
            return 2;
        printf("port 0\n");
        return serve(u);
    }
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (l < 0 || bind(l, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(l, 16) < 0 ||
        getsockname(l, (struct sockaddr *)&addr, &len) < 0)
        return 2;
    printf("port %d\n", ntohs(addr.sin_port));
    return serve(l);
}
