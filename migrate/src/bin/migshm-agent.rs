//! `migshm-agent`: the processes `dsmd` starts to move a process.
//!
//! `migshm-agent deputy --pid PID --socket HOME_SOCKET --host ADDR:PORT --token HEX`
//!   on the process's home node: moves it, then stands in for it
//!   (commands on stdin: `home`).
//! `migshm-agent host --socket NODE_SOCKET --bind IP --token HEX`
//!   on the destination: prints `listening PORT`, then takes the process.
//!
//! Both report one line per event on stdout (see `migrate::deputy`,
//! `migrate::host`).

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
    Host {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        bind: IpAddr,
        #[arg(long, value_parser = parse_token)]
        token: u128,
    },
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
        Role::Host {
            socket,
            bind,
            token,
        } => match TcpListener::bind((bind, 0)).and_then(|l| Ok((l.local_addr()?.port(), l))) {
            Ok((port, listener)) => {
                let _ = writeln!(out, "listening {port}");
                let _ = out.flush();
                let host = migrate::host::Host {
                    node_socket: socket,
                    token,
                };
                migrate::host::run(&host, listener, &mut out)
            }
            Err(e) => {
                let _ = writeln!(out, "error cannot listen on {bind}: {e}");
                std::process::exit(1);
            }
        },
    };
    if let Err(e) = result {
        tracing::error!("{e}");
        std::process::exit(1);
    }
}
