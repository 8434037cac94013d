//! Automatic load balancing (issue 13) on nodes that behave as separate
//! machines (`dsmd --cpus`: node 1 on CPU 0, node 2 on CPU 1): CPU-bound
//! work started on one node spreads by itself, comes home when home is
//! idle, and the controls (`--no-balance`, `balance on|off`, `block`,
//! `expel`, `omrun --lock`, `lock|unlock`) are obeyed; a process that
//! cannot move is never chosen again and again; a node lost while it hosts
//! balanced processes costs what a node loss costs; `omctl top` shows it.

use migshm::{
    c_program, eventually_every, omctl, uffd_or_skip, without_colours, Cluster, ClusterOptions,
    Proc,
};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Poll `f` until it holds or `limit` passes, four times a second: each
/// look runs `omctl`, which asks every daemon, and a look every 10 ms kept
/// a quarter of a CPU busy (measured), a load the balancer rightly weighs
/// where it runs.
fn soon(limit: Duration, f: impl FnMut() -> bool) -> bool {
    eventually_every(limit, Duration::from_millis(250), f)
}

/// The tests of this file one at a time: a node's load is every runnable
/// thread on its CPU, as on a real machine, so another test's spinners on
/// the same CPUs would (rightly) make a node look loaded.
fn alone() -> std::sync::MutexGuard<'static, ()> {
    static CPUS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    CPUS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn two_machines(daemon_args: &[&str]) -> Cluster {
    Cluster::start_with(ClusterOptions {
        nodes: 2,
        cpu_per_node: true,
        daemon_args: daemon_args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    })
    .expect("start 2 daemons")
}

/// `omrun [OPTIONS] -- PROGRAM` on `node`, once it said "spinning".
fn start(cluster: &Cluster, node: u8, options: &[&str], program: &str) -> Proc {
    let path = c_program(program).expect("compile");
    let mut command = Command::new(migshm::binary("omrun"));
    command
        .arg("--socket")
        .arg(cluster.socket(node))
        .args(options)
        .arg("--")
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut process = Proc::from(command.spawn().expect("start under omrun"));
    let mut out = BufReader::new(process.child.stdout.take().expect("stdout"));
    let mut line = String::new();
    assert!(
        out.read_line(&mut line).is_ok() && line.trim() == "spinning",
        "{program}: {line:?}"
    );
    process
}

fn spinners(cluster: &Cluster, node: u8, count: usize, options: &[&str]) -> Vec<Proc> {
    (0..count)
        .map(|_| start(cluster, node, options, "spin"))
        .collect()
}

/// `omctl ps` asked of `node`: (home pid, runs on, why).
fn placements(cluster: &Cluster, node: u8) -> Vec<(u32, u8, String)> {
    let (ok, stdout, stderr) = omctl(cluster.socket(node), &["ps"]);
    assert!(ok, "omctl ps: {stderr}");
    stdout
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cells: Vec<&str> = line.split_whitespace().collect();
            let why = cells.get(4..).map(|w| w.join(" ")).unwrap_or_default();
            Some((
                cells.first()?.parse().ok()?,
                cells.get(2)?.parse().ok()?,
                why,
            ))
        })
        .collect()
}

/// Where each of `procs` runs (by its home pid).
fn nodes_of(cluster: &Cluster, procs: &[Proc]) -> Vec<Option<u8>> {
    let all = placements(cluster, 1);
    procs
        .iter()
        .map(|p| {
            all.iter()
                .find(|(pid, _, _)| *pid == p.child.id())
                .map(|(_, on, _)| *on)
        })
        .collect()
}

/// `procs` split into those running on node 1 and the others.
fn split_by_node(cluster: &Cluster, procs: Vec<Proc>) -> (Vec<Proc>, Vec<Proc>) {
    let on = nodes_of(cluster, &procs);
    let (home, away): (Vec<_>, Vec<_>) =
        procs.into_iter().zip(on).partition(|(_, n)| *n == Some(1));
    (
        home.into_iter().map(|(p, _)| p).collect(),
        away.into_iter().map(|(p, _)| p).collect(),
    )
}

