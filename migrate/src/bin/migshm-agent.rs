//! `migshm-agent`: the processes `dsmd` starts to move a process.
//!
//! `migshm-agent deputy --pid PID --socket HOME_SOCKET --host ADDR:PORT --token HEX`
//!   on the process's home node: moves it, then stands in for it
//!   (commands on stdin: `home`).
//! `migshm-agent host --socket NODE_SOCKET (--bind IP | --listen-fd FD) --token HEX`
//!   on the destination: listens (prints `listening PORT` after --bind;
//!   with --listen-fd, dsmd bound the port), then takes the process.
//!
//! `migshm-agent check --pid PID --socket NODE_SOCKET`
//!   prints every reason the process cannot move, one per line, without
//!   moving it (exit status 3 if there are any).
//!
//! Deputy and host report one line per event on stdout (see
//! `migrate::deputy`, `migrate::host`).

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "migshm-agent",
    about = "moves a process between migshm nodes (started by dsmd)"
)]
struct Args {
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    Deputy {
        #[arg(long)]
        pid: i32,
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        host: SocketAddr,
        #[arg(long, value_parser = parse_token)]
        token: u128,
    },
    Check {
        #[arg(long)]
        pid: i32,
        #[arg(long)]
        socket: PathBuf,
    },
    Host {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long, required_unless_present = "listen_fd")]
        bind: Option<IpAddr>,
        /// A listening TCP socket inherited from dsmd.
        #[arg(long)]
        listen_fd: Option<i32>,
        #[arg(long, value_parser = parse_token)]
        token: u128,
    },
}

/// The listening socket dsmd left at `fd` (checked to be one).
fn inherited_listener(fd: i32) -> std::io::Result<TcpListener> {
    let listener = TcpListener::from(migrate::ptrace::inherited_socket(fd)?);
    listener.local_addr()?;
    Ok(listener)
}

fn parse_token(s: &str) -> Result<u128, String> {
    u128::from_str_radix(s, 16).map_err(|e| format!("token: {e}"))
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    // Started by a dsmd: gone with it (the process it moves or hosts then
    // ends, as when a node is lost), never an orphan holding a process.
    if let Some(parent) = std::env::var(dsm::daemon::AGENT_PARENT_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    {
        if !migrate::ptrace::die_with(parent) {
            std::process::exit(1);
        }
    }
    let args = Args::parse();
    let mut out = std::io::stdout().lock();
    let result = match args.role {
        Role::Deputy {
            pid,
            socket,
            host,
            token,
        } => {
            let deputy = migrate::deputy::Deputy {
                pid,
                home_socket: socket,
                host,
                token,
            };
            migrate::deputy::run(&deputy, &mut std::io::stdin().lock(), &mut out)
        }
        Role::Check { pid, socket } => {
            let reasons = migrate::daemon::DaemonConn::connect(&socket)
                .and_then(|mut d| d.process_info(pid))
                .and_then(|info| migrate::checkpoint::stay_reasons(pid, &info));
            match reasons {
                Ok(reasons) if reasons.is_empty() => Ok(()),
                Ok(reasons) => {
                    for why in reasons {
                        let _ = writeln!(out, "{why}");
                    }
                    let _ = out.flush();
                    std::process::exit(3);
                }
                Err(e) => Err(e),
            }
        }
        Role::Host {
            socket,
            bind,
            listen_fd,
            token,
        } => {
            let listener = match (listen_fd, bind) {
                (Some(fd), _) => inherited_listener(fd),
                (None, Some(ip)) => TcpListener::bind((ip, 0)).and_then(|l| {
                    let _ = writeln!(out, "listening {}", l.local_addr()?.port());
                    let _ = out.flush();
                    Ok(l)
                }),
                (None, None) => Err(std::io::Error::other("--bind or --listen-fd")),
            };
            match listener {
                Ok(listener) => {
                    let host = migrate::host::Host {
                        node_socket: socket,
                        token,
                    };
                    migrate::host::run(&host, listener, &mut out)
                }
                Err(e) => {
                    let _ = writeln!(out, "error cannot listen: {e}");
                    std::process::exit(1);
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::error!("{e}");
        std::process::exit(1);
    }
}
