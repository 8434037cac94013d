//! Semaphore sets across three `dsmd` on loopback: processes on different
//! nodes (the `sem-testprog` roles) and the library API from the test.

use dsm::client::Client;
use migshm::{
    eventually, spawn_program_as, spawn_sem_role, uffd_or_skip, Cluster, ClusterOptions, Proc,
};
use semaphore::{SemBuf, SemSet, Semaphores, IPC_CREAT, IPC_EXCL, IPC_NOWAIT};
use std::time::{Duration, Instant};

fn key() -> i32 {
    use std::sync::atomic::{AtomicI32, Ordering};
    static NEXT: AtomicI32 = AtomicI32::new(0x6000);
    NEXT.fetch_add(1, Ordering::Relaxed) + (std::process::id() as i32 % 1000) * 0x100
}

fn output(p: Proc, limit: Duration, what: &str) -> String {
    let (status, out) = p.output(limit).unwrap_or_else(|| panic!("{what} hung"));
    assert!(status.success(), "{what} failed ({status:?}): {out}");
    out.trim().to_string()
}

/// A set of one semaphore homed on `node`, with value `value`.
fn set_on(cluster: &Cluster, node: u8, value: i32) -> (Semaphores, SemSet) {
    let sems = Semaphores::connect(cluster.socket(node)).unwrap();
    let set = sems.get(key(), 1, IPC_CREAT | IPC_EXCL | 0o666).unwrap();
    set.set_value(0, value).unwrap();
    (sems, set)
}

/// Wait (at most 10 s) until `n` processes wait on semaphore 0 of `set`.
fn wait_for_waiters(set: &SemSet, n: i32) {
    assert!(
        eventually(Duration::from_secs(10), || set.get_ncnt(0).unwrap() == n),
        "{n} waiter(s) never queued"
    );
}

/// Wait until a `hold` role says it holds its unit.
fn held(p: &mut Proc) {
    use std::io::BufRead;
    let mut line = String::new();
    let stdout = p.child.stdout.as_mut().expect("piped stdout");
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("the holder's word");
    assert_eq!(line.trim(), "held", "the holder failed");
}

fn errno_of<T: std::fmt::Debug>(r: Result<T, semaphore::Error>) -> i32 {
    r.expect_err("expected an error").errno()
}

#[test]
fn mutual_exclusion_across_three_nodes_keeps_a_plain_counter_exact() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(3).expect("start cluster");
    let (_sems, set) = set_on(&cluster, 1, 1);
    let segments = Client::connect(cluster.socket(1)).unwrap();
    let seg = segments.get(key(), 4096, IPC_CREAT | 0o666).unwrap();
    let (procs, iters) = (6, 150);
    let running: Vec<Proc> = (0..procs)
        .map(|i| {
            let node = (i % 3) as u8 + 1;
            spawn_sem_role(
                cluster.socket(node),
                &[
                    "mutex",
                    &set.id().to_string(),
                    &seg.to_string(),
                    &iters.to_string(),
                    &procs.to_string(),
                ],
            )
            .unwrap()
        })
        .collect();
    for p in running {
        output(p, Duration::from_secs(120), "a mutex role");
    }
    let counter = segments.attach(seg, true).unwrap();
    let mut word = [0u8; 8];
    counter.read(0, &mut word);
    assert_eq!(u64::from_ne_bytes(word), procs * iters, "lost updates");
    assert_eq!(set.get_value(0).unwrap(), 1, "the mutex ends free");
}

#[test]
fn a_waiter_on_node_3_is_woken_by_a_post_on_node_1() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(3).expect("start cluster");
    let (_sems, set) = set_on(&cluster, 1, 0);
    let id = set.id().to_string();
    let waiter = spawn_sem_role(cluster.socket(3), &["p", &id]).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || set.get_ncnt(0).unwrap() == 1),
        "the waiter never queued at the home"
    );
    // The waiter's node is not the home: GETNCNT counts it there.
    let other = Semaphores::connect(cluster.socket(2)).unwrap();
    assert_eq!(other.open(set.id()).get_ncnt(0).unwrap(), 1);
    set.op(&[SemBuf {
        num: 0,
        op: 1,
        flags: 0,
    }])
    .unwrap();
    assert_eq!(output(waiter, Duration::from_secs(10), "the waiter"), "ok");
    assert_eq!(set.get_value(0).unwrap(), 0, "the waiter took the unit");
    assert_eq!(set.get_ncnt(0).unwrap(), 0);
}

