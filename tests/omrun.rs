//! Unmodified C programs under `omrun`: their SysV calls are served by the
//! cluster, and they behave exactly as they do natively.

use migshm::{binary, c_program, run_under_omrun, spawn_under_omrun, uffd_or_skip, Cluster};
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

fn key_base() -> i32 {
    use std::sync::atomic::{AtomicI32, Ordering};
    static NEXT: AtomicI32 = AtomicI32::new(0);
    0x7000_0000
        + (std::process::id() as i32 % 5000) * 0x1000
        + NEXT.fetch_add(0x40, Ordering::Relaxed)
}

fn native(program: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .expect("run natively");
    assert!(out.status.success(), "native run failed: {:?}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The walk of SysV semantics prints the same lines natively and under
/// omrun, on the node of a three-node cluster it runs on and on another.
#[test]
fn sysv_walk_prints_the_same_natively_and_under_omrun() {
    if !uffd_or_skip() {
        return;
    }
    let walk = c_program("sysv_walk").expect("compile sysv_walk.c");
    let expected = native(&walk, &[&key_base().to_string()]);
    let cluster = Cluster::start(3).expect("start cluster");
    for node in [1u8, 3] {
        let (status, out) = run_under_omrun(
            cluster.socket(node),
            &walk,
            &[&key_base().to_string()],
            Duration::from_secs(60),
        )
        .expect("sysv_walk hung under omrun");
        assert!(status.success(), "under omrun: {status:?}\n{out}");
        migshm::assert_same_output(&format!("sysv_walk on node {node}"), &expected, &out);
    }
    // The whole walk on node 1 with every object homed on node 2.
    let (status, out) = migshm::run_under_omrun_homed(
        cluster.socket(1),
        Some(2),
        &walk,
        &[&key_base().to_string()],
        Duration::from_secs(60),
    )
    .expect("sysv_walk --home 2 hung");
    assert!(status.success(), "under omrun --home 2: {status:?}\n{out}");
    assert_eq!(
        out, expected,
        "objects homed on node 2: differs from native"
    );
    // Objects homed on another node: created there, walked here.
    let base = key_base().to_string();
    native(&walk, &[&base, "create"]);
    let expected = native(&walk, &[&base, "use"]);
    let base = key_base().to_string();
    let created = run_under_omrun(
        cluster.socket(2),
        &walk,
        &[&base, "create"],
        Duration::from_secs(60),
    )
    .expect("create hung");
    assert!(created.0.success());
    let (status, out) = run_under_omrun(
        cluster.socket(1),
        &walk,
        &[&base, "use"],
        Duration::from_secs(60),
    )
    .expect("sysv_walk use hung under omrun");
    assert!(status.success(), "under omrun: {status:?}\n{out}");
    assert_eq!(
        out, expected,
        "objects homed on node 2, walked on node 1: differs from native"
    );
    // Nothing left behind: every object the walk made was removed.
    let admin = dsm::client::Client::connect(cluster.socket(2)).unwrap();
    assert!(admin.ipcs().unwrap().is_empty(), "{:?}", admin.ipcs());
    assert!(
        admin.sem_ipcs().unwrap().is_empty(),
        "{:?}",
        admin.sem_ipcs()
    );
}

/// A ring buffer guarded by SysV semaphores: producers on nodes 1 and 2, a
/// consumer on node 3, an exact sum.
#[test]
fn a_c_ring_buffer_across_three_nodes_is_exact() {
    if !uffd_or_skip() {
        return;
    }
    let ring = c_program("ring").expect("compile ring.c");
    let cluster = Cluster::start(3).expect("start cluster");
    let key = key_base().to_string();
    let limit = Duration::from_secs(120);
    let run = |node: u8, args: &[&str]| {
        let (status, out) =
            run_under_omrun(cluster.socket(node), &ring, args, limit).expect("ring hung");
        assert!(status.success(), "ring {args:?} on node {node}: {status:?}");
        out
    };
    run(1, &["init", &key]);
    let count = 2000i64;
    let consumer = spawn_under_omrun(
        cluster.socket(3),
        &ring,
        &["consume", &key, &(2 * count).to_string()],
    )
    .unwrap();
    let producers: Vec<_> = [(1u8, "1"), (2, "2")]
        .iter()
        .map(|(node, id)| {
            spawn_under_omrun(
                cluster.socket(*node),
                &ring,
                &["produce", &key, id, &count.to_string()],
            )
            .unwrap()
        })
        .collect();
    for p in producers {
        let (status, _) = p.output(limit).expect("a producer hung");
        assert!(status.success(), "a producer failed: {status:?}");
    }
    let (status, out) = consumer.output(limit).expect("the consumer hung");
    assert!(status.success(), "the consumer failed: {status:?}");
    let expected: i64 = [1i64, 2]
        .iter()
        .map(|id| (0..count).map(|i| id * 1_000_000 + i).sum::<i64>())
        .sum();
    assert_eq!(out.trim().parse::<i64>().unwrap(), expected);
    run(2, &["remove", &key]);
}

/// The program's exit status (or the signal that ended it) is omrun's; a
/// missing daemon is a one-line error, not a hang.
#[test]
fn omrun_passes_the_exit_status_and_reports_a_missing_daemon() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(1).expect("start cluster");
    let sh = std::path::Path::new("/bin/sh");
    let (status, _) = run_under_omrun(
        cluster.socket(1),
        sh,
        &["-c", "exit 3"],
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(status.code(), Some(3));
    let (status, _) = run_under_omrun(
        cluster.socket(1),
        sh,
        &["-c", "kill -TERM $$"],
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(status.signal(), Some(libc::SIGTERM));
    let out = Command::new(binary("omrun"))
        .args(["--socket", "/nonexistent/dsmd.sock", "--", "/bin/true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no dsmd"), "{err}");
    let out = Command::new(binary("omrun"))
        .env_remove("DSMD_SOCKET")
        .args(["--", "/bin/true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127));
}

/// Wrong ids, bad pointers and bad arguments: the same errnos as natively.
#[test]
fn bad_calls_get_the_same_errnos_as_natively() {
    if !uffd_or_skip() {
        return;
    }
    let bad = c_program("sysv_bad").expect("compile sysv_bad.c");
    let expected = native(&bad, &[&key_base().to_string()]);
    let cluster = Cluster::start(2).expect("start cluster");
    let (status, out) = run_under_omrun(
        cluster.socket(2),
        &bad,
        &[&key_base().to_string()],
        Duration::from_secs(60),
    )
    .expect("sysv_bad hung under omrun");
    assert!(status.success());
    assert_eq!(out, expected);
}

/// A thousand children that inherit a segment, attach it again, count and
/// post, and exit: exact counts, nothing leaked, no process left counted.
#[test]
fn a_thousand_forked_children_leave_nothing_behind() {
    if !uffd_or_skip() {
        return;
    }
    let storm = c_program("forkstorm").expect("compile forkstorm.c");
    let cluster = Cluster::start(2).expect("start cluster");
    let (status, out) = run_under_omrun(
        cluster.socket(1),
        &storm,
        &["1000"],
        Duration::from_secs(120),
    )
    .expect("forkstorm hung under omrun");
    assert!(status.success(), "{out}");
    assert!(out.contains("ok 1000"), "{out}");
    let admin = dsm::client::Client::connect(cluster.socket(2)).unwrap();
    assert!(admin.ipcs().unwrap().is_empty());
    assert!(admin.sem_ipcs().unwrap().is_empty());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let procs: u64 = admin
            .status()
            .unwrap()
            .iter()
            .map(|s| s.attached_processes)
            .sum();
        if procs <= 1 {
            break; // the admin connection itself may count once
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{procs} processes still counted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The node's daemon dies while programs wait in semop: one that maps
/// the node's DSM memory is killed (its memory can no longer be served,
/// see `dsm::guardian`) if its failed call did not end it first; one that
/// only uses semaphores sees the call fail (EIDRM) and goes on; nothing
/// hangs.
#[test]
fn a_dead_daemon_fails_calls_instead_of_hanging() {
    if !uffd_or_skip() {
        return;
    }
    let ring = c_program("ring").expect("compile ring.c");
    let mut cluster = Cluster::start(2).expect("start cluster");
    let key = key_base().to_string();
    let (status, _) = run_under_omrun(
        cluster.socket(2),
        &ring,
        &["init", &key],
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(status.success());
    // Nothing will ever be produced: the consumer waits at node 2's set.
    let consumer = spawn_under_omrun(cluster.socket(1), &ring, &["consume", &key, "1"]).unwrap();
    let (status, out) =
        migshm::spawn_sem_role(cluster.socket(2), &["probe", "get", "0", "1", "1600"])
            .unwrap()
            .output(Duration::from_secs(10))
            .expect("semget");
    assert!(status.success(), "{out}");
    let set = out.trim().to_string();
    let waiter = migshm::spawn_sem_role(cluster.socket(1), &["p", &set]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    cluster.kill(1);
    let (status, _) = consumer
        .output(Duration::from_secs(10))
        .expect("the program hung after its daemon died");
    use std::os::unix::process::ExitStatusExt;
    // Killed, since it maps the node's memory, unless the failed semop
    // (EIDRM: the daemon went) made it exit first.
    assert!(
        status.signal() == Some(libc::SIGKILL) || status.code() == Some(1),
        "{status:?}"
    );
    let (status, out) = waiter
        .output(Duration::from_secs(10))
        .expect("the semaphore user hung after its daemon died");
    assert!(
        status.success() && out.starts_with("errno "),
        "semop should have failed: {out}"
    );
}

/// A program that closes every descriptor it did not open, then reuses the
/// numbers: its semaphore calls still work (the library reconnects) and
/// nothing is written into its own files.
#[test]
fn a_program_closing_all_descriptors_keeps_its_semaphores_and_files() {
    if !uffd_or_skip() {
        return;
    }
    let program = c_program("closefrom").expect("compile closefrom.c");
    let expected = native(&program, &[]);
    let cluster = Cluster::start(1).expect("start cluster");
    let (status, out) = run_under_omrun(cluster.socket(1), &program, &[], Duration::from_secs(30))
        .expect("closefrom hung under omrun");
    assert!(status.success());
    assert_eq!(out, expected);
}

/// A process that closes every descriptor after attaching a segment keeps
/// a coherent view of it: a write from another node reaches it.
#[test]
fn a_segment_stays_coherent_after_the_program_closes_all_descriptors() {
    if !uffd_or_skip() {
        return;
    }
    let program = c_program("closefrom_shm").expect("compile closefrom_shm.c");
    let cluster = Cluster::start(2).expect("start cluster");
    let key = key_base().to_string();
    let mut reader = migshm::Proc {
        child: migshm::omrun_command(cluster.socket(1), None, &program)
            .arg(&key)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start closefrom_shm under omrun"),
    };
    // Let it attach, read page 1 (a copy on node 1) and close everything.
    let mut out = reader.child.stdout.take().unwrap();
    let mut first = [0u8; 9];
    std::io::Read::read_exact(&mut out, &mut first).expect("the program said nothing");
    assert_eq!(&first, b"closed 0\n");
    std::thread::sleep(Duration::from_millis(200));
    let (status, _) = migshm::run_role(cluster.socket(2), &["write-page", &key, "1", "777"]);
    assert!(status.success());
    // The writer detached and exited: the program may count attachments.
    let mut stdin = reader.child.stdin.take().expect("stdin");
    std::io::Write::write_all(&mut stdin, b"go\n").expect("tell the program");
    drop(stdin);
    let (status, _) = reader
        .output(Duration::from_secs(20))
        .expect("the program hung");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(status.success());
    assert_eq!(
        rest.lines().collect::<Vec<_>>(),
        [
            "saw 777",
            "second shmat: ok",
            "second mapping sees 777",
            "IPC_STAT: ok, nattch 2"
        ],
        "its memory stopped being coherent, or segment calls failed after it closed everything"
    );
}

/// POSIX shared memory under omrun is the cluster's: an object made with
/// shm_open on node 1 is listed as a segment (its size and mode); on node 2
/// it is opened without O_CREAT and mapped even where its file is not (the
/// test removes the file, as on another machine: the file made again there
/// is a new one, so only the cluster's segment can carry the words); the
/// two see each other's writes; shm_unlink on node 2 removes it everywhere
/// (a new shm_open fails with ENOENT, no segment is left).
#[test]
fn posix_shared_memory_is_one_object_across_nodes() {
    if !uffd_or_skip() {
        return;
    }
    let prog = c_program("posix_shm").expect("compile posix_shm.c");
    let cluster = Cluster::start(2).expect("start cluster");
    let name = format!("/migshm-posix-{}", std::process::id());
    let file = format!("/dev/shm{name}");
    let _ = std::fs::remove_file(&file);
    let admin = dsm::client::Client::connect(cluster.socket(2)).expect("connect");
    let creator = spawn_under_omrun(cluster.socket(1), &prog, &["create", &name]).unwrap();
    assert!(
        migshm::eventually(Duration::from_secs(10), || admin
            .ipcs()
            .is_ok_and(|l| l.iter().any(|s| s.size == 8192 && s.nattch == 1))),
        "the object's segment: {:?}",
        admin.ipcs()
    );
    let segment = admin
        .ipcs()
        .unwrap()
        .into_iter()
        .find(|s| s.size == 8192)
        .unwrap();
    assert_eq!(segment.perm.mode & 0o777, 0o640);
    std::fs::remove_file(&file).expect("the creator's file");
    let (status, out) = run_under_omrun(
        cluster.socket(2),
        &prog,
        &["join", &name],
        Duration::from_secs(60),
    )
    .expect("the joiner hung");
    assert!(status.success(), "join: {status:?} {out}");
    assert!(
        out.contains("unlink 0") && out.contains("reopen ENOENT"),
        "{out}"
    );
    let (status, out) = creator
        .output(Duration::from_secs(30))
        .expect("creator hung");
    assert!(status.success(), "create: {status:?} {out}");
    assert!(out.contains("creator done"), "{out}");
    assert!(
        migshm::eventually(Duration::from_secs(5), || admin
            .ipcs()
            .is_ok_and(|l| l.is_empty())),
        "left behind: {:?}",
        admin.ipcs()
    );
    assert!(!std::path::Path::new(&file).exists());
}
