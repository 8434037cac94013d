//! `omctl [--socket PATH] nodes|ipcs|status|ps|migrate PID NODE|home|migrate --check PID`:
//! cluster administration.
//! The socket defaults to `$DSMD_SOCKET`.

use dsm::client::{Client, SOCKET_ENV};
use dsm::sysv::SHM_DEST;
use std::process::ExitCode;

const USAGE: &str =
    "usage: omctl [--socket PATH] nodes|ipcs|status|ps|migrate PID NODE|home|migrate --check PID";

fn user_name(uid: u32) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let id: u32 = f.nth(1)?.parse().ok()?;
            (id == uid).then(|| name.to_string())
        })
        .next()
        .unwrap_or_else(|| uid.to_string())
}

fn main() -> ExitCode {
    // Die quietly when the reader goes away (`omctl ipcs | head`), as C
    // tools do, instead of panicking on a write.
    // SAFETY: restoring the default disposition of SIGPIPE.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let mut args = std::env::args().skip(1);
    let mut socket = std::env::var_os(SOCKET_ENV).map(std::path::PathBuf::from);
    let mut command = None;
    let mut operands: Vec<String> = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--socket" => match args.next() {
                Some(p) => socket = Some(p.into()),
                None => {
                    eprintln!("omctl: --socket needs a path");
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other if command.is_none() => command = Some(other.to_string()),
            other if command.as_deref() == Some("migrate") && operands.len() < 2 => {
                operands.push(other.to_string())
            }
            other => {
                eprintln!("omctl: unexpected argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(command) = command else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    if !matches!(
        command.as_str(),
        "nodes" | "loads" | "ipcs" | "status" | "ps" | "migrate"
    ) {
        eprintln!("omctl: unknown command {command:?}\n{USAGE}");
        return ExitCode::from(2);
    }
    // `migrate --check PID`: why it cannot move, without moving it.
    let check = if command == "migrate" && operands.first().map(String::as_str) == Some("--check") {
        match operands
            .get(1)
            .and_then(|p| p.parse::<i32>().ok().filter(|p| *p > 0))
        {
            Some(pid) => Some(pid),
            None => {
                eprintln!("omctl: migrate --check needs a pid\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    // `migrate PID NODE|home`
    let migration = if command == "migrate" && check.is_none() {
        let pid = operands
            .first()
            .and_then(|p| p.parse::<i32>().ok().filter(|p| *p > 0));
        let to = match operands.get(1).map(String::as_str) {
            Some("home") => Some(None),
            Some(n) => n
                .parse::<u8>()
                .ok()
                .and_then(dsm::ids::NodeId::new)
                .map(Some),
            None => None,
        };
        match (pid, to) {
            (Some(pid), Some(to)) => Some((pid, to)),
            _ => {
                eprintln!("omctl: migrate needs a pid and a node id or \"home\"\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let Some(socket) = socket else {
        eprintln!("omctl: no socket: pass --socket PATH or set {SOCKET_ENV}");
        return ExitCode::from(2);
    };
    let client = match Client::connect(&socket) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("omctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(pid) = check {
        return match client.migrate_check(pid) {
            Ok(reasons) if reasons.is_empty() => {
                println!("{pid} can move");
                ExitCode::SUCCESS
            }
            Ok(reasons) => {
                println!("{pid} cannot move:");
                for why in reasons {
                    println!("  {why}");
                }
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("omctl: cannot check {pid}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let result = match command.as_str() {
        "migrate" => match migration {
            Some((pid, to)) => client.migrate(pid, to).map(|()| match to {
                Some(node) => println!("{pid} runs on node {node}"),
                None => println!("{pid} runs at home"),
            }),
            None => Ok(()),
        },
        "ps" => client.migrations().map(|list| {
            println!(
                "{:<8} {:<6} {:<8} {:<10}",
                "pid", "home", "runs_on", "pid_there"
            );
            for m in list {
                println!(
                    "{:<8} {:<6} {:<8} {:<10}",
                    m.home_pid, m.home, m.runs_on, m.pid_there
                );
            }
        }),
        "loads" => client.loads().map(|loads| {
            println!("{:<5} {:>6} {:>9} {:>7}", "node", "load", "free_mib", "age_s");
            for l in loads {
                println!(
                    "{:<5} {:>6.2} {:>9} {:>7.1}",
                    l.node,
                    f64::from(l.load_milli) / 1000.0,
                    l.free_kib / 1024,
                    f64::from(l.age_ms) / 1000.0
                );
            }
        }),
        "nodes" => client.nodes().map(|nodes| {
            for n in nodes {
                let here = if n.this_node { "  (this node)" } else { "" };
                println!(
                    "{} {} {}{here}",
                    n.node,
                    if n.up { "up" } else { "down" },
                    n.address
                );
            }
        }),
        "ipcs" => client
            .ipcs()
            .map(|segments| {
                println!("------ Shared Memory Segments --------");
                println!(
                    "{:<10} {:<10} {:<10} {:<10} {:<10} {:<10} {:<10} {:<5}",
                    "key", "shmid", "owner", "perms", "bytes", "nattch", "status", "home"
                );
                for s in segments {
                    let status = if s.perm.mode & SHM_DEST != 0 {
                        "dest"
                    } else {
                        ""
                    };
                    println!(
                        "{:<10} {:<10} {:<10} {:<10o} {:<10} {:<10} {:<10} {:<5}",
                        format!("{:#010x}", s.perm.key as u32),
                        s.id,
                        user_name(s.perm.uid),
                        s.perm.mode & 0o777,
                        s.size,
                        s.nattch,
                        status,
                        s.home
                    );
                }
            })
            .and_then(|()| client.sem_ipcs())
            .map(|sets| {
                println!("\n------ Semaphore Arrays --------");
                println!(
                    "{:<10} {:<10} {:<10} {:<10} {:<10} {:<5} {:<7}",
                    "key", "semid", "owner", "perms", "nsems", "home", "arbiter"
                );
                for s in sets {
                    println!(
                        "{:<10} {:<10} {:<10} {:<10o} {:<10} {:<5} {:<7}",
                        format!("{:#010x}", s.perm.key as u32),
                        s.id,
                        user_name(s.perm.uid),
                        s.perm.mode & 0o777,
                        s.nsems,
                        s.home,
                        s.arbiter
                    );
                }
            }),
        _ => client.status().map(|nodes| {
            println!(
                "{:<5} {:>9} {:>9} {:>10} {:>13} {:>10} {:>12} {:>12} {:>6} {:>9} {:>8} {:>6} {:>9}",
                "node",
                "homed",
                "cached",
                "resident",
                "faults_served",
                "requests",
                "bytes_sent",
                "bytes_recv",
                "procs",
                "sem_sets",
                "cpus",
                "load",
                "free_mib"
            );
            for s in nodes {
                println!(
                    "{:<5} {:>9} {:>9} {:>10} {:>13} {:>10} {:>12} {:>12} {:>6} {:>9} {:>8} {:>6.2} {:>9}",
                    s.node,
                    s.segments_homed,
                    s.segments_cached,
                    s.resident_pages,
                    s.faults_served,
                    s.remote_requests,
                    s.bytes_sent,
                    s.bytes_received,
                    s.attached_processes,
                    s.sem_sets_homed,
                    s.cpus,
                    s.load_milli as f64 / 1000.0,
                    s.free_kib / 1024
                );
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match migration {
                Some((pid, _)) => eprintln!("omctl: cannot migrate {pid}: {e}"),
                None => eprintln!("omctl: {e}"),
            }
            ExitCode::FAILURE
        }
    }
}
