//! The interposer's state: connections to the local daemon, made on first
//! use, and the process's attachments by address. No `unsafe` here.

use dsm::client::{Attachment, Client, Error};
use semaphore::Semaphores;
use std::sync::{Mutex, OnceLock};

pub struct Runtime {
    pub segments: Client,
    pub sems: Semaphores,
    /// Where the objects this program creates are homed (`omrun --home`).
    pub home: Option<dsm::ids::NodeId>,
    /// Every attachment of the process, so `shmdt` finds it by address.
    pub attached: Mutex<Vec<Attachment>>,
}

/// What the first call found.
enum Found {
    /// Not under `omrun`: the real libc serves.
    Native,
    Daemon(Runtime),
    /// Under `omrun`, but the daemon could not be reached.
    Unreachable(String),
}

static RUNTIME: OnceLock<Found> = OnceLock::new();

/// Set by `omrun --home NODE`: the node that homes what the program creates.
pub const HOME_ENV: &str = "MIGSHM_HOME";

/// Set by `omrun --node NODE`: the node the program runs on from the start.
pub const START_ON_ENV: &str = "MIGSHM_START_ON";

/// At load time, under `omrun --node NODE`: ask this node's daemon to move
/// the process to NODE before the program runs. The request is answered on
/// the copy's side by the loss of the connection (its descriptor is a
/// stand-in there) with the library pointed at NODE's daemon; a refusal
/// ends the program (exit status 127), as omrun's own failures do.
pub fn start_where_asked() {
    let Some(node) = std::env::var_os(START_ON_ENV) else {
        return;
    };
    // Children the program starts run where they are started.
    // SAFETY: at load time, before the program runs: no other thread reads
    // the environment.
    unsafe { libc::unsetenv(c"MIGSHM_START_ON".as_ptr()) };
    let Some(to) = node
        .to_str()
        .and_then(|n| n.parse::<u8>().ok())
        .and_then(dsm::ids::NodeId::new)
    else {
        fail_start(&format!("{START_ON_ENV}={node:?} is not a node id"));
    };
    let Some(path) = std::env::var_os(dsm::client::SOCKET_ENV) else {
        fail_start("no daemon socket");
    };
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    // A plain connection, not one of the library's: while the process
    // moves it waits here for the answer, which comes through the relay the
    // move makes for this socket, on the node it now runs on.
    let asked = ask_once(
        std::path::Path::new(&path),
        &dsm::wire::ClientRequest::Migrate {
            pid: me,
            to: Some(to),
        },
    );
    match asked {
        Ok(dsm::wire::ClientReply::Ok) => {}
        Ok(dsm::wire::ClientReply::Refused(why)) => {
            fail_start(&format!("cannot start on node {to}: {why}"))
        }
        Ok(other) => fail_start(&format!("cannot start on node {to}: {other:?}")),
        Err(e) => fail_start(&format!("cannot start on node {to}: {e}")),
    }
}

/// One request on a connection of its own (Hello, then `req`).
fn ask_once(
    path: &std::path::Path,
    req: &dsm::wire::ClientRequest,
) -> Result<dsm::wire::ClientReply, Error> {
    use std::os::fd::AsFd;
    let stream = std::os::unix::net::UnixStream::connect(path)?;
    let hello = dsm::wire::ClientRequest::Hello {
        version: dsm::wire::PROTOCOL_VERSION,
        link: None,
    };
    dsm::client::exchange(stream.as_fd(), 1, &hello, None)?;
    Ok(dsm::client::exchange(stream.as_fd(), 2, req, None)?.0)
}

fn fail_start(why: &str) -> ! {
    eprintln!("omrun: {why}");
    // SAFETY: ends the process at once, as a failed exec would.
    unsafe { libc::_exit(127) }
}

/// The runtime, if a call already made it (never connects).
pub fn runtime() -> Option<&'static Runtime> {
    match RUNTIME.get()? {
        Found::Daemon(rt) => Some(rt),
        _ => None,
    }
}