fn count_on(cluster: &Cluster, procs: &[Proc], node: u8) -> usize {
    nodes_of(cluster, procs)
        .iter()
        .filter(|n| **n == Some(node))
        .count()
}

/// How many moves `omctl top --once` lists for the last minute.
fn moves_last_minute(cluster: &Cluster) -> usize {
    let (ok, stdout, stderr) = omctl(cluster.socket(1), &["top", "--once"]);
    assert!(ok, "omctl top --once: {stderr}");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("moves in the last minute: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count of moves in:\n{stdout}"))
}

fn ctl(cluster: &Cluster, node: u8, args: &[&str]) {
    let (ok, stdout, stderr) = omctl(cluster.socket(node), args);
    assert!(ok, "omctl {args:?}: {stdout}{stderr}");
}

/// Nothing of `procs` leaves node 1 for `quiet`.
fn none_move(cluster: &Cluster, procs: &[Proc], quiet: Duration, what: &str) {
    let until = Instant::now() + quiet;
    while Instant::now() < until {
        assert_eq!(count_on(cluster, procs, 1), procs.len(), "{what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn ends(procs: Vec<Proc>) {
    for mut p in procs {
        // SAFETY: signalling a child we spawned and have not reaped.
        unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) };
        assert!(
            p.wait_timeout(Duration::from_secs(10)).is_some(),
            "a spinner did not end on SIGTERM"
        );
    }
}

#[test]
fn cpu_jobs_started_on_one_node_spread_stay_put_and_come_home_when_it_is_idle() {
    if !uffd_or_skip() {
        return;
    }
    let _alone = alone();
    let cluster = two_machines(&[]);
    let started = Instant::now();
    let jobs = spinners(&cluster, 1, 4, &[]);
    assert!(
        soon(Duration::from_secs(10), || count_on(&cluster, &jobs, 2)
            == 2),
        "not spread in 10 s: {:?}",
        nodes_of(&cluster, &jobs)
    );
    eprintln!("spread after {:?}", started.elapsed());
    let ps = placements(&cluster, 1);
    assert!(
        ps.iter()
            .filter(|(_, on, why)| *on == 2 && why.contains("moved by the balancer"))
            .count()
            == 2,
        "{ps:?}"
    );
    // Steady: nothing moves back and forth.
    let moves = moves_last_minute(&cluster);
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(count_on(&cluster, &jobs, 2), 2);
    assert_eq!(moves_last_minute(&cluster), moves, "moves while steady");

    // The two at home end: home is idle; one guest comes home (the other
    // then has node 2 to itself).
    let (home, away) = split_by_node(&cluster, jobs);
    assert_eq!(count_on(&cluster, &away, 2), 2);
    ends(home);
    let idle = Instant::now();
    assert!(
        soon(Duration::from_secs(15), || count_on(&cluster, &away, 1)
            == 1),
        "no guest came home: {:?}",
        nodes_of(&cluster, &away)
    );
    eprintln!("a guest came home after {:?}", idle.elapsed());
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        count_on(&cluster, &away, 1),
        1,
        "{:?}",
        nodes_of(&cluster, &away)
    );
    // The one at home ends too: the last guest comes home.
    let (home, away) = split_by_node(&cluster, away);
    ends(home);
    let idle = Instant::now();
    assert!(
        soon(Duration::from_secs(15), || count_on(&cluster, &away, 1)
            == 1),
        "the last guest did not come home: {:?}",
        nodes_of(&cluster, &away)
    );
    eprintln!("the last guest came home after {:?}", idle.elapsed());
    // Ended at home, as a process does.
    ends(away);
}

