//! Calls carried out at home: what a moved process's call on a stand-in
//! descriptor becomes on the link (`Call`), how the host reads it off the
//! intercepted system call (`decide`); `home_io.rs` carries it out.
//!
//! A stand-in is a descriptor that cannot live where the process runs (a
//! deleted file, an eventfd, a timerfd, an inotify instance): the home
//! process keeps the original, and every call the process makes on the
//! stand-in's number is answered with what the same call on the original
//! returns at home. Record locks (`fcntl` F_SETLK…) are taken by the home
//! process itself, so they exclude the other processes at home exactly as
//! before the move.

use serde::{Deserialize, Serialize};

/// Largest transfer of one forwarded `read` or `write` (a shorter count is
/// what the call returns, as the kernel may).
pub const MOST_BYTES: u64 = 4 << 20;

/// Size of `struct flock` and `struct itimerspec`, and of the kernel's
/// `struct termios` and `struct termios2` (what TCGETS and TCGETS2 fill:
/// not glibc's larger `struct termios`).
pub const FLOCK_LEN: usize = 32;
pub const ITIMERSPEC_LEN: usize = 32;
const TERMIOS_LEN: usize = 36;
const TERMIOS2_LEN: usize = 44;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Call {
    Read {
        len: u64,
    },
    Pread {
        len: u64,
        offset: i64,
    },
    Write {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Pwrite {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        offset: i64,
    },
    Lseek {
        offset: i64,
        whence: i32,
    },
    Fstat,
    Statx {
        flags: i32,
        mask: u32,
    },
    Ftruncate {
        len: i64,
    },
    Fsync {
        data_only: bool,
    },
    Fallocate {
        mode: i32,
        offset: i64,
        len: i64,
    },
    Fadvise {
        offset: i64,
        len: i64,
        advice: i32,
    },
    Flock {
        op: i32,
    },
    /// A record or open-file-description lock: `struct flock` in, and
    /// back out for the GETLK commands.
    Lock {
        cmd: i32,
        #[serde(with = "serde_bytes")]
        flock: Vec<u8>,
    },
    /// Any other `fcntl` with an integer argument (F_GETFL, F_SETFL…).
    Fcntl {
        cmd: i32,
        arg: u64,
    },
    /// `ioctl` with the bytes its argument points to (in and out).
    Ioctl {
        request: u64,
        #[serde(with = "serde_bytes")]
        arg: Vec<u8>,
    },
    /// `ioctl` whose argument is a plain value (TCFLSH, TCSBRK…).
    IoctlValue {
        request: u64,
        arg: u64,
    },
    /// `timerfd_gettime`, and `timerfd_settime` with the new setting
    /// (`struct itimerspec`, 32 bytes): the old one comes back.
    TimerGet,
    TimerSet {
        flags: i32,
        #[serde(with = "serde_bytes")]
        new: Vec<u8>,
    },
    /// `inotify_add_watch` (the path made absolute where the process
    /// runs: the same tree at home) and `inotify_rm_watch`.
    WatchAdd {
        path: String,
        mask: u32,
    },
    WatchRemove {
        wd: i32,
    },
    /// The process closed its descriptor (its record locks on the file go).
    Close,
    /// A call naming another process by pid, made by the home process
    /// (`home_pids.rs`): its number, arguments, and the `siginfo_t` a
    /// queueing call points to.
    ByPid {
        nr: i64,
        args: [u64; 4],
        #[serde(with = "serde_bytes")]
        info: Vec<u8>,
    },
    /// `waitid` in the home process, for its children there (`waits.rs`):
    /// `siginfo_t` then `struct rusage` come back. Without WNOHANG in
    /// `options`, the deputy tries again until a child has something.
    Wait {
        idtype: i32,
        id: u64,
        options: i32,
    },
}

impl Call {
    /// A POSIX record lock, owned by the process (not by the description):
    /// only the home process itself can take or test it.
    pub fn is_record_lock(&self) -> bool {
        matches!(self, Call::Lock { cmd, .. }
            if matches!(*cmd, libc::F_GETLK | libc::F_SETLK | libc::F_SETLKW))
    }

    /// A request about the terminal as the caller's controlling terminal
    /// (its foreground group, its session): only the home process, whose
    /// terminal it is, can make it.
    pub fn is_controlling_terminal(&self) -> bool {
        let request = match self {
            Call::Ioctl { request, .. } | Call::IoctlValue { request, .. } => *request,
            _ => return false,
        };
        [
            libc::TIOCGPGRP,
            libc::TIOCSPGRP,
            libc::TIOCGSID,
            libc::TIOCSCTTY,
            libc::TIOCNOTTY,
        ]
        .contains(&request)
    }

    /// Whether the call may wait (for data, room or a lock) on a
    /// descriptor that waits (`regular`: a regular file, whose reads and
    /// writes never do).
    pub fn may_wait(&self, regular: bool, nonblocking: bool) -> bool {
        match self {
            Call::Read { .. } | Call::Write { .. } => !regular && !nonblocking,
            Call::Flock { op } => op & libc::LOCK_NB == 0,
            Call::Lock { cmd, .. } => *cmd == libc::F_OFD_SETLKW || *cmd == libc::F_SETLKW,
            _ => false,
        }
    }
}

/// How the descriptor a call names is seen from where the process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// A stand-in: its calls go home.
    StandIn,
    /// A file reopened here whose locks are kept at home.
    LockHome,
}

