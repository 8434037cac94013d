//! `migrate-bench`: how long a process stops when it migrates, and how long
//! until it runs at full speed again, for 1 MiB and 64 MiB of private
//! memory, moved between two local dsmd by `omctl migrate` (the daemons'
//! agents do the move as they would between machines).
//!
//! Prints a table and, last, one JSON line.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use migshm::{c_program, eventually, omrun_command, Cluster, Proc};

const SIZES: [(&str, usize); 2] = [("1mib", 1 << 20), ("64mib", 64 << 20)];
const ROUNDS: usize = 5;

struct Round {
    frozen_us: f64,
    gap_us: f64,
    recover_us: f64,
    omctl_ms: f64,
}

fn one_round(cluster: &Cluster, bytes: usize) -> Result<Round, String> {
    let prog = c_program("migrate_timing").map_err(|e| e.to_string())?;
    // Output to a file: a regular file is reopened where the process goes.
    let out_path = std::env::temp_dir().join(format!("migrate-bench-{}", std::process::id()));
    let out = std::fs::File::create(&out_path).map_err(|e| e.to_string())?;
    let mut command = omrun_command(cluster.socket(1), None, &prog);
    migshm::only_standard_fds(&mut command);
    let child = command
        .arg(bytes.to_string())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut proc = Proc::from(child);
    let text = || std::fs::read_to_string(&out_path).unwrap_or_default();
    if !eventually(Duration::from_secs(30), || text().starts_with("ready")) {
        return Err("the program did not start".into());
    }
    // Let it settle and take its baseline.
    std::thread::sleep(Duration::from_millis(300));
    let pid = proc.child.id().to_string();
    let t = Instant::now();
    let out = Command::new(migshm::binary("omctl"))
        .arg("--socket")
        .arg(cluster.socket(1))
        .args(["migrate", &pid, "2"])
        .output()
        .map_err(|e| e.to_string())?;
    let omctl_ms = t.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill with a pid we started.
    unsafe { libc::kill(proc.child.id() as i32, libc::SIGTERM) };
    let _ = proc.wait_timeout(Duration::from_secs(10));
    let all = text();
    let _ = std::fs::remove_file(&out_path);
    let result = all
        .lines()
        .find(|l| l.starts_with("gap_us"))
        .ok_or(format!("no result line in {all:?}"))?
        .to_string();
    if std::env::var_os("MIGRATE_BENCH_VERBOSE").is_some() {
        eprintln!("  {bytes} bytes: {result}");
    }
    let fields: Vec<&str> = result.split_whitespace().collect();
    let field = |name: &str| -> Result<f64, String> {
        fields
            .iter()
            .position(|f| *f == name)
            .and_then(|i| fields.get(i + 1)?.parse().ok())
            .ok_or(format!("no {name} in {result:?}"))
    };
    // The deputy's own measure: stopped until the copy was let run.
    let log = cluster.log(1);
    let frozen_us: f64 = log
        .lines()
        .rev()
        .find_map(|l| {
            l.split("frozen_us=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .ok_or("no frozen_us in node 1's log")?;
    Ok(Round {
        frozen_us,
        gap_us: field("gap_us")?,
        recover_us: field("recover_us")?,
        omctl_ms,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut cluster = match Cluster::start(2) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("migrate-bench: cannot start daemons: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = cluster.wait_ready(Duration::from_secs(10)) {
        eprintln!("migrate-bench: daemons not ready: {e}");
        std::process::exit(1);
    }
    let (_latency_guard, mode) = dsm::bench::hold_low_latency();
    println!(
        "migrate-bench: two dsmd on loopback; lazy transfer of large private regions; {ROUNDS} rounds, medians; mode: {mode}"
    );
    println!(
        "{:<10} {:>12} {:>18} {:>18} {:>16}",
        "memory", "downtime ms", "longest stall ms", "back to speed ms", "omctl migrate ms"
    );
    let low_latency = mode.starts_with("cpu_dma_latency=0");
    let mut json = vec![
        format!(
            "\"mode\":\"{}\"",
            if low_latency {
                "low-latency"
            } else {
                "default"
            }
        ),
        "\"transfer\":\"lazy\"".to_string(),
    ];
    for (name, bytes) in SIZES {
        let mut rounds = Vec::new();
        for _ in 0..ROUNDS {
            match one_round(&cluster, bytes) {
                Ok(r) => rounds.push(r),
                Err(e) => {
                    eprintln!("migrate-bench: {name}: {e}");
                    std::process::exit(1);
                }
            }
        }
        let down = median(rounds.iter().map(|r| r.frozen_us / 1e3).collect());
        let stall = median(rounds.iter().map(|r| r.gap_us / 1e3).collect());
        let back = median(rounds.iter().map(|r| r.recover_us / 1e3).collect());
        let omctl = median(rounds.iter().map(|r| r.omctl_ms).collect());
        println!("{name:<10} {down:>12.2} {stall:>18.2} {back:>18.2} {omctl:>16.1}");
        json.push(format!("\"downtime_{name}_ms\":{down:.2}"));
        json.push(format!("\"longest_stall_{name}_ms\":{stall:.2}"));
        json.push(format!("\"recovery_{name}_ms\":{back:.2}"));
        json.push(format!("\"omctl_migrate_{name}_ms\":{omctl:.1}"));
    }
    cluster.stop();
    println!("{{{}}}", json.join(","));
}
