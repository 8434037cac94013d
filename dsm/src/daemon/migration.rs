//! Process migration as the daemon sees it: it starts the agents
//! (`migshm-agent`, next to `dsmd`) that do the work, and keeps the table
//! of processes homed here that run elsewhere (their deputies) and of
//! processes from elsewhere that run here (guests).
//!
//! Moving a process: the home daemon asks the destination's daemon for a
//! host (`RpcRequest::StartHost`, with a one-time token over the
//! authenticated peer link); that daemon binds a TCP port on its listen
//! address and starts the host agent on it; the home daemon starts the
//! deputy, which checkpoints the process and hands it to the host. The
//! request is answered when the deputy reports the process running there.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, Mutex};

use crate::ids::NodeId;
use crate::wire::MigrationEntry;

/// Set for the agents dsmd starts: they end with it (its node's DSM
/// service is gone, as when the node is lost: the moved process ends).
pub const AGENT_PARENT_ENV: &str = "MIGSHM_AGENT_PARENT";

/// How long a move or a return may take before it is reported failed.
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

struct Deputy {
    runs_on: NodeId,
    pid_there: i32,
    commands: Mutex<tokio::process::ChildStdin>,
    reports: Mutex<mpsc::UnboundedReceiver<String>>,
}

struct Guest {
    home: NodeId,
    home_pid: i32,
    /// Sets its home was told it makes SEM_UNDO operations on.
    undo_noted: std::collections::BTreeSet<crate::ids::SemSetId>,
    /// Placed here by hand or locked: the balancer leaves it here.
    pinned: bool,
    arrived: std::time::Instant,
}

impl Guest {
    fn new(home: NodeId, home_pid: i32, pinned: bool) -> Guest {
        Guest {
            home,
            home_pid,
            undo_noted: Default::default(),
            pinned,
            arrived: std::time::Instant::now(),
        }
    }
}

/// A guest as the balancer sees it.
pub struct GuestInfo {
    pub pid: i32,
    pub home: NodeId,
    pub home_pid: i32,
    pub pinned: bool,
    pub arrived: std::time::Instant,
}

pub struct Migrations {
    me: NodeId,
    socket: PathBuf,
    deputies: RefCell<HashMap<i32, Rc<Deputy>>>,
    guests: RefCell<HashMap<i32, Guest>>,
    /// The hosts started here, by token: whose process each receives, and
    /// whether it is pinned.
    hosts: RefCell<HashMap<u128, (NodeId, i32, bool)>>,
    /// Processes homed here being moved, and where to: the copy may run
    /// (and ask us things) before the deputy has reported it running.
    moving: RefCell<HashMap<i32, NodeId>>,
}

fn agent_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    let agent = exe
        .parent()
        .map(|d| d.join("migshm-agent"))
        .ok_or("no directory for migshm-agent")?;
    if agent.exists() {
        Ok(agent)
    } else {
        Err(format!("{} is missing", agent.display()))
    }
}

