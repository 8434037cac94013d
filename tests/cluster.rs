//! Three `dsmd` on loopback and processes on different nodes using the
//! library API (through the `dsm-testprog` roles).

use dsm::client::{Client, IPC_CREAT, IPC_EXCL};
use migshm::{
    eventually, run_role, spawn_role, spawn_role_as, uffd_or_skip, Cluster, ClusterOptions,
};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

fn key() -> i32 {
    use std::sync::atomic::{AtomicI32, Ordering};
    static NEXT: AtomicI32 = AtomicI32::new(0x5000);
    NEXT.fetch_add(1, Ordering::Relaxed) + (std::process::id() as i32 % 1000) * 0x100
}

/// A 1 MiB segment homed on node 1, read and written in a loop by one
/// process on node 2 and one on node 3, so its pages keep moving through
/// node 1.
fn scan_from_nodes_2_and_3(cluster: &Cluster) -> Vec<migshm::Proc> {
    let k = key().to_string();
    let home = Client::connect(cluster.socket(1)).unwrap();
    home.get(k.parse().unwrap(), 256 * 4096, IPC_CREAT | 0o666)
        .unwrap();
    let scanners = [2u8, 3]
        .iter()
        .map(|n| {
            // Opposite parities: each needs the other's writes on every
            // pass, so both keep faulting through node 1 (one that held
            // every page it touches could rightly run on after the loss).
            let parity = (*n % 2).to_string();
            spawn_role(cluster.socket(*n), &["scan", &k, "256", &parity]).unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    scanners
}

/// After the home node's loss no scanner waits on it: within 10 s each one
/// has died of SIGBUS (it touched a page only the dead node could give),
/// or is still running on pages its own node holds (a scanner the other
/// one let take every page it touches may rightly go on; it must then be
/// running, not asleep in a fault). At least one meets the dead node.
/// Returns when the last SIGBUS was seen.
fn expect_sigbus(procs: Vec<migshm::Proc>) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut sigbus = 0;
    let mut last_sigbus = Instant::now();
    for mut p in procs {
        let left = deadline.saturating_duration_since(Instant::now());
        let pid = p.child.id();
        match p.child_wait_until(left) {
            Some(status) => {
                assert_eq!(
                    status.signal(),
                    Some(libc::SIGBUS),
                    "expected SIGBUS, got {status:?}"
                );
                sigbus += 1;
                last_sigbus = Instant::now();
            }
            None => {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let state = stat
                    .rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next());
                assert_eq!(
                    state,
                    Some("R"),
                    "a survivor is stuck after its home node was lost: {stat}"
                );
            }
        }
    }
    assert!(sigbus > 0, "no scanner met the lost node");
    last_sigbus
}

#[test]
fn fetch_add_from_processes_on_three_nodes_is_exact() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(3).expect("start cluster");
    let key = key().to_string();
    let (procs, iters) = (6u64, 20_000u64);
    let running: Vec<_> = (0..procs)
        .map(|i| {
            let node = (i % 3) as u8 + 1;
            spawn_role(
                cluster.socket(node),
                &["add", &key, &iters.to_string(), &procs.to_string()],
            )
            .unwrap()
        })
        .collect();
    for p in running {
        let (status, out) = p.output(Duration::from_secs(120)).expect("an adder hung");
        assert!(status.success(), "adder failed: {out}");
    }
    let (_, total) = run_role(cluster.socket(2), &["read", &key]);
    assert_eq!(
        total.lines().next(),
        Some((procs * iters).to_string().as_str()),
        "lost or duplicated increments"
    );
    // Every process detached on exit: nattch drops back to 0.
    let client = Client::connect(cluster.socket(3)).unwrap();
    let id = client.get(key.parse().unwrap(), 4096, 0).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || client
            .stat(id)
            .map(|s| s.nattch)
            .unwrap_or(99)
            == 0),
        "exited processes left attachments"
    );
}