#[test]
fn removal_gives_eidrm_to_waiters_on_every_node() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(3).expect("start cluster");
    let (_sems, set) = set_on(&cluster, 2, 0);
    let id = set.id().to_string();
    let waiters: Vec<Proc> = [1u8, 2, 3]
        .iter()
        .map(|n| spawn_sem_role(cluster.socket(*n), &["p", &id]).unwrap())
        .collect();
    wait_for_waiters(&set, 3);
    let remover = Semaphores::connect(cluster.socket(3)).unwrap();
    remover.open(set.id()).remove().unwrap();
    for w in waiters {
        assert_eq!(
            output(w, Duration::from_secs(10), "a waiter"),
            format!("errno {}", libc::EIDRM)
        );
    }
    assert_eq!(errno_of(set.get_value(0)), libc::EINVAL);
    assert!(remover.list().unwrap().iter().all(|s| s.id != set.id()));
}

/// Holders killed on the set's home node (whose undo lives in the fast
/// path's shared memory) and on another node both give their unit back.
#[test]
fn a_holder_killed_on_node_2_releases_its_undo() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(3).expect("start cluster");
    let (_sems, set) = set_on(&cluster, 1, 1);
    let id = set.id().to_string();
    for holder_node in [2u8, 1] {
        let holder = spawn_sem_role(cluster.socket(holder_node), &["hold", &id]).unwrap();
        assert!(
            eventually(Duration::from_secs(10), || set.get_value(0).unwrap() == 0),
            "the holder never took the semaphore"
        );
        let waiter = spawn_sem_role(cluster.socket(3), &["p", &id, "undo"]).unwrap();
        wait_for_waiters(&set, 1);
        drop(holder); // SIGKILL
        assert_eq!(output(waiter, Duration::from_secs(10), "the waiter"), "ok");
        // The waiter took it with SEM_UNDO and exited: it came back again.
        assert!(
            eventually(Duration::from_secs(10), || set.get_value(0).unwrap() == 1),
            "the waiter's undo did not apply at its exit"
        );
    }
}

#[test]
fn a_lost_node_releases_its_processes_undo() {
    if !uffd_or_skip() {
        return;
    }
    let mut cluster = Cluster::start_with(ClusterOptions {
        nodes: 3,
        peer_timeout_ms: 1000,
        ..ClusterOptions::default()
    })
    .expect("start cluster");
    let (_sems, set) = set_on(&cluster, 1, 2);
    let id = set.id().to_string();
    let _holders: Vec<Proc> = (0..2)
        .map(|_| spawn_sem_role(cluster.socket(2), &["hold", &id]).unwrap())
        .collect();
    assert!(eventually(Duration::from_secs(10), || set
        .get_value(0)
        .unwrap()
        == 0));
    let waiter = spawn_sem_role(cluster.socket(3), &["p", &id]).unwrap();
    wait_for_waiters(&set, 1);
    let started = Instant::now();
    cluster.kill(2);
    assert_eq!(output(waiter, Duration::from_secs(10), "the waiter"), "ok");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "undo of the lost node took {:?}",
        started.elapsed()
    );
    assert_eq!(
        set.get_value(0).unwrap(),
        1,
        "both holders' units came back"
    );
}

#[test]
fn interrupted_and_timed_out_waits_lose_no_operation() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(3).expect("start cluster");
    let (_sems, set) = set_on(&cluster, 1, 0);
    let id = set.id().to_string();

    // A timeout gives EAGAIN and leaves nothing behind.
    let t = spawn_sem_role(cluster.socket(2), &["p", &id, "plain", "100"]).unwrap();
    assert_eq!(
        output(t, Duration::from_secs(10), "a timed P"),
        format!("errno {}", libc::EAGAIN)
    );
    assert_eq!(set.get_ncnt(0).unwrap(), 0);

    // A signal gives EINTR and leaves nothing behind.
    let w = spawn_sem_role(cluster.socket(3), &["p-interruptible", &id]).unwrap();
    wait_for_waiters(&set, 1);
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(w.child.id() as i32, libc::SIGUSR1) };
    assert_eq!(
        output(w, Duration::from_secs(10), "an interrupted P"),
        format!("errno {}", libc::EINTR)
    );
    assert_eq!(set.get_ncnt(0).unwrap(), 0);
    assert_eq!(set.get_value(0).unwrap(), 0);

    // Timeouts racing posts, across nodes: every V is either taken by a
    // P that reports success or still in the value.
    let posts = 1500;
    let taker = spawn_sem_role(cluster.socket(3), &["timed-p-loop", &id, "2500", "300"]).unwrap();
    let poster =
        spawn_sem_role(cluster.socket(2), &["v", &id, &posts.to_string(), "1200"]).unwrap();
    output(poster, Duration::from_secs(60), "the poster");
    let taken: i32 = output(taker, Duration::from_secs(60), "the taker")
        .parse()
        .unwrap();
    assert_eq!(
        taken + set.get_value(0).unwrap(),
        posts,
        "an operation was lost or applied twice"
    );
}