/// How a call is served.
pub enum Route {
    Native,
    Daemon(&'static Runtime),
    /// The errno to fail with.
    Fail(i32),
}

pub fn route() -> Route {
    let found = RUNTIME.get_or_init(|| {
        let Some(path) = std::env::var_os(dsm::client::SOCKET_ENV) else {
            return Found::Native;
        };
        // After a migration: the daemon of the node the process is on.
        let path = dsm::client::current_socket(std::path::Path::new(&path));
        let connected = Client::connect(&path).and_then(|segments| {
            let sems = Semaphores::connect(&path)?;
            let home = std::env::var(HOME_ENV)
                .ok()
                .and_then(|v| v.parse::<u8>().ok())
                .and_then(dsm::ids::NodeId::new);
            Ok(Runtime {
                segments,
                sems,
                home,
                attached: Mutex::new(Vec::new()),
            })
        });
        match connected {
            Ok(rt) => Found::Daemon(rt),
            Err(e) => Found::Unreachable(e.to_string()),
        }
    });
    match found {
        Found::Native => Route::Native,
        Found::Daemon(rt) => Route::Daemon(rt),
        Found::Unreachable(why) => {
            report_once(why);
            // SysV IPC is not available to this program: what Linux says
            // when it is compiled out.
            Route::Fail(libc::ENOSYS)
        }
    }
}

fn report_once(why: &str) {
    static REPORTED: std::sync::Once = std::sync::Once::new();
    REPORTED.call_once(|| eprintln!("migshm: SysV IPC unavailable: {why}"));
}

/// The errno for a failed call on an existing object: a daemon that went
/// away makes the object gone for this process.
pub fn errno_of(e: &Error) -> i32 {
    match e {
        Error::Errno(n) => *n,
        Error::Io(_) | Error::Protocol(_) => libc::EIDRM,
        // Only administrative requests are refused with a reason.
        Error::Refused(_) => libc::EINVAL,
        Error::Unreachable { .. } | Error::NoSocket => libc::ENOSYS,
    }
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Shared mappings made DSM segments, inherited across fork as any
/// attachment, and so able to follow a process that migrates: anonymous
/// ones (`mmap(MAP_SHARED|MAP_ANONYMOUS)`, keyless, removed at once so that
/// they end with their last user; Apache's scoreboard is one) and POSIX
/// shared memory objects (`shm_open` + `mmap`, keyed by their name).
pub static SHARED_ANONYMOUS: Mutex<Vec<Attachment>> = Mutex::new(Vec::new());

/// `MIGSHM_ANON_SHARED=native`: anonymous shared mappings and POSIX shared
/// memory stay the kernel's (they then keep a process from migrating).
pub fn anonymous_shared_as_dsm() -> bool {
    static AS_DSM: OnceLock<bool> = OnceLock::new();
    *AS_DSM.get_or_init(|| std::env::var_os("MIGSHM_ANON_SHARED").is_none_or(|v| v != "native"))
}

/// A DSM segment in place of an anonymous shared mapping; its address.
/// `fixed`: at exactly `addr` (MAP_FIXED, whatever was there goes).
pub fn map_shared_anonymous(
    rt: &Runtime,
    addr: usize,
    len: usize,
    writable: bool,
    fixed: bool,
) -> Result<usize, i32> {
    if len == 0 {
        return Err(libc::EINVAL);
    }
    let id = rt
        .segments
        .get_in(
            dsm::sysv::ShmSpace::Anonymous,
            libc::IPC_PRIVATE,
            len as u64,
            libc::IPC_CREAT | 0o600,
            rt.home,
        )
        .map_err(|e| errno_of(&e))?;
    let attached = attach_mapping(rt, id, addr, writable, fixed);
    // Gone with its last user, as anonymous memory is.
    let _ = rt.segments.remove(id);
    attached
}

/// Segment `id` attached as `mmap` would place a mapping (at `addr`
/// exactly if `fixed`, else there if free), and noted for `munmap`; its
/// address.
fn attach_mapping(
    rt: &Runtime,
    id: i32,
    addr: usize,
    writable: bool,
    fixed: bool,
) -> Result<usize, i32> {
    let hint = (addr != 0).then_some(addr);
    let attached = match rt.segments.attach_at(id, !writable, hint) {
        // A hint, unlike MAP_FIXED, may be ignored.
        Err(_) if hint.is_some() && !fixed => rt.segments.attach_at(id, !writable, None),
        other => other,
    };
    let attachment = attached.map_err(|e| errno_of(&e))?;
    let at = attachment.as_ptr() as usize;
    lock(&SHARED_ANONYMOUS).push(attachment);
    crate::reshape::note_dsm_mapping();
    Ok(at)
}

/// The key a POSIX shared memory object's name stands for in the cluster
/// (FNV-1a of the name, leading slashes dropped as glibc does), in a key
/// namespace of its own (`IpcKind::PosixShm`): two names clash with a 1 in
/// 2^32 chance per pair, SysV keys never.
pub fn posix_shm_key(name: &[u8]) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for &b in b"posix-shm:"
        .iter()
        .chain(name.iter().skip_while(|&&c| c == b'/'))
    {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    match hash as i32 {
        libc::IPC_PRIVATE => 1,
        key => key,
    }
}

/// The name of the POSIX shared memory object descriptor `fd` is open on
/// (`shm_open` opens `/dev/shm/NAME`), if it is one.
pub fn posix_shm_name(fd: i32) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    let name = target.as_os_str().as_bytes().strip_prefix(b"/dev/shm/")?;
    (!name.is_empty() && !name.ends_with(b" (deleted)") && !name.contains(&b'/'))
        .then(|| name.to_vec())
}

/// A DSM segment in place of a shared mapping of the POSIX shared memory
/// object `name` open on `fd`, of the whole object (`len` covers exactly
/// its pages): the object's segment, made on first use with the object's
/// size and mode, and left when the object is (`shm_unlink`).
pub fn map_posix_shm(
    rt: &Runtime,
    fd: i32,
    name: &[u8],
    addr: usize,
    len: usize,
    writable: bool,
    fixed: bool,
) -> Result<usize, i32> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(format!("/proc/self/fd/{fd}")).map_err(|_| libc::EBADF)?;
    let pages = |n: u64| n.div_ceil(4096);
    if meta.size() == 0 || pages(len as u64) != pages(meta.size()) {
        return Err(libc::EINVAL);
    }
    let get = |flags: i32| {
        rt.segments.get_in(
            dsm::sysv::ShmSpace::Posix,
            posix_shm_key(name),
            meta.size(),
            flags | (meta.mode() & 0o777) as i32,
            rt.home,
        )
    };
    let id = match get(libc::IPC_CREAT | libc::IPC_EXCL) {
        Ok(id) => {
            // New in the cluster: it starts with what the object holds
            // (written with write() before it was first mapped).
            copy_file_into(rt, fd, id, meta.size())?;
            id
        }
        Err(e) if errno_of(&e) == libc::EEXIST => get(0).map_err(|e| errno_of(&e))?,
        Err(e) => return Err(errno_of(&e)),
    };
    attach_mapping(rt, id, addr, writable, fixed)
}

