//! `balance-bench [--poll]`: automatic load balancing on a 2-node cluster
//! whose nodes have one CPU each (node 1 on CPU 0, node 2 on CPU 1), as two
//! machines would:
//!
//! - (a) four CPU-bound jobs (3 s of work each) started under `omrun` on
//!   node 1: makespan with balancing against without;
//! - (b) Apache prefork with PHP (opcache on) serving a page that computes
//!   for about 50 ms, `ab -c 4`: requests per second with balancing against
//!   node 1 alone (balancing off), and failed requests;
//! - (c) how long until four spinning jobs started on node 1 are spread,
//!   and how many moves each makes in the steady minute that follows.
//!
//! Prints a table, then (last line) one JSON object. `--poll` holds
//! `/dev/cpu_dma_latency` at 0 (vCPUs kept polling); by default the vCPUs
//! keep their idle states, as when a user runs `dsmd`. Needs root, gcc,
//! apache2, ab and libapache2-mod-php (`scripts/test.sh` installs them).

use migshm::programs::{ab, apache_conf_with, apache_installed, free_port, start_apache, Under};
use migshm::{c_program, omctl, Cluster, ClusterOptions, Proc};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const JOBS: usize = 4;
const JOB_SECONDS: f64 = 3.0;
const AB_CONCURRENCY: u32 = 4;
const AB_REQUESTS: u32 = 500;
/// (b) alternates node 1 alone and balanced this many times, and takes
/// the median of each pair's ratio: this VM's CPUs drift by up to 2x
/// within minutes.
const PHP_ROUNDS: usize = 3;
const PAGE_MS: f64 = 50.0;
const STEADY: Duration = Duration::from_secs(60);

fn fail(msg: &str) -> ! {
    eprintln!("balance-bench: {msg}");
    std::process::exit(1)
}

fn ctl(cluster: &Cluster, node: u8, args: &[&str]) {
    let (ok, out, err) = omctl(cluster.socket(node), args);
    if !ok {
        fail(&format!("omctl {args:?}: {out}{err}"));
    }
}

fn balancing(cluster: &Cluster, on: bool) {
    for node in [1, 2] {
        ctl(cluster, node, &["balance", if on { "on" } else { "off" }]);
    }
}

/// Where each process under `omrun` runs, by home pid (`omctl ps`).
fn placements(cluster: &Cluster) -> Vec<(u32, u8)> {
    let (ok, out, err) = omctl(cluster.socket(1), &["ps"]);
    if !ok {
        fail(&format!("omctl ps: {err}"));
    }
    out.lines()
        .skip(1)
        .filter_map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            Some((c.first()?.parse().ok()?, c.get(2)?.parse().ok()?))
        })
        .collect()
}

/// The moves of the last minute, as (seconds ago) (`omctl top --once`).
fn recent_moves(cluster: &Cluster) -> Vec<f64> {
    let (ok, out, err) = omctl(cluster.socket(1), &["top", "--once"]);
    if !ok {
        fail(&format!("omctl top: {err}"));
    }
    out.lines()
        .filter_map(|l| l.trim().strip_suffix("balancer").map(str::trim))
        .filter_map(|l| l.split("s ago").next()?.trim().parse().ok())
        .collect()
}

/// Rounds of `work` that take `seconds` on one CPU.
fn calibrate(work: &Path, seconds: f64) -> u64 {
    let rounds = 200_000_000u64;
    let started = Instant::now();
    let ok = Command::new("taskset")
        .args(["-c", "0"])
        .arg(work)
        .arg(rounds.to_string())
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        fail("the calibration run failed");
    }
    (rounds as f64 * seconds / started.elapsed().as_secs_f64()) as u64
}

/// (a): seconds until all jobs started under omrun on node 1 have ended.
fn makespan(cluster: &Cluster, work: &Path, rounds: u64) -> f64 {
    let started = Instant::now();
    let mut jobs: Vec<Proc> = (0..JOBS)
        .map(|_| {
            let mut c = migshm::omrun_command(cluster.socket(1), None, work);
            c.arg(rounds.to_string()).stdout(Stdio::null());
            Proc::from(c.spawn().unwrap_or_else(|e| fail(&format!("omrun: {e}"))))
        })
        .collect();
    for j in &mut jobs {
        match j.wait_timeout(Duration::from_secs(120)) {
            Some(s) if s.success() => {}
            other => fail(&format!("a job ended with {other:?}")),
        }
    }
    started.elapsed().as_secs_f64()
}

