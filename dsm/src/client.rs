//! The library API for Rust programs: talk to the local `dsmd`, get or
//! create segments by key, attach them, stat and remove them.
//!
//! ```no_run
//! use dsm::client::{Client, IPC_CREAT};
//! let client = Client::connect("/run/dsmd.sock")?;
//! let id = client.get(0x1234, 4096, IPC_CREAT | 0o600)?;
//! let seg = client.attach(id, false)?;
//! seg.atomic_u64(0).fetch_add(1, std::sync::atomic::Ordering::SeqCst);
//! # Ok::<(), dsm::client::Error>(())
//! ```
//!
//! Each process talks to its daemon over its own connection; a forked child
//! re-registers its inherited attachments (with a new userfaultfd) in a
//! `pthread_atfork` handler, before it can touch them.

use crate::fdpass;
use crate::ids::{pages_for, NodeId, PAGE_SIZE};
use crate::memfd::Mapping;
use crate::sysv::ShmStat;
pub use crate::sysv::{IPC_CREAT, IPC_EXCL};
use crate::uffd;
use crate::wire::{
    self, AttachmentRecord, ClientReply, ClientRequest, NodeInfo, NodeStatus, SemSetStat,
};
use parking_lot::Mutex;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8};
use std::sync::{Arc, Once, Weak};
use std::time::Duration;

/// The environment variable naming the daemon's socket.
pub const SOCKET_ENV: &str = "DSMD_SOCKET";

/// Set by `omrun --lock`: the balancer never moves the process, nor the
/// children that inherit it.
pub const LOCK_ENV: &str = "MIGSHM_LOCK";

/// How long a call may wait for the daemon (it bounds its own waits on
/// other nodes well below this).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How many times (1 ms apart) a reconnected client asks to take back what
/// its closed connection left served.
const RECLAIM_TRIES: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The errno a Linux program would get from the same call.
    #[error("{}", std::io::Error::from_raw_os_error(*.0))]
    Errno(i32),
    #[error("cannot reach dsmd at {path}: {source}")]
    Unreachable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("connection to dsmd: {0}")]
    Io(#[from] std::io::Error),
    #[error("dsmd answered out of protocol: {0}")]
    Protocol(String),
    #[error("{SOCKET_ENV} is not set and no socket was given")]
    NoSocket,
    /// The daemon refused or could not carry out the request, and says why.
    #[error("{0}")]
    Refused(String),
}

impl Error {
    /// The errno to report for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Errno(e) => *e,
            Error::Unreachable { .. } | Error::NoSocket => libc::ECONNREFUSED,
            Error::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            Error::Protocol(_) => libc::EPROTO,
            Error::Refused(_) => libc::ECANCELED,
        }
    }
}

/// Length of the buffer a migrator writes a daemon socket path into.
pub const SOCKET_SLOT_LEN: usize = 128;

/// Where a migrator writes, through ptrace while the process is stopped,
/// the socket of the daemon of the node the process was moved to (see
/// [`wire::ClientLink`]): NUL-terminated, empty until the process moves.
/// Every reconnection reads it first.
#[repr(C, align(64))]
struct SocketSlot(std::cell::UnsafeCell<[u8; SOCKET_SLOT_LEN]>);

// SAFETY: written only from outside the process while it is stopped, and
// read with volatile reads; no reference to the bytes is ever formed.
unsafe impl Sync for SocketSlot {}

static RELOCATED_SOCKET: SocketSlot = SocketSlot(std::cell::UnsafeCell::new([0; SOCKET_SLOT_LEN]));

/// The socket a migrator put in [`RELOCATED_SOCKET`], if any.
fn relocated_socket() -> Option<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let base = RELOCATED_SOCKET.0.get() as *const u8;
    let mut path = Vec::new();
    for i in 0..SOCKET_SLOT_LEN {
        // SAFETY: in bounds of the static buffer; a volatile read, since
        // the bytes change behind the compiler's back.
        let b = unsafe { std::ptr::read_volatile(base.add(i)) };
        if b == 0 {
            break;
        }
        path.push(b);
    }
    (!path.is_empty()).then(|| PathBuf::from(std::ffi::OsString::from_vec(path)))
}

/// The daemon this process belongs to now: the one a migrator named, or
/// `default` if the process never moved.
pub fn current_socket(default: &Path) -> PathBuf {
    relocated_socket().unwrap_or_else(|| default.to_path_buf())
}

/// Calls this process has in flight on its daemon connections, from the
/// first byte of a request to the last of its answer: a migrator reads it
/// (see [`wire::ClientLink::calls_in_flight`]) so as never to move the
/// process with an answer on its way to a connection it leaves behind.
static CALLS_IN_FLIGHT: AtomicU32 = AtomicU32::new(0);

/// Held for the length of one call to a daemon.
pub struct CallInFlight(());

impl CallInFlight {
    pub fn begin() -> CallInFlight {
        CALLS_IN_FLIGHT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        CallInFlight(())
    }
}

