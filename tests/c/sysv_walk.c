/* Walks SysV shared memory and semaphore semantics and prints what it
 * sees, one line per check, with nothing that differs between runs (no ids,
 * no pids, no addresses). The same binary run natively and under omrun
 * must print exactly the same lines.
 *
 *   sysv_walk KEYBASE          keys KEYBASE..KEYBASE+3 must be free
 *   sysv_walk KEYBASE create   only create the segment and the set (so
 *                              another process, on another node, owns them)
 *   sysv_walk KEYBASE use      the walk on objects `create` made
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

union semun {
	int val;
	struct semid_ds *buf;
	unsigned short *array;
};

static void show(const char *what, long r)
{
	if (r == -1)
		printf("%-40s errno %s\n", what, strerrorname_np(errno));
	else
		printf("%-40s ok\n", what);
	fflush(stdout);
}

static void value(const char *what, long v)
{
	printf("%-40s %ld\n", what, v);
	fflush(stdout);
}

static void on_usr1(int sig) { (void)sig; }

/* Eight processes race to create one key exclusively: one winner. */
static void creation_race(key_t key, int sem)
{
	int winners = 0;
	for (int i = 0; i < 8; i++) {
		pid_t pid = fork();
		if (pid == 0) {
			int r = sem ? semget(key, 1, IPC_CREAT | IPC_EXCL | 0600)
				    : shmget(key, 4096, IPC_CREAT | IPC_EXCL | 0600);
			_exit(r >= 0 ? 0 : errno == EEXIST ? 1 : 2);
		}
	}
	int other = 0;
	for (int i = 0; i < 8; i++) {
		int status;
		wait(&status);
		if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
			winners++;
		else if (!WIFEXITED(status) || WEXITSTATUS(status) != 1)
			other++;
	}
	printf("%-40s %d winner(s), %d other failure(s)\n",
	       sem ? "semget IPC_EXCL race of 8" : "shmget IPC_EXCL race of 8", winners, other);
	if (sem)
		semctl(semget(key, 0, 0), 0, IPC_RMID);
	else
		shmctl(shmget(key, 0, 0), IPC_RMID, NULL);
}

static int blocked_id;
static void *blocked_p(void *arg)
{
	(void)arg;
	struct sembuf p = {0, -1, 0};
	return (void *)(long)semop(blocked_id, &p, 1);
}

/* Wait until GETNCNT (or GETZCNT) of sem 0 reaches n, up to 10 s. */
static int wait_count(int id, int cmd, int n)
{
	for (int i = 0; i < 10000; i++) {
		if (semctl(id, 0, cmd) == n)
			return 1;
		usleep(1000);
	}
	return 0;
}

static const char *status_text(int status)
{
	static char buf[64];
	if (WIFEXITED(status))
		snprintf(buf, sizeof buf, "exit %d", WEXITSTATUS(status));
	else if (WIFSIGNALED(status))
		snprintf(buf, sizeof buf, "signal %s", sigabbrev_np(WTERMSIG(status)));
	else
		snprintf(buf, sizeof buf, "status %d", status);
	return buf;
}

static void child_status(const char *what, pid_t pid)
{
	int status = 0;
	waitpid(pid, &status, 0);
	printf("%-40s %s\n", what, status_text(status));
	fflush(stdout);
}

/* 0: the full walk; 1: create only; 2: use what `create` made. */
static int mode;

