/* Two threads that sleep until killed: a process that cannot migrate. */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

static void *sleeper(void *arg) {
    (void)arg;
    for (;;)
        pause();
    return NULL;
}

int main(void) {
    pthread_t t;
    if (pthread_create(&t, NULL, sleeper, NULL) != 0)
        return 2;
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    for (;;)
        pause();
}