impl Drop for CallInFlight {
    fn drop(&mut self) {
        CALLS_IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// In a forked child (one thread, no call of its own yet): calls other
/// threads of the parent had in flight are not the child's.
pub fn forget_parent_calls() {
    CALLS_IN_FLIGHT.store(0, std::sync::atomic::Ordering::SeqCst);
}

/// What a migrator needs to know about a connection to the daemon.
pub fn link_of(stream: &UnixStream) -> wire::ClientLink {
    wire::ClientLink {
        fd: stream.as_raw_fd(),
        socket_slot: RELOCATED_SOCKET.0.get() as u64,
        calls_in_flight: CALLS_IN_FLIGHT.as_ptr() as u64,
    }
}

fn hello(stream: &UnixStream) -> ClientRequest {
    ClientRequest::Hello {
        version: wire::PROTOCOL_VERSION,
        link: Some(link_of(stream)),
    }
}

struct State {
    stream: UnixStream,
    /// The daemon's socket, to reconnect after the program closed ours.
    path: Option<PathBuf>,
    /// What `stream`'s descriptor was when opened (see `fdpass::identity`).
    stream_id: Option<(u64, u64)>,
    next_id: u64,
    uffd_sent: bool,
    attachments: Vec<AttachmentRecord>,
    /// After a failed fork hand-over: every call fails.
    broken: bool,
}

struct Inner {
    path: PathBuf,
    node: NodeId,
    state: Mutex<State>,
}

/// A connection to the local daemon. Cheap to clone; share it across threads.
#[derive(Clone)]
pub struct Client(Arc<Inner>);

static LIVE: Mutex<Vec<Weak<Inner>>> = Mutex::new(Vec::new());
static ATFORK: Once = Once::new();

fn open_stream(path: &Path) -> Result<UnixStream, Error> {
    let stream = UnixStream::connect(path).map_err(|source| Error::Unreachable {
        path: path.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(Some(CALL_TIMEOUT))?;
    stream.set_write_timeout(Some(CALL_TIMEOUT))?;
    Ok(stream)
}

fn call_on(
    state: &mut State,
    req: &ClientRequest,
    fd: Option<&OwnedFd>,
) -> Result<(ClientReply, Option<OwnedFd>), Error> {
    if state.broken {
        return Err(Error::Errno(libc::EIO));
    }
    let _in_flight = CallInFlight::begin();
    if fdpass::identity(state.stream.as_fd()) != state.stream_id {
        // The program closed our descriptor (and may have reused its
        // number): never write there, never close it. Reconnect and take
        // back what the daemon kept serving for this process.
        // After a migration, the daemon of the node the process is on now.
        let Some(path) = relocated_socket().or_else(|| state.path.clone()) else {
            state.broken = true;
            return Err(Error::Errno(libc::EIO));
        };
        state.path = Some(path.clone());
        let fresh = match open_stream(&path) {
            Ok(f) => f,
            Err(e) => {
                state.broken = true;
                return Err(e);
            }
        };
        state.stream_id = fdpass::identity(fresh.as_fd());
        std::mem::forget(std::mem::replace(&mut state.stream, fresh));
        state.next_id = 1;
        let hello = hello(&state.stream);
        let welcomed = matches!(call_on(state, &hello, None)?.0, ClientReply::Welcome { .. });
        // The daemon may not have read the old connection's end yet: the
        // state to take back appears once it has.
        let mut reclaimed = !state.uffd_sent;
        for _ in 0..RECLAIM_TRIES {
            if reclaimed {
                break;
            }
            match call_on(state, &ClientRequest::Reclaim, None)?.0 {
                ClientReply::Ok => reclaimed = true,
                ClientReply::Err(libc::ENOENT) => std::thread::sleep(Duration::from_millis(1)),
                _ => break,
            }
        }
        if !welcomed || !reclaimed {
            state.broken = true;
            return Err(Error::Errno(libc::EIO));
        }
    }
    let id = state.next_id;
    state.next_id += 1;
    exchange(state.stream.as_fd(), id, req, fd.map(|f| f.as_fd()))
}

/// One request (with a descriptor, if any) and its answer on a connection
/// to a daemon: the local protocol's framing, for every client of it.
pub fn exchange(
    stream: BorrowedFd<'_>,
    id: u64,
    req: &ClientRequest,
    fd: Option<BorrowedFd<'_>>,
) -> Result<(ClientReply, Option<OwnedFd>), Error> {
    let frame = wire::encode_client(id, req);
    let sock = stream.as_raw_fd();
    let fds: Vec<i32> = fd.iter().map(|f| f.as_raw_fd()).collect();
    fdpass::send_all(sock, &frame, &fds)?;
    let mut buf = Vec::new();
    let mut received = Vec::new();
    loop {
        if let Some(len) =
            wire::client_frame_len(&buf).map_err(|e| Error::Protocol(e.to_string()))?
        {
            if buf.len() >= len {
                let (reply_id, reply): (u64, ClientReply) = wire::decode_client(&buf[4..len])
                    .map_err(|e| Error::Protocol(e.to_string()))?;
                if reply_id != id {
                    return Err(Error::Protocol(format!("reply {reply_id} to request {id}")));
                }
                return Ok((reply, received.pop()));
            }
        }
        let mut chunk = [0u8; 65536];
        let n = fdpass::recv_with_fds(sock, &mut chunk, &mut received)?;
        if n == 0 {
            return Err(Error::Io(std::io::Error::from(
                std::io::ErrorKind::UnexpectedEof,
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// This process's userfaultfd: one that also handles faults taken inside
/// the kernel (a `read()` into a segment) — made by the process itself if
/// it may, else through the daemon's `/dev/userfaultfd` — or, failing
/// both, a user-faults-only one.
fn new_uffd(state: &mut State) -> Result<OwnedFd, Error> {
    if let Ok(fd) = uffd::create_full(None) {
        return Ok(fd);
    }
    if let Ok((ClientReply::Ok, Some(dev))) = call_on(state, &ClientRequest::UffdDevice, None) {
        if let Ok(fd) = uffd::create_full(Some(dev.as_fd())) {
            return Ok(fd);
        }
    }
    Ok(uffd::create_user_only()?)
}

fn expect_ok(reply: ClientReply) -> Result<(), Error> {
    match reply {
        ClientReply::Ok => Ok(()),
        ClientReply::Err(e) => Err(Error::Errno(e)),
        other => Err(Error::Protocol(format!("{other:?}"))),
    }
}

impl Client {
    /// Connect to the daemon listening on `path`.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, Error> {
        // From the connect on: a migrator must not take this connection,
        // still unknown to the daemon, for one of the program's.
        let _in_flight = CallInFlight::begin();
        let path = path.as_ref().to_path_buf();
        let stream = open_stream(&path)?;
        let stream_id = fdpass::identity(stream.as_fd());
        let mut state = State {
            stream,
            path: Some(path.clone()),
            stream_id,
            next_id: 1,
            uffd_sent: false,
            attachments: vec![],
            broken: false,
        };
        let hello = hello(&state.stream);
        let node = match call_on(&mut state, &hello, None)?.0 {
            ClientReply::Welcome { node, .. } => node,
            ClientReply::Err(e) => return Err(Error::Errno(e)),
            other => return Err(Error::Protocol(format!("{other:?}"))),
        };
        let inner = Arc::new(Inner {
            path,
            node,
            state: Mutex::new(state),
        });
        ATFORK.call_once(|| {
            // SAFETY: registering plain extern "C" functions without arguments.
            unsafe {
                libc::pthread_atfork(
                    Some(atfork_prepare),
                    Some(atfork_parent),
                    Some(atfork_child),
                )
            };
        });
        let mut live = LIVE.lock();
        live.retain(|w| w.strong_count() > 0);
        live.push(Arc::downgrade(&inner));
        Ok(Client(inner))
    }

    /// Connect to the daemon named by `DSMD_SOCKET`.
    pub fn connect_default() -> Result<Client, Error> {
        let path = std::env::var_os(SOCKET_ENV).ok_or(Error::NoSocket)?;
        Client::connect(path)
    }

    /// The node this process runs on.
    pub fn node(&self) -> NodeId {
        self.0.node
    }

    fn call(&self, req: &ClientRequest) -> Result<ClientReply, Error> {
        let mut state = self.0.state.lock();
        Ok(call_on(&mut state, req, None)?.0)
    }

    /// `shmget`: find or create the segment of `key` (0 = `IPC_PRIVATE`).
    /// `flags` holds `IPC_CREAT`, `IPC_EXCL` and the mode bits.
    pub fn get(&self, key: i32, size: u64, flags: i32) -> Result<i32, Error> {
        self.get_on(key, size, flags, None)
    }

    /// `shmget`, with a segment it creates homed on node `home` (this node
    /// if `None`).
    pub fn get_on(
        &self,
        key: i32,
        size: u64,
        flags: i32,
        home: Option<NodeId>,
    ) -> Result<i32, Error> {
        self.get_in(crate::sysv::ShmSpace::SysV, key, size, flags, home)
    }

    /// `get_on` for a segment standing for something else than a SysV
    /// segment (an anonymous shared mapping, a POSIX object): it has its
    /// own keys and is neither enumerated nor counted as a SysV segment.
    pub fn get_in(
        &self,
        space: crate::sysv::ShmSpace,
        key: i32,
        size: u64,
        flags: i32,
        home: Option<NodeId>,
    ) -> Result<i32, Error> {
        let req = ClientRequest::ShmGet {
            key,
            size,
            flags,
            home,
            space,
        };
        match self.call(&req)? {
            ClientReply::ShmId(id) => Ok(id),
            ClientReply::Err(e) => Err(Error::Errno(e)),
            other => Err(Error::Protocol(format!("{other:?}"))),
        }
    }

    /// `shmat`: map the segment into this process (read-only if asked).
    pub fn attach(&self, id: i32, readonly: bool) -> Result<Attachment, Error> {
        self.attach_at(id, readonly, None)
    }

    /// `shmat` at a given page-aligned address.
    pub fn attach_at(
        &self,
        id: i32,
        readonly: bool,
        addr: Option<usize>,
    ) -> Result<Attachment, Error> {
        let mut state = self.0.state.lock();
        let (reply, memfd) = call_on(&mut state, &ClientRequest::ShmAttach { id, readonly }, None)?;
        let size = match reply {
            ClientReply::Attached { size } => size,
            ClientReply::Err(e) => return Err(Error::Errno(e)),
            other => return Err(Error::Protocol(format!("{other:?}"))),
        };
        let memfd =
            memfd.ok_or_else(|| Error::Protocol("attach reply without a descriptor".into()))?;
        let len = u64::from(pages_for(size)) as usize * PAGE_SIZE;
        let mapped = Mapping::map(memfd.as_fd(), len, !readonly, addr);
        drop(memfd);
        let mapping = match mapped {
            Ok(m) => m,
            Err(e) => {
                // The daemon counted the attach. A `ShmMapped` with no
                // mapping (address and length 0) is refused, and a refused
                // `ShmMapped` makes the daemon uncount the attach.
                let errno = e.raw_os_error().unwrap_or(libc::ENOMEM);
                let req = ClientRequest::ShmMapped {
                    id,
                    addr: 0,
                    len: 0,
                    readonly,
                    with_uffd: false,
                    handle: 0,
                };
                let _ = call_on(&mut state, &req, None);
                return Err(Error::Errno(errno));
            }
        };
        let with_uffd = !state.uffd_sent;
        let uffd = if with_uffd {
            Some(new_uffd(&mut state)?)
        } else {
            None
        };
        let handle = NEXT_HANDLE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let req = ClientRequest::ShmMapped {
            id,
            addr: mapping.addr() as u64,
            len: len as u64,
            readonly,
            with_uffd,
            handle,
        };
        let (reply, _) = call_on(&mut state, &req, uffd.as_ref())?;
        // Our copy of the uffd closes here: only the daemon holds it.
        drop(uffd);
        expect_ok(reply)?;
        state.uffd_sent = true;
        // From here the pieces are tracked in `attachments` (they may be
        // unmapped, moved or grown one by one).
        let (base, len) = mapping.leak();
        state.attachments.push(AttachmentRecord {
            id,
            addr: base as u64,
            len: len as u64,
            readonly,
            pgoff: 0,
            handle,
        });
        drop(state);
        Ok(Attachment {
            client: self.clone(),
            id,
            size,
            base,
            len,
            handle,
            readonly,
        })
    }

    /// Detach attachment `handle`: every piece of it is unmapped first (the
    /// range must never be served again), then the daemon uncounts them.
    /// Nothing to do if no piece is left (the program unmapped them all).
    fn detach_handle(&self, id: i32, handle: u64) -> Result<(), Error> {
        let mut state = self.0.state.lock();
        let pieces: Vec<AttachmentRecord> = state
            .attachments
            .iter()
            .filter(|a| a.handle == handle)
            .copied()
            .collect();
        if pieces.is_empty() {
            return Ok(());
        }
        state.attachments.retain(|a| a.handle != handle);
        for p in &pieces {
            let _ = crate::memfd::raw::munmap(p.addr as usize, p.len as usize);
        }
        expect_ok(call_on(&mut state, &ClientRequest::ShmDetach { id, handle }, None)?.0)
    }

    /// Does some piece of an attachment overlap `[addr, addr + len)`?
    pub fn maps_any(&self, addr: usize, len: usize) -> bool {
        !self.pieces_in(addr, len).is_empty()
    }

    /// The pieces overlapping `[addr, addr + len)`.
    pub fn pieces_in(&self, addr: usize, len: usize) -> Vec<AttachmentRecord> {
        let end = addr.saturating_add(len) as u64;
        self.0
            .state
            .lock()
            .attachments
            .iter()
            .filter(|a| a.addr < end && (addr as u64) < a.addr + a.len)
            .copied()
            .collect()
    }

    /// The kernel no longer maps `[addr, addr + len)` (the program
    /// unmapped it, or mapped something else over it): the pieces there
    /// are trimmed or gone, and the daemon told.
    pub fn unmapped(&self, addr: usize, len: usize) -> Result<(), Error> {
        let mut state = self.0.state.lock();
        // The kernel unmaps whole pages.
        let len = len.next_multiple_of(PAGE_SIZE);
        let touched = trim(&mut state.attachments, addr as u64, len as u64);
        tell_views(&mut state, &touched)
    }

    /// `shmdt(addr)` as the kernel does it: `addr` must start a piece of an
    /// attachment; every piece of that attachment that still sits where
    /// the attachment put it (from `addr` up to the attachment's end) goes.
    /// EINVAL if no piece starts there.
    pub fn detach_at(&self, addr: usize) -> Result<(), Error> {
        let mut state = self.0.state.lock();
        let addr = addr as u64;
        let Some(first) = state.attachments.iter().find(|a| a.addr == addr).copied() else {
            return Err(Error::Errno(libc::EINVAL));
        };
        let page = PAGE_SIZE as u64;
        let base = addr.wrapping_sub(first.pgoff * page);
        let end = state
            .attachments
            .iter()
            .filter(|a| a.handle == first.handle)
            .map(|a| a.pgoff * page + a.len)
            .max()
            .unwrap_or(0)
            .saturating_add(base);
        let gone: Vec<AttachmentRecord> = state
            .attachments
            .iter()
            .filter(|a| {
                a.handle == first.handle
                    && a.addr >= addr
                    && a.addr < end
                    && a.addr.wrapping_sub(base) == a.pgoff * page
            })
            .copied()
            .collect();
        for g in &gone {
            let _ = crate::memfd::raw::munmap(g.addr as usize, g.len as usize);
        }
        state.attachments.retain(|a| !gone.contains(a));
        tell_views(&mut state, &[(first.id, first.handle)])
    }

    /// `mremap` of (part of) a piece, done by mapping the node's copy again
    /// where the range goes (no page moves: it is the same memory) and
    /// registering it before it can be touched, then unmapping the old
    /// range. Returns the new address, or the errno the kernel gives.
    pub fn remap(
        &self,
        addr: usize,
        old_len: usize,
        new_len: usize,
        flags: i32,
        new_addr: usize,
    ) -> Result<usize, i32> {
        let page = PAGE_SIZE as u64;
        let (addr, old_len, new_len) = (
            addr as u64,
            old_len as u64,
            new_len.next_multiple_of(PAGE_SIZE) as u64,
        );
        let old_len = old_len.next_multiple_of(page);
        if !addr.is_multiple_of(page) || new_len == 0 || old_len == 0 {
            return Err(libc::EINVAL);
        }
        if flags & !(libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) != 0 {
            // MREMAP_DONTUNMAP is not offered for DSM mappings.
            return Err(libc::EINVAL);
        }
        let fixed = flags & libc::MREMAP_FIXED != 0;
        let may_move = flags & libc::MREMAP_MAYMOVE != 0;
        if fixed && (!may_move || !(new_addr as u64).is_multiple_of(page)) {
            return Err(libc::EINVAL);
        }
        let mut state = self.0.state.lock();
        let Some(piece) = state
            .attachments
            .iter()
            .find(|a| a.addr <= addr && addr + old_len <= a.addr + a.len)
            .copied()
        else {
            // Across pieces, or not all mapped: what the kernel says.
            return Err(libc::EFAULT);
        };
        let pgoff = piece.pgoff + (addr - piece.addr) / page;
        let prot = if piece.readonly {
            libc::PROT_READ
        } else {
            libc::PROT_READ | libc::PROT_WRITE
        };
        if !fixed && new_len <= old_len {
            // Shrinking in place: the tail goes.
            if new_len < old_len {
                let _ = crate::memfd::raw::munmap(
                    (addr + new_len) as usize,
                    (old_len - new_len) as usize,
                );
                let touched = trim(&mut state.attachments, addr + new_len, old_len - new_len);
                tell_views(&mut state, &touched).map_err(|e| e.errno())?;
            }
            return Ok(addr as usize);
        }
        let (reply, memfd) = call_on(&mut state, &ClientRequest::ShmMemfd { id: piece.id }, None)
            .map_err(|e| e.errno())?;
        expect_ok(reply).map_err(|e| e.errno())?;
        let memfd = memfd.ok_or(libc::EPROTO)?;
        let fd = memfd.as_raw_fd();
        let shared = libc::MAP_SHARED;
        // Where the range goes, mapped inaccessible until the daemon serves it.
        let grown_in_place = !fixed && {
            let ext = crate::memfd::raw::mmap(
                (addr + old_len) as usize,
                (new_len - old_len) as usize,
                libc::PROT_NONE,
                shared | libc::MAP_FIXED_NOREPLACE,
                fd,
                pgoff * page + old_len,
            );
            match ext {
                Ok(at) if at as u64 == addr + old_len => true,
                Ok(at) => {
                    let _ = crate::memfd::raw::munmap(at, (new_len - old_len) as usize);
                    false
                }
                Err(_) => false,
            }
        };
        let target = if grown_in_place {
            addr
        } else if !may_move {
            return Err(libc::ENOMEM);
        } else {
            let (hint, how) = if fixed {
                if (new_addr as u64) < addr + old_len && addr < new_addr as u64 + new_len {
                    return Err(libc::EINVAL);
                }
                (new_addr, shared | libc::MAP_FIXED)
            } else {
                (0, shared)
            };
            let at = crate::memfd::raw::mmap(
                hint,
                new_len as usize,
                libc::PROT_NONE,
                how,
                fd,
                pgoff * page,
            )
            .map_err(|e| e.raw_os_error().unwrap_or(libc::ENOMEM))?;
            // MAP_FIXED replaced whatever was there, DSM pieces included.
            let mut touched = trim(&mut state.attachments, at as u64, new_len);
            touched.push((piece.id, piece.handle));
            // The old range goes when the new one is served (below).
            touched.extend(trim(&mut state.attachments, addr, old_len));
            at as u64
        };
        drop(memfd);
        if grown_in_place {
            state.attachments.push(AttachmentRecord {
                addr: addr + old_len,
                len: new_len - old_len,
                pgoff: pgoff + old_len / page,
                ..piece
            });
        } else {
            state.attachments.push(AttachmentRecord {
                addr: target,
                len: new_len,
                pgoff,
                ..piece
            });
        }
        merge(&mut state.attachments, piece.handle);
        let told = tell_views(&mut state, &[(piece.id, piece.handle)]);
        if let Err(e) = told {
            let _ = crate::memfd::raw::munmap(target as usize, new_len as usize);
            return Err(e.errno());
        }
        // Served now: accessible, and the old range goes.
        let _ = crate::memfd::raw::mprotect(target as usize, new_len as usize, prot);
        if !grown_in_place {
            let _ = crate::memfd::raw::munmap(addr as usize, old_len as usize);
        }
        Ok(target as usize)
    }

    /// `shmctl(IPC_STAT)`.
    pub fn stat(&self, id: i32) -> Result<ShmStat, Error> {
        match self.call(&ClientRequest::ShmStat { id })? {
            ClientReply::Stat(s) => Ok(s),
            ClientReply::Err(e) => Err(Error::Errno(e)),
            other => Err(Error::Protocol(format!("{other:?}"))),
        }
    }

    /// `shmctl(SHM_LOCK)` (`lock`) or `SHM_UNLOCK`: the SHM_LOCKED mode bit
    /// (the pages of a segment are the cluster's; nothing is pinned).
    pub fn lock(&self, id: i32, lock: bool) -> Result<(), Error> {
        expect_ok(self.call(&ClientRequest::ShmLock { id, lock })?)
    }

    /// `shmctl(IPC_SET)`: owner, group and the permission bits.
    pub fn set(&self, id: i32, uid: u32, gid: u32, mode: u32) -> Result<(), Error> {
        expect_ok(self.call(&ClientRequest::ShmSet { id, uid, gid, mode })?)
    }

    /// `shmctl(IPC_RMID)`: the key is freed now, the memory when the last
    /// process detaches.
    pub fn remove(&self, id: i32) -> Result<(), Error> {
        expect_ok(self.call(&ClientRequest::ShmRemove { id })?)
    }

    /// Move process `pid` (homed on this node) to node `to`, or bring it
    /// home (`None`); returns once it runs there.
    pub fn migrate(&self, pid: i32, to: Option<NodeId>) -> Result<(), Error> {
        match self.call(&ClientRequest::Migrate { pid, to })? {
            ClientReply::Ok => Ok(()),
            ClientReply::Refused(why) => Err(Error::Refused(why)),
            ClientReply::Err(e) => Err(Error::Errno(e)),
            other => Err(Error::Protocol(format!("{other:?}"))),
        }
    }

    /// Every reason local process `pid` cannot move (empty if it can),
    /// found without moving it.
    pub fn migrate_check(&self, pid: i32) -> Result<Vec<String>, Error> {
        match self.call(&ClientRequest::MigrateCheck { pid })? {
            ClientReply::Ok => Ok(Vec::new()),
            ClientReply::Refused(why) => Ok(why.lines().map(str::to_string).collect()),
            ClientReply::Err(e) => Err(Error::Errno(e)),
            other => Err(Error::Protocol(format!("{other:?}"))),
        }
    }

    /// Processes that run away from their home node, cluster-wide.
    pub fn migrations(&self) -> Result<Vec<wire::MigrationEntry>, Error> {
        match self.call(&ClientRequest::Ps)? {
            ClientReply::Migrations(list) => Ok(list),
            ClientReply::Err(e) => Err(Error::Errno(e)),
            other => Err(Error::Protocol(format!("{other:?}"))),
        }
    }

    /// Every process under `omrun`, cluster-wide: where it runs and why.
    pub fn placements(&self) -> Result<Vec<wire::Placement>, Error> {
        match self.call(&ClientRequest::Placements)? {
            ClientReply::Placements(list) => Ok(list),
            ClientReply::Err(e) => Err(Error::Errno(e)),
            other => Err(Error::Protocol(format!("{other:?}"))),
        }
    }

    /// What `omctl top` shows.
    pub fn top(&self) -> Result<wire::TopFrame, Error> {
        match self.call(&ClientRequest::Top)? {
            ClientReply::Top(frame) => Ok(frame),
            ClientReply::Err(e) => Err(Error::Errno(e)),
            other => Err(Error::Protocol(format!("{other:?}"))),
        }
    }

    /// `omctl balance|block|unblock|expel|lock|unlock`: `Ok` or
    /// `Value(n)` answers, `n` (0 for `Ok`).
    pub fn control(&self, request: &ClientRequest) -> Result<i32, Error> {
        match self.call(request)? {
            ClientReply::Ok => Ok(0),
            ClientReply::Value(n) => Ok(n),
            ClientReply::Err(e) => Err(Error::Errno(e)),
            ClientReply::Refused(why) => Err(Error::Refused(why)),
            other => Err(Error::Protocol(format!("{other:?}"))),
        }
    }

    pub fn nodes(&self) -> Result<Vec<NodeInfo>, Error> {
        match self.call(&ClientRequest::Nodes)? {
            ClientReply::Nodes(n) => Ok(n),
            ClientReply::Err(e) => Err(Error::Errno(e)),
            other => Err(Error::Protocol(format!("{other:?}"))),
        }
    }

    /// The loads this node has heard of, its own first.
    pub fn loads(&self) -> Result<Vec<crate::wire::LoadEntry>, Error> {
        match self.call(&ClientRequest::Loads)? {
            ClientReply::Loads(l) => Ok(l),
            ClientReply::Err(e) => Err(Error::Errno(e)),
            other => Err(Error::Protocol(format!("{other:?}"))),
        }
    }

    /// Every segment of the cluster (on the nodes that are up).
    pub fn ipcs(&self) -> Result<Vec<ShmStat>, Error> {
        match self.call(&ClientRequest::Ipcs)? {
            ClientReply::Segments(s) => Ok(s),
            ClientReply::Err(e) => Err(Error::Errno(e)),
            other => Err(Error::Protocol(format!("{other:?}"))),
        }
    }

    /// Every semaphore set of the cluster, like `ipcs -s` (the semaphore
    /// crate's `Semaphores` works on them).
    pub fn sem_ipcs(&self) -> Result<Vec<SemSetStat>, Error> {
        match self.call(&ClientRequest::SemIpcs)? {
            ClientReply::SemSets(list) => Ok(list),
            ClientReply::Err(e) => Err(Error::Errno(e)),
            other => Err(Error::Protocol(format!("{other:?}"))),
        }
    }

    pub fn status(&self) -> Result<Vec<NodeStatus>, Error> {
        match self.call(&ClientRequest::Status)? {
            ClientReply::Status(s) => Ok(s),
            ClientReply::Err(e) => Err(Error::Errno(e)),
            other => Err(Error::Protocol(format!("{other:?}"))),
        }
    }
}

/// A segment mapped into this process; detaches on drop.
pub struct Attachment {
    client: Client,
    id: i32,
    size: u64,
    /// Where `shmat` mapped the whole segment (`len` bytes); the pieces
    /// left of it are in the client's records, under `handle`.
    base: usize,
    len: usize,
    handle: u64,
    readonly: bool,
}

/// Attachment handles, unique in this process (a forked child inherits
/// the counter with the attachments, so its new ones stay unique).
static NEXT_HANDLE: AtomicU64 = AtomicU64::new(1);

/// Cut `[addr, addr + len)` out of every piece; the attachments touched.
fn trim(pieces: &mut Vec<AttachmentRecord>, addr: u64, len: u64) -> Vec<(i32, u64)> {
    let end = addr.saturating_add(len);
    let page = PAGE_SIZE as u64;
    let mut touched = Vec::new();
    let mut kept = Vec::with_capacity(pieces.len());
    for p in pieces.drain(..) {
        let p_end = p.addr + p.len;
        if p_end <= addr || end <= p.addr {
            kept.push(p);
            continue;
        }
        if !touched.contains(&(p.id, p.handle)) {
            touched.push((p.id, p.handle));
        }
        if p.addr < addr {
            kept.push(AttachmentRecord {
                len: addr - p.addr,
                ..p
            });
        }
        if end < p_end {
            kept.push(AttachmentRecord {
                addr: end,
                len: p_end - end,
                pgoff: p.pgoff + (end - p.addr) / page,
                ..p
            });
        }
    }
    *pieces = kept;
    touched
}

/// Join the pieces of attachment `handle` that touch and map on (as the
/// kernel merges such VMAs).
fn merge(pieces: &mut Vec<AttachmentRecord>, handle: u64) {
    let page = PAGE_SIZE as u64;
    pieces.sort_by_key(|p| (p.handle, p.addr));
    let mut out: Vec<AttachmentRecord> = Vec::with_capacity(pieces.len());
    for p in pieces.drain(..) {
        match out.last_mut() {
            Some(last)
                if last.handle == handle
                    && p.handle == handle
                    && last.addr + last.len == p.addr
                    && last.pgoff + last.len / page == p.pgoff =>
            {
                last.len += p.len;
            }
            _ => out.push(p),
        }
    }
    *pieces = out;
}

/// Tell the daemon what each touched attachment is now.
fn tell_views(state: &mut State, touched: &[(i32, u64)]) -> Result<(), Error> {
    for &(id, handle) in touched {
        let views: Vec<wire::View> = state
            .attachments
            .iter()
            .filter(|a| a.handle == handle)
            .map(|a| wire::View {
                addr: a.addr,
                len: a.len,
                pgoff: a.pgoff,
            })
            .collect();
        expect_ok(call_on(state, &ClientRequest::ShmViews { id, handle, views }, None)?.0)?;
    }
    Ok(())
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("id", &self.id)
            .field("addr", &self.as_ptr())
            .field("size", &self.size)
            .finish()
    }
}

impl Attachment {
    pub fn id(&self) -> i32 {
        self.id
    }

    /// The segment's size in bytes (the mapping is rounded up to pages).
    pub fn len(&self) -> usize {
        self.size as usize
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    pub fn is_readonly(&self) -> bool {
        self.readonly
    }

    /// Where the segment was attached (the program may have reshaped the
    /// mapping since: see [`Client::unmapped`] and [`Client::remap`]).
    pub fn as_ptr(&self) -> *mut u8 {
        self.base as *mut u8
    }

    fn mapped_len(&self) -> usize {
        self.len
    }

    /// Names this attachment among the process's (see `AttachmentRecord`).
    pub fn handle(&self) -> u64 {
        self.handle
    }

    /// Does any piece of this attachment remain mapped?
    pub fn is_mapped(&self) -> bool {
        self.client
            .0
            .state
            .lock()
            .attachments
            .iter()
            .any(|a| a.handle == self.handle)
    }

    /// The segment as 64-bit atomics (the mapping is page-aligned).
    pub fn atomics_u64(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is live while `self` is, page-aligned, and
        // atomics tolerate concurrent access from other processes.
        unsafe { std::slice::from_raw_parts(self.as_ptr().cast(), self.mapped_len() / 8) }
    }

    pub fn atomics_u32(&self) -> &[AtomicU32] {
        // SAFETY: as for `atomics_u64`.
        unsafe { std::slice::from_raw_parts(self.as_ptr().cast(), self.mapped_len() / 4) }
    }

    pub fn atomics_u8(&self) -> &[AtomicU8] {
        // SAFETY: as for `atomics_u64`.
        unsafe { std::slice::from_raw_parts(self.as_ptr().cast(), self.mapped_len()) }
    }

    /// The 64-bit word at `index` (panics beyond the segment, like slicing).
    pub fn atomic_u64(&self, index: usize) -> &AtomicU64 {
        &self.atomics_u64()[index]
    }

    /// Copy bytes out of the segment.
    pub fn read(&self, offset: usize, buf: &mut [u8]) {
        assert!(
            offset + buf.len() <= self.mapped_len(),
            "read beyond the segment"
        );
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: the range is inside the live mapping; volatile because
            // other processes write it concurrently.
            *b = unsafe { std::ptr::read_volatile(self.as_ptr().add(offset + i)) };
        }
    }

    /// Copy bytes into the segment.
    pub fn write(&self, offset: usize, data: &[u8]) {
        assert!(!self.readonly, "write to a read-only attachment");
        assert!(
            offset + data.len() <= self.mapped_len(),
            "write beyond the segment"
        );
        for (i, b) in data.iter().enumerate() {
            // SAFETY: as for `read`.
            unsafe { std::ptr::write_volatile(self.as_ptr().add(offset + i), *b) };
        }
    }

    /// The segment as bytes.
    ///
    /// # Safety
    /// Other processes may write the segment at any time; the caller must
    /// make sure none does while the slice is alive (e.g. hold a lock).
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is live while `self` is; exclusion is the caller's.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.size as usize) }
    }

    /// Detach now, reporting errors (drop detaches too, silently).
    pub fn detach(self) -> Result<(), Error> {
        // Drop finds nothing left to detach.
        self.client.detach_handle(self.id, self.handle)
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if let Err(e) = self.client.detach_handle(self.id, self.handle) {
            tracing::debug!(id = self.id, "detach on drop: {e}");
        }
    }
}

// ---- fork ----------------------------------------------------------------------

// Locks stay held from prepare to the parent/child handler so the child
// never inherits a lock some other thread held at the moment of fork.
extern "C" fn atfork_prepare() {
    let live = LIVE.lock();
    for inner in live.iter().filter_map(Weak::upgrade) {
        std::mem::forget(inner.state.lock());
    }
    std::mem::forget(live);
}

fn release_fork_locks() {
    // SAFETY: prepare locked LIVE and forgot the guard; this is its unlock.
    unsafe { LIVE.force_unlock() };
    let live = LIVE.lock();
    for inner in live.iter().filter_map(Weak::upgrade) {
        // SAFETY: prepare locked every live state and forgot the guards.
        unsafe { inner.state.force_unlock() };
    }
}

extern "C" fn atfork_parent() {
    release_fork_locks();
}

extern "C" fn atfork_child() {
    forget_parent_calls();
    release_fork_locks();
    let live: Vec<Arc<Inner>> = LIVE.lock().iter().filter_map(Weak::upgrade).collect();
    for inner in live {
        let mut state = inner.state.lock();
        let path = relocated_socket()
            .or_else(|| state.path.clone())
            .unwrap_or_else(|| inner.path.clone());
        if let Err(e) = adopt_in_child(&path, &mut state) {
            // Unregistered mappings could show stale or zero pages: take
            // them away, so an access faults (SIGSEGV) instead.
            for a in state.attachments.drain(..) {
                // A range this client mapped in the parent.
                let _ = crate::memfd::raw::munmap(a.addr as usize, a.len as usize);
            }
            state.broken = true;
            tracing::error!("forked child could not re-register its segments: {e}");
        }
    }
}

/// In a forked child: a connection of its own, a userfaultfd of its own,
/// and the inherited attachments handed to the daemon before returning.
fn adopt_in_child(path: &Path, state: &mut State) -> Result<(), Error> {
    let _in_flight = CallInFlight::begin();
    let fresh = open_stream(path)?;
    let inherited_id = std::mem::replace(&mut state.stream_id, fdpass::identity(fresh.as_fd()));
    // The inherited descriptor is the parent's connection: close the
    // child's copy only if it still is ours.
    let inherited = std::mem::replace(&mut state.stream, fresh);
    if fdpass::identity(inherited.as_fd()) == inherited_id {
        drop(inherited);
    } else {
        std::mem::forget(inherited);
    }
    state.next_id = 1;
    state.uffd_sent = false;
    let hello = hello(&state.stream);
    match call_on(state, &hello, None)?.0 {
        ClientReply::Welcome { .. } => {}
        other => return Err(Error::Protocol(format!("{other:?}"))),
    }
    if state.attachments.is_empty() {
        return Ok(());
    }
    let uffd = new_uffd(state)?;
    let req = ClientRequest::Adopt {
        attachments: state.attachments.clone(),
    };
    expect_ok(call_on(state, &req, Some(&uffd))?.0)?;
    state.uffd_sent = true;
    Ok(())
}
