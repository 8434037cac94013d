//! The library API for Rust programs: SysV semaphore sets served by the
//! local `dsmd`, the same sets every node of the cluster sees.
//!
//! ```no_run
//! use semaphore::{SemBuf, Semaphores, IPC_CREAT, SEM_UNDO};
//! let sems = Semaphores::connect("/run/dsmd.sock")?;
//! let set = sems.get(0x5e4a, 1, IPC_CREAT | 0o600)?;
//! set.set_value(0, 1)?;
//! set.op(&[SemBuf { num: 0, op: -1, flags: SEM_UNDO }])?; // P
//! set.op(&[SemBuf { num: 0, op: 1, flags: SEM_UNDO }])?; // V
//! # Ok::<(), semaphore::Error>(())
//! ```
//!
//! A `semop` that must wait blocks only its own thread: each call takes a
//! connection of its own from a small pool. A signal that interrupts the
//! wait (its handler runs) withdraws the operation at the home and the call
//! returns EINTR, unless the operation had already been applied, in which
//! case it returns success: an operation is never lost nor applied twice.

use dsm::ids::NodeId;
use dsm::semregion::{Fast, Region};
use dsm::sysv::Credentials;
use dsm::wire::{self, ClientReply, ClientRequest, SemCtl, SemSetStat};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;
use sysv::sem::SemBuf;

pub use dsm::client::Error;

/// Connections idle in the pool beyond this are closed.
const POOL_MAX: usize = 8;

/// How long a call other than a waiting `semop` may take before the
/// daemon is considered stuck.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// One connection to the daemon, used by one call at a time.
struct Conn {
    stream: UnixStream,
    next_id: u64,
    /// The process that opened it: a forked child never uses its parent's.
    owner: u32,
    /// What the descriptor was when opened (see `dsm::fdpass::identity`).
    identity: Option<(u64, u64)>,
}

/// Every connection's descriptor, so a forked child can close the ones it
/// inherited (they belong to the parent's calls).
static OPEN_FDS: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());
static POOLS: Mutex<Vec<std::sync::Weak<Inner>>> = Mutex::new(Vec::new());
static ATFORK: Once = Once::new();

impl Conn {
    fn open(path: &Path) -> Result<(Conn, NodeId), Error> {
        // From the connect on: a migrator must not take this connection,
        // still unknown to the daemon, for one of the program's.
        let _in_flight = dsm::client::CallInFlight::begin();
        let stream = UnixStream::connect(path).map_err(|source| Error::Unreachable {
            path: path.to_path_buf(),
            source,
        })?;
        let identity = dsm::fdpass::identity(std::os::fd::AsFd::as_fd(&stream));
        let mut conn = Conn {
            stream,
            next_id: 1,
            owner: std::process::id(),
            identity,
        };
        lock(&OPEN_FDS).push(conn.stream.as_raw_fd());
        let hello = ClientRequest::Hello {
            version: wire::PROTOCOL_VERSION,
            link: Some(dsm::client::link_of(&conn.stream)),
        };
        match conn.call(&hello)? {
            ClientReply::Welcome { node, .. } => Ok((conn, node)),
            ClientReply::Err(e) => Err(Error::Errno(e)),
            other => Err(Error::Protocol(format!("{other:?}"))),
        }
    }

    fn send(&mut self, id: u64, req: &ClientRequest) -> Result<(), Error> {
        let frame = wire::encode_client(id, req);
        // MSG_NOSIGNAL: a daemon gone is an error, not a SIGPIPE.
        dsm::fdpass::send_all(self.stream.as_raw_fd(), &frame, &[])?;
        Ok(())
    }

    fn call(&mut self, req: &ClientRequest) -> Result<ClientReply, Error> {
        Ok(self.call_with_fd(req)?.0)
    }

    fn call_with_fd(
        &mut self,
        req: &ClientRequest,
    ) -> Result<(ClientReply, Option<OwnedFd>), Error> {
        let _in_flight = dsm::client::CallInFlight::begin();
        let id = self.next_id;
        self.next_id += 1;
        self.send(id, req)?;
        self.receive(id, Some(CALL_TIMEOUT), false)
    }