/// Where the result's bytes go in the caller's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Only the return value.
    Value,
    /// The bytes at this address (at most as many as came back).
    Into(u64),
    /// Spread over these buffers (address, length), in order.
    Scatter(Vec<(u64, u64)>),
}

/// What the host does with one intercepted call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not ours (another descriptor with a watched number, or a call that
    /// only concerns the process's own table): run it as it is.
    RunAsIs,
    /// Answer at once with this result.
    Answer(i64),
    /// Carry it out at home and answer with what that returns.
    Forward { fd: i32, call: Call, reply: Reply },
    /// Close these descriptors at home first, then run it as it is (the
    /// process's own table changes too).
    CloseFirst(Vec<i32>),
}

/// The caller, as the host sees it.
pub trait CallerMemory {
    fn read(&self, addr: u64, len: usize) -> std::io::Result<Vec<u8>>;
    /// Its working directory (for a relative path).
    fn cwd(&self) -> std::io::Result<String>;
}

/// Largest path read from the caller.
const PATH_MAX: usize = 4096;

/// The NUL-terminated string at `at`, read a page at a time (a string
/// may end just before an unmapped page).
fn path_at(mem: &dyn CallerMemory, at: u64) -> Result<String, i32> {
    let mut bytes = Vec::new();
    let mut addr = at;
    while bytes.len() < PATH_MAX {
        let to_page_end = (4096 - (addr % 4096)) as usize;
        let chunk = mem.read(addr, to_page_end).map_err(|_| libc::EFAULT)?;
        if let Some(end) = chunk.iter().position(|&b| b == 0) {
            bytes.extend_from_slice(&chunk[..end]);
            return String::from_utf8(bytes).map_err(|_| libc::EINVAL);
        }
        bytes.extend_from_slice(&chunk);
        addr += to_page_end as u64;
    }
    Err(libc::ENAMETOOLONG)
}

fn errno(e: i32) -> Decision {
    Decision::Answer(-i64::from(e))
}

/// The buffers of an iovec array of `count` entries at `at`.
fn iovecs(mem: &dyn CallerMemory, at: u64, count: u64) -> Result<Vec<(u64, u64)>, i32> {
    if count > libc::UIO_MAXIOV as u64 {
        return Err(libc::EINVAL);
    }
    let raw = mem
        .read(at, count as usize * 16)
        .map_err(|_| libc::EFAULT)?;
    Ok(raw
        .chunks_exact(16)
        .map(|c| {
            let word = |i: usize| u64::from_le_bytes(c[i..i + 8].try_into().unwrap_or_default());
            (word(0), word(8))
        })
        .collect())
}

fn gather(mem: &dyn CallerMemory, bufs: &[(u64, u64)]) -> Result<Vec<u8>, i32> {
    let mut data = Vec::new();
    for &(addr, len) in bufs {
        let room = MOST_BYTES.saturating_sub(data.len() as u64);
        let take = len.min(room);
        data.extend(mem.read(addr, take as usize).map_err(|_| libc::EFAULT)?);
        if take < len {
            break;
        }
    }
    Ok(data)
}

fn total(bufs: &[(u64, u64)]) -> u64 {
    bufs.iter()
        .fold(0u64, |sum, b| sum.saturating_add(b.1))
        .min(MOST_BYTES)
}