#[test]
fn bad_requests_get_the_kernel_errno_and_change_nothing() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(2).expect("start cluster");
    let (sems, set) = set_on(&cluster, 2, 3);
    let remote = Semaphores::connect(cluster.socket(1)).unwrap();
    let op = |num: u16, op: i16, flags: i16| SemBuf { num, op, flags };
    for s in [&set, &remote.open(set.id())] {
        assert_eq!(errno_of(s.op(&[])), libc::EINVAL);
        assert_eq!(errno_of(s.op(&[op(1, -1, 0)])), libc::EFBIG);
        assert_eq!(errno_of(s.op(&[op(0, 32767, 0)])), libc::ERANGE);
        assert_eq!(errno_of(s.op(&[op(0, -4, IPC_NOWAIT)])), libc::EAGAIN);
        let too_many = vec![op(0, 0, IPC_NOWAIT); 100_000];
        assert_eq!(errno_of(s.op(&too_many)), libc::E2BIG);
        assert_eq!(errno_of(s.get_value(1)), libc::EINVAL);
        assert_eq!(errno_of(s.get_value(-1)), libc::EINVAL);
        assert_eq!(errno_of(s.set_value(0, 32768)), libc::ERANGE);
        assert_eq!(errno_of(s.set_value(0, -1)), libc::ERANGE);
        assert_eq!(errno_of(s.set_all(&[1, 2])), libc::EINVAL);
        assert_eq!(s.get_value(0).unwrap(), 3, "a failed call changed the set");
    }
    // Ids no node issued, or of a set that does not exist.
    for bad in [0, -1, 5, set.id() + 1] {
        assert_eq!(errno_of(sems.open(bad).get_value(0)), libc::EINVAL, "{bad}");
        assert_eq!(errno_of(sems.open(bad).op(&[op(0, 1, 0)])), libc::EINVAL);
    }
    // semget rules.
    assert_eq!(errno_of(sems.get(key(), 0, IPC_CREAT)), libc::EINVAL);
    assert_eq!(
        errno_of(sems.get(key(), 1_000_000, IPC_CREAT)),
        libc::EINVAL
    );
    assert_eq!(errno_of(sems.get(key(), 1, 0)), libc::ENOENT);
    let k = set.stat().unwrap().perm.key;
    assert_eq!(
        errno_of(remote.get(k, 1, IPC_CREAT | IPC_EXCL)),
        libc::EEXIST
    );
    assert_eq!(errno_of(remote.get(k, 2, 0)), libc::EINVAL);
    assert_eq!(remote.get(k, 0, 0).unwrap().id(), set.id());
}

#[test]
fn permission_rules_apply_to_other_users_on_every_node() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(2).expect("start cluster");
    let (sems, set) = set_on(&cluster, 1, 1);
    set.set_perm(0, 0, 0o600).unwrap();
    let id = set.id().to_string();
    let key = set.stat().unwrap().perm.key.to_string();
    let nobody = |node: u8, args: &[&str]| {
        let p = spawn_program_as("sem-testprog", cluster.socket(node), args, Some(65534)).unwrap();
        output(p, Duration::from_secs(10), "a probe as nobody")
    };
    let eacces = format!("errno {}", libc::EACCES);
    let eperm = format!("errno {}", libc::EPERM);
    for node in [1u8, 2] {
        // As on Linux: semget asks for the mode bits it is given.
        assert_eq!(nobody(node, &["probe", "get", &key, "1", "600"]), eacces);
        assert_eq!(nobody(node, &["probe", "get", &key, "1", "0"]), id);
        assert_eq!(nobody(node, &["probe", "op", &id, "0", "-1"]), eacces);
        assert_eq!(nobody(node, &["probe", "setval", &id, "0", "5"]), eacces);
        assert_eq!(nobody(node, &["probe", "rmid", &id]), eperm);
        assert_eq!(nobody(node, &["probe", "perm", &id, "666"]), eperm);
    }
    assert_eq!(set.get_value(0).unwrap(), 1);
    // Read permission only: wait-for-zero is allowed, altering is not.
    set.set_perm(0, 0, 0o604).unwrap();
    assert_eq!(nobody(2, &["probe", "op", &id, "0", "1"]), eacces);
    assert_eq!(
        nobody(2, &["probe", "op", &id, "0", "0"]),
        format!("errno {}", libc::EAGAIN)
    );
    set.set_perm(0, 0, 0o606).unwrap();
    assert_eq!(nobody(2, &["probe", "op", &id, "0", "-1"]), "ok");
    drop(sems);
}

