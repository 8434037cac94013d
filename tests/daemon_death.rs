//! A node's `dsmd` killed under the processes it serves: they must never
//! read memory the protocol did not give them (the kernel would fill a
//! hole with zeros once nobody serves the faults) and must end, with
//! SIGKILL or SIGBUS, within the bound; a new life of the daemon joins and
//! serves again.

use migshm::{run_role, spawn_role, uffd_or_skip, Cluster};
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

const PAGES: u64 = 16384; // 64 MiB
const WRITE_PAGES: u64 = 2048; // 8 MiB
const PATTERN: u8 = 0xAB;
const REPETITIONS: u32 = 50;
const BOUND: Duration = Duration::from_secs(2);
const MOVED_REPETITIONS: u32 = 50;

/// What a role printed after what was read of it already.
fn rest_of(p: &mut migshm::Proc) -> String {
    let mut rest = String::new();
    let _ = p.child.stdout.as_mut().map(|o| o.read_to_string(&mut rest));
    rest
}

fn key(i: u32) -> i32 {
    0x7d00_0000 + (std::process::id() as i32 % 4096) * 0x100 + i as i32
}

#[test]
fn readers_and_writers_never_see_a_page_the_protocol_did_not_give_when_their_daemon_dies() {
    if !uffd_or_skip() {
        return;
    }
    let mut cluster = Cluster::start(2).expect("start 2 daemons");
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    let mut slowest = Duration::ZERO;
    for i in 0..REPETITIONS {
        // A new segment each time, homed on node 1 and filled there: node
        // 2's pages are all missing when its reader starts.
        // Readers share one 64 MiB segment (a new life of node 2 has none
        // of its pages); every other time the process also writes (the
        // same bytes) into a new 8 MiB segment, so that node 2 holds pages
        // exclusively when its daemon dies (they are lost with it).
        let writes = i % 2 == 1;
        let (k, pages) = if writes {
            (key(i + 1), WRITE_PAGES)
        } else {
            (key(0), PAGES)
        };
        let (k, pages) = (k.to_string(), pages.to_string());
        if writes || i == 0 {
            let (status, out) = run_role(
                cluster.socket(1),
                &["fill", &k, &pages, &PATTERN.to_string()],
            );
            assert!(status.success(), "fill: {status:?} {out}");
        }
        let pattern = PATTERN.to_string();
        let mut args = vec!["check-random", &k, &pages, &pattern];
        if writes {
            args.push("write");
        }
        let mut reader = spawn_role(cluster.socket(2), &args).expect("start the reader");
        let mut first = [0u8; 9];
        let stdout = reader.child.stdout.as_mut().expect("piped stdout");
        stdout.read_exact(&mut first).expect("the reader starts");
        assert_eq!(&first, b"checking\n");
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(5 + rng % 150));
        let killed = Instant::now();
        cluster.kill(2);
        let status = reader
            .child_wait_until(BOUND + Duration::from_secs(3))
            .unwrap_or_else(|| {
                panic!("repetition {i}: the reader still runs 5 s after its daemon died")
            });
        let took = killed.elapsed();
        let rest = rest_of(&mut reader);
        assert!(
            !rest.contains("BAD"),
            "repetition {i}: a read returned what nobody wrote: {rest}"
        );
        assert!(
            matches!(status.signal(), Some(libc::SIGKILL) | Some(libc::SIGBUS)),
            "repetition {i}: the reader ended with {status:?}: {rest}"
        );
        assert!(
            took < BOUND,
            "repetition {i}: the reader ended {took:?} after its daemon"
        );
        slowest = slowest.max(took);
        cluster
            .restart(2)
            .expect("a new life of node 2's daemon joins");
        // The new life serves: a read of the segment from node 2 sees the
        // home's data (the pages node 2 held exclusively are gone: SIGBUS).
        let (status, out) = run_role(cluster.socket(2), &["read", &k]);
        assert!(
            (status.success() && out.starts_with(&u64::from_ne_bytes([PATTERN; 8]).to_string()))
                || status.signal() == Some(libc::SIGBUS),
            "repetition {i}: node 2 does not serve after its restart: {status:?} {out}"
        );
        if writes {
            let home = dsm::client::Client::connect(cluster.socket(1)).expect("node 1");
            let id = home
                .get(key(i + 1), 0, 0)
                .expect("the segment is still there");
            home.remove(id).expect("IPC_RMID");
        }
    }
    println!("{REPETITIONS} daemon deaths: slowest end of a reader {slowest:?}");
    for n in 1..=2 {
        assert!(!cluster.log(n).contains("panicked"), "node {n} panicked");
    }
}