/// Whether the path argument at `at` is the empty string.
fn empty_path(mem: &dyn CallerMemory, at: u64) -> Result<bool, i32> {
    let first = mem.read(at, 1).map_err(|_| libc::EFAULT)?;
    Ok(first.first() == Some(&0))
}

/// What to do with call `nr(args)`, given the numbers the filter watches
/// and how each descriptor is watched (`watch`, None for one that is not,
/// or no longer, ours).
pub fn decide(
    nr: i64,
    args: [u64; 6],
    numbers: &[i32],
    watch: &dyn Fn(i32) -> Option<Watch>,
    mem: &dyn CallerMemory,
) -> Decision {
    match decide_or_errno(nr, args, numbers, watch, mem) {
        Ok(d) => d,
        Err(e) => errno(e),
    }
}

fn decide_or_errno(
    nr: i64,
    args: [u64; 6],
    numbers: &[i32],
    watch: &dyn Fn(i32) -> Option<Watch>,
    mem: &dyn CallerMemory,
) -> Result<Decision, i32> {
    let fd_at = |i: usize| args[i] as u32 as i32;
    let fd = fd_at(0);
    // Calls that close or replace a watched descriptor, of any kind.
    match nr {
        libc::SYS_close if watch(fd).is_some() => {
            return Ok(Decision::CloseFirst(vec![fd]));
        }
        libc::SYS_dup2 | libc::SYS_dup3 => {
            let target = fd_at(1);
            if watch(fd) == Some(Watch::StandIn) {
                return Ok(cannot_duplicate());
            }
            if target != fd && watch(target).is_some() {
                return Ok(Decision::CloseFirst(vec![target]));
            }
            return Ok(Decision::RunAsIs);
        }
        libc::SYS_close_range => {
            const CLOSE_RANGE_CLOEXEC: u64 = 1 << 2;
            if args[2] & CLOSE_RANGE_CLOEXEC != 0 {
                return Ok(Decision::RunAsIs);
            }
            let (first, last) = (args[0] as u32, args[1] as u32);
            let mut closing: Vec<i32> = numbers
                .iter()
                .copied()
                .filter(|&n| (first..=last).contains(&(n as u32)) && watch(n).is_some())
                .collect();
            closing.sort_unstable();
            return Ok(if closing.is_empty() {
                Decision::RunAsIs
            } else {
                Decision::CloseFirst(closing)
            });
        }
        libc::SYS_mmap if watch(fd_at(4)) == Some(Watch::StandIn) => {
            // Its pages live at home: it cannot be mapped here.
            return Err(libc::ENODEV);
        }
        libc::SYS_mmap => return Ok(Decision::RunAsIs),
        _ => {}
    }
    let Some(kind) = watch(fd) else {
        return Ok(Decision::RunAsIs);
    };
    let forward = |call: Call, reply: Reply| Ok(Decision::Forward { fd, call, reply });
    if kind == Watch::LockHome {
        // Only its locks are kept at home.
        return match nr {
            libc::SYS_flock => forward(Call::Flock { op: args[1] as i32 }, Reply::Value),
            libc::SYS_fcntl if is_lock_command(args[1] as i32) => lock(args, mem, forward),
            _ => Ok(Decision::RunAsIs),
        };
    }
    let len = |i: usize| args[i].min(MOST_BYTES);
    match nr {
        libc::SYS_read => forward(Call::Read { len: len(2) }, Reply::Into(args[1])),
        libc::SYS_pread64 => forward(
            Call::Pread {
                len: len(2),
                offset: args[3] as i64,
            },
            Reply::Into(args[1]),
        ),
        libc::SYS_write => {
            let data = mem
                .read(args[1], len(2) as usize)
                .map_err(|_| libc::EFAULT)?;
            forward(Call::Write { data }, Reply::Value)
        }
        libc::SYS_pwrite64 => {
            let data = mem
                .read(args[1], len(2) as usize)
                .map_err(|_| libc::EFAULT)?;
            forward(
                Call::Pwrite {
                    data,
                    offset: args[3] as i64,
                },
                Reply::Value,
            )
        }
        libc::SYS_readv | libc::SYS_preadv | libc::SYS_preadv2 => {
            let bufs = iovecs(mem, args[1], args[2])?;
            let offset = args[3] as i64;
            let call = if nr == libc::SYS_readv || offset == -1 {
                Call::Read { len: total(&bufs) }
            } else {
                Call::Pread {
                    len: total(&bufs),
                    offset,
                }
            };
            forward(call, Reply::Scatter(bufs))
        }
        libc::SYS_writev | libc::SYS_pwritev | libc::SYS_pwritev2 => {
            let bufs = iovecs(mem, args[1], args[2])?;
            let data = gather(mem, &bufs)?;
            let offset = args[3] as i64;
            let call = if nr == libc::SYS_writev || offset == -1 {
                Call::Write { data }
            } else {
                Call::Pwrite { data, offset }
            };
            forward(call, Reply::Value)
        }
        libc::SYS_lseek => forward(
            Call::Lseek {
                offset: args[1] as i64,
                whence: args[2] as i32,
            },
            Reply::Value,
        ),
        libc::SYS_fstat => forward(Call::Fstat, Reply::Into(args[1])),
        libc::SYS_newfstatat => {
            if args[3] as i32 & libc::AT_EMPTY_PATH == 0 || !empty_path(mem, args[1])? {
                // A path looked up from a descriptor that is no directory.
                return Ok(Decision::RunAsIs);
            }
            forward(Call::Fstat, Reply::Into(args[2]))
        }
        libc::SYS_statx => {
            if args[2] as i32 & libc::AT_EMPTY_PATH == 0 || !empty_path(mem, args[1])? {
                return Ok(Decision::RunAsIs);
            }
            forward(
                Call::Statx {
                    flags: args[2] as i32,
                    mask: args[3] as u32,
                },
                Reply::Into(args[4]),
            )
        }
        libc::SYS_ftruncate => forward(
            Call::Ftruncate {
                len: args[1] as i64,
            },
            Reply::Value,
        ),
        libc::SYS_fsync => forward(Call::Fsync { data_only: false }, Reply::Value),
        libc::SYS_fdatasync => forward(Call::Fsync { data_only: true }, Reply::Value),
        libc::SYS_fallocate => forward(
            Call::Fallocate {
                mode: args[1] as i32,
                offset: args[2] as i64,
                len: args[3] as i64,
            },
            Reply::Value,
        ),
        libc::SYS_fadvise64 => forward(
            Call::Fadvise {
                offset: args[1] as i64,
                len: args[2] as i64,
                advice: args[3] as i32,
            },
            Reply::Value,
        ),
        libc::SYS_flock => forward(Call::Flock { op: args[1] as i32 }, Reply::Value),
        libc::SYS_fcntl => {
            let cmd = args[1] as i32;
            match cmd {
                // The process's own table: its close-on-exec flag.
                libc::F_GETFD | libc::F_SETFD => Ok(Decision::RunAsIs),
                libc::F_DUPFD | libc::F_DUPFD_CLOEXEC => Ok(cannot_duplicate()),
                _ if is_lock_command(cmd) => lock(args, mem, forward),
                _ => forward(Call::Fcntl { cmd, arg: args[2] }, Reply::Value),
            }
        }
        libc::SYS_ioctl => {
            let request = args[1];
            match request {
                // Close-on-exec, again the process's own.
                r if r == libc::FIOCLEX || r == libc::FIONCLEX => Ok(Decision::RunAsIs),
                _ => match ioctl_arg(request) {
                    Some(IoctlArg::Nothing) => forward(
                        Call::Ioctl {
                            request,
                            arg: Vec::new(),
                        },
                        Reply::Value,
                    ),
                    Some(IoctlArg::Value) => forward(
                        Call::IoctlValue {
                            request,
                            arg: args[2],
                        },
                        Reply::Value,
                    ),
                    Some(IoctlArg::In(len)) => {
                        let arg = mem.read(args[2], len).map_err(|_| libc::EFAULT)?;
                        forward(Call::Ioctl { request, arg }, Reply::Value)
                    }
                    Some(IoctlArg::Out(len)) => forward(
                        Call::Ioctl {
                            request,
                            arg: vec![0; len],
                        },
                        Reply::Into(args[2]),
                    ),
                    Some(IoctlArg::InOut(len)) => {
                        let arg = mem.read(args[2], len).map_err(|_| libc::EFAULT)?;
                        forward(Call::Ioctl { request, arg }, Reply::Into(args[2]))
                    }
                    // A request whose argument we cannot size: none of the
                    // descriptors served at home (files, eventfd, timerfd,
                    // inotify, terminals) answers one but with this.
                    None => {
                        tracing::debug!(request, "an ioctl on a stand-in refused (ENOTTY)");
                        Err(libc::ENOTTY)
                    }
                },
            }
        }
        libc::SYS_dup => Ok(cannot_duplicate()),
        libc::SYS_timerfd_gettime => forward(Call::TimerGet, Reply::Into(args[1])),
        libc::SYS_timerfd_settime => {
            let new = mem
                .read(args[2], ITIMERSPEC_LEN)
                .map_err(|_| libc::EFAULT)?;
            let reply = if args[3] == 0 {
                Reply::Value
            } else {
                Reply::Into(args[3])
            };
            forward(
                Call::TimerSet {
                    flags: args[1] as i32,
                    new,
                },
                reply,
            )
        }
        libc::SYS_inotify_add_watch => {
            let mut path = path_at(mem, args[1])?;
            if !path.starts_with('/') {
                let cwd = mem.cwd().map_err(|_| libc::ENOENT)?;
                path = format!("{}/{path}", cwd.trim_end_matches('/'));
            }
            forward(
                Call::WatchAdd {
                    path,
                    mask: args[2] as u32,
                },
                Reply::Value,
            )
        }
        libc::SYS_inotify_rm_watch => {
            forward(Call::WatchRemove { wd: args[1] as i32 }, Reply::Value)
        }
        _ => Ok(Decision::RunAsIs),
    }
}