/// The same random non-blocking operations on a kernel set and on ours,
/// through the library: on a set homed on this node (the shared-memory fast
/// path, falling back to the daemon) and on one homed on another node.
/// Every result, errno, value and GETPID must match the kernel's.
#[test]
fn library_operations_match_the_kernel() {
    const NAME: &str = "library_operations_match_the_kernel";
    if migshm::is_test_child(NAME) {
        let socket = |n| {
            std::path::PathBuf::from(std::env::var_os(format!("NODE{n}_SOCKET")).expect("socket"))
        };
        return compare_library_with_kernel(&socket(1), &socket(2));
    }
    if !uffd_or_skip() {
        return;
    }
    // In a child: its SEM_UNDO operations make node 2 hold it, and node 2
    // kills what it holds when it stops (see `dsm::guardian`).
    let cluster = Cluster::start(2).expect("start cluster");
    let (status, out) = migshm::run_test_in_child(
        NAME,
        &[
            ("NODE1_SOCKET", cluster.socket(1).as_os_str()),
            ("NODE2_SOCKET", cluster.socket(2).as_os_str()),
        ],
    );
    assert!(status.success(), "{out}");
}

fn compare_library_with_kernel(node1: &std::path::Path, node2: &std::path::Path) {
    let local = Semaphores::connect(node1).unwrap();
    let remote = Semaphores::connect(node2).unwrap();
    for (name, ours) in [
        ("homed here", local.get(0, 3, 0o600).unwrap()),
        (
            "homed elsewhere",
            remote.open(local.get(0, 3, 0o600).unwrap().id()),
        ),
    ] {
        // SAFETY: semget/semop/semctl on a private set of our own, with
        // arguments of the types each command expects.
        let kernel = unsafe { libc::semget(libc::IPC_PRIVATE, 3, 0o600) };
        assert!(kernel >= 0);
        let kernel_op = |sops: &[SemBuf]| -> Result<(), i32> {
            let mut raw: Vec<libc::sembuf> = sops.iter().map(|s| libc::sembuf::from(*s)).collect();
            // SAFETY: as above.
            let r = unsafe { libc::semop(kernel, raw.as_mut_ptr(), raw.len()) };
            if r < 0 {
                Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
            } else {
                Ok(())
            }
        };
        let mut rng = dsm::coherence::sim::Rng::new(0x5e3a);
        for step in 0..1500 {
            if rng.chance(5) {
                let (num, value) = (rng.below(3) as i32, rng.below(6) as i32);
                // SAFETY: as above.
                unsafe { libc::semctl(kernel, num, libc::SETVAL, value) };
                ours.set_value(num, value).unwrap();
                continue;
            }
            let sops: Vec<SemBuf> = (0..1 + rng.below(3))
                .map(|_| SemBuf {
                    num: if rng.chance(3) {
                        3
                    } else {
                        rng.below(3) as u16
                    },
                    op: rng.below(7) as i16 - 3,
                    flags: IPC_NOWAIT
                        | if rng.chance(40) {
                            semaphore::SEM_UNDO
                        } else {
                            0
                        },
                })
                .collect();
            let theirs = kernel_op(&sops);
            let mine = ours.op(&sops).map_err(|e| e.errno());
            assert_eq!(mine, theirs, "{name}, step {step}: {sops:?}");
            let mut values = vec![0u16; 3];
            // SAFETY: as above; GETALL writes nsems values.
            unsafe { libc::semctl(kernel, 0, libc::GETALL, values.as_mut_ptr()) };
            assert_eq!(ours.get_all().unwrap(), values, "{name}, step {step}");
            for num in 0..3 {
                // SAFETY: as above.
                let pid = unsafe { libc::semctl(kernel, num, libc::GETPID) };
                assert_eq!(ours.get_pid(num).unwrap(), pid, "{name}, step {step}");
            }
        }
        // SAFETY: as above.
        unsafe { libc::semctl(kernel, 0, libc::IPC_RMID) };
    }
}

