//! Listening sockets of a moved process (TCP, and unix stream ones bound
//! to a path or an abstract name). A listener cannot move: the home
//! process keeps it, and the process gets a stand-in listener of the same
//! family on the node it runs on (TCP on loopback; unix under an abstract
//! name of its own, so that nobody on that node reaches it by the
//! original's name, which belongs to the home node). While the process waits for a connection on the
//! stand-in (seen from the system call it is blocked in), the host asks the
//! deputy for one (`Want`); the deputy accepts one from the original
//! listener, in turn with the processes at home that accept from it, and
//! relays it (`Accepted`, then `Data`/`Shut` under a key of its own); the
//! host connects it to the stand-in, where the process accepts it. One
//! connection at a time per listener is given, and only to a process that
//! waits, so none is left queued to a process that will not take it.
//! Before a return home, `Quiesce` stops the supply, and the return waits
//! until the process has taken and closed every connection it was given.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use crate::image::{FdEntry, FdKind};
use crate::link::AgentMsg;
use crate::relay::Relays;
use crate::MigrateError;

/// Keys of relayed connections: below every descriptor number.
const FIRST_CONN: i32 = i32::MIN;

/// The deputy's side: the home process's listeners.
#[derive(Default)]
pub struct HomeListeners {
    list: Vec<HomeListener>,
    next_conn: i32,
    /// Connections accepted for the moved process so far.
    pub accepted: u64,
    /// A return is being prepared: accept nothing more.
    quiescing: bool,
}

struct HomeListener {
    fd: i32,
    listener: OwnedFd,
    wanted: bool,
}

impl HomeListeners {
    /// The listeners among the process's descriptors (`pid`: the home
    /// process, which keeps them).
    pub fn of(pid: i32, fds: &[FdEntry]) -> Result<HomeListeners, MigrateError> {
        let mut list = Vec::new();
        for entry in fds {
            if let FdKind::Listener { .. } = entry.kind {
                let listener = crate::ptrace::take_fd(pid, entry.fd as u64)?;
                // Our duplicate shares the file: O_NONBLOCK would change the
                // process's too. Readiness comes from poll instead, and an
                // accept only follows POLLIN (see `accept_one`).
                list.push(HomeListener {
                    fd: entry.fd,
                    listener,
                    wanted: false,
                });
            }
        }
        Ok(HomeListeners {
            list,
            next_conn: FIRST_CONN,
            accepted: 0,
            quiescing: false,
        })
    }