static void shm_walk(key_t base)
{
	struct shmid_ds ds;
	int id;

	if (mode != 2) {
		show("shmget new key without IPC_CREAT", shmget(base, 4096, 0600));
		show("shmget size 0", shmget(base, 0, IPC_CREAT | 0600));
		id = shmget(base, 10000, IPC_CREAT | IPC_EXCL | 0640);
		show("shmget create", id);
		if (mode == 1)
			return;
	} else {
		id = shmget(base, 10000, 0640);
		show("shmget existing", id);
	}
	show("shmget IPC_EXCL again", shmget(base, 10000, IPC_CREAT | IPC_EXCL | 0640));
	show("shmget existing, larger", shmget(base, 20000, 0640));
	value("shmget existing, same id", shmget(base, 100, 0) == id);

	char *a = shmat(id, NULL, 0);
	show("shmat", a == (void *)-1 ? -1 : 0);
	strcpy(a, "hello");
	a[9999] = 'z';
	char *b = shmat(id, NULL, SHM_RDONLY);
	show("shmat read-only", b == (void *)-1 ? -1 : 0);
	value("second mapping sees the first", strcmp(b, "hello") == 0 && b[9999] == 'z');
	show("shmctl IPC_STAT", shmctl(id, IPC_STAT, &ds));
	value("shm_segsz", ds.shm_segsz);
	value("shm_nattch (2 attaches)", ds.shm_nattch);
	value("mode bits", ds.shm_perm.mode & 0777);
	value("cpid is mine", ds.shm_cpid == getpid() && mode == 0);
	value("lpid is mine", ds.shm_lpid == getpid());
	value("key", ds.shm_perm.__key == base);
	show("shmdt second", shmdt(b));
	show("shmdt again", shmdt(b));
	show("shmdt not attached", shmdt(a + 4096));

	/* fork: the child shares the attachment */
	pid_t pid = fork();
	if (pid == 0) {
		a[100] = 'c';
		shmctl(id, IPC_STAT, &ds);
		_exit(ds.shm_nattch == 2 ? 0 : 10 + (int)ds.shm_nattch);
	}
	child_status("forked child writes (nattch 2)", pid);
	value("parent sees the child's write", a[100] == 'c');

	/* read-only attachment: a write is SIGSEGV */
	pid = fork();
	if (pid == 0) {
		char *r = shmat(id, NULL, SHM_RDONLY);
		if (r == (void *)-1)
			_exit(3);
		r[0] = 'x';
		_exit(0);
	}
	child_status("write to SHM_RDONLY", pid);
	value("data unchanged", a[0] == 'h');

	/* exec drops the attachments (the process goes on, as `sleep`) */
	pid = fork();
	if (pid == 0) {
		if (shmat(id, NULL, 0) == (void *)-1)
			_exit(3);
		execl("/bin/sleep", "sleep", "2", (char *)NULL);
		_exit(4);
	}
	int dropped = 0;
	for (int i = 0; i < 1000 && !dropped; i++) {
		usleep(2000);
		shmctl(id, IPC_STAT, &ds);
		dropped = ds.shm_nattch == 1;
	}
	value("exec dropped the child's attachments", dropped);
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);

	/* a chosen address, rounded with SHM_RND */
	char *where = a + 64 * 4096 * 1024L;
	show("shmat unaligned without SHM_RND", shmat(id, where + 1, 0) == (void *)-1 ? -1 : 0);
	char *c = shmat(id, where + 1, SHM_RND);
	value("shmat SHM_RND rounds down", c == where);
	if (c != (void *)-1)
		shmdt(c);

	/* IPC_SET, then permissions as another user */
	shmctl(id, IPC_STAT, &ds);
	ds.shm_perm.mode = 0600;
	show("shmctl IPC_SET", shmctl(id, IPC_SET, &ds));
	shmctl(id, IPC_STAT, &ds);
	value("mode after IPC_SET", ds.shm_perm.mode & 0777);
	pid = fork();
	if (pid == 0) {
		if (setgid(65534) || setuid(65534))
			_exit(2);
		void *p = shmat(id, NULL, SHM_RDONLY);
		int e1 = p == (void *)-1 ? errno : 0;
		int e2 = shmctl(id, IPC_RMID, NULL) == -1 ? errno : 0;
		int e3 = shmget(base, 100, 0600) == -1 ? errno : 0;
		_exit((e1 == EACCES) + 2 * (e2 == EPERM) + 4 * (e3 == EACCES));
	}
	child_status("as nobody: EACCES, EPERM, EACCES", pid);

	/* deferred removal: the key goes at once, the memory at last detach */
	show("shmctl IPC_RMID while attached", shmctl(id, IPC_RMID, NULL));
	show("shmget the key after IPC_RMID", shmget(base, 100, 0600));
	show("shmctl IPC_STAT after IPC_RMID", shmctl(id, IPC_STAT, &ds));
	value("SHM_DEST set", (ds.shm_perm.mode & SHM_DEST) != 0);
	value("key now private", ds.shm_perm.__key == IPC_PRIVATE);
	value("memory still there", strcmp(a, "hello") == 0);
	show("shmdt last", shmdt(a));
	show("shmctl IPC_STAT after last detach", shmctl(id, IPC_STAT, &ds));
	show("shmat a removed segment", shmat(id, NULL, 0) == (void *)-1 ? -1 : 0);
}