#[test]
fn no_balance_lock_and_block_are_obeyed_and_expel_sends_guests_home() {
    if !uffd_or_skip() {
        return;
    }
    let _alone = alone();
    let cluster = two_machines(&["--no-balance"]);
    let jobs = spinners(&cluster, 1, 3, &[]);
    none_move(&cluster, &jobs, Duration::from_secs(6), "--no-balance");
    assert!(placements(&cluster, 1)
        .iter()
        .all(|(_, _, why)| why.contains("balancing off")));
    // Node 2 takes no guests: node 1's balancer leaves them home.
    ctl(&cluster, 2, &["block"]);
    ctl(&cluster, 1, &["balance", "on"]);
    none_move(&cluster, &jobs, Duration::from_secs(6), "node 2 blocked");
    // By hand neither.
    let (ok, _, stderr) = omctl(
        cluster.socket(1),
        &["migrate", &jobs[0].child.id().to_string(), "2"],
    );
    assert!(!ok && stderr.contains("blocked"), "{stderr}");
    ends(jobs);

    // Locked (omrun --lock) stay; unlocked, one goes.
    let locked = spinners(&cluster, 1, 3, &["--lock"]);
    ctl(&cluster, 2, &["unblock"]);
    none_move(&cluster, &locked, Duration::from_secs(6), "omrun --lock");
    assert!(placements(&cluster, 1)
        .iter()
        .all(|(_, _, why)| why == "locked"));
    ctl(&cluster, 1, &["unlock", &locked[0].child.id().to_string()]);
    assert!(
        soon(Duration::from_secs(10), || nodes_of(&cluster, &locked)[0]
            == Some(2)),
        "unlocked, it stayed: {:?}",
        nodes_of(&cluster, &locked)
    );
    assert_eq!(count_on(&cluster, &locked, 1), 2, "the locked ones stay");
    // `omctl lock` on a process away keeps it there.
    ctl(&cluster, 1, &["lock", &locked[0].child.id().to_string()]);

    // Expel: every guest goes home, and none comes back (node 2 is blocked).
    let (ok, stdout, stderr) = omctl(cluster.socket(2), &["expel"]);
    assert!(ok, "expel: {stderr}");
    assert!(stdout.contains("1 guests sent home"), "{stdout}");
    none_move(&cluster, &locked, Duration::from_secs(5), "after expel");
    ctl(&cluster, 2, &["unblock"]);
    // Controls are root's (tests run as root: an unknown word is refused).
    let (ok, _, _) = omctl(cluster.socket(1), &["balance", "maybe"]);
    assert!(!ok);
    ends(locked);
}

