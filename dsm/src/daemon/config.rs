//! `dsmd` configuration: command line or a TOML file with the same keys.

use crate::ids::NodeId;
use clap::Parser;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "dsmd",
    about = "migshm node daemon: coherent SysV shared memory across nodes"
)]
pub struct Args {
    /// TOML file with the keys below (node, listen, socket, peer, secret-file, ...).
    #[arg(long, conflicts_with_all = ["node", "listen", "socket", "peer", "secret_file"])]
    pub config: Option<PathBuf>,
    /// This node's id, 1..=127.
    #[arg(long)]
    pub node: Option<u8>,
    /// TCP address for the other nodes, HOST:PORT.
    #[arg(long)]
    pub listen: Option<String>,
    /// Unix socket path for local processes.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Another node, ID=HOST:PORT; repeat for each.
    #[arg(long = "peer")]
    pub peer: Vec<String>,
    /// File holding the shared cluster secret. Without one, dsmd listens on
    /// loopback only.
    #[arg(long = "secret-file")]
    pub secret_file: Option<PathBuf>,
    /// A peer silent for this long is declared lost.
    #[arg(long = "peer-timeout-ms", default_value_t = 2000)]
    pub peer_timeout_ms: u64,
    /// Interval between heartbeats.
    #[arg(long = "heartbeat-ms", default_value_t = 200)]
    pub heartbeat_ms: u64,
    /// Lend a semaphore set to the node that made this many operations on
    /// it in a row (it then serves them locally); 0: never.
    #[arg(long = "sem-lend-after", default_value_t = crate::daemon::sems::LEND_AFTER)]
    pub sem_lend_after: u32,
    /// The CPUs this node serves (`0`, `0-3`, `0,2`): the daemon and the
    /// processes it hosts run on them only, and its load is theirs.
    /// Default: every CPU it may run on.
    #[arg(long)]
    pub cpus: Option<String>,
    /// This node's relative CPU speed (1.0: as the others): its load is
    /// divided by it.
    #[arg(long)]
    pub speed: Option<f64>,
    /// Do not move processes by load (`omctl balance on` starts it).
    #[arg(long = "no-balance")]
    pub no_balance: bool,
    /// Keep idle CPUs out of deep sleep (`/dev/cpu_dma_latency` held at 0)
    /// during bursts of faults (`auto`, the default), always (`always`, or
    /// the flag alone), or never (`off`).
    #[arg(long = "low-latency", value_enum, num_args = 0..=1, default_missing_value = "always")]
    pub low_latency: Option<super::wakeups::LowLatency>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    node: Option<u8>,
    listen: Option<String>,
    socket: Option<PathBuf>,
    #[serde(default)]
    peer: Vec<String>,
    secret_file: Option<PathBuf>,
    peer_timeout_ms: Option<u64>,
    heartbeat_ms: Option<u64>,
    sem_lend_after: Option<u32>,
    cpus: Option<String>,
    speed: Option<f64>,
    /// `balance = false`: as `--no-balance`.
    balance: Option<bool>,
    low_latency: Option<super::wakeups::LowLatency>,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub node: NodeId,
    pub listen: SocketAddr,
    pub socket: PathBuf,
    pub peers: Vec<(NodeId, SocketAddr)>,
    pub secret: Option<Vec<u8>>,
    pub peer_timeout: Duration,
    pub heartbeat: Duration,
    /// See `--sem-lend-after`.
    pub sem_lend_after: u32,
    /// See `--cpus` (sorted), and whether it was given.
    pub cpus: Vec<usize>,
    pub cpus_given: bool,
    /// See `--speed`.
    pub speed: f64,
    /// Whether the balancer runs (`--no-balance`, `balance = false`).
    pub balance: bool,
    /// See `--low-latency`.
    pub low_latency: super::wakeups::LowLatency,
}

