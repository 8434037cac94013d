//! Network partitions (DESIGN.md §7): three daemons in network
//! namespaces of their own; node 3 loses node 1, the segment's home, while
//! processes on every node read and write it, then the link heals. Node 3
//! is cut off from everyone (its link down), or by nftables drop rules
//! from node 1 only: one way (either way) or both, node 2 still reaching
//! both.
//!
//! What must hold (docs/architecture.md, "What a partition costs"): every
//! read, on either side, returns a value no older than the newest write
//! that completed before it started (the logs of all processes are checked
//! against one clock); the majority side goes on once the cut-off node is
//! declared lost; the cut-off side's processes get SIGBUS within the bound;
//! no write that completed is lost without its page turning SIGBUS; after
//! the heal the cut-off life stays out until its daemon restarts, and then
//! the new life joins and serves.

use migshm::linlog;
use migshm::{
    eventually, run_role, spawn_role, uffd_or_skip, without_colours, Cluster, ClusterOptions,
};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

const PAGES: u32 = 24;
const RUN_MS: u64 = 5000;
/// The peer timeout the cluster runs with, and its heartbeat.
const TIMEOUT: Duration = Duration::from_millis(1000);
const HEARTBEAT_MS: u64 = 100;

/// How node 3 loses node 1, the segment's home.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Cut {
    /// Node 3's port on the bridge goes down: it reaches nobody.
    Isolate,
    /// Node 1 stops hearing node 3; node 3 still hears node 1 (until TCP,
    /// getting no acknowledgements, stops sending).
    HomeDeaf,
    /// The same, and node 3 never sees node 1 close their connection:
    /// only a lease counted from what node 1 heard fences node 3 in time.
    HomeDeafNoEnd,
    /// Node 3 stops hearing node 1; node 1 still hears node 3.
    NodeDeaf,
    /// Nodes 1 and 3 lose each other; node 2 still reaches both.
    Pair,
}

impl Cut {
    /// The nftables drop rules, (at, from), of the one-way and partial cuts.
    fn drops(self) -> &'static [(u8, u8)] {
        match self {
            Cut::Isolate => &[],
            Cut::HomeDeaf | Cut::HomeDeafNoEnd => &[(1, 3)],
            Cut::NodeDeaf => &[(3, 1)],
            Cut::Pair => &[(1, 3), (3, 1)],
        }
    }

    fn apply(self, namespaces: &migshm::netns::Namespaces) {
        if self == Cut::Isolate {
            namespaces.cut(3).expect("cut node 3 off");
        }
        if self == Cut::HomeDeafNoEnd {
            namespaces.drop_ends_from(3, 1).expect("nft drop rule");
        }
        for &(at, from) in self.drops() {
            namespaces.drop_from(at, from).expect("nft drop rule");
        }
    }

    fn heal(self, namespaces: &migshm::netns::Namespaces) {
        if self == Cut::Isolate {
            namespaces.heal(3).expect("heal");
        }
        for &(at, from) in self.drops() {
            namespaces.undrop(at, from).expect("nft rule removed");
        }
        if self == Cut::HomeDeafNoEnd {
            namespaces.undrop_ends(3, 1).expect("nft rule removed");
        }
    }
}

#[test]
fn a_cut_off_node_never_lets_anyone_read_an_overwritten_value() {
    partition(Cut::Isolate);
}

#[test]
fn a_home_that_no_longer_hears_a_node_never_lets_it_read_an_overwritten_value() {
    partition(Cut::HomeDeaf);
}

#[test]
fn a_node_that_never_sees_its_deaf_home_hang_up_never_reads_an_overwritten_value() {
    partition(Cut::HomeDeafNoEnd);
}

#[test]
fn a_node_that_no_longer_hears_its_home_never_reads_an_overwritten_value() {
    partition(Cut::NodeDeaf);
}