#[test]
fn a_killed_guardian_is_replaced_and_the_new_one_guards_everything() {
    if !uffd_or_skip() {
        return;
    }
    let mut cluster = Cluster::start(2).expect("start 2 daemons");
    let k = key(99).to_string();
    let pages = WRITE_PAGES.to_string();
    let pattern = PATTERN.to_string();
    let (status, out) = run_role(cluster.socket(1), &["fill", &k, &pages, &pattern]);
    assert!(status.success(), "fill: {status:?} {out}");
    let mut reader =
        spawn_role(cluster.socket(2), &["check-random", &k, &pages, &pattern]).expect("reader");
    let mut first = [0u8; 9];
    let stdout = reader.child.stdout.as_mut().expect("piped stdout");
    stdout.read_exact(&mut first).expect("the reader starts");
    let dsmd2 = cluster.node(2).pid().expect("node 2 runs");
    let old = migshm::guardian_of(dsmd2).expect("node 2 has a guardian");
    // SAFETY: signalling a process of our cluster by pid.
    unsafe { libc::kill(old, libc::SIGKILL) };
    assert!(
        migshm::eventually(Duration::from_secs(5), || migshm::guardian_of(dsmd2)
            .is_some_and(|g| g != old)),
        "no new guardian"
    );
    // The reader was not killed by the old guardian's end.
    assert!(
        reader.child.try_wait().expect("try_wait").is_none(),
        "the reader died with the guardian"
    );
    std::thread::sleep(Duration::from_millis(50));
    cluster.kill(2);
    let status = reader
        .child_wait_until(BOUND)
        .expect("the reader ends within the bound");
    let rest = rest_of(&mut reader);
    assert!(
        !rest.contains("BAD"),
        "a read returned what nobody wrote: {rest}"
    );
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{rest}");
    assert!(cluster.log(2).contains("the guardian is gone"));
}

