//! Nodes as separate machines on one host (`dsmd --cpus`), and the load
//! each measures and gossips (issue 13): a node serves its CPUs only, the
//! processes it serves run there, its load is what runs there, and the
//! other nodes hear of it.

use migshm::{
    binary, c_program, eventually, omctl, omrun_command, uffd_or_skip, Cluster, ClusterOptions,
    Proc,
};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Node `node`'s row of `omctl status`: (cpus, load).
fn status_of(cluster: &Cluster, node: u8) -> Option<(String, f64)> {
    let (ok, stdout, _) = omctl(cluster.socket(1), &["status"]);
    if !ok {
        return None;
    }
    let header: Vec<&str> = stdout.lines().next()?.split_whitespace().collect();
    let column = |name: &str| header.iter().position(|h| *h == name);
    let (cpus, load) = (column("cpus")?, column("load")?);
    stdout.lines().skip(1).find_map(|line| {
        let cells: Vec<&str> = line.split_whitespace().collect();
        (cells.first()? == &node.to_string())
            .then(|| Some((cells.get(cpus)?.to_string(), cells.get(load)?.parse().ok()?)))?
    })
}

/// What node `asked` has heard of node `of` (`omctl loads`): (load, age
/// in seconds).
fn heard(cluster: &Cluster, asked: u8, of: u8) -> Option<(f64, f64)> {
    let (ok, stdout, _) = omctl(cluster.socket(asked), &["loads"]);
    if !ok {
        return None;
    }
    stdout.lines().skip(1).find_map(|line| {
        let cells: Vec<&str> = line.split_whitespace().collect();
        if cells.first()? != &of.to_string() {
            return None;
        }
        Some((cells.get(1)?.parse().ok()?, cells.get(3)?.parse().ok()?))
    })
}

/// The CPUs process `pid` may run on (`Cpus_allowed_list`).
fn allowed(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or("")
        .trim()
        .to_string()
}

#[test]
fn a_node_serves_its_cpus_and_its_load_is_what_runs_there_and_is_heard_of() {
    if !uffd_or_skip() {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cluster = Cluster::start_with(ClusterOptions {
        nodes: 2,
        cpu_per_node: true,
        ..Default::default()
    })
    .expect("start 2 daemons");
    let second = (1 % cpus).to_string();
    assert_eq!(status_of(&cluster, 1).map(|s| s.0), Some("0".to_string()));
    assert_eq!(status_of(&cluster, 2).map(|s| s.0), Some(second.clone()));

    let spin = c_program("spin").expect("compile spin.c");
    let mut command = omrun_command(cluster.socket(1), None, &spin);
    command.stdin(Stdio::null()).stdout(Stdio::piped());
    let mut process = Proc::from(command.spawn().expect("start spin"));
    let pid = process.child.id();
    let mut out = BufReader::new(process.child.stdout.take().expect("stdout"));
    let mut line = String::new();
    assert!(
        out.read_line(&mut line).is_ok() && line.trim() == "spinning",
        "{line:?}"
    );
    // It registered with node 1 when it said so: it runs on node 1's CPU.
    assert!(
        eventually(Duration::from_secs(5), || allowed(pid) == "0"),
        "allowed {}",
        allowed(pid)
    );
    // One thread always runnable on CPU 0: the smoothed load rises past
    // half a CPU within a few time constants.
    assert!(
        eventually(Duration::from_secs(10), || status_of(&cluster, 1)
            .is_some_and(|s| s.1 >= 0.5)),
        "node 1's load: {:?}",
        status_of(&cluster, 1)
    );
    // Node 2 hears of it by gossip (one message a second to a node
    // picked at random: here the only other one).
    assert!(
        eventually(Duration::from_secs(10), || heard(&cluster, 2, 1)
            .is_some_and(|(load, age)| load >= 0.5 && age < 3.0)),
        "node 2 heard of node 1: {:?}",
        heard(&cluster, 2, 1)
    );
    drop(process);

    // A CPU it may not run on is refused, with the reason.
    let refused = Command::new(binary("dsmd"))
        .args([
            "--node",
            "1",
            "--listen",
            "127.0.0.1:1",
            "--socket",
            "/tmp/x.sock",
        ])
        .args(["--cpus", "4095"])
        .output()
        .expect("run dsmd");
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("--cpus") && why.contains("4095"), "{why}");
}