#[test]
fn a_process_that_cannot_move_is_never_chosen_in_a_loop() {
    if !uffd_or_skip() {
        return;
    }
    let _alone = alone();
    let cluster = two_machines(&[]);
    let stuck: Vec<Proc> = (0..3)
        .map(|_| start(&cluster, 1, &[], "spin_threads"))
        .collect();
    none_move(&cluster, &stuck, Duration::from_secs(10), "cannot move");
    let ps = placements(&cluster, 1);
    assert!(
        ps.iter()
            .all(|(_, _, why)| why.starts_with("cannot move:") && why.contains("thread")),
        "{ps:?}"
    );
    // Each was looked at once in these 10 s (the next look is 30 s on).
    let log = without_colours(&cluster.log(1));
    for p in &stuck {
        let looks = log
            .lines()
            .filter(|l| l.contains("it stays") && l.contains(&format!("pid={}", p.child.id())))
            .count();
        assert_eq!(
            looks,
            1,
            "pid {}: looked at {looks} times:\n{}",
            p.child.id(),
            log.lines()
                .filter(|l| l.contains("balancer"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    ends(stuck);
}

#[test]
fn a_node_lost_while_it_hosts_balanced_processes_costs_a_node_loss_only() {
    if !uffd_or_skip() {
        return;
    }
    let _alone = alone();
    let mut cluster = two_machines(&[]);
    let mut jobs = spinners(&cluster, 1, 4, &[]);
    assert!(
        soon(Duration::from_secs(10), || count_on(&cluster, &jobs, 2)
            == 2),
        "not spread: {:?}",
        nodes_of(&cluster, &jobs)
    );
    let on = nodes_of(&cluster, &jobs);
    cluster.kill(2);
    // The two that ran there end (their node is gone); the two at home
    // run on, and the balancer sends nothing to the lost node.
    for (p, node) in jobs.iter_mut().zip(&on) {
        if *node == Some(2) {
            assert!(
                p.wait_timeout(Duration::from_secs(15)).is_some(),
                "a process of the lost node still runs at home"
            );
        }
    }
    let home: Vec<Proc> = jobs
        .into_iter()
        .zip(on)
        .filter(|(_, n)| *n == Some(1))
        .map(|(p, _)| p)
        .collect();
    none_move(&cluster, &home, Duration::from_secs(5), "after the loss");
    let (ok, _, stderr) = omctl(cluster.socket(1), &["status"]);
    assert!(ok, "node 1 serves on: {stderr}");
    ends(home);
}

#[test]
fn top_once_shows_every_node_and_the_moves_and_the_live_view_runs_in_a_terminal() {
    if !uffd_or_skip() {
        return;
    }
    let _alone = alone();
    let cluster = two_machines(&[]);
    let jobs = spinners(&cluster, 1, 3, &[]);
    assert!(soon(Duration::from_secs(10), || count_on(
        &cluster, &jobs, 2
    ) == 1));
    // Gossip: node 1 knows node 2's figures within a couple of seconds.
    let mut frame = String::new();
    assert!(
        soon(Duration::from_secs(5), || {
            frame = omctl(cluster.socket(1), &["top", "--once"]).1;
            frame
                .lines()
                .any(|l| l.starts_with("2 ") && l.contains(" 1 "))
        }),
        "{frame}"
    );
    let header = frame
        .lines()
        .find(|l| l.starts_with("node"))
        .unwrap_or_else(|| panic!("no header:\n{frame}"));
    for column in [
        "load", "cpus", "free_mib", "guests", "procs", "faults/s", "pages/s",
    ] {
        assert!(header.contains(column), "{column} missing: {header}");
    }
    let row = |n: &str| -> Vec<String> {
        frame
            .lines()
            .find(|l| l.split_whitespace().next() == Some(n))
            .unwrap_or_else(|| panic!("no row for node {n}:\n{frame}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    // Node 2: one CPU, one guest; node 1 balancing, loaded.
    assert_eq!(row("2")[2], "1.00", "{frame}");
    assert_eq!(row("2")[4], "1", "{frame}");
    assert!(
        row("1")[1].parse::<f64>().is_ok_and(|l| l >= 1.0),
        "{frame}"
    );
    assert!(frame.contains("moves in the last minute: 1"), "{frame}");
    assert!(frame.contains("1 -> 2  balancer"), "{frame}");

    // The live view in a real terminal.
    if Command::new("tmux").arg("-V").output().is_err() {
        let installed = Command::new("apt-get")
            .args(["install", "-y", "-q", "tmux"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(installed, "tmux is missing and could not be installed");
    }
    let session = format!("migshm-top-{}", std::process::id());
    let omctl_path = migshm::binary("omctl");
    let started = Command::new("tmux")
        .args(["new-session", "-d", "-s", &session, "-x", "120", "-y", "30"])
        .arg(format!(
            "{} --socket {} top",
            omctl_path.display(),
            cluster.socket(1).display()
        ))
        .status()
        .expect("tmux");
    assert!(started.success());
    let screen = || {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &session])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let mut first = String::new();
    let shown = soon(Duration::from_secs(5), || {
        first = screen();
        first.contains("migshm top") && first.lines().any(|l| l.starts_with("2 "))
    });
    // Refreshed every second: the clock on its first line moves on.
    let mut later = String::new();
    let refreshed = shown
        && soon(Duration::from_secs(5), || {
            later = screen();
            later.lines().next() != first.lines().next() && later.contains("migshm top")
        });
    let _ = Command::new("tmux")
        .args(["kill-session", "-t", &session])
        .status();
    assert!(shown, "the live view:\n{first}");
    assert!(refreshed, "not refreshed:\n{first}\n---\n{later}");
    ends(jobs);
}