/// Loops of the PHP page that take about `PAGE_MS`, timed with php-cli
/// on CPU 0.
fn php_loops() -> u64 {
    let probe =
        "$t=microtime(true);$x=0;for($i=0;$i<2000000;$i++){$x+=$i%7;}echo microtime(true)-$t;";
    let out = Command::new("taskset")
        .args(["-c", "0", "php", "-r", probe])
        .output()
        .unwrap_or_else(|e| fail(&format!("php: {e}")));
    let secs: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| fail("php-cli's timing"));
    (2_000_000.0 * PAGE_MS / 1000.0 / secs.max(1e-6)) as u64
}

/// The page that computes for about `PAGE_MS` (`loops` of `php_loops`).
fn php_page(dir: &Path, loops: u64) -> String {
    std::fs::write(
        dir.join("htdocs/compute.php"),
        format!("<?php $x=0; for($i=0;$i<{loops};$i++){{$x+=$i%7;}} echo 'x:', $x, \"\\n\";\n"),
    )
    .unwrap_or_else(|e| fail(&format!("compute.php: {e}")));
    "compute.php".into()
}

/// (b): requests per second of Apache + PHP under omrun on node 1, after
/// a warm-up (children started, and moved if balancing), and the failed.
fn apache_php(cluster: &Cluster, dir: &Path, loops: u64, on: bool) -> (f64, u32) {
    let _ = std::fs::remove_dir_all(dir);
    let ports = [free_port(), free_port()];
    let conf = apache_conf_with(dir, ports, true);
    // One port, as Debian's default configuration has (two make the
    // children serialise accept through the SysV mutex), and four
    // children, as many as ab's connections: each always busy.
    let mut text: String = std::fs::read_to_string(&conf)
        .unwrap_or_default()
        .lines()
        .filter(|l| *l != format!("Listen 127.0.0.1:{}", ports[1]))
        .map(|l| format!("{l}\n"))
        .collect();
    text.push_str(
        "ServerLimit 4\nStartServers 4\nMinSpareServers 4\nMaxSpareServers 4\nMaxRequestWorkers 4\n",
    );
    std::fs::write(&conf, text).unwrap_or_else(|e| fail(&format!("conf: {e}")));
    let page = php_page(dir, loops);
    let _ = Command::new("chmod")
        .arg("-R")
        .arg("a+rX")
        .arg(dir)
        .status();
    balancing(cluster, on);
    let under = Under::Omrun {
        socket: cluster.socket(1),
        home: None,
    };
    let mut apache = start_apache(under, &conf, ports[0]).unwrap_or_else(|e| {
        fail(&format!(
            "{e}: {}",
            std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        ))
    });
    let url = format!("http://127.0.0.1:{}/{page}", ports[0]);
    let (_, warm_failed, _) = ab(&url, 250, AB_CONCURRENCY);
    let (done, failed, rate) = ab(&url, AB_REQUESTS, AB_CONCURRENCY);
    if apache
        .stop(libc::SIGTERM, Duration::from_secs(30))
        .is_none()
    {
        eprintln!("balance-bench: apache did not stop; killed");
    }
    if done != AB_REQUESTS {
        fail(&format!("ab: {done} of {AB_REQUESTS} requests"));
    }
    (rate, failed + warm_failed)
}