/// How an `ioctl`'s argument travels (sizes in bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IoctlArg {
    Nothing,
    Value,
    In(usize),
    Out(usize),
    InOut(usize),
}

/// The argument of `ioctl` request `request`: the terminal and file
/// requests by name (their numbers predate the size encoding), others
/// from the direction and size their number encodes (`_IOC`).
fn ioctl_arg(request: u64) -> Option<IoctlArg> {
    use IoctlArg::*;
    let named: [(u64, IoctlArg); 26] = [
        (libc::FIONREAD, Out(4)),
        (libc::FIONBIO, In(4)),
        (libc::TCGETS, Out(TERMIOS_LEN)),
        (libc::TCSETS, In(TERMIOS_LEN)),
        (libc::TCSETSW, In(TERMIOS_LEN)),
        (libc::TCSETSF, In(TERMIOS_LEN)),
        (libc::TCGETS2, Out(TERMIOS2_LEN)),
        (libc::TCSETS2, In(TERMIOS2_LEN)),
        (libc::TCSETSW2, In(TERMIOS2_LEN)),
        (libc::TCSETSF2, In(TERMIOS2_LEN)),
        (libc::TIOCGWINSZ, Out(8)),
        (libc::TIOCSWINSZ, In(8)),
        (libc::TIOCGPGRP, Out(4)),
        (libc::TIOCSPGRP, In(4)),
        (libc::TIOCGSID, Out(4)),
        (libc::TIOCOUTQ, Out(4)),
        (libc::TIOCGPTN, Out(4)),
        (libc::TIOCSPTLCK, In(4)),
        (libc::TCFLSH, Value),
        (libc::TCXONC, Value),
        (libc::TCSBRK, Value),
        (libc::TCSBRKP, Value),
        (libc::TIOCSCTTY, Value),
        (libc::TIOCNOTTY, Nothing),
        (libc::TIOCEXCL, Nothing),
        (libc::TIOCNXCL, Nothing),
    ];
    if let Some(&(_, arg)) = named.iter().find(|(r, _)| *r == request) {
        return Some(arg);
    }
    // _IOC: direction in bits 30-31 (1 write, 2 read), size in 16-29.
    let size = ((request >> 16) & 0x3fff) as usize;
    match (request >> 30) & 3 {
        1 => Some(In(size)),
        2 => Some(Out(size)),
        3 => Some(InOut(size)),
        _ => None,
    }
}

