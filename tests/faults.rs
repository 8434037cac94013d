//! Fault injection (`dsm::faults`): for every named point of the agents
//! and the daemon, a cluster whose daemons (and so their agents) die at
//! that point while a process that checks every word it reads is moved
//! there and back. Whatever dies, the process never reads a word nobody
//! wrote (its own heap, partly moved lazily, and a segment homed on node
//! 1), every `omctl migrate` returns within the bound, the process either
//! runs on (at home or away) or ends with SIGKILL or SIGBUS, and nothing
//! is left behind: no agent, no copy.

use dsm::faults::{FAULT_ENV, POINTS};
use migshm::{agents_of, c_program, eventually, run_role, Cluster, ClusterOptions};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

const SEGMENT_PAGES: &str = "2048";
const HEAP_MIB: &str = "64";
/// Longest an `omctl migrate` may take, whatever died.
const MIGRATE_BOUND: Duration = Duration::from_secs(20);

/// `omctl ARGS`, or `None` if it did not return within the bound.
fn omctl_bounded(socket: &Path, args: &[&str]) -> Option<(bool, String)> {
    let mut child = std::process::Command::new(migshm::binary("omctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run omctl");
    let deadline = Instant::now() + MIGRATE_BOUND;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let out = child.wait_with_output().ok()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            return Some((status.success(), text));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Processes running `program` (any node: all run on this machine).
fn running(program: &Path) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == program)
                && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                    !s.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                })
        })
        .collect()
}

fn spec_of(point: &str) -> String {
    match point {
        // Repeated points die some way in, not at their first time.
        "deputy.streaming" => format!("{point}@4"),
        "dsmd.remote_fault" => format!("{point}@40"),
        "host.serving" => format!("{point}@3"),
        _ => point.to_string(),
    }
}

#[test]
fn whatever_dies_at_any_point_no_wrong_read_no_hang_nothing_left() {
    if !migshm::uffd_or_skip() {
        return;
    }
    let program = c_program("random_check").expect("compile random_check.c");
    let dir = std::env::temp_dir().join(format!("migshm-faults-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut fired = Vec::new();
    // `MIGSHM_FAULT_POINTS=a,b` walks only those (to chase one).
    let only: Option<Vec<String>> = std::env::var("MIGSHM_FAULT_POINTS")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect());
    let points: Vec<(usize, &(&str, &str))> = POINTS
        .iter()
        .enumerate()
        .filter(|(_, (p, _))| only.as_ref().is_none_or(|o| o.iter().any(|x| x == p)))
        .collect();
    for (i, (point, stage)) in points.iter().map(|(i, p)| (*i, *p)) {
        let cluster = Cluster::start_with(ClusterOptions {
            nodes: 2,
            daemon_env: vec![(FAULT_ENV.to_string(), spec_of(point))],
            ..Default::default()
        })
        .expect("start 2 daemons");
        let key =
            (0x7f10_0000 + (std::process::id() as i32 % 0x1000) * 0x40 + i as i32).to_string();
        let (status, out) = run_role(cluster.socket(1), &["fill", &key, SEGMENT_PAGES, "171"]);
        assert!(status.success(), "{point}: fill: {out}");
        let out = dir.join(format!("{point}.out"));
        let mut process = migshm::start_checker(
            cluster.socket(1),
            &program,
            &[&key, SEGMENT_PAGES, HEAP_MIB, "write"],
            &out,
            "checking",
        );
        let read = || std::fs::read_to_string(&out).unwrap_or_default();
        let pid = process.child.id().to_string();
        let socket1 = cluster.socket(1).to_path_buf();
        for _ in 0..2 {
            for target in ["2", "home"] {
                if process.child.try_wait().ok().flatten().is_some() {
                    break;
                }
                let answer = omctl_bounded(&socket1, &["migrate", &pid, target]);
                assert!(
                    answer.is_some(),
                    "{point} ({stage}): omctl migrate {target} hung\n{}\n{}",
                    cluster.log(1),
                    cluster.log(2)
                );
                std::thread::sleep(Duration::from_millis(60));
            }
        }
        let logs = format!("{}{}", cluster.log(1), cluster.log(2));
        if logs.contains(&format!("fault point {point} reached")) {
            fired.push(*point);
        }
        // The end: kill it (at home, so everywhere) if it still runs.
        let status = match process.child.try_wait().ok().flatten() {
            Some(status) => status,
            None => {
                let _ = process.child.kill();
                process.child.wait().expect("wait")
            }
        };
        assert!(!read().contains("BAD"), "{point} ({stage}): {}", read());
        assert!(
            matches!(status.signal(), Some(libc::SIGKILL) | Some(libc::SIGBUS)),
            "{point} ({stage}): ended with {status:?}: {}",
            read()
        );
        assert!(
            eventually(Duration::from_secs(10), || running(&program).is_empty()),
            "{point} ({stage}): a copy of the process was left running: {:?}",
            running(&program)
        );
        for n in 1..=2u8 {
            if let Some(daemon) = cluster.node(n).pid() {
                assert!(
                    eventually(Duration::from_secs(10), || agents_of(daemon).is_empty()),
                    "{point} ({stage}): node {n} kept an agent"
                );
            }
            assert!(
                !cluster.log(n).contains("panicked"),
                "{point}: node {n} panicked"
            );
        }
        drop(cluster);
    }
    let missed: Vec<&str> = points
        .iter()
        .map(|(_, (p, _))| *p)
        .filter(|p| !fired.contains(p))
        .collect();
    println!("{} fault points fired: {fired:?}", fired.len());
    assert!(missed.is_empty(), "points never reached: {missed:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