    /// Read the reply to `id`. With `interruptible`, a signal handler that
    /// runs meanwhile makes this send `SemCancel` once and go on waiting
    /// for the reply, which tells what became of the operation.
    fn receive(
        &mut self,
        id: u64,
        timeout: Option<Duration>,
        interruptible: bool,
    ) -> Result<(ClientReply, Option<OwnedFd>), Error> {
        let fd = self.stream.as_raw_fd();
        let mut buf: Vec<u8> = Vec::new();
        let mut fds: Vec<OwnedFd> = Vec::new();
        let mut cancelled = false;
        loop {
            if let Some(len) =
                wire::client_frame_len(&buf).map_err(|e| Error::Protocol(e.to_string()))?
            {
                if buf.len() >= len {
                    let (reply_id, reply): (u64, ClientReply) =
                        wire::decode_client(&buf[4..len])
                            .map_err(|e| Error::Protocol(e.to_string()))?;
                    if reply_id != id {
                        return Err(Error::Protocol(format!("reply {reply_id} to request {id}")));
                    }
                    return Ok((reply, fds.pop()));
                }
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
            // SAFETY: one valid pollfd. poll is never restarted after a
            // signal handler, whatever SA_RESTART says: that is how a
            // signal reaches us here.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    if interruptible && !cancelled {
                        cancelled = true;
                        self.send(0, &ClientRequest::SemCancel)?;
                    }
                    continue;
                }
                return Err(Error::Io(e));
            }
            if n == 0 {
                return Err(Error::Io(std::io::ErrorKind::TimedOut.into()));
            }
            let mut chunk = [0u8; 4096];
            let got = dsm::fdpass::recv_with_fds(fd, &mut chunk, &mut fds)?;
            if got == 0 {
                return Err(Error::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            buf.extend_from_slice(&chunk[..got]);
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let fd = self.stream.as_raw_fd();
        lock(&OPEN_FDS).retain(|f| *f != fd);
    }
}

/// A connection that is not ours to use any more: inherited from the
/// parent (its descriptor was closed in the child, by number), or closed by
/// the program (the number may be another file now). Forgotten, never
/// closed again.
fn discard_inherited(conn: Conn) {
    let fd = conn.stream.as_raw_fd();
    lock(&OPEN_FDS).retain(|f| *f != fd);
    std::mem::forget(conn);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Inner {
    path: PathBuf,
    node: NodeId,
    pool: Mutex<Vec<Conn>>,
    /// The fast path of each set used, once asked for.
    fast: Mutex<HashMap<i32, FastPath>>,
    /// Supplementary groups for the fast path's permission check, read
    /// again whenever the effective ids change.
    groups: Mutex<(u32, u32, Vec<u32>)>,
}

/// A set's fast path as this process knows it.
struct FastPath {
    region: Option<Arc<Region>>,
    /// Operations that went to the daemon since the region was asked for:
    /// asked again after a while (the set may have come to this node).
    slow_ops: u32,
}

/// Operations through the daemon before asking again for a region that
/// was not there.
const ASK_REGION_EVERY: u32 = 64;

impl Inner {
    fn checkout(&self) -> Result<Conn, Error> {
        let me = std::process::id();
        while let Some(c) = lock(&self.pool).pop() {
            let ours = dsm::fdpass::identity(std::os::fd::AsFd::as_fd(&c.stream)) == c.identity;
            if c.owner == me && ours {
                return Ok(c);
            }
            // Inherited from the parent, or the program closed (and may
            // have reused) the descriptor: never use it nor close it.
            discard_inherited(c);
        }
        // After a migration, the daemon of the node the process is on now.
        Ok(Conn::open(&dsm::client::current_socket(&self.path))?.0)
    }

    fn checkin(&self, conn: Conn) {
        let mut pool = lock(&self.pool);
        if pool.len() < POOL_MAX {
            pool.push(conn);
        }
    }

    /// One request, one reply, on a pooled connection. A connection that
    /// failed is dropped, not returned to the pool.
    fn call(&self, req: &ClientRequest) -> Result<ClientReply, Error> {
        Ok(self.call_with_fd(req)?.0)
    }

    fn call_with_fd(&self, req: &ClientRequest) -> Result<(ClientReply, Option<OwnedFd>), Error> {
        let mut conn = self.checkout()?;
        let reply = conn.call_with_fd(req)?;
        self.checkin(conn);
        Ok(reply)
    }

    /// The set's region, asking the daemon the first time and again now
    /// and then while it has none.
    fn region(&self, id: i32) -> Option<Arc<Region>> {
        {
            let mut fast = lock(&self.fast);
            if let Some(f) = fast.get_mut(&id) {
                if f.region.is_some() || f.slow_ops < ASK_REGION_EVERY {
                    return f.region.clone();
                }
            }
        }
        let region = match self.call_with_fd(&ClientRequest::SemRegion { id }) {
            Ok((ClientReply::Ok, Some(fd))) => Region::map(fd).ok().map(Arc::new),
            _ => None,
        };
        lock(&self.fast).insert(
            id,
            FastPath {
                region: region.clone(),
                slow_ops: 0,
            },
        );
        region
    }

    fn went_slow(&self, id: i32, retired: bool) {
        if let Some(f) = lock(&self.fast).get_mut(&id) {
            f.slow_ops += 1;
            if retired {
                f.region = None;
            }
        }
    }

    /// The caller's credentials as the fast path checks them. Capabilities
    /// count as absent: where they would matter, the daemon decides.
    fn credentials(&self, euid: u32, egid: u32) -> Credentials {
        let mut cached = lock(&self.groups);
        if cached.0 != euid || cached.1 != egid || cached.2.is_empty() {
            *cached = (euid, egid, read_groups());
        }
        Credentials {
            pid: std::process::id() as i32,
            uid: euid,
            gid: egid,
            groups: cached.2.clone(),
            cap_ipc_owner: false,
            cap_sys_admin: false,
            cap_ipc_lock: false,
        }
    }
}

/// The semaphore sets of the cluster, as seen from this node's daemon.
/// Cheap to clone; share it across threads.
#[derive(Clone)]
pub struct Semaphores(Arc<Inner>);

impl Semaphores {
    /// Connect to the daemon listening on `path`.
    pub fn connect(path: impl AsRef<Path>) -> Result<Semaphores, Error> {
        let path = path.as_ref().to_path_buf();
        let (conn, node) = Conn::open(&path)?;
        let inner = Arc::new(Inner {
            path,
            node,
            pool: Mutex::new(vec![conn]),
            fast: Mutex::new(HashMap::new()),
            groups: Mutex::new((u32::MAX, u32::MAX, Vec::new())),
        });
        ATFORK.call_once(|| {
            // SAFETY: registering a plain extern "C" function without arguments.
            unsafe { libc::pthread_atfork(None, None, Some(atfork_child)) };
        });
        let mut pools = lock(&POOLS);
        pools.retain(|w| w.strong_count() > 0);
        pools.push(Arc::downgrade(&inner));
        Ok(Semaphores(inner))
    }

    /// Connect to the daemon named by `DSMD_SOCKET`.
    pub fn connect_default() -> Result<Semaphores, Error> {
        let path = std::env::var_os(dsm::client::SOCKET_ENV).ok_or(Error::NoSocket)?;
        Semaphores::connect(path)
    }

    /// The node this process runs on.
    pub fn node(&self) -> NodeId {
        self.0.node
    }

    /// `semget`: find or create the set of `key` (0 = `IPC_PRIVATE`).
    pub fn get(&self, key: i32, nsems: i32, flags: i32) -> Result<SemSet, Error> {
        self.get_on(key, nsems, flags, None)
    }

    /// `semget`, with a set it creates homed on node `home` (this node if
    /// `None`).
    pub fn get_on(
        &self,
        key: i32,
        nsems: i32,
        flags: i32,
        home: Option<NodeId>,
    ) -> Result<SemSet, Error> {
        let req = ClientRequest::SemGet {
            key,
            nsems,
            flags,
            home,
        };
        match self.0.call(&req)? {
            ClientReply::SemId(id) => Ok(self.open(id)),
            ClientReply::Err(e) => Err(Error::Errno(e)),
            other => Err(Error::Protocol(format!("{other:?}"))),
        }
    }

    /// A handle on the set `id` (as `semget` returned it, on any node).
    /// Nothing is checked until it is used, as with a raw SysV id.
    pub fn open(&self, id: i32) -> SemSet {
        SemSet {
            sems: self.clone(),
            id,
        }
    }

    /// Every semaphore set of the cluster, like `ipcs -s`.
    pub fn list(&self) -> Result<Vec<SemSetStat>, Error> {
        match self.0.call(&ClientRequest::SemIpcs)? {
            ClientReply::SemSets(list) => Ok(list),
            ClientReply::Err(e) => Err(Error::Errno(e)),
            other => Err(Error::Protocol(format!("{other:?}"))),
        }
    }
}

/// A semaphore set, by id.
#[derive(Clone)]
pub struct SemSet {
    sems: Semaphores,
    id: i32,
}

impl std::fmt::Debug for SemSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SemSet").field("id", &self.id).finish()
    }
}