#[test]
fn message_passing_reader_on_another_node_never_sees_stale_data() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(3).expect("start cluster");
    let key = key().to_string();
    let rounds = "300";
    let reader = spawn_role(cluster.socket(3), &["mp-read", &key, rounds]).unwrap();
    let writer = spawn_role(cluster.socket(1), &["mp-write", &key, rounds]).unwrap();
    let (ws, wout) = writer
        .output(Duration::from_secs(120))
        .expect("writer hung");
    let (rs, rout) = reader
        .output(Duration::from_secs(120))
        .expect("reader hung");
    assert!(rs.success(), "reader saw stale data: {rout}");
    assert!(ws.success(), "writer failed: {wout}");
}

#[test]
fn forked_child_on_another_node_stays_coherent() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(3).expect("start cluster");
    let key = key();
    // Home the segment on node 1; the forking process runs on node 2.
    let home = Client::connect(cluster.socket(1)).unwrap();
    let id = home.get(key, 4096, IPC_CREAT | 0o666).unwrap();
    let k = key.to_string();
    let poster = spawn_role(cluster.socket(3), &["post", &k]).unwrap();
    let (status, out) = run_role(cluster.socket(2), &["fork", &k, "5000"]);
    assert!(status.success(), "fork role failed: {out}");
    let (ps, pout) = poster.output(Duration::from_secs(60)).expect("poster hung");
    assert!(ps.success(), "{pout}");
    // Parent and child each added 5000 from node 2.
    let seg = home.attach(id, true).unwrap();
    assert_eq!(
        seg.atomic_u64(0).load(std::sync::atomic::Ordering::SeqCst),
        10_000
    );
    assert_ne!(
        seg.atomic_u64(1).load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the child never wrote"
    );
}

#[test]
fn process_killed_mid_fault_leaves_the_daemon_healthy() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(3).expect("start cluster");
    let k = key().to_string();
    for round in 0..5 {
        // Two scanners on different nodes keep pages moving; one is killed
        // at a random point of its faults.
        let steady = spawn_role(cluster.socket(3), &["scan", &k, "256"]).unwrap();
        let mut victim = spawn_role(cluster.socket(2), &["scan", &k, "256"]).unwrap();
        std::thread::sleep(Duration::from_millis(100 + 37 * round));
        let _ = victim.child.kill();
        let _ = victim.child.wait();
        drop(steady);
    }
    // The daemons still serve: a fresh process on each node works.
    for node in 1..=3 {
        let (status, out) = run_role(cluster.socket(node), &["add", &key().to_string(), "1000"]);
        assert!(status.success(), "node {node} no longer serves: {out}");
    }
    let client = Client::connect(cluster.socket(1)).unwrap();
    let id = client.get(k.parse().unwrap(), 0, 0).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || client
            .stat(id)
            .map(|s| s.nattch)
            .unwrap_or(99)
            == 0),
        "killed processes left attachments"
    );
    for n in 1..=3 {
        assert!(!cluster.log(n).contains("panicked"), "node {n} panicked");
    }
}

#[test]
fn a_killed_dsmd_gives_sigbus_to_survivors_within_the_bound() {
    if !uffd_or_skip() {
        return;
    }
    let mut cluster = Cluster::start_with(ClusterOptions {
        peer_timeout_ms: 1000,
        ..Default::default()
    })
    .unwrap();
    let scanners = scan_from_nodes_2_and_3(&cluster);
    // A segment homed on node 2 where node 1 holds page 5 exclusively and
    // node 3 holds page 0: after node 1 dies, page 0 still works, page 5 is
    // lost and must SIGBUS rather than show stale data.
    let k2 = key().to_string();
    let c2 = Client::connect(cluster.socket(2)).unwrap();
    let id2 = c2
        .get(k2.parse().unwrap(), 256 * 4096, IPC_CREAT | 0o666)
        .unwrap();
    assert!(
        run_role(cluster.socket(1), &["write-page", &k2, "5", "555"])
            .0
            .success()
    );
    assert!(run_role(cluster.socket(3), &["write-page", &k2, "0", "77"])
        .0
        .success());

    let killed_at = Instant::now();
    cluster.kill(1);
    // (A scanner that runs on is waited for to the end of the bound.)
    let bound = expect_sigbus(scanners) - killed_at;
    assert!(bound < Duration::from_secs(10), "SIGBUS after {bound:?}");
    let (status, out) = run_role(cluster.socket(3), &["read-page", &k2, "0"]);
    assert!(
        status.success() && out.starts_with("77"),
        "page held by a survivor stopped working: {status:?} {out}"
    );
    let (status, _) = run_role(cluster.socket(3), &["read-page", &k2, "5"]);
    assert_eq!(
        status.signal(),
        Some(libc::SIGBUS),
        "a page only the dead node held must SIGBUS"
    );
    // Operations on a segment homed on the dead node fail with EIDRM.
    let c3 = Client::connect(cluster.socket(3)).unwrap();
    let dead_id = c3.ipcs().unwrap();
    assert!(
        dead_id.iter().all(|s| s.home != 1),
        "ipcs still lists the dead node's segments"
    );
    let _ = id2;
    println!("survivors ended {bound:?} after the kill");
}

