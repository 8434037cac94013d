//! The node's guardian: a small process that outlives `dsmd` so that no
//! local process ever reads memory the protocol did not give it.
//!
//! `dsmd` serves every local process's page faults through that process's
//! userfaultfd. If `dsmd` held the only reference to it and died, the
//! kernel would release the uffd, unregister its ranges and resolve every
//! later fault on a hole with a zero page (and writes would go into a node
//! copy that nobody else will ever see). So `dsmd` hands the guardian a
//! duplicate of each uffd, with a pidfd of its process, before that
//! process can touch the memory. While `dsmd` lives, the guardian only
//! holds them. When `dsmd` is gone (however it went: its end of the
//! control socket closes), a fault just waits, since the uffd is still
//! open, and the guardian kills every process it holds (SIGKILL, by
//! pidfd) before it lets go of anything: the node's DSM service is lost,
//! which costs its processes their lives, as a node's loss does (a
//! process is held only while it maps a segment: the daemon tells the
//! guardian to forget one that detached everything). It also
//! retires the semaphore fast-path regions of sets homed on the node, so
//! that their local users ask the (gone) daemon and get the errno.
//!
//! Processes holding semaphore undo adjustments on other nodes' sets are
//! held too (pidfd only): their undo is applied when the node is declared
//! lost, and they must not run on believing they still hold the set.
//!
//! The guardian is `dsmd` itself, started again with [`GUARDIAN_ENV`]
//! set and the control socket as its stdin; it changes its name to
//! `dsmd-guardian`. If it is killed, `dsmd` starts a new one and hands it
//! everything again.

use crate::fdpass;
use crate::pidfd::ExitSet;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Set in the guardian's environment by `dsmd` (see [`serve_if_asked`]).
pub const GUARDIAN_ENV: &str = "MIGSHM_GUARDIAN";

/// The name the guardian takes (`comm`, as `ps` shows it).
pub const GUARDIAN_NAME: &str = "dsmd-guardian";

/// How long the guardian waits for the processes it killed to be gone
/// before it lets go of their uffds anyway (a process stuck in an
/// uninterruptible sleep must not keep the guardian forever).
const REAP_BOUND: Duration = Duration::from_secs(5);

/// How long `dsmd` waits for the guardian to take a message before it
/// takes it for gone.
const SEND_BOUND: Duration = Duration::from_secs(1);

const KIND_PROCESS: u8 = 1;
const KIND_REGION: u8 = 2;
const KIND_FORGET: u8 = 3;
const KIND_TICK: u8 = 4;
const MESSAGE_BYTES: usize = 16;

/// What the guardian holds, named by a token the daemon chooses (unique
/// for the daemon's life).
pub enum Guarded<'a> {
    /// A local process the daemon serves: killed if the daemon dies. With
    /// its userfaultfd when it has one (kept open until it is dead).
    Process {
        pid: i32,
        pidfd: BorrowedFd<'a>,
        uffd: Option<BorrowedFd<'a>>,
    },
    /// A semaphore fast-path region: retired if the daemon dies.
    Region { memfd: BorrowedFd<'a> },
}

fn encode(kind: u8, pid: i32, token: u64) -> [u8; MESSAGE_BYTES] {
    let mut m = [0u8; MESSAGE_BYTES];
    m[0] = kind;
    m[4..8].copy_from_slice(&pid.to_le_bytes());
    m[8..16].copy_from_slice(&token.to_le_bytes());
    m
}

/// The daemon's side: the control socket and the guardian process.
pub struct Guardian {
    sock: OwnedFd,
    child: Child,
}

impl Guardian {
    /// Start a guardian (the `dsmd` binary next to this program, or this
    /// program itself).
    /// `lease`: how long the daemon may go without ticking (see
    /// [`Guardian::tick`]) before the guardian takes it for dead.
    pub fn start(lease: Duration) -> io::Result<Guardian> {
        let (ours, theirs) = fdpass::seqpacket_pair()?;
        let program = guardian_program()?;
        let child = Command::new(program)
            .env(GUARDIAN_ENV, lease.as_millis().max(1).to_string())
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        fdpass::set_send_timeout(ours.as_fd(), SEND_BOUND)?;
        Ok(Guardian { sock: ours, child })
    }