    /// (descriptor, events) per listener, in order: POLLIN where wanted.
    pub fn poll_set(&self) -> Vec<(BorrowedFd<'_>, i16)> {
        self.list
            .iter()
            .map(|l| (l.listener.as_fd(), if l.wanted { libc::POLLIN } else { 0 }))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The host asks for a connection on `fd`.
    pub fn want(&mut self, fd: i32) {
        if self.quiescing {
            return;
        }
        match self.list.iter_mut().find(|l| l.fd == fd) {
            Some(l) => l.wanted = true,
            None => tracing::warn!(
                fd,
                "a connection wanted on a descriptor that is no listener"
            ),
        }
    }

    /// Accept nothing more (a return home is prepared).
    pub fn quiesce(&mut self) {
        self.quiescing = true;
        for l in &mut self.list {
            l.wanted = false;
        }
    }

    /// After a failed return: the host asks again when the process waits.
    pub fn resume(&mut self) {
        self.quiescing = false;
    }

    /// After a poll (`revents` in `poll_set` order): accept for the wanted
    /// listeners that are ready, relaying each connection.
    pub fn service(&mut self, revents: &[i16], relays: &mut Relays, out: &mut Vec<AgentMsg>) {
        for (l, &rev) in self.list.iter_mut().zip(revents) {
            if !l.wanted || rev & libc::POLLIN == 0 {
                continue;
            }
            match crate::ptrace::accept_now(l.listener.as_fd()) {
                Ok(Some(conn)) => {
                    l.wanted = false;
                    let key = self.next_conn;
                    self.next_conn += 1;
                    self.accepted += 1;
                    relays.add(key, conn, true, true);
                    out.push(AgentMsg::Accepted {
                        fd: l.fd,
                        conn: key,
                    });
                }
                // A process at home took it first.
                Ok(None) => {}
                Err(e) => tracing::warn!(fd = l.fd, "accepting for the moved process: {e}"),
            }
        }
    }
}

/// The host's side: the stand-in listeners the process got.
#[derive(Default)]
pub struct StandIns {
    list: Vec<StandIn>,
    /// `Quiesce` came: no more `Want`; answer `Quiet` once settled.
    quiescing: Option<std::time::Instant>,
    /// `Quiet` was answered: no `Want` until the return is over.
    held: bool,
    /// What the process is blocked in, looked at on every tick.
    probe: Option<crate::procfs::SyscallProbe>,
}

struct StandIn {
    fd: i32,
    listener: OwnedFd,
    addr: StandInAddr,
    /// A `Want` is out and no connection came for it yet.
    want_sent: bool,
    /// A connection was put in its queue and the process has not taken it.
    queued: bool,
}

/// Where a stand-in listens.
enum StandInAddr {
    Tcp(SocketAddr),
    Unix(std::os::unix::net::SocketAddr),
}

impl StandInAddr {
    fn connect(&self) -> std::io::Result<OwnedFd> {
        match self {
            StandInAddr::Tcp(addr) => {
                let stream = TcpStream::connect(addr)?;
                let _ = stream.set_nodelay(true);
                Ok(OwnedFd::from(stream))
            }
            StandInAddr::Unix(addr) => Ok(OwnedFd::from(UnixStream::connect_addr(addr)?)),
        }
    }
}

/// A stand-in listener like the original of `entry` (a `Listener`).
fn stand_in_for(entry: &FdEntry) -> Result<(OwnedFd, StandInAddr), MigrateError> {
    use std::os::linux::net::SocketAddrExt;
    if let FdKind::Listener { unix: true, .. } = entry.kind {
        // Unique in the network namespace the nodes of one machine share.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("migshm-listener-{}-{}-{n}", std::process::id(), entry.fd);
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        let listener = UnixListener::bind_addr(&addr)?;
        return Ok((OwnedFd::from(listener), StandInAddr::Unix(addr)));
    }
    let listener = TcpListener::bind(("127.0.0.1", 0))?;
    let addr = listener.local_addr()?;
    Ok((OwnedFd::from(listener), StandInAddr::Tcp(addr)))
}

/// How long a return waits for the process to be done with the
/// connections it was given.
const QUIESCE_LIMIT: Duration = Duration::from_secs(5);

/// System calls on x86-64 a process waits for connections in.
const SYS_ACCEPT: i64 = 43;
const SYS_ACCEPT4: i64 = 288;
const SYS_POLL: i64 = 7;
const SYS_PPOLL: i64 = 271;
const SYS_EPOLL_WAIT: i64 = 232;
const SYS_EPOLL_PWAIT: i64 = 281;
const SYS_EPOLL_PWAIT2: i64 = 441;

impl StandIns {
    /// A stand-in per listener of `image`: ours, and the ends the process
    /// gets (by descriptor number).
    pub fn for_image(
        image: &crate::Image,
    ) -> Result<(StandIns, std::collections::HashMap<i32, OwnedFd>), MigrateError> {
        let mut list = Vec::new();
        let mut ends = std::collections::HashMap::new();
        for entry in &image.fds {
            if let FdKind::Listener { .. } = entry.kind {
                let (listener, addr) = stand_in_for(entry)?;
                ends.insert(entry.fd, listener.try_clone()?);
                list.push(StandIn {
                    fd: entry.fd,
                    listener,
                    addr,
                    want_sent: false,
                    queued: false,
                });
            }
        }
        Ok((
            StandIns {
                list,
                quiescing: None,
                held: false,
                probe: None,
            },
            ends,
        ))
    }

    /// Whether the host must look at the process now and then (it may
    /// start waiting for a connection at any time).
    pub fn needs_ticks(&self) -> bool {
        !self.list.is_empty() || self.quiescing.is_some()
    }