#[test]
fn sysv_identity_rules_hold_cluster_wide() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(3).expect("start cluster");
    let c1 = Client::connect(cluster.socket(1)).unwrap();
    let c3 = Client::connect(cluster.socket(3)).unwrap();
    let k = key();
    assert_eq!(c1.get(k, 4096, 0).unwrap_err().errno(), libc::ENOENT);
    let id = c1.get(k, 4096, IPC_CREAT | 0o600).unwrap();
    assert_eq!(
        c3.get(k, 100, 0).unwrap(),
        id,
        "a key resolves to one segment from every node"
    );
    assert_eq!(
        c3.get(k, 8192, 0).unwrap_err().errno(),
        libc::EINVAL,
        "larger than the segment"
    );
    assert_eq!(
        c3.get(k, 4096, IPC_CREAT | IPC_EXCL | 0o600)
            .unwrap_err()
            .errno(),
        libc::EEXIST
    );
    assert_eq!(
        c3.get(0x7777_0000, 0, IPC_CREAT | 0o600)
            .unwrap_err()
            .errno(),
        libc::EINVAL,
        "size below SHMMIN"
    );
    // Permissions use the caller's credentials (nobody = 65534).
    let s1 = cluster.socket(1);
    let probe = |args: &[&str]| {
        let (_, out) = spawn_role_as(s1, args, Some(65534))
            .unwrap()
            .output(Duration::from_secs(30))
            .unwrap();
        out.trim().to_string()
    };
    assert_eq!(
        probe(&["probe", "get", &k.to_string(), "4096", "0600"]),
        format!("errno {}", libc::EACCES)
    );
    let k_ro = key();
    let id_ro = c1.get(k_ro, 4096, IPC_CREAT | 0o644).unwrap();
    assert_eq!(probe(&["probe", "attach", &id_ro.to_string(), "ro"]), "ok");
    assert_eq!(
        probe(&["probe", "attach", &id_ro.to_string(), "rw"]),
        format!("errno {}", libc::EACCES)
    );
    assert_eq!(
        probe(&["probe", "rmid", &id_ro.to_string()]),
        format!("errno {}", libc::EPERM)
    );
    // Stat: nattch counted over all nodes, cpid, mode.
    let a1 = c1.attach(id, false).unwrap();
    let a3 = c3.attach(id, false).unwrap();
    let st = c3.stat(id).unwrap();
    assert_eq!(
        (st.nattch, st.size, st.perm.mode & 0o777, st.home),
        (2, 4096, 0o600, 1)
    );
    assert_eq!(st.cpid, std::process::id() as i32);
    c3.set(id, 0, 0, 0o640).unwrap();
    assert_eq!(c1.stat(id).unwrap().perm.mode & 0o777, 0o640);
    // Removal is deferred while attached; the key is free at once.
    c3.remove(id).unwrap();
    assert_eq!(c1.get(k, 4096, 0).unwrap_err().errno(), libc::ENOENT);
    let st = c1.stat(id).unwrap();
    assert!(st.perm.mode & dsm::sysv::SHM_DEST != 0 && st.perm.key == 0);
    a1.atomic_u64(0)
        .store(5, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        a3.atomic_u64(0).load(std::sync::atomic::Ordering::SeqCst),
        5,
        "still usable after IPC_RMID"
    );
    let new_id = c1.get(k, 4096, IPC_CREAT | 0o600).unwrap();
    assert_ne!(new_id, id);
    drop(a1);
    drop(a3);
    assert_eq!(
        c1.stat(id).unwrap_err().errno(),
        libc::EINVAL,
        "destroyed after the last detach"
    );
    assert_eq!(
        c1.attach(0x0100_0000 + 12345, false).unwrap_err().errno(),
        libc::EINVAL,
        "unknown id"
    );
    assert_eq!(c1.stat(-1).unwrap_err().errno(), libc::EINVAL);
}