/// (c): seconds from the start until four spinners are spread two and
/// two, and the moves per process in the steady minute after.
fn spread_and_steady(cluster: &Cluster) -> (f64, f64) {
    let spin = c_program("spin").unwrap_or_else(|e| fail(&format!("spin.c: {e}")));
    balancing(cluster, true);
    let started = Instant::now();
    let mut pids = Vec::new();
    let mut spinners: Vec<Proc> = (0..JOBS)
        .map(|_| {
            let mut c = migshm::omrun_command(cluster.socket(1), None, &spin);
            c.stdin(Stdio::null()).stdout(Stdio::piped());
            let mut p = Proc::from(c.spawn().unwrap_or_else(|e| fail(&format!("omrun: {e}"))));
            if let Some(out) = p.child.stdout.take() {
                let mut line = String::new();
                let _ = BufReader::new(out).read_line(&mut line);
            }
            pids.push(p.child.id());
            p
        })
        .collect();
    let spread = loop {
        let on2 = placements(cluster)
            .iter()
            .filter(|(pid, node)| pids.contains(pid) && *node == 2)
            .count();
        if on2 == JOBS / 2 {
            break started.elapsed().as_secs_f64();
        }
        if started.elapsed() > Duration::from_secs(60) {
            fail("not spread within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(STEADY + Duration::from_secs(1));
    // Moves within the minute that followed the spread.
    let steady = recent_moves(cluster)
        .into_iter()
        .filter(|ago| *ago < STEADY.as_secs_f64())
        .count();
    for p in &mut spinners {
        // SAFETY: signalling a child we spawned and have not reaped.
        unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) };
        let _ = p.wait_timeout(Duration::from_secs(10));
    }
    (spread, steady as f64 / JOBS as f64)
}

fn main() {
    let poll = std::env::args().any(|a| a == "--poll");
    if !apache_installed() || !Path::new(migshm::programs::MOD_PHP).exists() {
        fail("apache2, ab and libapache2-mod-php are needed (scripts/test.sh installs them)");
    }
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        fail("two CPUs are needed (one per node)");
    }
    if let Err(e) = dsm::uffd::probe_features() {
        fail(&format!("userfaultfd is not usable here: {e}"));
    }
    let (_held, mode) = if poll {
        dsm::bench::hold_low_latency()
    } else {
        (None, "default idle states (as a user runs dsmd)")
    };
    let cluster = Cluster::start_with(ClusterOptions {
        nodes: 2,
        cpu_per_node: true,
        ..Default::default()
    })
    .unwrap_or_else(|e| fail(&format!("cluster: {e}")));
    let work = c_program("work").unwrap_or_else(|e| fail(&format!("work.c: {e}")));
    let rounds = calibrate(&work, JOB_SECONDS);
    balancing(&cluster, false);
    let makespan_off = makespan(&cluster, &work, rounds);
    balancing(&cluster, true);
    let makespan_on = makespan(&cluster, &work, rounds);
    let base = std::env::temp_dir().join(format!("balance-bench-{}", std::process::id()));
    let loops = php_loops();
    let mut pairs = Vec::new();
    let (mut failed_alone, mut failed_balanced) = (0, 0);
    for _ in 0..PHP_ROUNDS {
        let (alone, f) = apache_php(&cluster, &base.join("alone"), loops, false);
        failed_alone += f;
        let (balanced, f) = apache_php(&cluster, &base.join("balanced"), loops, true);
        failed_balanced += f;
        pairs.push((alone, balanced));
    }
    pairs.sort_by(|a, b| (a.1 / a.0).total_cmp(&(b.1 / b.0)));
    let (rps_alone, rps_balanced) = pairs[pairs.len() / 2];
    let all_pairs: Vec<String> = pairs
        .iter()
        .map(|(a, b)| format!("{b:.1}/{a:.1}"))
        .collect();
    let (spread_s, steady_moves) = spread_and_steady(&cluster);
    let _ = std::fs::remove_dir_all(&base);

    let makespan_ratio = makespan_on / makespan_off;
    let php_ratio = rps_balanced / rps_alone;
    println!("balance-bench: 2 nodes of one CPU each (node 1 on CPU 0, node 2 on CPU 1); {mode}");
    println!("| what | without balancing | with balancing | ratio | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| (a) makespan of {JOBS} jobs of {JOB_SECONDS} s started on node 1 | {makespan_off:.2} s | {makespan_on:.2} s | {makespan_ratio:.2} | <= 0.6 |"
    );
    println!(
        "| (b) Apache + PHP ({PAGE_MS} ms page), ab -c {AB_CONCURRENCY}, req/s (failed), median of {PHP_ROUNDS} | {rps_alone:.1} ({failed_alone}) | {rps_balanced:.1} ({failed_balanced}) | {php_ratio:.2} | >= 1.6, 0 failed |"
    );
    println!(
        "| (b) each round, balanced / alone | | {} | | |",
        all_pairs.join(", ")
    );
    println!("| (c) spread after the start | | {spread_s:.2} s | | <= 3 s |");
    println!("| (c) moves per process in the steady minute | | {steady_moves:.2} | | <= 2 |");
    println!(
        "{{\"mode\":\"{}\",\"makespan_off_s\":{makespan_off:.3},\"makespan_on_s\":{makespan_on:.3},\"makespan_ratio\":{makespan_ratio:.3},\"php_rps_alone\":{rps_alone:.2},\"php_rps_balanced\":{rps_balanced:.2},\"php_ratio\":{php_ratio:.3},\"php_failed\":{},\"spread_s\":{spread_s:.3},\"steady_moves_per_process_minute\":{steady_moves:.2}}}",
        if poll { "polling" } else { "default" },
        failed_alone + failed_balanced
    );
}