    /// The guardian's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The control socket: it turns readable (end of file) when the
    /// guardian is gone, since the guardian never writes.
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// End this guardian without it doing its job (it is being replaced:
    /// closing its socket alone would make it kill every process).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Hand `what` to the guardian under `token`. Once this returns Ok,
    /// the guardian has it even if the daemon dies the next instant (the
    /// message and its descriptors are in the socket's queue).
    pub fn hold(&self, token: u64, what: Guarded<'_>) -> io::Result<()> {
        match what {
            Guarded::Process { pid, pidfd, uffd } => {
                let mut fds = vec![pidfd.as_raw_fd()];
                fds.extend(uffd.map(|u| u.as_raw_fd()));
                self.send(&encode(KIND_PROCESS, pid, token), &fds)
            }
            Guarded::Region { memfd } => {
                self.send(&encode(KIND_REGION, 0, token), &[memfd.as_raw_fd()])
            }
        }
    }

    /// The daemon is alive and acting (sent every heartbeat). A daemon
    /// that stops ticking for its lease (stopped, or stalled) cannot fence
    /// its node any more while the other nodes go on: the guardian then
    /// kills what it holds, and the daemon, as if it had died.
    pub fn tick(&self) -> io::Result<()> {
        self.send(&encode(KIND_TICK, 0, 0), &[])
    }

    /// The guardian may let go of what it holds under `token`.
    pub fn forget(&self, token: u64) -> io::Result<()> {
        self.send(&encode(KIND_FORGET, 0, token), &[])
    }

    fn send(&self, message: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let sent = fdpass::send_with_fds(self.sock.as_raw_fd(), message, fds)?;
        if sent != message.len() {
            return Err(io::Error::other("short message to the guardian"));
        }
        Ok(())
    }
}

impl Drop for Guardian {
    fn drop(&mut self) {
        // Its end of the socket closes: it does its job and exits. Reap
        // it if it already has, so no zombie is left while dsmd lives.
        let _ = self.child.try_wait();
    }
}

/// `dsmd` next to the running program (a benchmark runs daemons as its
/// own children), else the running program.
fn guardian_program() -> io::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    if exe.file_name().is_some_and(|n| n == "dsmd") {
        return Ok(exe);
    }
    match exe.parent().map(|d| d.join("dsmd")) {
        Some(dsmd) if dsmd.exists() => Ok(dsmd),
        _ => Ok(exe),
    }
}

/// First thing in `main` of every program that can be a guardian (`dsmd`):
/// if this process was started as one, serve and return its exit code.
pub fn serve_if_asked() -> Option<i32> {
    let lease = std::env::var(GUARDIAN_ENV).ok()?;
    let lease = Duration::from_millis(lease.parse().unwrap_or(0));
    // SAFETY: fd 0 is the control socket the daemon gave us as stdin; we
    // take it over for the rest of this process's life.
    let control = unsafe { OwnedFd::from_raw_fd(0) };
    Some(serve(control, lease))
}

/// One thing held: a process (pidfd, maybe its uffd) or a region.
struct Held {
    pid: i32,
    pidfd: Option<OwnedFd>,
    /// Only held, never used: its being open is the point.
    _uffd: Option<OwnedFd>,
    region: Option<OwnedFd>,
}

const CONTROL_TOKEN: u64 = u64::MAX;