impl Config {
    pub fn from_args(args: Args) -> Result<Config, String> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                toml::from_str::<FileConfig>(&text).map_err(|e| {
                    format!(
                        "{}: {}",
                        path.display(),
                        e.message().lines().next().unwrap_or("invalid TOML")
                    )
                })?
            }
            None => FileConfig::default(),
        };
        let node = args.node.or(file.node).ok_or("missing --node")?;
        let node = NodeId::new(node).ok_or_else(|| format!("--node {node}: must be 1..=127"))?;
        let listen = args
            .listen
            .or(file.listen)
            .ok_or("missing --listen HOST:PORT")?;
        let listen = resolve(&listen).map_err(|e| format!("--listen {listen}: {e}"))?;
        let socket = args.socket.or(file.socket).ok_or("missing --socket PATH")?;
        let mut peers = Vec::new();
        for spec in args.peer.iter().chain(file.peer.iter()) {
            let (id, addr) = spec
                .split_once('=')
                .ok_or_else(|| format!("--peer {spec}: expected ID=HOST:PORT"))?;
            let id: u8 = id
                .trim()
                .parse()
                .map_err(|_| format!("--peer {spec}: bad node id"))?;
            let id =
                NodeId::new(id).ok_or_else(|| format!("--peer {spec}: node id must be 1..=127"))?;
            if id == node {
                return Err(format!("--peer {spec}: that is this node's own id"));
            }
            if peers.iter().any(|(p, _)| *p == id) {
                return Err(format!("--peer {spec}: node {id} given twice"));
            }
            let addr = resolve(addr).map_err(|e| format!("--peer {spec}: {e}"))?;
            peers.push((id, addr));
        }
        let secret = match args.secret_file.or(file.secret_file) {
            Some(path) => {
                let bytes = std::fs::read(&path)
                    .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
                let trimmed = bytes.trim_ascii().to_vec();
                if trimmed.len() < 16 {
                    return Err(format!(
                        "secret file {}: use at least 16 bytes",
                        path.display()
                    ));
                }
                Some(trimmed)
            }
            None => None,
        };
        if secret.is_none() && !listen.ip().is_loopback() {
            return Err(format!(
                "refusing to listen on {listen} without --secret-file: only loopback is allowed unauthenticated"
            ));
        }
        let peer_timeout_ms = file.peer_timeout_ms.unwrap_or(args.peer_timeout_ms);
        let heartbeat_ms = file.heartbeat_ms.unwrap_or(args.heartbeat_ms);
        // A node stops using what a peer gave it (its lease ends) three
        // heartbeats before that peer may declare it lost, and a healthy
        // lease is up to a heartbeat and a round trip old: two of margin.
        if heartbeat_ms == 0 || peer_timeout_ms < 5 * heartbeat_ms {
            return Err("--peer-timeout-ms must be at least 5 times --heartbeat-ms (> 0)".into());
        }
        let cpus_given = args.cpus.is_some() || file.cpus.is_some();
        let cpus = match args.cpus.or(file.cpus) {
            Some(list) => {
                let cpus = super::load::parse_cpu_list(&list).map_err(|e| format!("--cpus {e}"))?;
                let allowed = super::load::allowed_cpus();
                if let Some(c) = cpus.iter().find(|c| !allowed.contains(c)) {
                    return Err(format!(
                        "--cpus {list}: CPU {c} is not one this daemon may run on ({})",
                        super::load::format_cpu_list(&allowed)
                    ));
                }
                cpus
            }
            None => super::load::allowed_cpus(),
        };
        let speed = args.speed.or(file.speed).unwrap_or(1.0);
        if !(speed.is_finite() && speed > 0.0) {
            return Err(format!("--speed {speed}: must be a positive number"));
        }
        Ok(Config {
            cpus,
            cpus_given,
            speed,
            balance: !args.no_balance && file.balance.unwrap_or(true),
            low_latency: args.low_latency.or(file.low_latency).unwrap_or_default(),
            node,
            listen,
            socket,
            peers,
            secret,
            peer_timeout: Duration::from_millis(peer_timeout_ms),
            heartbeat: Duration::from_millis(heartbeat_ms),
            sem_lend_after: file.sem_lend_after.unwrap_or(args.sem_lend_after),
        })
    }

    /// Every node of the cluster, sorted: the membership keys hash over.
    pub fn members(&self) -> Vec<NodeId> {
        let mut all: Vec<NodeId> = self
            .peers
            .iter()
            .map(|(n, _)| *n)
            .chain([self.node])
            .collect();
        all.sort();
        all
    }
}

fn resolve(spec: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    spec.to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| "no address".to_string())
}
