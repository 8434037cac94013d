//! `forward-bench`: the cost of one call carried out at home for a moved
//! process (an 8-byte `pread` of a deleted file, through the seccomp
//! filter, the host, the link and the deputy), beside the same call on a
//! file of its own node and a call the filter looks at and lets run.
//! Two local dsmd; the process is moved to node 2 by `omctl migrate`.
//!
//! `--default-idle` runs with the vCPUs' default idle states, as a user
//! runs `dsmd`; otherwise they are kept out of deep idle. Prints a table
//! and, last, one JSON line.

use std::time::Duration;

use migshm::{c_program, eventually, omctl, omrun_command, Cluster, Proc};

const CALLS: usize = 20_000;

fn main() {
    let default_idle = std::env::args().any(|a| a == "--default-idle");
    let (_latency_guard, mode) = if default_idle {
        (None, "default idle states (as a user runs dsmd)")
    } else {
        dsm::bench::hold_low_latency()
    };
    match run() {
        Ok(rows) => {
            println!("forward-bench: {CALLS} calls each, moved to node 2 of two local dsmd; mode: {mode}");
            println!("{:<48} {:>10} {:>10}", "call", "p50 µs", "p99 µs");
            let labels = [
                ("pread of a file of its node (local)", "local"),
                ("pread of a deleted file (carried out at home)", "forwarded"),
                ("fcntl(F_GETFL) of a watched number (let run)", "watched"),
            ];
            let mut json = vec![format!(
                "\"mode\":\"{}\"",
                if mode.starts_with("cpu_dma_latency=0") {
                    "low-latency"
                } else {
                    "default"
                }
            )];
            for (label, key) in labels {
                let p50 = rows
                    .get(&format!("{key}_p50_ns"))
                    .copied()
                    .unwrap_or(f64::NAN)
                    / 1e3;
                let p99 = rows
                    .get(&format!("{key}_p99_ns"))
                    .copied()
                    .unwrap_or(f64::NAN)
                    / 1e3;
                println!("{label:<48} {p50:>10.1} {p99:>10.1}");
                json.push(format!(
                    "\"{key}_p50_us\":{p50:.1},\"{key}_p99_us\":{p99:.1}"
                ));
            }
            println!("{{{}}}", json.join(","));
        }
        Err(e) => {
            eprintln!("forward-bench: {e}");
            std::process::exit(1);
        }
    }
}

fn run() -> Result<std::collections::HashMap<String, f64>, String> {
    let mut cluster = Cluster::start(2).map_err(|e| format!("cannot start daemons: {e}"))?;
    cluster
        .wait_ready(Duration::from_secs(10))
        .map_err(|e| format!("daemons not ready: {e}"))?;
    let prog = c_program("forward_timing").map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("forward-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    // Output to a file: a regular file is reopened where the process goes.
    let out_path = dir.join("out");
    let out = std::fs::File::create(&out_path).map_err(|e| e.to_string())?;
    let mut command = omrun_command(cluster.socket(1), None, &prog);
    migshm::only_standard_fds(&mut command);
    let child = command
        .arg(CALLS.to_string())
        .arg(&dir)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut proc = Proc::from(child);
    let pid = proc.child.id() as i32;
    let text = || std::fs::read_to_string(&out_path).unwrap_or_default();
    let result = (|| {
        if !eventually(Duration::from_secs(30), || text().starts_with("ready")) {
            return Err("the program did not start".to_string());
        }
        let (ok, stdout, stderr) = omctl(cluster.socket(1), &["migrate", &pid.to_string(), "2"]);
        if !ok {
            return Err(format!("migrate: {} {}", stdout.trim(), stderr.trim()));
        }
        // SAFETY: signalling the process we started (its home pid).
        unsafe { libc::kill(pid, libc::SIGUSR1) };
        if !eventually(Duration::from_secs(60), || {
            text().contains("watched_p99_ns")
        }) {
            return Err(format!("no result: {:?}", text()));
        }
        let line = text()
            .lines()
            .find(|l| l.starts_with("local_p50_ns"))
            .unwrap_or_default()
            .to_string();
        let words: Vec<&str> = line.split_whitespace().collect();
        Ok(words
            .chunks(2)
            .filter_map(|kv| Some((kv.first()?.to_string(), kv.get(1)?.parse().ok()?)))
            .collect())
    })();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let _ = proc.wait_timeout(Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
    result
}