fn serve(control: OwnedFd, lease: Duration) -> i32 {
    set_name(GUARDIAN_NAME);
    // Our parent is the daemon (a guardian started again later too).
    let daemon = std::os::unix::process::parent_id() as i32;
    // Armed by the first tick: until then the daemon is starting.
    let mut last_tick: Option<Instant> = None;
    let epoll = match ExitSet::new() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("{GUARDIAN_NAME}: epoll: {e}");
            return 1;
        }
    };
    if let Err(e) = epoll.add(&control, CONTROL_TOKEN) {
        eprintln!("{GUARDIAN_NAME}: epoll: {e}");
        return 1;
    }
    let mut held: HashMap<u64, Held> = HashMap::new();
    loop {
        let timeout = match last_tick {
            Some(t) if !lease.is_zero() => {
                let left = lease.saturating_sub(t.elapsed());
                if left.is_zero() {
                    eprintln!(
                        "{GUARDIAN_NAME}: dsmd (pid {daemon}) did not tick for {lease:?}: taken for dead"
                    );
                    let killed = kill_held(&held);
                    if !killed.is_empty() {
                        eprintln!("{GUARDIAN_NAME}: killed the process(es) it held {killed:?}");
                    }
                    if std::os::unix::process::parent_id() as i32 == daemon {
                        // SAFETY: kill of our parent (checked just above),
                        // which our end of the socket then sees go.
                        unsafe { libc::kill(daemon, libc::SIGKILL) };
                    }
                    last_tick = None;
                    continue;
                }
                left.as_millis().clamp(1, i32::MAX as u128) as i32
            }
            _ => -1,
        };
        for token in epoll.wait(timeout) {
            if token != CONTROL_TOKEN {
                // A held process exited: nothing of it to guard any more.
                if let Some(h) = held.remove(&token) {
                    if let Some(fd) = &h.pidfd {
                        epoll.remove(fd);
                    }
                }
                continue;
            }
            loop {
                match receive(&control) {
                    Received::Message(kind, pid, token, mut fds) => match kind {
                        KIND_PROCESS if !fds.is_empty() => {
                            let pidfd = fds.remove(0);
                            let uffd = fds.pop();
                            if crate::pidfd::has_exited(&pidfd) {
                                continue;
                            }
                            if epoll.add(&pidfd, token).is_err() {
                                eprintln!("{GUARDIAN_NAME}: cannot watch pid {pid}");
                            }
                            held.insert(
                                token,
                                Held {
                                    pid,
                                    pidfd: Some(pidfd),
                                    _uffd: uffd,
                                    region: None,
                                },
                            );
                        }
                        KIND_REGION if !fds.is_empty() => {
                            held.insert(
                                token,
                                Held {
                                    pid: 0,
                                    pidfd: None,
                                    _uffd: None,
                                    region: fds.pop(),
                                },
                            );
                        }
                        KIND_TICK => last_tick = Some(Instant::now()),
                        KIND_FORGET => {
                            if let Some(h) = held.remove(&token) {
                                if let Some(fd) = &h.pidfd {
                                    epoll.remove(fd);
                                }
                            }
                        }
                        _ => eprintln!("{GUARDIAN_NAME}: bad message (kind {kind})"),
                    },
                    Received::Nothing => break,
                    Received::End => return daemon_gone(held),
                }
            }
        }
    }
}

enum Received {
    Message(u8, i32, u64, Vec<OwnedFd>),
    Nothing,
    End,
}

fn receive(control: &OwnedFd) -> Received {
    let mut buf = [0u8; MESSAGE_BYTES];
    let mut fds = Vec::new();
    if !crate::pidfd::readable_now(control.as_fd()) {
        return Received::Nothing;
    }
    match fdpass::recv_with_fds(control.as_raw_fd(), &mut buf, &mut fds) {
        Ok(0) => Received::End,
        Ok(n) if n == MESSAGE_BYTES => {
            let pid = i32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
            let mut t = [0u8; 8];
            t.copy_from_slice(&buf[8..16]);
            Received::Message(buf[0], pid, u64::from_le_bytes(t), fds)
        }
        Ok(_) => {
            eprintln!("{GUARDIAN_NAME}: short message ignored");
            Received::Nothing
        }
        Err(e) if e.raw_os_error() == Some(libc::EINTR) => Received::Nothing,
        Err(_) => Received::End,
    }
}

/// SIGKILL every process held that is still there; their pids.
fn kill_held(held: &HashMap<u64, Held>) -> Vec<i32> {
    let mut killed = Vec::new();
    for h in held.values() {
        if let Some(fd) = &h.pidfd {
            if crate::pidfd::has_exited(fd) {
                continue;
            }
            match crate::pidfd::send_signal(fd, libc::SIGKILL) {
                Ok(()) => killed.push(h.pid),
                Err(e) => eprintln!("{GUARDIAN_NAME}: cannot kill pid {}: {e}", h.pid),
            }
        }
    }
    killed
}

/// The daemon is gone: kill every process it served, retire the regions,
/// wait (bounded) for the processes to be gone, then let go of all.
fn daemon_gone(held: HashMap<u64, Held>) -> i32 {
    let mut killed = kill_held(&held);
    let mut retired = 0;
    for h in held.values() {
        if let Some(fd) = &h.region {
            if let Ok(copy) = fd.try_clone() {
                if let Ok(region) = crate::semregion::Region::map(copy) {
                    region.retire();
                    retired += 1;
                }
            }
        }
    }
    killed.sort_unstable();
    if !killed.is_empty() || retired > 0 {
        eprintln!(
            "{GUARDIAN_NAME}: dsmd is gone: killed {} process(es) it served {killed:?}, retired {retired} semaphore region(s)",
            killed.len()
        );
    }
    let deadline = Instant::now() + REAP_BOUND;
    for h in held.values() {
        if let Some(fd) = &h.pidfd {
            while !crate::pidfd::has_exited(fd) {
                if Instant::now() > deadline {
                    eprintln!(
                        "{GUARDIAN_NAME}: pid {} not gone after {REAP_BOUND:?}",
                        h.pid
                    );
                    return 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    0
}

fn set_name(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr()) };
}
