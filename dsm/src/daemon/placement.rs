//! Where the processes under `omrun` run, and why (issue 13): the
//! balancer's side that touches the world. Every round it finds the
//! processes this node may move (those started under `omrun` with this
//! node's socket, found by their environment, and the guests running
//! here), reads what each uses from /proc (its CPU demand from
//! `schedstat`: time running plus time waiting for a CPU; its resident
//! memory), asks `balance.rs` for a decision and carries it out through
//! the moves of `migration.rs`. It also keeps the per-process locks, why
//! each process was last moved, and the log of the last minute's moves.

use std::collections::{HashMap, VecDeque};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::balance::{Balancer, Candidate, Move, NodeView};
use super::core::SharedCore;
use super::load::Smoothed;
use crate::ids::NodeId;
use crate::wire::{MoveCause, MoveRecord};

use crate::client::LOCK_ENV;
/// How long moves stay in the log (`omctl top`).
const LOG_FOR_MS: u64 = 60_000;

/// How long a process found not under `omrun` is taken as such: it may
/// have been looked at before `omrun` made it the program (`exec`).
const NOT_OURS_FOR_MS: u64 = 2_000;

/// What a process's environment says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Started {
    /// Not under `omrun` with this node's socket (when read, ms).
    Elsewhere {
        read_ms: u64,
    },
    Here {
        locked: bool,
    },
}

struct Usage {
    /// Nanoseconds it ran or waited to, all threads, at `at_ms`.
    sched_ns: u64,
    at_ms: u64,
    demand: Smoothed,
    rss_kib: u64,
    faults: u64,
    faults_per_s: Smoothed,
}

pub struct Placements {
    pub balancer: Balancer,
    /// The balancer runs (`--no-balance`, `omctl balance on|off`).
    pub enabled: bool,
    /// Takes no guests (`omctl block`, `expel`).
    pub blocked: bool,
    /// A move the balancer started is under way.
    pub in_flight: bool,
    socket: PathBuf,
    started: HashMap<i32, Started>,
    usage: HashMap<i32, Usage>,
    /// `omctl lock|unlock`, by home pid (over what `omrun --lock` said).
    locks: HashMap<i32, bool>,
    /// How and when each process homed here was last moved, by pid.
    placed: HashMap<i32, (MoveCause, u64)>,
    log: VecDeque<(u64, MoveRecord)>,
    /// Processes under `omrun` running here at the last round.
    pub running_here: usize,
}

impl Placements {
    pub fn new(me: NodeId, socket: &Path, enabled: bool) -> Placements {
        Placements {
            balancer: Balancer::new(me, super::load::SMOOTHING.as_millis() as u64),
            enabled,
            blocked: false,
            in_flight: false,
            socket: std::path::absolute(socket).unwrap_or_else(|_| socket.to_path_buf()),
            started: HashMap::new(),
            usage: HashMap::new(),
            locks: HashMap::new(),
            placed: HashMap::new(),
            log: VecDeque::new(),
            running_here: 0,
        }
    }