impl SemSet {
    pub fn id(&self) -> i32 {
        self.id
    }

    /// `semop`: apply every operation or none, waiting as long as needed.
    pub fn op(&self, sops: &[SemBuf]) -> Result<(), Error> {
        self.timed_op(sops, None)
    }

    /// `semtimedop`: like [`SemSet::op`], but EAGAIN once `timeout` passed
    /// without the operations applying.
    pub fn timed_op(&self, sops: &[SemBuf], timeout: Option<Duration>) -> Result<(), Error> {
        loop {
            match self.try_op(sops, timeout)? {
                ClientReply::Withdrawn => {}
                reply => return expect_ok(reply),
            }
        }
    }

    /// One attempt at a `semop`: answered with its outcome, or `Withdrawn`
    /// when a migrator took the process away while it waited (nothing of
    /// it applied: the caller asks again, now on the node it runs on).
    fn try_op(&self, sops: &[SemBuf], timeout: Option<Duration>) -> Result<ClientReply, Error> {
        // SAFETY: geteuid/getegid only read the calling thread's credentials.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let inner = &self.sems.0;
        let mut retired = false;
        if let Some(region) = inner.region(self.id) {
            let cred = inner.credentials(euid, egid);
            match region.try_semop(sops, cred.pid, &cred, dsm::sysv::now_seconds()) {
                Fast::Done(result) => {
                    return Ok(result.map_or_else(ClientReply::Err, |()| ClientReply::Ok))
                }
                Fast::Slow => {}
                Fast::Retired => retired = true,
            }
        }
        inner.went_slow(self.id, retired);
        let req = ClientRequest::SemOp {
            id: self.id,
            sops: sops.to_vec(),
            timeout_ns: timeout.map(|t| t.as_nanos().min(u128::from(u64::MAX)) as u64),
            euid,
            egid,
        };
        let _in_flight = dsm::client::CallInFlight::begin();
        let mut conn = inner.checkout()?;
        let id = conn.next_id;
        conn.next_id += 1;
        conn.send(id, &req)?;
        // The daemon bounds every wait on another node; only the local
        // daemon itself could keep this waiting, and its death ends it.
        let (reply, _) = conn.receive(id, None, true)?;
        let replaced =
            dsm::fdpass::identity(std::os::fd::AsFd::as_fd(&conn.stream)) != conn.identity;
        if reply == ClientReply::Withdrawn || replaced {
            // A migrator took the connection over while we waited (it is a
            // stand-in holding the answer now): ours to close, the program
            // never saw this number free.
            drop(conn);
        } else {
            inner.checkin(conn);
        }
        Ok(reply)
    }