/// A process moved to node 2 reads random words of a segment homed on
/// node 1 and of its own heap (which stayed at home and is served lazily
/// by its host): node 2's daemon (or only its host agent) is killed
/// under it. It must never read a
/// word nobody wrote, and it ends (SIGKILL, at home too) within the bound.
#[test]
fn a_moved_process_never_sees_a_page_nobody_wrote_when_the_daemon_it_runs_under_dies() {
    if !uffd_or_skip() {
        return;
    }
    let program = migshm::c_program("random_check").expect("compile random_check.c");
    let mut cluster = Cluster::start(2).expect("start 2 daemons");
    let k = key(200).to_string();
    let (status, out) = run_role(
        cluster.socket(1),
        &["fill", &k, &PAGES.to_string(), &PATTERN.to_string()],
    );
    assert!(status.success(), "fill: {status:?} {out}");
    let dir = std::env::temp_dir().join(format!("migshm-moved-death-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut slowest = Duration::ZERO;
    for i in 0..MOVED_REPETITIONS {
        let out = dir.join(format!("out{i}"));
        // As above: writers get a segment of their own each time (the
        // pages node 2 held exclusively are lost with its daemon).
        let writes = i % 2 == 1;
        let (k, pages) = if writes {
            let k = key(300 + i).to_string();
            let pages = WRITE_PAGES.to_string();
            let (status, out) = run_role(
                cluster.socket(1),
                &["fill", &k, &pages, &PATTERN.to_string()],
            );
            assert!(status.success(), "fill: {status:?} {out}");
            (k, pages)
        } else {
            (k.clone(), PAGES.to_string())
        };
        let mut args = vec![k.as_str(), pages.as_str(), "128"];
        if writes {
            args.push("write");
        }
        let mut process =
            migshm::start_checker(cluster.socket(1), &program, &args, &out, "checking");
        let read = || std::fs::read_to_string(&out).unwrap_or_default();
        let pid = process.child.id().to_string();
        let (ok, stdout, stderr) = migshm::omctl(cluster.socket(1), &["migrate", &pid, "2"]);
        assert!(ok, "repetition {i}: migrate: {stdout} {stderr}");
        std::thread::sleep(Duration::from_millis(u64::from(i) * 7 % 40));
        // Every third time only its host agent dies (its daemon lives on),
        // while much of the heap still waits at home.
        let host_only = i % 3 == 2;
        let killed = Instant::now();
        if host_only {
            let dsmd2 = cluster.node(2).pid().expect("node 2 runs");
            let hosts = migshm::agents_of(dsmd2);
            assert!(!hosts.is_empty(), "repetition {i}: no host on node 2");
            for host in hosts {
                // SAFETY: signalling an agent of our cluster by pid.
                unsafe { libc::kill(host, libc::SIGKILL) };
            }
        } else {
            cluster.kill(2);
        }
        let status = process
            .child_wait_until(BOUND + Duration::from_secs(3))
            .unwrap_or_else(|| panic!("repetition {i}: it still runs 5 s after the daemon died"));
        let took = killed.elapsed();
        assert!(!read().contains("BAD"), "repetition {i}: {}", read());
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "repetition {i}: {}",
            read()
        );
        assert!(
            took < BOUND,
            "repetition {i}: ended {took:?} after the daemon"
        );
        slowest = slowest.max(took);
        if !host_only {
            cluster
                .restart(2)
                .expect("a new life of node 2's daemon joins");
        }
        if writes {
            let home = dsm::client::Client::connect(cluster.socket(1)).expect("node 1");
            let id = home
                .get(key(300 + i), 0, 0)
                .expect("the segment is still there");
            home.remove(id).expect("IPC_RMID");
        }
    }
    println!("{MOVED_REPETITIONS} deaths under a moved process: slowest end {slowest:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Only a process that maps cluster memory is at risk when its daemon
/// dies: one that detached everything is let go by the guardian (it lives
/// on, its next call fails), and is held again by its next attachment.
#[test]
fn a_process_that_detached_everything_outlives_its_daemon() {
    const NAME: &str = "a_process_that_detached_everything_outlives_its_daemon";
    if migshm::is_test_child(NAME) {
        return detach_then_kill_the_daemon();
    }
    if !uffd_or_skip() {
        return;
    }
    let mut cluster = Cluster::start(1).expect("start a node");
    for attach_again in ["no", "yes"] {
        let pid = cluster.node(1).pid().expect("daemon pid").to_string();
        let (status, out) = migshm::run_test_in_child(
            NAME,
            &[
                ("NODE_SOCKET", cluster.socket(1).as_os_str()),
                ("NODE_PID", pid.as_ref()),
                ("ATTACH_AGAIN", attach_again.as_ref()),
            ],
        );
        if attach_again == "no" {
            assert!(status.success(), "{status:?}: {out}");
            assert!(out.contains("alive after the daemon died"), "{out}");
        } else {
            assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}: {out}");
        }
        cluster.restart(1).expect("a new life of the daemon");
    }
}

fn detach_then_kill_the_daemon() {
    let socket = std::env::var_os("NODE_SOCKET").expect("socket");
    let daemon: i32 = std::env::var("NODE_PID")
        .ok()
        .and_then(|p| p.parse().ok())
        .expect("daemon pid");
    let client = dsm::client::Client::connect(std::path::Path::new(&socket)).expect("connect");
    let id = client.get(0, 4096 * 4, 0o600).expect("shmget");
    let seg = client.attach(id, false).expect("shmat");
    seg.atomics_u64()[0].store(7, std::sync::atomic::Ordering::SeqCst);
    seg.detach().expect("shmdt");
    let again = (std::env::var("ATTACH_AGAIN").as_deref() == Ok("yes"))
        .then(|| client.attach(id, false).expect("shmat again"));
    // SAFETY: SIGKILL of the daemon the test started for us.
    unsafe { libc::kill(daemon, libc::SIGKILL) };
    // The guardian acts within milliseconds of the daemon's end.
    std::thread::sleep(Duration::from_millis(1000));
    println!(
        "alive after the daemon died (attached: {})",
        again.is_some()
    );
    assert!(client.get(0, 4096, 0o600).is_err());
}