/// A duplicate made here would name the stand-in, whose calls the filter
/// (fixed when the process was restored) does not watch under the new
/// number: refused, as when the table is full, rather than answered wrong.
fn cannot_duplicate() -> Decision {
    tracing::warn!("a duplicate of a descriptor served at home was refused (EMFILE)");
    errno(libc::EMFILE)
}

fn is_lock_command(cmd: i32) -> bool {
    matches!(
        cmd,
        libc::F_GETLK
            | libc::F_SETLK
            | libc::F_SETLKW
            | libc::F_OFD_GETLK
            | libc::F_OFD_SETLK
            | libc::F_OFD_SETLKW
    )
}

fn lock(
    args: [u64; 6],
    mem: &dyn CallerMemory,
    forward: impl Fn(Call, Reply) -> Result<Decision, i32>,
) -> Result<Decision, i32> {
    let cmd = args[1] as i32;
    let flock = mem.read(args[2], FLOCK_LEN).map_err(|_| libc::EFAULT)?;
    let reply = if cmd == libc::F_GETLK || cmd == libc::F_OFD_GETLK {
        Reply::Into(args[2])
    } else {
        Reply::Value
    };
    forward(Call::Lock { cmd, flock }, reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Memory of a pretend caller: bytes at addresses.
    struct Memory(HashMap<u64, Vec<u8>>);

    impl CallerMemory for Memory {
        fn read(&self, addr: u64, len: usize) -> std::io::Result<Vec<u8>> {
            for (&at, bytes) in &self.0 {
                if addr >= at && addr + len as u64 <= at + bytes.len() as u64 {
                    let from = (addr - at) as usize;
                    return Ok(bytes[from..from + len].to_vec());
                }
            }
            Err(std::io::Error::from_raw_os_error(libc::EFAULT))
        }

        fn cwd(&self) -> std::io::Result<String> {
            Ok("/work".into())
        }
    }

    fn watch(fd: i32) -> Option<Watch> {
        match fd {
            3 => Some(Watch::StandIn),
            5 => Some(Watch::LockHome),
            _ => None,
        }
    }

    fn memory() -> Memory {
        let mut iov = Vec::new();
        for (addr, len) in [(0x1000u64, 3u64), (0x2000, 2)] {
            iov.extend(addr.to_le_bytes());
            iov.extend(len.to_le_bytes());
        }
        Memory(HashMap::from([
            (0x1000, b"abc".to_vec()),
            (0x2000, b"de".to_vec()),
            (0x3000, iov),
            (0x4000, vec![0]),
            (0x5000, vec![7; FLOCK_LEN]),
            (0x6000, {
                // A path is read to the end of its page.
                let mut page = b"dir/x\0".to_vec();
                page.resize(4096, 0);
                page
            }),
        ]))
    }

    fn decide_on(nr: i64, args: [u64; 6]) -> Decision {
        decide(nr, args, &[5, 3, 9], &watch, &memory())
    }

    #[test]
    fn terminal_requests_carry_the_kernels_sizes() {
        let ioctl = |request: u64, arg: u64| decide_on(libc::SYS_ioctl, [3, request, arg, 0, 0, 0]);
        // The kernel's struct termios: 36 bytes, not glibc's 60.
        assert_eq!(
            ioctl(libc::TCGETS, 0x9000),
            Decision::Forward {
                fd: 3,
                call: Call::Ioctl {
                    request: libc::TCGETS,
                    arg: vec![0; 36]
                },
                reply: Reply::Into(0x9000)
            }
        );
        assert_eq!(
            ioctl(libc::TCFLSH, 2),
            Decision::Forward {
                fd: 3,
                call: Call::IoctlValue {
                    request: libc::TCFLSH,
                    arg: 2
                },
                reply: Reply::Value
            }
        );
        // A size-encoded request: its size from its number (TCGETS2).
        assert_eq!(ioctl_arg(libc::TCGETS2), Some(IoctlArg::Out(44)));
        assert_eq!(ioctl_arg(0xc008_5401), Some(IoctlArg::InOut(8)));
        assert_eq!(ioctl_arg(0x5499), None);
        assert_eq!(
            ioctl(0x5499, 0x9000),
            Decision::Answer(-i64::from(libc::ENOTTY))
        );
        let sid = Call::Ioctl {
            request: libc::TIOCGSID,
            arg: vec![0; 4],
        };
        assert!(sid.is_controlling_terminal());
        assert!(!Call::Ioctl {
            request: libc::TCGETS,
            arg: vec![0; 36]
        }
        .is_controlling_terminal());
    }

    #[test]
    fn reads_and_writes_of_stand_ins_go_home_with_their_bytes() {
        assert_eq!(
            decide_on(libc::SYS_read, [3, 0x9000, 10, 0, 0, 0]),
            Decision::Forward {
                fd: 3,
                call: Call::Read { len: 10 },
                reply: Reply::Into(0x9000)
            }
        );
        assert_eq!(
            decide_on(libc::SYS_writev, [3, 0x3000, 2, 0, 0, 0]),
            Decision::Forward {
                fd: 3,
                call: Call::Write {
                    data: b"abcde".to_vec()
                },
                reply: Reply::Value
            }
        );
        assert_eq!(
            decide_on(libc::SYS_preadv, [3, 0x3000, 2, 40, 0, 0]),
            Decision::Forward {
                fd: 3,
                call: Call::Pread { len: 5, offset: 40 },
                reply: Reply::Scatter(vec![(0x1000, 3), (0x2000, 2)])
            }
        );
        // A bad pointer is the caller's EFAULT, found here.
        assert_eq!(
            decide_on(libc::SYS_write, [3, 0x7777, 4, 0, 0, 0]),
            Decision::Answer(-i64::from(libc::EFAULT))
        );
        // A huge count is cut to what one call carries.
        let Decision::Forward {
            call: Call::Read { len },
            ..
        } = decide_on(libc::SYS_read, [3, 0x9000, u64::MAX, 0, 0, 0])
        else {
            panic!("not forwarded");
        };
        assert_eq!(len, MOST_BYTES);
    }

    #[test]
    fn what_is_the_process_own_runs_here() {
        // Another descriptor, close-on-exec, a path looked up from it.
        assert_eq!(
            decide_on(libc::SYS_read, [4, 0, 1, 0, 0, 0]),
            Decision::RunAsIs
        );
        let setfd = [3, libc::F_SETFD as u64, 1, 0, 0, 0];
        assert_eq!(decide_on(libc::SYS_fcntl, setfd), Decision::RunAsIs);
        let at = [3, 0x1000, 0x9000, libc::AT_EMPTY_PATH as u64, 0, 0];
        assert_eq!(decide_on(libc::SYS_newfstatat, at), Decision::RunAsIs);
        let empty = [3, 0x4000, 0x9000, libc::AT_EMPTY_PATH as u64, 0, 0];
        assert_eq!(
            decide_on(libc::SYS_newfstatat, empty),
            Decision::Forward {
                fd: 3,
                call: Call::Fstat,
                reply: Reply::Into(0x9000)
            }
        );
    }

    #[test]
    fn closing_or_replacing_a_watched_descriptor_closes_it_at_home_first() {
        assert_eq!(
            decide_on(libc::SYS_close, [5, 0, 0, 0, 0, 0]),
            Decision::CloseFirst(vec![5])
        );
        assert_eq!(
            decide_on(libc::SYS_dup2, [4, 3, 0, 0, 0, 0]),
            Decision::CloseFirst(vec![3])
        );
        assert_eq!(
            decide_on(libc::SYS_close_range, [0, u32::MAX as u64, 0, 0, 0, 0]),
            Decision::CloseFirst(vec![3, 5])
        );
        let cloexec = [0, u32::MAX as u64, 4, 0, 0, 0];
        assert_eq!(decide_on(libc::SYS_close_range, cloexec), Decision::RunAsIs);
        // A duplicate cannot be watched: refused.
        assert_eq!(
            decide_on(libc::SYS_dup, [3, 0, 0, 0, 0, 0]),
            Decision::Answer(-i64::from(libc::EMFILE))
        );
    }

    #[test]
    fn a_watch_is_added_at_home_by_its_whole_path() {
        let add = [3, 0x6000, libc::IN_MODIFY as u64, 0, 0, 0];
        assert_eq!(
            decide_on(libc::SYS_inotify_add_watch, add),
            Decision::Forward {
                fd: 3,
                call: Call::WatchAdd {
                    path: "/work/dir/x".into(),
                    mask: libc::IN_MODIFY
                },
                reply: Reply::Value
            }
        );
    }

    #[test]
    fn only_locks_of_a_lock_home_file_go_home() {
        assert_eq!(
            decide_on(libc::SYS_read, [5, 0x9000, 1, 0, 0, 0]),
            Decision::RunAsIs
        );
        let getfl = [5, libc::F_GETFL as u64, 0, 0, 0, 0];
        assert_eq!(decide_on(libc::SYS_fcntl, getfl), Decision::RunAsIs);
        assert_eq!(
            decide_on(libc::SYS_fcntl, [5, libc::F_GETLK as u64, 0x5000, 0, 0, 0]),
            Decision::Forward {
                fd: 5,
                call: Call::Lock {
                    cmd: libc::F_GETLK,
                    flock: vec![7; FLOCK_LEN]
                },
                reply: Reply::Into(0x5000)
            }
        );
    }
}