#[test]
fn concurrent_exclusive_creation_has_exactly_one_winner() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(3).expect("start cluster");
    for _ in 0..30 {
        let k = key();
        let winners: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = (1..=3u8)
                .map(|n| {
                    let socket = cluster.socket(n).to_path_buf();
                    s.spawn(move || {
                        Client::connect(socket)
                            .unwrap()
                            .get(k, 4096, IPC_CREAT | IPC_EXCL | 0o600)
                            .is_ok()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            winners.iter().filter(|w| **w).count(),
            1,
            "key {k:#x}: winners {winners:?}"
        );
        let ids: Vec<i32> = (1..=3u8)
            .map(|n| {
                Client::connect(cluster.socket(n))
                    .unwrap()
                    .get(k, 1, 0)
                    .unwrap()
            })
            .collect();
        assert!(
            ids.windows(2).all(|w| w[0] == w[1]),
            "nodes disagree on the key: {ids:?}"
        );
    }
}

#[test]
fn keys_of_live_segments_survive_the_loss_of_a_directory_node() {
    if !uffd_or_skip() {
        return;
    }
    let mut cluster = Cluster::start(3).expect("start cluster");
    // Fixed keys: with three nodes about a third of them have node 1 as
    // their primary directory node.
    let keys: Vec<i32> = (0..24).map(|i| 0x0D1E_0000 + i).collect();
    let c2 = Client::connect(cluster.socket(2)).unwrap();
    let ids: Vec<i32> = keys
        .iter()
        .map(|k| c2.get(*k, 4096, IPC_CREAT | 0o600).unwrap())
        .collect();
    cluster.kill(1);
    // Wait until the survivors know node 1 is gone.
    assert!(eventually(Duration::from_secs(5), || {
        Client::connect(cluster.socket(3))
            .and_then(|c| c.nodes())
            .is_ok_and(|n| n.iter().any(|x| x.node.0 == 1 && !x.up))
    }));
    for node in [2u8, 3] {
        let c = Client::connect(cluster.socket(node)).unwrap();
        for (k, id) in keys.iter().zip(&ids) {
            assert_eq!(
                c.get(*k, 4096, 0).map_err(|e| e.errno()),
                Ok(*id),
                "key {k:#x} from node {node}"
            );
        }
    }
    // New keys can still be created, with exactly one winner per key.
    for i in 0..12 {
        let k = 0x0D1F_0000 + i;
        let won: Vec<bool> = [2u8, 3]
            .iter()
            .map(|n| {
                Client::connect(cluster.socket(*n))
                    .unwrap()
                    .get(k, 4096, IPC_CREAT | IPC_EXCL | 0o600)
                    .is_ok()
            })
            .collect();
        assert_eq!(won.iter().filter(|w| **w).count(), 1, "key {k:#x}: {won:?}");
    }
}

#[test]
fn a_silent_node_is_declared_lost_within_the_peer_timeout() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start_with(ClusterOptions {
        peer_timeout_ms: 1000,
        heartbeat_ms: 100,
        ..Default::default()
    })
    .expect("start cluster");
    let scanners = scan_from_nodes_2_and_3(&cluster);
    // Frozen, not dead: its sockets stay open, only heartbeats stop.
    let frozen_at = Instant::now();
    cluster.signal(1, libc::SIGSTOP);
    let detected = expect_sigbus(scanners) - frozen_at;
    // The bound: the peer timeout (1 s) plus a heartbeat and some slack.
    // Not before the leases end: the survivors' on the frozen node's pages
    // (the timeout less three heartbeats, 0.7 s of silence), or the frozen
    // daemon's own, after which its guardian kills it (its last tick may
    // be a heartbeat older than the stop: 0.6 s).
    assert!(detected < Duration::from_millis(3000), "took {detected:?}");
    assert!(
        detected >= Duration::from_millis(550),
        "fenced before a lease ended: {detected:?}"
    );
    let nodes = Client::connect(cluster.socket(2)).unwrap().nodes().unwrap();
    assert!(nodes.iter().any(|n| n.node.0 == 1 && !n.up));
    cluster.signal(1, libc::SIGCONT);
    println!("silent node declared lost after {detected:?}");
}

/// A new segment written from another node: sequential writes are granted
/// in runs of fresh pages (a handful of faults for thousands of pages),
/// scattered ones page by page, and every node reads exactly what was
/// written, zeros elsewhere. A 4 GiB segment costs its home next to
/// nothing until it is touched.
#[test]
fn fresh_pages_are_granted_in_runs_and_read_back_everywhere() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start(3).expect("start cluster");
    let (c1, c2, c3) = (
        Client::connect(cluster.socket(1)).unwrap(),
        Client::connect(cluster.socket(2)).unwrap(),
        Client::connect(cluster.socket(3)).unwrap(),
    );
    let faults_on = |node: u8| {
        c1.status()
            .unwrap()
            .iter()
            .find(|s| s.node == node)
            .map(|s| s.faults_served)
            .unwrap()
    };
    let table_bytes_on = |node: u8| {
        c1.status()
            .unwrap()
            .iter()
            .find(|s| s.node == node)
            .map(|s| s.table_bytes)
            .unwrap()
    };
    let pages = 4096usize; // 16 MiB
    let id = c1
        .get(key(), (pages * 4096) as u64, IPC_CREAT | 0o600)
        .unwrap();
    let writer = c2.attach(id, false).unwrap();
    let before = faults_on(2);
    for p in 0..pages / 2 {
        writer
            .atomic_u64(p * 512)
            .store(p as u64 + 1, std::sync::atomic::Ordering::SeqCst);
    }
    let sequential_faults = faults_on(2) - before;
    assert!(
        sequential_faults < 64,
        "{sequential_faults} faults for {} sequential fresh pages",
        pages / 2
    );
    let before = faults_on(2);
    // Past what the last run may have granted beyond the sequential half
    // (a run ends at most 512 pages on).
    let scattered_from = pages / 2 + 1024;
    let scattered: Vec<usize> = (scattered_from..pages).step_by(7).collect();
    for &p in &scattered {
        writer
            .atomic_u64(p * 512)
            .store(p as u64 + 1, std::sync::atomic::Ordering::SeqCst);
    }
    let scattered_faults = faults_on(2) - before;
    assert!(
        scattered_faults >= scattered.len() as u64,
        "scattered writes were granted pages they did not touch ({scattered_faults} faults for {})",
        scattered.len()
    );
    let expected = |p: usize| {
        if p < pages / 2 || (p >= scattered_from && (p - scattered_from).is_multiple_of(7)) {
            p as u64 + 1
        } else {
            0
        }
    };
    for client in [&c3, &c1] {
        let reader = client.attach(id, true).unwrap();
        for p in 0..pages {
            let seen = reader
                .atomic_u64(p * 512)
                .load(std::sync::atomic::Ordering::SeqCst);
            assert_eq!(seen, expected(p), "page {p}");
        }
    }
    drop(writer);
    let _ = c1.remove(id);
    // Untouched: a 4 GiB segment created and attached costs its home no
    // per-page memory.
    let before = table_bytes_on(1);
    let big = c1.get(key(), 4 << 30, IPC_CREAT | 0o600).unwrap();
    let attached = c1.attach(big, false).unwrap();
    let grown = table_bytes_on(1).saturating_sub(before);
    assert!(
        grown < 64 << 10,
        "a new 4 GiB segment took {grown} bytes of tables"
    );
    drop(attached);
    let _ = c1.remove(big);
}