    fn ctl(&self, cmd: SemCtl) -> Result<ClientReply, Error> {
        match self
            .sems
            .0
            .call(&ClientRequest::SemCtl { id: self.id, cmd })?
        {
            ClientReply::Err(e) => Err(Error::Errno(e)),
            other => Ok(other),
        }
    }

    fn ctl_value(&self, cmd: SemCtl) -> Result<i32, Error> {
        match self.ctl(cmd)? {
            ClientReply::Value(v) => Ok(v),
            other => Err(Error::Protocol(format!("{other:?}"))),
        }
    }

    /// `GETVAL`.
    pub fn get_value(&self, semnum: i32) -> Result<i32, Error> {
        self.ctl_value(SemCtl::GetVal { semnum })
    }

    /// `SETVAL` (clears every process's undo adjustment of it).
    pub fn set_value(&self, semnum: i32, value: i32) -> Result<(), Error> {
        expect_ok(self.ctl(SemCtl::SetVal { semnum, value })?)
    }

    /// `GETALL`.
    pub fn get_all(&self) -> Result<Vec<u16>, Error> {
        match self.ctl(SemCtl::GetAll)? {
            ClientReply::Values(v) => Ok(v),
            other => Err(Error::Protocol(format!("{other:?}"))),
        }
    }