/// A set used from one node only is lent to it (then served from that
/// node's shared memory); a user on another node brings it back; and if
/// the borrower dies, its processes' undo still applies.
#[test]
fn a_set_follows_its_only_user_and_survives_the_borrowers_loss() {
    if !uffd_or_skip() {
        return;
    }
    let mut cluster = Cluster::start_with(ClusterOptions {
        nodes: 3,
        peer_timeout_ms: 1000,
        ..ClusterOptions::default()
    })
    .expect("start cluster");
    let (sems, set) = set_on(&cluster, 1, 2);
    let id = set.id().to_string();
    let arbiter = || {
        sems.list()
            .unwrap()
            .iter()
            .find(|s| s.id == set.id())
            .map(|s| s.arbiter)
    };
    assert_eq!(arbiter(), Some(1));
    // 40 P+V pairs from node 2, then it holds one unit (it says so: the
    // value is 1 in the middle of its pairs too).
    let mut _holder = spawn_sem_role(cluster.socket(2), &["hold", &id, "40"]).unwrap();
    held(&mut _holder);
    assert!(
        eventually(Duration::from_secs(10), || arbiter() == Some(2)),
        "the set was not lent to its only user"
    );
    // A semctl from elsewhere brings it home, with node 2's changes.
    assert!(eventually(Duration::from_secs(10), || set
        .get_value(0)
        .unwrap()
        == 1));
    assert_eq!(arbiter(), Some(1));
    assert!(set.get_pid(0).unwrap() > 0);
    // Lent again, then its borrower dies holding a unit with SEM_UNDO.
    let mut _second = spawn_sem_role(cluster.socket(2), &["hold", &id, "40"]).unwrap();
    held(&mut _second);
    assert!(
        eventually(Duration::from_secs(10), || arbiter() == Some(2)),
        "the set was not lent again"
    );
    let waiter = spawn_sem_role(cluster.socket(3), &["p", &id, "undo"]).unwrap();
    wait_for_waiters(&set, 1);
    cluster.kill(2);
    assert_eq!(output(waiter, Duration::from_secs(10), "the waiter"), "ok");
    assert!(
        eventually(Duration::from_secs(10), || set.get_value(0).unwrap() == 2),
        "the lost node's units did not all come back"
    );
}

/// A process stopped inside a fast-path operation pauses that set only:
/// the daemon keeps serving everything else, and the set's waiting
/// requests run once the process goes on, or dies (its half operation
/// undone).
#[test]
fn a_process_stopped_inside_the_fast_path_pauses_only_its_set() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(2).expect("start cluster");
    let (_sems, set) = set_on(&cluster, 1, 1);
    let (_other_sems, other) = set_on(&cluster, 1, 5);
    let id = set.id().to_string();
    for ending in ["continue", "kill"] {
        let staller = spawn_sem_role(cluster.socket(1), &["stall", &id]).unwrap();
        let pid = staller.child.id() as i32;
        // Wait until it is stopped holding the lock.
        assert!(eventually(Duration::from_secs(10), || {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('T'))
            })
        }));
        // An operation on that set from the other node waits...
        let waiter = spawn_sem_role(cluster.socket(2), &["p", &id]).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        // ...while the daemon serves everything else (a process on its
        // node, so that a stuck daemon fails the test instead of hanging it).
        let served = spawn_sem_role(cluster.socket(1), &["p", &other.id().to_string()]).unwrap();
        assert_eq!(
            output(served, Duration::from_secs(10), "an op on another set"),
            "ok"
        );
        other.set_value(0, 5).unwrap();
        if ending == "continue" {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(pid, libc::SIGCONT) };
            output(staller, Duration::from_secs(10), "the staller");
        } else {
            drop(staller); // SIGKILL
        }
        assert_eq!(output(waiter, Duration::from_secs(10), "the waiter"), "ok");
        assert_eq!(set.get_value(0).unwrap(), 0);
        set.set_value(0, 1).unwrap();
    }
}