    /// A look at the process: ask for a connection for each stand-in it
    /// waits on with nothing queued; note the connections it took; answer
    /// a pending `Quiesce` once settled (true: answered `Quiet`).
    pub fn tick(&mut self, pid: i32, relays: &Relays, out: &mut Vec<AgentMsg>) -> bool {
        for s in &mut self.list {
            // Readable while a connection waits in its queue.
            if s.queued
                && !crate::ptrace::readable_within(s.listener.as_fd(), Duration::ZERO)
                    .unwrap_or(true)
            {
                s.queued = false;
            }
        }
        if let Some(since) = self.quiescing {
            let settled = self.list.iter().all(|s| !s.queued) && relays.connections_over();
            if settled {
                self.quiescing = None;
                self.held = true;
                out.push(AgentMsg::Quiet);
                return true;
            }
            if since.elapsed() > QUIESCE_LIMIT {
                self.quiescing = None;
                out.push(AgentMsg::Failed(
                    "it is still busy with connections it accepted; try again".into(),
                ));
            }
            return false;
        }
        if self.held {
            return false;
        }
        if self.list.iter().all(|s| s.want_sent || s.queued) {
            return false;
        }
        let probe = match &mut self.probe {
            Some(p) if p.pid() == pid => p,
            other => other.insert(crate::procfs::SyscallProbe::new(pid)),
        };
        let Some(blocked) = probe.blocked() else {
            return false;
        };
        let waited: Vec<i32> = self
            .list
            .iter()
            .filter(|s| !s.want_sent && !s.queued)
            .map(|s| s.fd)
            .filter(|&fd| waits_for_connection(pid, blocked, fd))
            .collect();
        for s in self.list.iter_mut().filter(|s| waited.contains(&s.fd)) {
            s.want_sent = true;
            out.push(AgentMsg::Want { fd: s.fd });
        }
        false
    }

    /// The deputy accepted connection `conn` for stand-in `fd`: put it in
    /// the stand-in's queue, relayed.
    /// If it cannot be, the deputy is told the connection ends here
    /// (`Shut`), so its client sees it closed rather than waiting.
    pub fn on_accepted(
        &mut self,
        fd: i32,
        conn: i32,
        relays: &mut Relays,
        out: &mut Vec<AgentMsg>,
    ) {
        let connected = match self.list.iter_mut().find(|s| s.fd == fd) {
            Some(s) => {
                s.want_sent = false;
                match s.addr.connect() {
                    Ok(stream) => {
                        s.queued = true;
                        relays.add(conn, stream, true, true);
                        true
                    }
                    Err(e) => {
                        tracing::error!(fd, "connecting to the stand-in listener: {e}");
                        false
                    }
                }
            }
            None => {
                tracing::warn!(fd, "a connection for a descriptor that has no stand-in");
                false
            }
        };
        if !connected {
            out.push(AgentMsg::Shut { fd: conn });
        }
    }

    /// The return failed: the process is given connections again.
    pub fn resume(&mut self) {
        self.held = false;
    }

    /// `Quiesce` from the deputy.
    pub fn quiesce(&mut self) {
        self.quiescing = Some(std::time::Instant::now());
        for s in &mut self.list {
            s.want_sent = false;
        }
    }
}

/// Whether `pid`, blocked in call `nr`, waits for a connection on
/// descriptor `fd`: in accept on it, or in poll or epoll_wait with it among what it waits
/// for.
fn waits_for_connection(pid: i32, (nr, args): (i64, [u64; 6]), fd: i32) -> bool {
    match nr {
        SYS_ACCEPT | SYS_ACCEPT4 => args[0] as i32 == fd,
        SYS_POLL | SYS_PPOLL => {
            // struct pollfd { int fd; short events, revents; }
            let count = (args[1] as usize).min(1024);
            read_process(pid, args[0], count * 8).is_some_and(|raw| {
                raw.chunks_exact(8)
                    .any(|p| i32::from_le_bytes([p[0], p[1], p[2], p[3]]) == fd)
            })
        }
        SYS_EPOLL_WAIT | SYS_EPOLL_PWAIT | SYS_EPOLL_PWAIT2 => {
            crate::procfs::epoll_targets(pid, args[0] as i32)
                .is_ok_and(|targets| targets.iter().any(|t| t.0 == fd))
        }
        _ => false,
    }
}

fn read_process(pid: i32, addr: u64, len: usize) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut buf = vec![0u8; len];
    mem.read_exact_at(&mut buf, addr).ok()?;
    Some(buf)
}