/// Lines an agent prints, as they come; the last is `None` at its end.
fn report_lines(stdout: tokio::process::ChildStdout) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::task::spawn_local(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Migrations {
    pub fn new(me: NodeId, socket: &Path) -> Rc<Migrations> {
        Rc::new(Migrations {
            me,
            socket: socket.to_path_buf(),
            deputies: RefCell::new(HashMap::new()),
            guests: RefCell::new(HashMap::new()),
            hosts: RefCell::new(HashMap::new()),
            moving: RefCell::new(HashMap::new()),
        })
    }

    /// The home node of a process running here as a guest, by its home pid.
    pub fn home_of_guest(&self, home_pid: i32) -> Option<NodeId> {
        self.guests
            .borrow()
            .values()
            .find(|g| g.home_pid == home_pid && g.home != self.me)
            .map(|g| g.home)
    }

    /// Local process `pid` is the copy the host with `token` made, told by
    /// that host before the copy runs (false: no such host).
    pub fn guest_of_host(&self, pid: i32, token: u128) -> bool {
        let Some((home, home_pid, pinned)) = self.hosts.borrow().get(&token).copied() else {
            return false;
        };
        self.guests
            .borrow_mut()
            .insert(pid, Guest::new(home, home_pid, pinned));
        true
    }

    /// The processes from other nodes running here.
    pub fn guest_list(&self) -> Vec<GuestInfo> {
        self.guests
            .borrow()
            .iter()
            .filter(|(_, g)| g.home != self.me)
            .map(|(pid, g)| GuestInfo {
                pid: *pid,
                home: g.home,
                home_pid: g.home_pid,
                pinned: g.pinned,
                arrived: g.arrived,
            })
            .collect()
    }

    /// Whose process local process `pid` is, if it moved here: its home
    /// node and its pid there.
    pub fn guest(&self, pid: i32) -> Option<(NodeId, i32)> {
        self.guests.borrow().get(&pid).map(|g| (g.home, g.home_pid))
    }

    /// Whether guest `pid`'s home still has to be told of its undo on
    /// `set`; noted as told from now on.
    pub fn first_undo_on(&self, pid: i32, set: crate::ids::SemSetId) -> bool {
        self.guests
            .borrow_mut()
            .get_mut(&pid)
            .is_some_and(|g| g.undo_noted.insert(set))
    }

    /// Undo the note of [`Migrations::first_undo_on`] (the home could not
    /// be told).
    pub fn undo_not_noted(&self, pid: i32, set: crate::ids::SemSetId) {
        if let Some(g) = self.guests.borrow_mut().get_mut(&pid) {
            g.undo_noted.remove(&set);
        }
    }

    /// The pids of this node's processes' copies running elsewhere (on one
    /// machine with several nodes, they are local pids too).
    pub fn copies_elsewhere(&self) -> Vec<i32> {
        self.deputies
            .borrow()
            .values()
            .map(|d| d.pid_there)
            .collect()
    }

    pub fn is_migrated(&self, pid: i32) -> Option<NodeId> {
        self.deputies.borrow().get(&pid).map(|d| d.runs_on)
    }

    /// Where local process `pid` runs or is being moved to, if not here.
    pub fn runs_or_moves_to(&self, pid: i32) -> Option<NodeId> {
        self.is_migrated(pid)
            .or_else(|| self.moving.borrow().get(&pid).copied())
    }

    pub fn entries(&self) -> Vec<MigrationEntry> {
        let mut out: Vec<MigrationEntry> = self
            .deputies
            .borrow()
            .iter()
            .map(|(pid, d)| MigrationEntry {
                home: self.me,
                home_pid: *pid,
                runs_on: d.runs_on,
                pid_there: d.pid_there,
            })
            .collect();
        out.extend(self.guests.borrow().iter().map(|(pid, g)| MigrationEntry {
            home: g.home,
            home_pid: g.home_pid,
            runs_on: self.me,
            pid_there: *pid,
        }));
        out
    }

    /// Start a host for a process of `home` moving here: the port it
    /// listens on (on `ip`, this node's listen address).
    pub fn start_host(
        self: &Rc<Self>,
        ip: IpAddr,
        token: u128,
        home: NodeId,
        home_pid: i32,
        pinned: bool,
    ) -> Result<u16, String> {
        let agent = agent_binary()?;
        let listener =
            std::net::TcpListener::bind((ip, 0)).map_err(|e| format!("bind {ip}: {e}"))?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let fd = listener.as_raw_fd();
        let mut command = tokio::process::Command::new(agent);
        command
            .arg("host")
            .arg("--socket")
            .arg(&self.socket)
            .args(["--listen-fd", "3", "--token", &format!("{token:032x}")])
            .env(AGENT_PARENT_ENV, std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: dup2 and fcntl are async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                if fd == 3 {
                    if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("starting the host: {e}"))?;
        drop(listener);
        let Some(stdout) = child.stdout.take() else {
            return Err("host without stdout".into());
        };
        let mut reports = report_lines(stdout);
        self.hosts
            .borrow_mut()
            .insert(token, (home, home_pid, pinned));
        let me = self.clone();
        tokio::task::spawn_local(async move {
            // The copies this host made: it reports `guest PID` before it
            // registers one (`ClientRequest::Guest`).
            let mut pids = Vec::new();
            while let Some(line) = reports.recv().await {
                tracing::info!(home = ?home, home_pid, "host: {line}");
                if let Some(pid) = line
                    .strip_prefix("guest ")
                    .and_then(|p| p.parse::<i32>().ok())
                {
                    pids.push(pid);
                }
            }
            me.hosts.borrow_mut().remove(&token);
            me.guests
                .borrow_mut()
                .retain(|pid, g| !(pids.contains(pid) && g.home == home && g.home_pid == home_pid));
            let _ = child.wait().await;
        });
        Ok(port)
    }

    /// Move local process `pid` to `to`, whose host listens at `host`.
    pub async fn move_out(
        self: &Rc<Self>,
        pid: i32,
        to: NodeId,
        host: SocketAddr,
        token: u128,
    ) -> Result<(), String> {
        self.moving.borrow_mut().insert(pid, to);
        let moved = self.start_deputy(pid, to, host, token).await;
        self.moving.borrow_mut().remove(&pid);
        moved
    }

    async fn start_deputy(
        self: &Rc<Self>,
        pid: i32,
        to: NodeId,
        host: SocketAddr,
        token: u128,
    ) -> Result<(), String> {
        let agent = agent_binary()?;
        let mut child = tokio::process::Command::new(agent)
            .arg("deputy")
            .args(["--pid", &pid.to_string()])
            .arg("--socket")
            .arg(&self.socket)
            .args(["--host", &host.to_string()])
            .args(["--token", &format!("{token:032x}")])
            .env(AGENT_PARENT_ENV, std::process::id().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting the deputy: {e}"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("deputy without pipes".into());
        };
        let mut reports = report_lines(stdout);
        let first = tokio::time::timeout(AGENT_TIMEOUT, reports.recv()).await;
        let first_line = match &first {
            Ok(Some(line)) => line.clone(),
            _ => String::new(),
        };
        let pid_there = match first {
            Ok(Some(line)) => match line
                .strip_prefix("running ")
                .and_then(|p| p.split_whitespace().next()?.parse().ok())
            {
                Some(p) => p,
                None => {
                    let _ = child.wait().await;
                    return Err(line.strip_prefix("error ").unwrap_or(&line).to_string());
                }
            },
            Ok(None) => {
                let _ = child.wait().await;
                return Err("the deputy ended without a word".into());
            }
            Err(_) => {
                // The deputy lets the process run on at home if it dies
                // before the copy runs.
                let _ = child.kill().await;
                return Err("timed out".into());
            }
        };
        let (forward, reports_for_requests) = mpsc::unbounded_channel();
        let deputy = Rc::new(Deputy {
            runs_on: to,
            pid_there,
            commands: Mutex::new(stdin),
            reports: Mutex::new(reports_for_requests),
        });
        self.deputies.borrow_mut().insert(pid, deputy.clone());
        tracing::info!(pid, "deputy: {first_line}");
        let me = self.clone();
        tokio::task::spawn_local(async move {
            while let Some(line) = reports.recv().await {
                tracing::info!(pid, "deputy: {line}");
                let ended = line.starts_with("ended") || is_home(&line);
                let _ = forward.send(line);
                if ended {
                    break;
                }
            }
            me.deputies
                .borrow_mut()
                .retain(|p, d| !(*p == pid && Rc::ptr_eq(d, &deputy)));
            let _ = child.wait().await;
        });
        Ok(())
    }

    /// Bring a process homed here back from where it runs.
    pub async fn bring_home(&self, pid: i32) -> Result<(), String> {
        let Some(deputy) = self.deputies.borrow().get(&pid).cloned() else {
            return Err(format!("process {pid} does not run elsewhere"));
        };
        let mut reports = deputy.reports.lock().await;
        deputy
            .commands
            .lock()
            .await
            .write_all(b"home\n")
            .await
            .map_err(|e| format!("the deputy is gone: {e}"))?;
        match tokio::time::timeout(AGENT_TIMEOUT, reports.recv()).await {
            Ok(Some(line)) if is_home(&line) => Ok(()),
            Ok(Some(line)) => Err(line.strip_prefix("error ").unwrap_or(&line).to_string()),
            Ok(None) => Err("the deputy ended".into()),
            Err(_) => Err("timed out (the process still runs where it ran; try again)".into()),
        }
    }
}

/// A deputy's report that the process runs at home again (`home`, maybe
/// followed by figures).
fn is_home(line: &str) -> bool {
    line == "home" || line.starts_with("home ")
}

/// An RPC to `to` with the daemon's bound on the answer.
async fn rpc(
    core: &super::core::SharedCore,
    to: NodeId,
    req: crate::wire::RpcRequest,
) -> crate::wire::RpcResponse {
    let (rx, timeout) = {
        let mut c = core.borrow_mut();
        (c.start_rpc(to, req), c.rpc_timeout)
    };
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => crate::wire::RpcResponse::Err(libc::EHOSTDOWN),
        Err(_) => crate::wire::RpcResponse::Err(libc::ETIMEDOUT),
    }
}

/// May a user with `uid` move (or check) local process `pid`? Root, or
/// its owner, as for a signal; ESRCH if there is no such process.
pub(super) fn may_act_on(uid: u32, pid: i32) -> Result<(), i32> {
    let owner = std::fs::metadata(format!("/proc/{pid}"))
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .map_err(|_| libc::ESRCH)?;
    // A process that has ended but is not yet reaped (an Apache child its
    // parent let go while it ran away) has nothing left to move.
    if has_ended(pid) {
        return Err(libc::ESRCH);
    }
    if uid != 0 && owner != uid {
        return Err(libc::EPERM);
    }
    Ok(())
}

/// Whether process `pid` is a zombie (or being reaped), from /proc.
fn has_ended(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    // pid (comm) state ...: comm may hold spaces and parentheses.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    matches!(state, Some("Z" | "X"))
}

/// `omctl migrate --check PID`: the reasons a local process cannot move,
/// found by an agent (`migshm-agent check`) without stopping it.
pub async fn check(core: &super::core::SharedCore, uid: u32, pid: i32) -> crate::wire::ClientReply {
    use crate::wire::ClientReply;
    let (migrations, socket) = {
        let c = core.borrow();
        (c.migrations.clone(), c.migrations.socket.clone())
    };
    if let Some(there) = migrations.runs_or_moves_to(pid) {
        return ClientReply::Refused(format!("process {pid} runs on node {there}, not here"));
    }
    if let Some(home) = migrations.home_of_guest(pid) {
        return ClientReply::Refused(format!(
            "process {pid} is a guest from node {home}: it goes home before it moves on"
        ));
    }
    if let Err(e) = may_act_on(uid, pid) {
        return ClientReply::Err(e);
    }
    let agent = match agent_binary() {
        Ok(a) => a,
        Err(e) => return ClientReply::Refused(e),
    };
    let run = tokio::process::Command::new(agent)
        .arg("check")
        .args(["--pid", &pid.to_string()])
        .arg("--socket")
        .arg(&socket)
        .env(AGENT_PARENT_ENV, std::process::id().to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(AGENT_TIMEOUT, run).await {
        Ok(Ok(out)) if out.status.success() => ClientReply::Ok,
        Ok(Ok(out)) if out.status.code() == Some(3) => {
            ClientReply::Refused(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
        }
        Ok(Ok(out)) => ClientReply::Refused(format!("the check failed ({})", out.status)),
        Ok(Err(e)) => ClientReply::Refused(format!("starting the check: {e}")),
        Err(_) => ClientReply::Refused("the check did not end in time".into()),
    }
}

/// `omctl migrate PID NODE|home` asked of this node by a user with `uid`
/// (or a move by the balancer, or an expulsion: `cause`): PID is the
/// process's pid on its home node. Done here for a process homed here; for
/// one that runs here away from home, asked of its home.
pub async fn migrate(
    core: &super::core::SharedCore,
    uid: u32,
    pid: i32,
    to: Option<NodeId>,
    cause: crate::wire::MoveCause,
) -> crate::wire::ClientReply {
    use crate::wire::{ClientReply, MoveCause, MoveRecord, RpcRequest, RpcResponse};
    let (migrations, me) = {
        let c = core.borrow();
        (c.migrations.clone(), c.me)
    };
    if let Some(home) = migrations.home_of_guest(pid) {
        let req = RpcRequest::Migrate {
            uid,
            pid,
            to,
            cause,
        };
        return match rpc(core, home, req).await {
            RpcResponse::Ok => ClientReply::Ok,
            RpcResponse::Refused(why) => ClientReply::Refused(why),
            RpcResponse::Err(e) => ClientReply::Err(e),
            other => ClientReply::Refused(format!("node {home} answered {other:?}")),
        };
    }
    if let Err(e) = may_act_on(uid, pid) {
        return ClientReply::Err(e);
    }
    let from = migrations.runs_or_moves_to(pid).unwrap_or(me);
    let pinned = core.borrow_mut().placement.pinned(pid, from != me);
    if let (MoveCause::Balancer, Some(why)) = (cause, pinned) {
        return ClientReply::Refused(format!("process {pid} is {why}"));
    }
    let reply = move_homed_here(core, pid, to, cause == MoveCause::Hand || pinned.is_some()).await;
    if reply == ClientReply::Ok {
        let mut c = core.borrow_mut();
        let now = c.clock_ms();
        c.placement.record(
            now,
            MoveRecord {
                home: me,
                home_pid: pid,
                from,
                to: to.unwrap_or(me),
                ago_ms: 0,
                cause,
                failed: None,
            },
        );
    }
    reply
}

/// Move process `pid`, homed here, to `to` or home (`pinned`: its new
/// node's balancer is to leave it there).
async fn move_homed_here(
    core: &super::core::SharedCore,
    pid: i32,
    to: Option<NodeId>,
    pinned: bool,
) -> crate::wire::ClientReply {
    use crate::wire::{ClientReply, RpcRequest, RpcResponse};
    let (migrations, me) = {
        let c = core.borrow();
        (c.migrations.clone(), c.me)
    };
    let Some(to) = to.filter(|n| *n != me) else {
        if migrations.is_migrated(pid).is_none() {
            return ClientReply::Refused(format!("process {pid} already runs on its home node"));
        }
        return match migrations.bring_home(pid).await {
            Ok(()) => ClientReply::Ok,
            Err(e) => ClientReply::Refused(e),
        };
    };
    let address = {
        let c = core.borrow();
        match c.peers.get(&to) {
            Some(p) if c.is_up(to) => p.address,
            Some(_) => return ClientReply::Refused(format!("node {to} is down")),
            None => return ClientReply::Refused(format!("node {to} is not in the cluster")),
        }
    };
    if let Some(at) = migrations.is_migrated(pid) {
        if at == to {
            return ClientReply::Refused(format!("process {pid} already runs on node {to}"));
        }
        // From one remote node to another: through its home, which holds
        // everything that stays (its pid, listeners, relayed descriptors).
        // If the second step fails, the process runs at home.
        if let Err(e) = migrations.bring_home(pid).await {
            return ClientReply::Refused(format!("bringing it home from node {at} first: {e}"));
        }
    }
    let token = rand::random::<u128>();
    let port = match rpc(
        core,
        to,
        RpcRequest::StartHost {
            token,
            home_pid: pid,
            pinned,
        },
    )
    .await
    {
        RpcResponse::HostPort(port) => port,
        RpcResponse::Refused(why) => return ClientReply::Refused(why),
        RpcResponse::Err(e) => {
            return ClientReply::Refused(format!(
                "node {to} cannot host it: {}",
                std::io::Error::from_raw_os_error(e)
            ))
        }
        other => return ClientReply::Refused(format!("node {to} answered {other:?}")),
    };
    let host = SocketAddr::new(address.ip(), port);
    match migrations.move_out(pid, to, host, token).await {
        Ok(()) => ClientReply::Ok,
        Err(e) => ClientReply::Refused(e),
    }
}

#[cfg(test)]
mod tests {
    use super::has_ended;

    #[test]
    fn an_unreaped_child_has_ended_and_a_running_one_has_not() {
        let mut running = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let mut exited = std::process::Command::new("true").spawn().expect("true");
        let zombie = exited.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !has_ended(zombie) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(
            has_ended(zombie),
            "a child that exited is not seen as ended"
        );
        assert!(std::path::Path::new(&format!("/proc/{zombie}")).exists());
        assert!(!has_ended(running.id() as i32));
        let _ = running.kill();
        let _ = running.wait();
        let _ = exited.wait();
        assert!(has_ended(zombie), "a reaped pid is gone");
    }
}