static void sem_walk(key_t base)
{
	union semun arg;
	struct semid_ds ds;
	struct sembuf op;
	unsigned short vals[3];
	int id;

	if (mode != 2) {
		show("semget new key without IPC_CREAT", semget(base, 1, 0600));
		show("semget nsems 0 creating", semget(base, 0, IPC_CREAT | 0600));
		id = semget(base, 3, IPC_CREAT | IPC_EXCL | 0600);
		show("semget create", id);
		if (mode == 1)
			return;
	} else {
		id = semget(base, 3, 0600);
		show("semget existing", id);
	}
	show("semget IPC_EXCL again", semget(base, 3, IPC_CREAT | IPC_EXCL | 0600));
	show("semget more sems than the set", semget(base, 4, 0600));
	value("semget nsems 0, same id", semget(base, 0, 0) == id);

	vals[0] = 1; vals[1] = 2; vals[2] = 3;
	arg.array = vals;
	show("SETALL", semctl(id, 0, SETALL, arg));
	memset(vals, 0, sizeof vals);
	arg.array = vals;
	semctl(id, 0, GETALL, arg);
	printf("%-40s %d %d %d\n", "GETALL", vals[0], vals[1], vals[2]);
	arg.buf = &ds;
	show("IPC_STAT", semctl(id, 0, IPC_STAT, arg));
	value("sem_nsems", ds.sem_nsems);
	value("mode bits", ds.sem_perm.mode & 0777);

	op = (struct sembuf){0, -2, IPC_NOWAIT};
	show("P by 2 with IPC_NOWAIT", semop(id, &op, 1));
	op = (struct sembuf){0, -1, 0};
	show("P", semop(id, &op, 1));
	value("GETVAL after P", semctl(id, 0, GETVAL));
	value("GETPID is mine", semctl(id, 0, GETPID) == getpid());
	op = (struct sembuf){7, 1, 0};
	show("sem_num out of range", semop(id, &op, 1));
	op = (struct sembuf){1, 32767, 0};
	show("V past SEMVMX", semop(id, &op, 1));
	arg.val = 40000;
	show("SETVAL 40000", semctl(id, 1, SETVAL, arg));
	show("GETVAL semnum 9", semctl(id, 9, GETVAL));
	struct sembuf many[2] = {{0, 1, 0}, {1, -5, IPC_NOWAIT}};
	show("array, second op would block", semop(id, many, 2));
	value("first op not applied", semctl(id, 0, GETVAL));

	/* a waiter woken by a V */
	pid_t pid = fork();
	if (pid == 0) {
		struct sembuf p = {0, -1, 0};
		_exit(semop(id, &p, 1) == 0 ? 0 : 1);
	}
	value("GETNCNT reaches 1", wait_count(id, GETNCNT, 1));
	op = (struct sembuf){0, 1, 0};
	semop(id, &op, 1);
	child_status("waiter woken by V", pid);
	value("GETVAL after the hand-over", semctl(id, 0, GETVAL));

	/* wait for zero */
	arg.val = 1;
	semctl(id, 2, SETVAL, arg);
	pid = fork();
	if (pid == 0) {
		struct sembuf z = {2, 0, 0};
		_exit(semop(id, &z, 1) == 0 ? 0 : 1);
	}
	for (int i = 0; i < 10000 && semctl(id, 2, GETZCNT) != 1; i++)
		usleep(1000);
	value("GETZCNT", semctl(id, 2, GETZCNT));
	op = (struct sembuf){2, -1, 0};
	semop(id, &op, 1);
	child_status("wait-for-zero woken", pid);

	/* SEM_UNDO applies at exit, however the process ends */
	arg.val = 2;
	semctl(id, 1, SETVAL, arg);
	pid = fork();
	if (pid == 0) {
		struct sembuf p = {1, -2, SEM_UNDO};
		semop(id, &p, 1);
		_exit(0);
	}
	child_status("child takes 2 with SEM_UNDO", pid);
	value("undone at its exit", semctl(id, 1, GETVAL));
	pid = fork();
	if (pid == 0) {
		struct sembuf p = {1, -1, SEM_UNDO};
		semop(id, &p, 1);
		raise(SIGKILL);
		_exit(0);
	}
	child_status("child killed holding with SEM_UNDO", pid);
	value("undone at its death", semctl(id, 1, GETVAL));

	/* a thread blocked in semop blocks no other thread */
	arg.val = 0;
	semctl(id, 0, SETVAL, arg);
	blocked_id = id;
	pthread_t thread;
	pthread_create(&thread, NULL, blocked_p, NULL);
	value("GETNCNT with a thread blocked", wait_count(id, GETNCNT, 1));
	value("other thread: GETVAL meanwhile", semctl(id, 1, GETVAL));
	op = (struct sembuf){0, 1, 0};
	show("other thread: V", semop(id, &op, 1));
	void *r;
	pthread_join(thread, &r);
	value("blocked thread's semop returned", (long)r);

	/* a timeout */
	arg.val = 0;
	semctl(id, 0, SETVAL, arg);
	struct timespec t = {0, 50 * 1000 * 1000};
	op = (struct sembuf){0, -1, 0};
	show("semtimedop 50 ms on 0", semtimedop(id, &op, 1, &t));
	value("GETNCNT after the timeout", semctl(id, 0, GETNCNT));

	/* a signal interrupts a wait: EINTR, nothing applied */
	pid = fork();
	if (pid == 0) {
		struct sigaction sa;
		memset(&sa, 0, sizeof sa);
		sa.sa_handler = on_usr1;
		sigaction(SIGUSR1, &sa, NULL);
		struct sembuf p = {0, -1, 0};
		int r = semop(id, &p, 1);
		_exit(r == -1 && errno == EINTR ? 0 : 1);
	}
	wait_count(id, GETNCNT, 1);
	kill(pid, SIGUSR1);
	child_status("semop interrupted: EINTR", pid);
	value("GETNCNT after EINTR", semctl(id, 0, GETNCNT));
	value("GETVAL after EINTR", semctl(id, 0, GETVAL));

	/* permissions of the current credentials */
	pid = fork();
	if (pid == 0) {
		if (setgid(65534) || setuid(65534))
			_exit(2);
		struct sembuf v = {0, 1, 0};
		int e1 = semop(id, &v, 1) == -1 ? errno : 0;
		int e2 = semctl(id, 0, IPC_RMID) == -1 ? errno : 0;
		int e3 = semctl(id, 0, GETVAL) == -1 ? errno : 0;
		_exit((e1 == EACCES) + 2 * (e2 == EPERM) + 4 * (e3 == EACCES));
	}
	child_status("as nobody: EACCES, EPERM, EACCES", pid);

	/* removal: waiters get EIDRM */
	pid = fork();
	if (pid == 0) {
		struct sembuf p = {0, -1, 0};
		int r = semop(id, &p, 1);
		_exit(r == -1 && errno == EIDRM ? 0 : 1);
	}
	wait_count(id, GETNCNT, 1);
	show("IPC_RMID", semctl(id, 0, IPC_RMID));
	child_status("waiter gets EIDRM", pid);
	show("GETVAL after IPC_RMID", semctl(id, 0, GETVAL));
	show("semget the key after IPC_RMID", semget(base, 1, 0600));
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: sysv_walk KEYBASE\n");
		return 2;
	}
	key_t base = (key_t)strtol(argv[1], NULL, 0);
	if (argc > 2)
		mode = !strcmp(argv[2], "create") ? 1 : !strcmp(argv[2], "use") ? 2 : 0;
	printf("== shared memory\n");
	if (mode == 0) {
		creation_race(base + 2, 0);
		creation_race(base + 3, 1);
	}
	shm_walk(base);
	printf("== semaphores\n");
	sem_walk(base + 1);
	return 0;
}