/// Copy the data of the file `fd` is open on into segment `id` (holes are
/// zeros there already).
fn copy_file_into(rt: &Runtime, fd: i32, id: i32, size: u64) -> Result<(), i32> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    // A description of its own: seeking it moves nobody's offset.
    let file = std::fs::File::open(format!("/proc/self/fd/{fd}")).map_err(|_| libc::EBADF)?;
    let seg = rt.segments.attach(id, false).map_err(|e| errno_of(&e))?;
    let mut at: u64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    while at < size {
        // SAFETY: lseek on our own descriptor.
        let data = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            break; // no data after `at`
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
        let (start, end) = (data as u64, (hole.max(data) as u64).min(size));
        let mut pos = start;
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            let got = file.read_at(&mut buf[..n], pos).map_err(|_| libc::EIO)?;
            if got == 0 {
                break;
            }
            seg.write(pos as usize, &buf[..got]);
            pos += got as u64;
        }
        at = end.max(start + 1);
    }
    Ok(())
}

/// The id of the segment of POSIX shared memory object `name`.
pub fn posix_segment(rt: &Runtime, name: &[u8]) -> Result<i32, dsm::client::Error> {
    rt.segments
        .get_in(dsm::sysv::ShmSpace::Posix, posix_shm_key(name), 0, 0, None)
}

/// The segment of POSIX shared memory object `name`, if the cluster has
/// one: its size and permission bits.
pub fn posix_shm_stat(rt: &Runtime, name: &[u8]) -> Option<(u64, u32)> {
    let id = posix_segment(rt, name).ok()?;
    let stat = rt.segments.stat(id).ok()?;
    Some((stat.size, stat.perm.mode & 0o777))
}

/// `shm_unlink`: the object's segment goes (mapped memory stays until it
/// is unmapped, as POSIX says); whether there was one.
pub fn unlink_posix_shm(rt: &Runtime, name: &[u8]) -> Result<bool, i32> {
    let id = match posix_segment(rt, name) {
        Ok(id) => id,
        Err(e) if errno_of(&e) == libc::ENOENT => return Ok(false),
        Err(e) => return Err(errno_of(&e)),
    };
    rt.segments
        .remove(id)
        .map(|()| true)
        .map_err(|e| errno_of(&e))
}
