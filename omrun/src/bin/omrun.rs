//! `omrun [--socket PATH] [--home NODE] [--node NODE] [--lock] -- PROGRAM ARGS...`:
//! run an unmodified program on the node of that daemon (default
//! `DSMD_SOCKET`) with its SysV shared memory and semaphores made
//! cluster-wide (the ones it creates homed on NODE if given, else on this
//! node), by preloading `libmigshm_preload.so` (found next to this binary).
//! The program replaces `omrun` (exec), so its exit status, or the signal
//! that ended it, is `omrun`'s. With `--node NODE` its home is this node but
//! it runs on NODE from the start (moved before `main`, as openMosix's
//! `mosrun -NODE`); if it cannot move it does not run (exit status 127).
//! With `--lock` the balancer never moves it, nor the children it starts
//! (`omctl unlock PID` lifts it for one process).

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str =
    "usage: omrun [--socket PATH] [--home NODE] [--node NODE] [--lock] -- PROGRAM [ARGS...]";
const PRELOAD: &str = "libmigshm_preload.so";

fn fail(msg: &str) -> ExitCode {
    eprintln!("omrun: {msg}");
    ExitCode::from(127)
}

/// The daemon answers a hello within a bound, or it is unusable: a missing
/// or stuck daemon is an error now, not a hang later.
/// Whether the daemon at `socket` answers; the CPUs its node serves, if
/// it was given some.
fn check_daemon(socket: &Path) -> Result<Vec<usize>, String> {
    let mut stream =
        UnixStream::connect(socket).map_err(|e| format!("no dsmd at {}: {e}", socket.display()))?;
    let limit = Some(Duration::from_secs(5));
    stream
        .set_read_timeout(limit)
        .and_then(|()| stream.set_write_timeout(limit))
        .map_err(|e| e.to_string())?;
    let hello = dsm::wire::ClientRequest::Hello {
        version: dsm::wire::PROTOCOL_VERSION,
        link: None,
    };
    stream
        .write_all(&dsm::wire::encode_client(1, &hello))
        .map_err(|e| format!("dsmd at {}: {e}", socket.display()))?;
    let mut len = [0u8; 4];
    stream
        .read_exact(&mut len)
        .map_err(|e| format!("dsmd at {} does not answer: {e}", socket.display()))?;
    let n = u32::from_le_bytes(len) as usize;
    if n > dsm::wire::CLIENT_FRAME_MAX {
        return Err(format!(
            "dsmd at {} answered out of protocol",
            socket.display()
        ));
    }
    let mut body = vec![0u8; n];
    stream
        .read_exact(&mut body)
        .map_err(|e| format!("dsmd at {} does not answer: {e}", socket.display()))?;
    match dsm::wire::decode_client::<dsm::wire::ClientReply>(&body) {
        Ok((_, dsm::wire::ClientReply::Welcome { cpus, .. })) => {
            Ok(cpus.into_iter().map(usize::from).collect())
        }
        Ok((_, other)) => Err(format!("dsmd at {} refused: {other:?}", socket.display())),
        Err(e) => Err(format!("dsmd at {}: {e}", socket.display())),
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let mut socket: Option<PathBuf> = None;
    let mut home: Option<u8> = None;
    let mut start_on: Option<u8> = None;
    let mut lock = false;
    let mut program: Vec<OsString> = Vec::new();
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("--socket") => match args.next() {
                Some(p) => socket = Some(PathBuf::from(p)),
                None => return fail("--socket needs a path"),
            },
            Some("--home") => match args.next().and_then(|v| v.to_str()?.parse::<u8>().ok()) {
                Some(n) if dsm::ids::NodeId::new(n).is_some() => home = Some(n),
                _ => return fail("--home needs a node id (1..=127)"),
            },
            Some("--node") => match args.next().and_then(|v| v.to_str()?.parse::<u8>().ok()) {
                Some(n) if dsm::ids::NodeId::new(n).is_some() => start_on = Some(n),
                _ => return fail("--node needs a node id (1..=127)"),
            },
            Some("--lock") => lock = true,
            Some("-h" | "--help") => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            Some("--") => {
                program.extend(args.by_ref());
                break;
            }
            Some(s) if s.starts_with('-') => return fail(&format!("unknown option {s}\n{USAGE}")),
            _ => {
                program.push(a);
                program.extend(args.by_ref());
                break;
            }
        }
    }
    let Some((exe, rest)) = program.split_first() else {
        return fail(USAGE);
    };
    let socket =
        match socket.or_else(|| std::env::var_os(dsm::client::SOCKET_ENV).map(PathBuf::from)) {
            Some(s) => s,
            None => {
                return fail(&format!(
                    "no daemon: pass --socket PATH or set {}",
                    dsm::client::SOCKET_ENV
                ))
            }
        };
    let socket = std::path::absolute(&socket).unwrap_or(socket);
    let cpus = match check_daemon(&socket) {
        Ok(cpus) => cpus,
        Err(e) => return fail(&e),
    };
    // The program runs on the CPUs its node serves (`dsmd --cpus`).
    if !cpus.is_empty() {
        if let Err(e) = dsm::daemon::load::pin(0, &cpus) {
            return fail(&format!("running on its node's CPUs: {e}"));
        }
    }
    let preload = match std::env::current_exe() {
        Ok(me) => me.with_file_name(PRELOAD),
        Err(e) => return fail(&format!("cannot find my own path: {e}")),
    };
    if !preload.is_file() {
        return fail(&format!("{} is missing", preload.display()));
    }
    // Ours first, then whatever the caller preloads.
    let mut ld_preload = preload.into_os_string();
    if let Some(existing) = std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
        ld_preload.push(":");
        ld_preload.push(existing);
    }
    let mut cmd = std::process::Command::new(exe);
    cmd.args(rest)
        .env("LD_PRELOAD", ld_preload)
        .env(dsm::client::SOCKET_ENV, &socket);
    match home {
        Some(n) => cmd.env("MIGSHM_HOME", n.to_string()),
        None => cmd.env_remove("MIGSHM_HOME"),
    };
    match start_on {
        Some(n) => cmd.env("MIGSHM_START_ON", n.to_string()),
        None => cmd.env_remove("MIGSHM_START_ON"),
    };
    if lock {
        cmd.env(dsm::client::LOCK_ENV, "1");
    }
    let err = cmd.exec();
    fail(&format!("cannot run {}: {err}", exe.to_string_lossy()))
}