#[test]
fn a_partial_partition_never_lets_anyone_read_an_overwritten_value() {
    partition(Cut::Pair);
}

fn partition(cut: Cut) {
    if !uffd_or_skip() || !migshm::netns::available() {
        return;
    }
    if !cut.drops().is_empty() && !migshm::netns::nft_available() {
        return;
    }
    let mut cluster = Cluster::start_with(ClusterOptions {
        nodes: 3,
        peer_timeout_ms: TIMEOUT.as_millis() as u64,
        heartbeat_ms: HEARTBEAT_MS,
        namespaces: true,
        ..Default::default()
    })
    .expect("a cluster in network namespaces");
    let key = (0x7e00_0000 + std::process::id() as i32 % 0x10000).to_string();
    let dir = std::env::temp_dir().join(format!("migshm-partition-{}-{cut:?}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // Homed on node 1. Pages 1..8 written on node 1, 8..16 on node 2,
    // 16..24 on node 3 (the one cut off); everybody reads. Page 0 is
    // written on node 1 only every 50 ms, so that node 3 most likely holds
    // it when the cut comes, and is read on node 3 all the time: a node
    // that kept using such a copy would read overwritten values.
    let home = dsm::client::Client::connect(cluster.socket(1)).expect("node 1");
    let id = home
        .get(
            key.parse().unwrap(),
            u64::from(PAGES) * 4096,
            dsm::client::IPC_CREAT | 0o666,
        )
        .expect("shmget");
    let run_ms = RUN_MS.to_string();
    // (node, name, pages written, pages read, µs per operation)
    type Role<'a> = (u8, &'a str, (u32, u32), (u32, u32), u32);
    let roles: [Role; 6] = [
        (1, "writer1", (1, 8), (0, 16), 10),
        (1, "slow-writer1", (0, 1), (0, 0), 50_000),
        (2, "writer2", (8, 16), (0, 16), 10),
        (3, "cutoff", (16, 24), (0, 24), 10),
        (3, "watcher3", (0, 0), (0, 1), 10),
        (2, "reader-of-3", (0, 0), (16, 24), 10),
    ];
    let mut procs = Vec::new();
    for (node, name, w, r, period) in roles {
        let log = dir.join(format!("{name}.log"));
        let args = [
            "lin".to_string(),
            key.clone(),
            PAGES.to_string(),
            w.0.to_string(),
            w.1.to_string(),
            r.0.to_string(),
            r.1.to_string(),
            run_ms.clone(),
            log.display().to_string(),
            period.to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        procs.push((
            name,
            log,
            spawn_role(cluster.socket(node), &args).expect("start"),
        ));
    }
    std::thread::sleep(Duration::from_millis(800));
    let namespaces = cluster.namespaces.as_ref().expect("namespaces");
    let cut_at = Instant::now();
    cut.apply(namespaces);
    // The cut-off process ends with SIGBUS (its lease on node 1's pages
    // ends) within the bound; node 1 and 2 see node 3 lost after the
    // timeout and go on.
    let mut ended = Vec::new();
    let mut running = procs;
    let deadline = cut_at + Duration::from_millis(RUN_MS + 5000);
    while !running.is_empty() {
        assert!(
            Instant::now() < deadline,
            "a process still runs long after its time"
        );
        let mut still = Vec::new();
        for (name, log, mut p) in running {
            match p.child.try_wait().expect("try_wait") {
                Some(status) => ended.push((name, log, status, cut_at.elapsed())),
                None => still.push((name, log, p)),
            }
        }
        running = still;
        std::thread::sleep(Duration::from_millis(5));
    }
    cut.heal(namespaces);
    let mut logs = Vec::new();
    for (name, log, status, at) in &ended {
        println!("{cut:?}: {name}: {status:?} {at:?} after the cut");
        match *name {
            "writer1" | "writer2" | "slow-writer1" => {
                assert!(status.success(), "{name}: {status:?}")
            }
            "cutoff" | "watcher3" => {
                assert_eq!(status.signal(), Some(libc::SIGBUS), "{name}");
                assert!(*at < TIMEOUT * 2, "{name} ended {at:?} after the cut");
            }
            // It reads pages node 3 wrote: those it held exclusively are
            // lost with it (SIGBUS), unless the reader only ever met pages
            // node 3 had given back.
            _ => assert!(
                status.success() || status.signal() == Some(libc::SIGBUS),
                "{name}: {status:?}"
            ),
        }
        logs.push((*name, linlog::load(log).expect("read a log")));
    }
    let (names, logs): (Vec<&str>, Vec<Vec<linlog::Record>>) = logs.into_iter().unzip();
    let checked = linlog::check(&logs).unwrap_or_else(|e| panic!("not linearizable: {e}"));
    assert!(checked.reads > 1000 && checked.writes > 1000, "{checked:?}");
    // No completed write lost: the majority's pages hold their writers'
    // last values.
    let seg = home.attach(id, true).expect("attach on node 1");
    let words = seg.atomics_u64();
    let majority = names
        .iter()
        .zip(&logs)
        .filter(|(name, _)| name.contains("writer"));
    for (_, log) in majority {
        let mut last = std::collections::HashMap::new();
        for r in log.iter().filter(|r| r.write) {
            last.insert(r.page, r.value);
        }
        for (page, value) in last {
            let seen = words[page as usize * 512].load(std::sync::atomic::Ordering::SeqCst);
            assert_eq!(seen, value, "page {page}: a completed write was lost");
        }
    }
    drop(seg);
    // The lease held whichever way the cut went: each of nodes 1 and 3
    // fenced the other before the other declared it lost (and so could
    // hand its pages to a writer).
    for (a, b) in [(1u8, 3u8), (3, 1)] {
        let fenced = first_event(&cluster.log(a), "lost touch with the peer", b);
        let declared = first_event(&cluster.log(b), "peer lost", a);
        println!("{cut:?}: node {a} fenced node {b} at {fenced:?}, node {b} declared {a} lost at {declared:?}");
        match (fenced, declared) {
            // (A run across midnight UTC: the later time wrapped.)
            (Some(f), Some(d)) => assert!(
                f < d || d + 86_400.0 - f < 43_200.0,
                "{cut:?}: node {a} fenced node {b} {:.3} s after node {b} declared it lost",
                f - d
            ),
            other => panic!("{cut:?}: node {a} / node {b}: {other:?}"),
        }
    }
    // Healed, node 3's old life stays out of node 1 (each took the other
    // for lost); node 2 lost it too only if it was cut off from node 2.
    std::thread::sleep(TIMEOUT);
    let nodes = home.nodes().expect("nodes");
    assert!(
        nodes.iter().any(|n| n.node.0 == 3 && !n.up),
        "the cut-off life was taken back: {nodes:?}"
    );
    let seen_by_2 = dsm::client::Client::connect(cluster.socket(2))
        .and_then(|c| c.nodes())
        .expect("nodes seen by node 2");
    assert!(
        seen_by_2
            .iter()
            .any(|n| n.node.0 == 3 && n.up == (cut != Cut::Isolate)),
        "{cut:?}: node 2 sees {seen_by_2:?}"
    );
    // A new life of node 3 joins and serves the segment's data.
    cluster.restart(3).expect("node 3 restarts and joins");
    let (status, out) = run_role(cluster.socket(3), &["read", &key]);
    assert!(
        status.success(),
        "node 3 after its restart: {status:?} {out}"
    );
    assert!(
        eventually(Duration::from_secs(5), || home
            .nodes()
            .is_ok_and(|n| n.iter().all(|x| x.up))),
        "not every node is up after the restart"
    );
    for n in 1..=3 {
        assert!(!cluster.log(n).contains("panicked"), "node {n} panicked");
    }
    println!(
        "{cut:?}: {} reads and {} writes linearizable across the cut",
        checked.reads, checked.writes
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A daemon that is stopped (SIGSTOP; a stall longer than its lease is
/// the same) cannot fence its node: its guardian, which it no longer
/// ticks, kills the processes it serves (and the daemon) before the other
/// nodes take its pages back, so none of them reads an overwritten value.
#[test]
fn a_stopped_daemon_cannot_let_its_processes_read_overwritten_values() {
    if !uffd_or_skip() {
        return;
    }
    let cluster = Cluster::start_with(ClusterOptions {
        nodes: 2,
        peer_timeout_ms: TIMEOUT.as_millis() as u64,
        heartbeat_ms: HEARTBEAT_MS,
        ..Default::default()
    })
    .expect("a cluster");
    let key = (0x7e10_0000 + std::process::id() as i32 % 0x10000).to_string();
    let dir = std::env::temp_dir().join(format!("migshm-stopped-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let home = dsm::client::Client::connect(cluster.socket(1)).expect("node 1");
    home.get(
        key.parse().unwrap(),
        4096 * 4,
        dsm::client::IPC_CREAT | 0o666,
    )
    .expect("shmget");
    let run_ms = "4000".to_string();
    let start = |node: u8, name: &str, w: (u32, u32), r: (u32, u32), period: &str| {
        let log = dir.join(format!("{name}.log"));
        let args = [
            "lin".to_string(),
            key.clone(),
            "4".into(),
            w.0.to_string(),
            w.1.to_string(),
            r.0.to_string(),
            r.1.to_string(),
            run_ms.clone(),
            log.display().to_string(),
            period.to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        (log, spawn_role(cluster.socket(node), &args).expect("start"))
    };
    // Node 1 writes page 0 every 20 ms; node 2 reads it all the time.
    let (wlog, mut writer) = start(1, "writer", (0, 1), (0, 0), "20000");
    let (rlog, mut reader) = start(2, "reader", (0, 0), (0, 1), "10");
    std::thread::sleep(Duration::from_millis(500));
    let stopped = Instant::now();
    cluster.signal(2, libc::SIGSTOP);
    let status = reader
        .child_wait_until(Duration::from_secs(5))
        .expect("the reader on the stopped node ends");
    let ended = stopped.elapsed();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert!(
        ended < TIMEOUT,
        "ended {ended:?} after the stop, not before the timeout"
    );
    let wstatus = writer
        .child_wait_until(Duration::from_secs(10))
        .expect("the writer ends");
    assert!(wstatus.success(), "writer: {wstatus:?}");
    let logs = vec![
        linlog::load(&wlog).expect("writer log"),
        linlog::load(&rlog).expect("reader log"),
    ];
    let checked = linlog::check(&logs).unwrap_or_else(|e| panic!("not linearizable: {e}"));
    assert!(
        cluster.log(2).contains("did not tick"),
        "the guardian did not act"
    );
    cluster.signal(2, libc::SIGCONT);
    println!(
        "stopped daemon: its reader killed {ended:?} after the stop; {} reads, {} writes linearizable",
        checked.reads, checked.writes
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// When a daemon first logged `message` about peer `node`, in seconds of
/// the day (the daemons' logs carry UTC timestamps with microseconds).
fn first_event(log: &str, message: &str, node: u8) -> Option<f64> {
    let field = format!("node=n{node}");
    log.lines()
        .map(without_colours)
        .filter(|line| line.contains(message) && line.contains(&field))
        .find_map(|line| {
            let time = line.split_whitespace().next()?.split('T').nth(1)?;
            let time = time.trim_end_matches('Z');
            let mut parts = time.split(':');
            let h: f64 = parts.next()?.parse().ok()?;
            let m: f64 = parts.next()?.parse().ok()?;
            let s: f64 = parts.next()?.parse().ok()?;
            Some(h * 3600.0 + m * 60.0 + s)
        })
}