    /// Local processes started under `omrun` with this node's socket, and
    /// whether each was started locked. Each process's environment is read
    /// once.
    pub fn started_here(&mut self, now_ms: u64) -> Vec<(i32, bool)> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let pids: Vec<i32> = dir
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        let present: std::collections::HashSet<i32> = pids.iter().copied().collect();
        self.started.retain(|pid, s| {
            present.contains(pid)
                && !matches!(s, Started::Elsewhere { read_ms }
                    if now_ms.saturating_sub(*read_ms) > NOT_OURS_FOR_MS)
        });
        self.usage.retain(|pid, _| present.contains(pid));
        self.balancer.retain(|pid| present.contains(&pid));
        let mut out = Vec::new();
        for pid in pids {
            let socket = &self.socket;
            let started = *self
                .started
                .entry(pid)
                .or_insert_with(|| read_started(pid, socket, now_ms));
            if let Started::Here { locked } = started {
                out.push((pid, locked));
            }
        }
        out
    }

    /// Whether local process `pid` runs under `omrun` with this node's
    /// socket.
    pub fn under_omrun(&self, pid: i32) -> bool {
        matches!(read_started(pid, &self.socket, 0), Started::Here { .. })
    }

    /// Whether local process `pid` was started locked (`omrun --lock`).
    fn started_locked(&mut self, pid: i32) -> bool {
        match self.started.get(&pid) {
            Some(s) => *s == Started::Here { locked: true },
            None => read_started(pid, &self.socket, 0) == Started::Here { locked: true },
        }
    }

    /// Its demand (runnable threads), resident KiB and DSM faults per
    /// second, measured since the last round; `None` if it is gone or
    /// this is the first look.
    fn observe(&mut self, pid: i32, now_ms: u64, faults: u64) -> Option<(f64, u64, f64)> {
        let sched_ns = sched_ns(pid)?;
        let rss_kib = rss_kib(pid).unwrap_or(0);
        let Some(u) = self.usage.get_mut(&pid) else {
            // At first sight, its demand over its life so far (a job just
            // started need not wait a round to be weighed).
            let mut demand = Smoothed::default();
            let lived_s = age_s(pid).filter(|a| *a >= 0.1);
            if let Some(age) = lived_s {
                demand.sample(sched_ns as f64 / 1e9 / age, std::time::Duration::ZERO);
            }
            self.usage.insert(
                pid,
                Usage {
                    sched_ns,
                    at_ms: now_ms,
                    demand,
                    rss_kib,
                    faults,
                    faults_per_s: Smoothed::default(),
                },
            );
            return lived_s.map(|_| (demand.value(), rss_kib, 0.0));
        };
        let elapsed_ms = now_ms.saturating_sub(u.at_ms);
        if elapsed_ms > 0 {
            let elapsed = std::time::Duration::from_millis(elapsed_ms);
            let ran = sched_ns.saturating_sub(u.sched_ns) as f64 / (elapsed_ms as f64 * 1e6);
            u.demand.sample(ran, elapsed);
            let rate = faults.saturating_sub(u.faults) as f64 * 1000.0 / elapsed_ms as f64;
            u.faults_per_s.sample(rate, elapsed);
            u.sched_ns = sched_ns;
            u.at_ms = now_ms;
            u.faults = faults;
        }
        u.rss_kib = rss_kib;
        Some((u.demand.value(), u.rss_kib, u.faults_per_s.value()))
    }

    pub fn set_lock(&mut self, pid: i32, locked: bool) {
        self.locks.insert(pid, locked);
    }

    /// Locked: by `omctl lock`, else by `omrun --lock`.
    pub fn is_locked(&mut self, pid: i32) -> bool {
        match self.locks.get(&pid) {
            Some(l) => *l,
            None => self.started_locked(pid),
        }
    }

    /// Why the balancer must leave process `pid` (homed here) where it is,
    /// if it must: locked, or put where it runs by hand.
    pub fn pinned(&mut self, pid: i32, away: bool) -> Option<&'static str> {
        if self.is_locked(pid) {
            return Some("locked");
        }
        match self.placed.get(&pid) {
            Some((MoveCause::Hand, _)) if away => Some("placed by hand"),
            _ => None,
        }
    }

    /// A move of process `pid` homed here ended (`failed`: why not).
    pub fn record(&mut self, now_ms: u64, record: MoveRecord) {
        if record.failed.is_none() {
            self.placed.insert(record.home_pid, (record.cause, now_ms));
        }
        self.log.push_back((now_ms, record));
        while self
            .log
            .front()
            .is_some_and(|(t, _)| now_ms.saturating_sub(*t) > LOG_FOR_MS)
        {
            self.log.pop_front();
        }
    }

    /// The moves of the last minute, newest first.
    pub fn recent(&self, now_ms: u64) -> Vec<MoveRecord> {
        self.log
            .iter()
            .rev()
            .filter(|(t, _)| now_ms.saturating_sub(*t) <= LOG_FOR_MS)
            .map(|(t, r)| MoveRecord {
                ago_ms: now_ms.saturating_sub(*t).min(u64::from(u32::MAX)) as u32,
                ..r.clone()
            })
            .collect()
    }

    /// How and when process `pid` homed here was last moved.
    pub fn last_move(&self, pid: i32) -> Option<(MoveCause, u64)> {
        self.placed.get(&pid).copied()
    }
}

/// Whether `pid` runs under `omrun` with `socket` (its environment has
/// our preload and that socket), and locked.
fn read_started(pid: i32, socket: &Path, now_ms: u64) -> Started {
    let not_ours = Started::Elsewhere { read_ms: now_ms };
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return not_ours;
    };
    let mut preloaded = false;
    let mut ours = false;
    let mut locked = false;
    for var in environ.split(|b| *b == 0) {
        let Some(eq) = var.iter().position(|b| *b == b'=') else {
            continue;
        };
        let (name, value) = (&var[..eq], &var[eq + 1..]);
        match name {
            b"LD_PRELOAD" => {
                preloaded = value
                    .split(|b| *b == b':' || *b == b' ')
                    .any(|p| p.ends_with(b"libmigshm_preload.so"))
            }
            n if n == crate::client::SOCKET_ENV.as_bytes() => {
                ours = Path::new(std::ffi::OsStr::from_bytes(value)) == socket
            }
            n if n == LOCK_ENV.as_bytes() => locked = !value.is_empty() && value != b"0",
            _ => {}
        }
    }
    if preloaded && ours {
        Started::Here { locked }
    } else {
        not_ours
    }
}