    /// `SETALL`.
    pub fn set_all(&self, values: &[u16]) -> Result<(), Error> {
        expect_ok(self.ctl(SemCtl::SetAll {
            values: values.to_vec(),
        })?)
    }

    /// `GETPID`: the pid of the last process to operate on `semnum`, as
    /// it is on that process's node (see the crate documentation).
    pub fn get_pid(&self, semnum: i32) -> Result<i32, Error> {
        self.ctl_value(SemCtl::GetPid { semnum })
    }

    /// `GETNCNT`: processes waiting for `semnum` to grow.
    pub fn get_ncnt(&self, semnum: i32) -> Result<i32, Error> {
        self.ctl_value(SemCtl::GetNcnt { semnum })
    }

    /// `GETZCNT`: processes waiting for `semnum` to be zero.
    pub fn get_zcnt(&self, semnum: i32) -> Result<i32, Error> {
        self.ctl_value(SemCtl::GetZcnt { semnum })
    }

    /// `IPC_STAT`.
    pub fn stat(&self) -> Result<SemSetStat, Error> {
        match self.ctl(SemCtl::Stat)? {
            ClientReply::SemStat(s) => Ok(s),
            other => Err(Error::Protocol(format!("{other:?}"))),
        }
    }

    /// `IPC_STAT` without the read permission (`SEM_STAT_ANY`).
    pub fn stat_any(&self) -> Result<SemSetStat, Error> {
        match self.ctl(SemCtl::StatAny)? {
            ClientReply::SemStat(s) => Ok(s),
            other => Err(Error::Protocol(format!("{other:?}"))),
        }
    }

    /// `IPC_SET`: owner, group and permission bits.
    pub fn set_perm(&self, uid: u32, gid: u32, mode: u32) -> Result<(), Error> {
        expect_ok(self.ctl(SemCtl::Set { uid, gid, mode })?)
    }

    /// `IPC_RMID`: the set goes at once; waiters everywhere get EIDRM.
    pub fn remove(&self) -> Result<(), Error> {
        expect_ok(self.ctl(SemCtl::Remove)?)
    }
}

/// The calling process's supplementary groups.
fn read_groups() -> Vec<u32> {
    let mut groups = vec![0 as libc::gid_t; 256];
    // SAFETY: getgroups writes at most groups.len() entries into the buffer.
    let n = unsafe { libc::getgroups(groups.len() as i32, groups.as_mut_ptr()) };
    groups.truncate(n.max(0) as usize);
    // Never empty, so the cache above knows it was read.
    if groups.is_empty() {
        // SAFETY: getegid only reads the caller's credentials.
        groups.push(unsafe { libc::getegid() });
    }
    groups
}

fn expect_ok(reply: ClientReply) -> Result<(), Error> {
    match reply {
        ClientReply::Ok => Ok(()),
        ClientReply::Err(e) => Err(Error::Errno(e)),
        other => Err(Error::Protocol(format!("{other:?}"))),
    }
}

/// In a forked child: the inherited connections carry the parent's calls.
/// Close them here (the parent keeps its own) and start with empty pools.
extern "C" fn atfork_child() {
    dsm::client::forget_parent_calls();
    // The child has one thread; locks another parent thread held at fork
    // time stay locked forever in the child: never block on them.
    let fds = match OPEN_FDS.try_lock() {
        Ok(mut fds) => std::mem::take(&mut *fds),
        Err(_) => return,
    };
    if let Ok(pools) = POOLS.try_lock() {
        for inner in pools.iter().filter_map(std::sync::Weak::upgrade) {
            if let Ok(mut pool) = inner.pool.try_lock() {
                pool.drain(..).for_each(discard_inherited);
            }
        }
    }
    for fd in fds {
        // SAFETY: each fd is a connection the parent opened; the child's
        // copies are closed once, and no child object refers to them now.
        unsafe { libc::close(fd) };
    }
}
