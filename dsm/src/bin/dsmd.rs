//! `dsmd --node ID --listen HOST:PORT --socket PATH [--peer ID=HOST:PORT]... [--secret-file F]`
//! or `dsmd --config FILE`.

use clap::Parser;
use dsm::daemon::{run, Args, Config};
use std::process::ExitCode;

/// `DSMD_PARENT_PID=PID` (set by test harnesses): die with that parent.
/// Asked by the daemon itself rather than in a hook between fork and exec,
/// so that its starter can use posix_spawn (no fork handlers run).
fn die_with_parent() {
    let Some(parent) = std::env::var("DSMD_PARENT_PID")
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return;
    };
    // SAFETY: prctl and getppid take and return plain integers.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != parent {
            // It died before we asked.
            std::process::exit(1);
        }
    }
}

fn main() -> ExitCode {
    // Before anything else: the guardian is this binary started again.
    if let Some(code) = dsm::guardian::serve_if_asked() {
        return ExitCode::from(code as u8);
    }
    die_with_parent();
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e)
            if e.kind() == clap::error::ErrorKind::DisplayHelp
                || e.kind() == clap::error::ErrorKind::DisplayVersion =>
        {
            print!("{e}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            let line = text
                .lines()
                .next()
                .unwrap_or("bad arguments")
                .trim_start_matches("error: ");
            eprintln!("dsmd: {line}");
            return ExitCode::from(2);
        }
    };
    let config = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dsmd: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DSMD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dsmd: {e}");
            ExitCode::FAILURE
        }
    }
}