/// Nanoseconds the threads of `pid` ran or waited to run.
fn sched_ns(pid: i32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    let mut any = false;
    for t in tasks.flatten() {
        let Ok(line) = std::fs::read_to_string(t.path().join("schedstat")) else {
            continue;
        };
        let mut f = line
            .split_whitespace()
            .map(|v| v.parse::<u64>().unwrap_or(0));
        total = total
            .saturating_add(f.next().unwrap_or(0))
            .saturating_add(f.next().unwrap_or(0));
        any = true;
    }
    any.then_some(total)
}

/// Seconds since process `pid` started.
fn age_s(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22, counted after the command (which may hold spaces).
    let started_ticks: f64 = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(uptime - started_ticks / hz)
}

fn rss_kib(pid: i32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * (crate::ids::PAGE_SIZE as u64 / 1024))
}

/// A balancing round: at most one move started (`ROUND_MS` apart).
pub fn round(core: &SharedCore) {
    let (decision, cap_here, cap_to) = {
        let mut c = core.borrow_mut();
        let Some(inputs) = c.balance_inputs() else {
            return;
        };
        let (now, here, others, candidates) = inputs;
        let p = &mut c.placement;
        if !p.enabled || p.in_flight {
            return;
        }
        tracing::debug!(?here, ?others, ?candidates, "balancer: round");
        let Some(m) = p.balancer.decide(now, &here, &others, &candidates) else {
            return;
        };
        let cap_to = others
            .iter()
            .find(|v| v.node == m.to)
            .map_or(1.0, |v| v.capacity);
        p.in_flight = true;
        (m, here.capacity, cap_to)
    };
    tracing::info!(pid = decision.pid, to = ?decision.to, "balancer: {}", decision.why);
    let core = core.clone();
    tokio::task::spawn_local(async move {
        let result = carry_out(&core, &decision).await;
        let mut c = core.borrow_mut();
        let now = c.clock_ms();
        c.placement.in_flight = false;
        match result {
            Ok(()) => {
                c.placement
                    .balancer
                    .moved(now, decision.demand, cap_here, decision.to, cap_to)
            }
            Err(why) => {
                tracing::info!(pid = decision.pid, "balancer: it stays: {why}");
                c.placement.balancer.cannot_move(now, decision.pid, why);
            }
        }
    });
}

async fn carry_out(core: &SharedCore, m: &Move) -> Result<(), String> {
    use crate::wire::ClientReply;
    let me = core.borrow().me;
    if m.home == me {
        // A stay reason is found without stopping the process.
        match super::migration::check(core, 0, m.pid).await {
            ClientReply::Ok => {}
            ClientReply::Refused(why) => return Err(why),
            other => return Err(format!("{other:?}")),
        }
    }
    let to = (m.to != m.home).then_some(m.to);
    match super::migration::migrate(core, 0, m.home_pid, to, MoveCause::Balancer).await {
        ClientReply::Ok => Ok(()),
        ClientReply::Refused(why) => Err(why),
        ClientReply::Err(e) => Err(std::io::Error::from_raw_os_error(e).to_string()),
        other => Err(format!("{other:?}")),
    }
}

/// What the core gives a round.
pub type RoundInputs = (u64, NodeView, Vec<NodeView>, Vec<Candidate>);

impl Placements {
    /// The candidates among `home_here` (started here, with their DSM
    /// fault counts, not moved away) and `guests` (local pid, home, home
    /// pid, pinned, arrival ms).
    pub fn candidates(
        &mut self,
        me: NodeId,
        now_ms: u64,
        home_here: &[(i32, u64)],
        guests: &[(i32, NodeId, i32, bool, u64, u64)],
    ) -> Vec<Candidate> {
        let mut out = Vec::new();
        for &(pid, faults) in home_here {
            let pinned = self.pinned(pid, false).is_some();
            let placed_ms = self.placed.get(&pid).map(|(_, t)| *t);
            if let Some((demand, rss_kib, faults_per_s)) = self.observe(pid, now_ms, faults) {
                out.push(Candidate {
                    pid,
                    home: me,
                    home_pid: pid,
                    demand,
                    rss_kib,
                    faults_per_s,
                    pinned,
                    placed_ms,
                });
            }
        }
        for &(pid, home, home_pid, pinned, arrived_ms, faults) in guests {
            if let Some((demand, rss_kib, faults_per_s)) = self.observe(pid, now_ms, faults) {
                out.push(Candidate {
                    pid,
                    home,
                    home_pid,
                    demand,
                    rss_kib,
                    faults_per_s,
                    pinned,
                    placed_ms: Some(arrived_ms),
                });
            }
        }
        self.running_here = home_here.len() + guests.len();
        out
    }
}
