//! `omctl [--socket PATH] COMMAND`: cluster administration.
//!
//! - `nodes`, `loads`, `ipcs`, `status`: what the cluster holds and how
//!   loaded each node is;
//! - `ps`: every process under `omrun`, where it runs and why;
//! - `migrate PID NODE|home`, `migrate --check PID`: move a process by
//!   hand, or say why it cannot move;
//! - `balance on|off`, `block`, `unblock`, `expel` (this node), `lock PID`,
//!   `unlock PID`: the balancer's controls;
//! - `top [--once]`: a live view of every node, refreshed every second
//!   (`--once`: one frame, for scripts).
//!
//! The socket defaults to `$DSMD_SOCKET`.

use dsm::client::{Client, SOCKET_ENV};
use dsm::sysv::SHM_DEST;
use dsm::wire::ClientRequest;
use std::process::ExitCode;

mod top;

const USAGE: &str = "usage: omctl [--socket PATH] nodes|loads|ipcs|status|ps|top [--once]\n\
    \x20      omctl [--socket PATH] migrate PID NODE|home | migrate --check PID\n\
    \x20      omctl [--socket PATH] balance on|off | block | unblock | expel | lock PID | unlock PID";
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
    let mut words: Vec<String> = Vec::new();
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
            _ => words.push(arg),
        }
    }
    let Some((command, operands)) = words.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let command = command.as_str();
    let operands: Vec<&str> = operands.iter().map(String::as_str).collect();
    let usage_error = |why: &str| {
        eprintln!("omctl: {why}\n{USAGE}");
        ExitCode::from(2)
    };
    let pid_of = |s: Option<&&str>| s.and_then(|p| p.parse::<i32>().ok()).filter(|p| *p > 0);
    // The balancer's controls: one request each.
    let control = match (command, operands.as_slice()) {
        ("balance", ["on"]) => Some(ClientRequest::Balance { on: true }),
        ("balance", ["off"]) => Some(ClientRequest::Balance { on: false }),
        ("balance", _) => return usage_error("balance needs on or off"),
        ("block", []) => Some(ClientRequest::Block { blocked: true }),
        ("unblock", []) => Some(ClientRequest::Block { blocked: false }),
        ("expel", []) => Some(ClientRequest::Expel),
        ("lock" | "unlock", [_]) => match pid_of(operands.first()) {
            Some(pid) => Some(ClientRequest::Lock {
                pid,
                locked: command == "lock",
            }),
            None => return usage_error(&format!("{command} needs a pid")),
        },
        ("block" | "unblock" | "expel" | "lock" | "unlock", _) => {
            return usage_error(&format!("unexpected arguments to {command}"))
        }
        _ => None,
    };
    let once = match (command, operands.as_slice()) {
        ("top", []) => false,
        ("top", ["--once"]) => true,
        ("top", _) => return usage_error("top takes only --once"),
        _ => false,
    };
    if control.is_none() && command != "top" && command != "migrate" && !operands.is_empty() {
        return usage_error(&format!("unexpected argument {:?}", operands[0]));
    }
    if control.is_none()
        && !matches!(
            command,
            "nodes" | "loads" | "ipcs" | "status" | "ps" | "migrate" | "top"
        )
    {
        return usage_error(&format!("unknown command {command:?}"));
    }
    // `migrate --check PID`: why it cannot move, without moving it.
    let check = if command == "migrate" && operands.first() == Some(&"--check") {
        if operands.len() != 2 {
            return usage_error("migrate --check needs a pid");
        }
        match pid_of(operands.get(1)) {
            Some(pid) => Some(pid),
            None => return usage_error("migrate --check needs a pid"),
        }
    } else {
        None
    };
    // `migrate PID NODE|home`
    let migration = if command == "migrate" && check.is_none() {
        let to = match operands.get(1) {
            Some(&"home") => Some(None),
            Some(n) => n
                .parse::<u8>()
                .ok()
                .and_then(dsm::ids::NodeId::new)
                .map(Some),
            None => None,
        };
        match (pid_of(operands.first()), to, operands.len()) {
            (Some(pid), Some(to), 2) => Some((pid, to)),
            _ => return usage_error("migrate needs a pid and a node id or \"home\""),
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
    if let Some(request) = control {
        return match client.control(&request) {
            Ok(n) => {
                match request {
                    ClientRequest::Expel => {
                        println!("{n} guests sent home; this node takes no guests")
                    }
                    ClientRequest::Balance { on } => {
                        println!("balancing {}", if on { "on" } else { "off" })
                    }
                    ClientRequest::Block { blocked: true } => println!("this node takes no guests"),
                    ClientRequest::Block { blocked: false } => println!("this node takes guests"),
                    ClientRequest::Lock { pid, locked } => {
                        println!("{pid} {}", if locked { "locked" } else { "unlocked" })
                    }
                    _ => {}
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("omctl: {command}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if command == "top" {
        return top::run(client, &socket, once);
    }
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
    let result = match command {
        "migrate" => match migration {
            Some((pid, to)) => client.migrate(pid, to).map(|()| match to {
                Some(node) => println!("{pid} runs on node {node}"),
                None => println!("{pid} runs at home"),
            }),
            None => Ok(()),
        },
        "ps" => client.placements().map(|list| {
            println!(
                "{:<8} {:<6} {:<8} {:<10} why",
                "pid", "home", "runs_on", "pid_there"
            );
            for p in list {
                println!(
                    "{:<8} {:<6} {:<8} {:<10} {}",
                    p.home_pid, p.home, p.runs_on, p.pid_there, p.why
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
                "{:<5} {:>9} {:>9} {:>10} {:>13} {:>10} {:>12} {:>12} {:>6} {:>9} {:>8} {:>6} {:>9} {:>11} {:>10}",
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
                "free_mib",
                "table_kib",
                "polled_ms"
            );
            for s in nodes {
                println!(
                    "{:<5} {:>9} {:>9} {:>10} {:>13} {:>10} {:>12} {:>12} {:>6} {:>9} {:>8} {:>6.2} {:>9} {:>11} {:>10}",
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
                    s.free_kib / 1024,
                    s.table_bytes.div_ceil(1024),
                    s.low_latency_held_ms
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
