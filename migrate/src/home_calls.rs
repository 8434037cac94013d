//! The deputy's side of calls carried out at home (`forward.rs`): it holds
//! a duplicate of each original the home process kept, runs each call the
//! host sends on it (one that may wait, on a thread of its own, so that
//! nothing else waits behind it), and takes record locks in the home
//! process itself, so that they are the home pid's and exclude the other
//! processes at home as before the move. It also tells the host when an
//! original becomes readable or stops being so, for the stand-in's
//! `poll`/`epoll` readiness.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::forward::{Call, FLOCK_LEN};
use crate::home_io::{self, Outcome};
use crate::image::{FdEntry, FdKind};
use crate::link::AgentMsg;

/// First and longest pause between two tries of a record lock the home
/// process waits for (`F_SETLKW`, tried as `F_SETLK` so that the deputy
/// never sleeps inside the home process), or of a wait for its children
/// (`waitid` tried with WNOHANG, for the same reason).
const RETRY_FIRST: Duration = Duration::from_micros(200);
const RETRY_MOST: Duration = Duration::from_millis(10);
/// How often a cancelled call still running is interrupted again (the
/// first interruption may come before it started to wait).
const CANCEL_AGAIN: Duration = Duration::from_millis(10);

/// The home process, for what only it can do: the deputy holds it stopped
/// for as long as the value lives.
pub trait HomeProcess {
    fn call(&mut self, nr: libc::c_long, args: &[u64]) -> std::io::Result<i64>;
    fn read(&mut self, addr: u64, len: usize) -> std::io::Result<Vec<u8>>;
    fn write(&mut self, addr: u64, data: &[u8]) -> std::io::Result<()>;
}

struct Original {
    /// A stand-in's original (not a reopened file's, whose locks only are
    /// taken here).
    stand_in: bool,
    /// Our duplicate (taken when first needed for a reopened file).
    dup: Option<OwnedFd>,
    /// A regular file: always ready, never waits.
    regular: bool,
    /// An eventfd: a value read for a call that was cancelled goes back.
    eventfd: bool,
    /// Readable, as last told to the host.
    readable: bool,
}

struct Worker {
    thread: libc::pthread_t,
    fd: i32,
    cancelled: Arc<AtomicBool>,
    last_interrupt: Option<Instant>,
}

/// A call in the home process tried again until it is done: a record
/// lock held by another, a wait for children that have nothing yet.
struct Retry {
    id: u64,
    fd: i32,
    call: Call,
    next_try: Instant,
    pause: Duration,
}

type Finished = Arc<Mutex<Vec<(u64, Outcome)>>>;

pub struct HomeCalls {
    pid: i32,
    originals: HashMap<i32, Original>,
    workers: HashMap<u64, Worker>,
    finished: Finished,
    /// Written by a worker when it finishes; read by the deputy's loop.
    wake: (UnixStream, UnixStream),
    retries: Vec<Retry>,
    /// A page of the home process's for what injected calls read and
    /// write (`struct flock`, `siginfo_t`…), mapped when first needed.
    scratch: Option<u64>,
}

impl HomeCalls {
    /// The originals of `fds` that the process's stand-ins name, taken
    /// from the home process `pid`; reopened files are taken when needed.
    pub fn of(pid: i32, fds: &[FdEntry]) -> std::io::Result<HomeCalls> {
        let mut originals = HashMap::new();
        for entry in fds {
            let original = match &entry.kind {
                FdKind::Forwarded { what } => {
                    let dup = crate::ptrace::take_fd(pid, entry.fd as u64)?;
                    let regular = std::fs::metadata(format!(
                        "/proc/self/fd/{}",
                        std::os::fd::AsRawFd::as_raw_fd(&dup)
                    ))
                    .is_ok_and(|m| m.is_file());
                    Original {
                        stand_in: true,
                        dup: Some(dup),
                        regular,
                        eventfd: what == "anon_inode:[eventfd]",
                        readable: false,
                    }
                }
                FdKind::File { .. } | FdKind::Duplicate { .. } => Original {
                    stand_in: false,
                    dup: None,
                    regular: true,
                    eventfd: false,
                    readable: true,
                },
                _ => continue,
            };
            originals.insert(entry.fd, original);
        }
        if !originals.is_empty() {
            home_io::catch_interruptions()?;
        }
        let wake = UnixStream::pair()?;
        wake.0.set_nonblocking(true)?;
        Ok(HomeCalls {
            pid,
            originals,
            workers: HashMap::new(),
            finished: Arc::default(),
            wake,
            retries: Vec::new(),
            scratch: None,
        })
    }

    /// How the stand-ins start: readable where the original is.
    pub fn first_readiness(&mut self, out: &mut Vec<AgentMsg>) {
        let fds: Vec<i32> = self.originals.keys().copied().collect();
        for fd in fds {
            self.tell_readiness(fd, true, out);
        }
    }

    /// Tell the host if stand-in `fd`'s readiness changed (or, `first`,
    /// what it is).
    fn tell_readiness(&mut self, fd: i32, first: bool, out: &mut Vec<AgentMsg>) {
        let Some(o) = self.originals.get_mut(&fd).filter(|o| o.stand_in) else {
            return;
        };
        let readable = o.regular
            || o.dup.as_ref().is_some_and(|d| {
                crate::ptrace::readable_within(d.as_fd(), Duration::ZERO).unwrap_or(false)
            });
        if readable != o.readable || first {
            o.readable = readable;
            out.push(AgentMsg::Readable { fd, readable });
        }
    }

    /// What to wait for: the workers' word, and the originals not ready.
    pub fn poll_set(&self) -> Vec<(BorrowedFd<'_>, i16)> {
        let mut set = vec![(self.wake.0.as_fd(), libc::POLLIN)];
        for o in self.originals.values() {
            if let (true, false, false, Some(dup)) = (o.stand_in, o.regular, o.readable, &o.dup) {
                set.push((dup.as_fd(), libc::POLLIN));
            }
        }
        set
    }

    /// After a poll of `poll_set` (its events, in order).
    pub fn service(&mut self, revents: &[i16], out: &mut Vec<AgentMsg>) {
        let mut woken: Vec<i32> = Vec::new();
        let mut i = 1;
        for (&fd, o) in &self.originals {
            if let (true, false, false, Some(_)) = (o.stand_in, o.regular, o.readable, &o.dup) {
                if revents.get(i).is_some_and(|r| *r != 0) {
                    woken.push(fd);
                }
                i += 1;
            }
        }
        for fd in woken {
            self.tell_readiness(fd, false, out);
        }
        if revents.first().is_some_and(|r| *r != 0) {
            let mut sink = [0u8; 64];
            while matches!((&self.wake.0).read(&mut sink), Ok(n) if n > 0) {}
            let done =
                std::mem::take(&mut *self.finished.lock().unwrap_or_else(|e| e.into_inner()));
            for (id, outcome) in done {
                let Some(worker) = self.workers.remove(&id) else {
                    continue;
                };
                let fd = worker.fd;
                // Readiness first: the process may poll as soon as it has
                // its answer.
                self.tell_readiness(fd, false, out);
                if worker.cancelled.load(Ordering::Acquire) {
                    self.cancelled_outcome(id, fd, outcome, out);
                } else {
                    out.push(done_msg(id, outcome));
                }
            }
        }
    }

    /// A call that finished after the host gave up on it: what it took
    /// from the original goes back where it can, or to the host, which
    /// keeps it for the process's next read.
    fn cancelled_outcome(&mut self, id: u64, fd: i32, outcome: Outcome, out: &mut Vec<AgentMsg>) {
        if outcome.result <= 0 || outcome.data.is_empty() {
            return;
        }
        let eventfd = self.originals.get(&fd).is_some_and(|o| o.eventfd);
        if let (true, Some(dup)) = (eventfd, self.dup(fd)) {
            // An eventfd's counter gets its value back.
            let back = home_io::run_on(dup.as_fd(), &Call::Write { data: outcome.data });
            if back.result < 0 {
                tracing::warn!(fd, "giving an eventfd its value back: {}", back.result);
            }
            return;
        }
        out.push(done_msg(id, outcome));
    }

    fn dup(&mut self, fd: i32) -> Option<OwnedFd> {
        let o = self.originals.get_mut(&fd)?;
        if o.dup.is_none() {
            o.dup = crate::ptrace::take_fd(self.pid, fd as u64).ok();
        }
        o.dup.as_ref().and_then(|d| d.try_clone().ok())
    }

    /// The host sends call `id` on descriptor `fd` (`by_process`: made by
    /// the moved process itself, not by a child it started there).
    pub fn on_call(
        &mut self,
        id: u64,
        fd: i32,
        by_process: bool,
        call: Call,
        home: &mut dyn HomeProcess,
        out: &mut Vec<AgentMsg>,
    ) {
        if let Call::ByPid { .. } = call {
            // Made by the home process, for the process or a child it
            // started where it runs alike: their world is the home's.
            out.extend(
                self.in_home_process(id, fd, &call, home)
                    .map(|o| done_msg(id, o)),
            );
            return;
        }
        if let Call::Wait { .. } = call {
            // Only the process's own: a child it started there waits for
            // its own children there.
            let outcome = if by_process {
                self.in_home_process(id, fd, &call, home)
            } else {
                Some(failed(libc::ECHILD))
            };
            out.extend(outcome.map(|o| done_msg(id, o)));
            return;
        }
        let Some(original) = self.originals.get(&fd) else {
            out.push(done_msg(id, failed(libc::EBADF)));
            return;
        };
        let regular = original.regular;
        if by_process
            && (call.is_record_lock() || call == Call::Close || call.is_controlling_terminal())
        {
            // The home process's own: its record locks, what releases
            // them, and its controlling terminal's foreground group and
            // session.
            if let Some(outcome) = self.in_home_process(id, fd, &call, home) {
                out.push(done_msg(id, outcome));
            }
            return;
        }
        if call == Call::Close {
            // A child's descriptor: ours stays for the others.
            out.push(done_msg(
                id,
                Outcome {
                    result: 0,
                    data: Vec::new(),
                },
            ));
            return;
        }
        let Some(dup) = self.dup(fd) else {
            out.push(done_msg(id, failed(libc::EBADF)));
            return;
        };
        let nonblocking = home_io::run_on(
            dup.as_fd(),
            &Call::Fcntl {
                cmd: libc::F_GETFL,
                arg: 0,
            },
        )
        .result
            & i64::from(libc::O_NONBLOCK)
            != 0;
        if !call.may_wait(regular, nonblocking) {
            let outcome = home_io::run_on(dup.as_fd(), &call);
            // Readiness first: the process may poll as soon as it has its
            // answer.
            self.tell_readiness(fd, false, out);
            out.push(done_msg(id, outcome));
            return;
        }
        self.start_worker(id, fd, dup, call);
    }

    fn start_worker(&mut self, id: u64, fd: i32, dup: OwnedFd, call: Call) {
        let cancelled = Arc::new(AtomicBool::new(false));
        let finished = Arc::clone(&self.finished);
        let (flag, wake) = (Arc::clone(&cancelled), self.wake.1.try_clone());
        let spawned = std::thread::Builder::new()
            .name(format!("home call {fd}"))
            .spawn(move || {
                let outcome = home_io::run_until_done(dup.as_fd(), &call, &flag);
                finished
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((id, outcome));
                if let Ok(mut wake) = wake {
                    let _ = wake.write_all(&[1]);
                }
            });
        match spawned {
            Ok(handle) => {
                use std::os::unix::thread::JoinHandleExt;
                let thread = handle.into_pthread_t();
                self.workers.insert(
                    id,
                    Worker {
                        thread,
                        fd,
                        cancelled,
                        last_interrupt: None,
                    },
                );
            }
            Err(e) => {
                tracing::error!(fd, "starting a call at home: {e}");
                self.finished
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((id, failed(libc::EAGAIN)));
                let _ = (&self.wake.1).write_all(&[1]);
            }
        }
    }

    /// Record locks, waits for children and closing, by injected calls in
    /// the home process; None while it must try again (a lock still held
    /// by another, children with nothing yet).
    fn in_home_process(
        &mut self,
        id: u64,
        fd: i32,
        call: &Call,
        home: &mut dyn HomeProcess,
    ) -> Option<Outcome> {
        let result = match call {
            Call::Close => home.call(libc::SYS_close, &[fd as u64]).map(|r| {
                Some(Outcome {
                    result: r,
                    data: Vec::new(),
                })
            }),
            _ => self.attempt(fd, call, home),
        };
        match result {
            Ok(Some(outcome)) => Some(outcome),
            Ok(None) => {
                self.retries.push(Retry {
                    id,
                    fd,
                    call: call.clone(),
                    next_try: Instant::now() + RETRY_FIRST,
                    pause: RETRY_FIRST,
                });
                None
            }
            Err(e) => {
                tracing::warn!(fd, "a call in the home process: {e}");
                Some(failed(e.raw_os_error().unwrap_or(libc::EIO)))
            }
        }
    }

    /// One try of a lock or a wait; None: not yet, try again.
    fn attempt(
        &mut self,
        fd: i32,
        call: &Call,
        home: &mut dyn HomeProcess,
    ) -> std::io::Result<Option<Outcome>> {
        match call {
            Call::Lock { cmd, flock } if *cmd == libc::F_SETLKW => {
                let outcome = self.lock_call(fd, libc::F_SETLK, flock, home)?;
                Ok((!is_held_elsewhere(outcome.result)).then_some(outcome))
            }
            Call::Lock { cmd, flock } => self.lock_call(fd, *cmd, flock, home).map(Some),
            Call::Wait {
                idtype,
                id,
                options,
            } => {
                let outcome = self.wait_call(*idtype, *id, *options, home)?;
                let nothing_yet = outcome.result == 0
                    && crate::waits::child_of(&outcome.data) == Some(0)
                    && options & libc::WNOHANG == 0;
                Ok((!nothing_yet).then_some(outcome))
            }
            Call::Ioctl { request, arg } => {
                let (at, len) = self.in_scratch(arg, home)?;
                let result = home.call(libc::SYS_ioctl, &[fd as u64, *request, at])?;
                let data = home.read(at, len)?;
                Ok(Some(Outcome { result, data }))
            }
            Call::ByPid { nr, args, info } => {
                let Some(info_at) = crate::home_pids::info_argument(*nr) else {
                    return Ok(Some(failed(libc::ENOSYS)));
                };
                let mut args = *args;
                if let Some(i) = info_at {
                    args[i] = self.in_scratch(info, home)?.0;
                }
                let result = home.call(*nr, &args)?;
                if result == 0 && crate::home_pids::sends_signal(*nr) {
                    // A signal it sent itself is delivered before the call
                    // returns: one more call takes the home process back
                    // through the kernel's exit, where it stops for it (held,
                    // and passed on before the answer).
                    home.call(libc::SYS_getpid, &[])?;
                }
                Ok(Some(Outcome {
                    result,
                    data: Vec::new(),
                }))
            }
            Call::IoctlValue { request, arg } => {
                let result = home.call(libc::SYS_ioctl, &[fd as u64, *request, *arg])?;
                Ok(Some(Outcome {
                    result,
                    data: Vec::new(),
                }))
            }
            _ => Ok(Some(failed(libc::EINVAL))),
        }
    }

    fn scratch(&mut self, home: &mut dyn HomeProcess) -> std::io::Result<u64> {
        if let Some(at) = self.scratch {
            return Ok(at);
        }
        let at = home.call(
            libc::SYS_mmap,
            &[
                0,
                crate::procfs::PAGE_SIZE,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
        )?;
        if (-4095..0).contains(&at) {
            return Err(std::io::Error::from_raw_os_error(-at as i32));
        }
        self.scratch = Some(at as u64);
        Ok(at as u64)
    }

    /// `bytes` (at most a page of them) put in the scratch page: where,
    /// and how many.
    fn in_scratch(
        &mut self,
        bytes: &[u8],
        home: &mut dyn HomeProcess,
    ) -> std::io::Result<(u64, usize)> {
        let at = self.scratch(home)?;
        let len = bytes.len().min(crate::procfs::PAGE_SIZE as usize);
        home.write(at, &bytes[..len])?;
        Ok((at, len))
    }

    fn lock_call(
        &mut self,
        fd: i32,
        cmd: i32,
        flock: &[u8],
        home: &mut dyn HomeProcess,
    ) -> std::io::Result<Outcome> {
        let at = self.scratch(home)?;
        let mut bytes = flock.to_vec();
        bytes.resize(FLOCK_LEN, 0);
        home.write(at, &bytes)?;
        let result = home.call(libc::SYS_fcntl, &[fd as u64, cmd as u64, at])?;
        let data = if cmd == libc::F_GETLK {
            home.read(at, FLOCK_LEN)?
        } else {
            Vec::new()
        };
        Ok(Outcome { result, data })
    }

    /// `waitid` in the home process, never waiting there: its result, and
    /// the `siginfo_t` and `struct rusage` it wrote.
    fn wait_call(
        &mut self,
        idtype: i32,
        id: u64,
        options: i32,
        home: &mut dyn HomeProcess,
    ) -> std::io::Result<Outcome> {
        use crate::waits::{RUSAGE_LEN, SIGINFO_LEN};
        let at = self.scratch(home)?;
        home.write(at, &[0; SIGINFO_LEN + RUSAGE_LEN])?;
        let info = at;
        let usage = at + SIGINFO_LEN as u64;
        let result = home.call(
            libc::SYS_waitid,
            &[
                idtype as u64,
                id,
                info,
                (options | libc::WNOHANG) as u64,
                usage,
            ],
        )?;
        let data = home.read(at, SIGINFO_LEN + RUSAGE_LEN)?;
        Ok(Outcome { result, data })
    }

    /// The host gave up on call `id` (its caller got a signal, or the
    /// process is going home).
    pub fn on_cancel(&mut self, id: u64) {
        self.retries.retain(|w| w.id != id);
        if let Some(w) = self.workers.get_mut(&id) {
            w.cancelled.store(true, Ordering::Release);
            home_io::interrupt_thread(w.thread);
            w.last_interrupt = Some(Instant::now());
        }
    }

    /// How long the deputy may wait before `tick` has work.
    pub fn next_tick(&self) -> Option<Duration> {
        let now = Instant::now();
        let locks = self.retries.iter().map(|w| w.next_try);
        let cancels = self
            .workers
            .values()
            .filter_map(|w| w.last_interrupt.map(|at| at + CANCEL_AGAIN));
        locks
            .chain(cancels)
            .min()
            .map(|at| at.saturating_duration_since(now))
    }

    /// Try again the locks and waits that are due; interrupt again the cancelled
    /// calls still running.
    pub fn tick(&mut self, home: &mut dyn HomeProcess, out: &mut Vec<AgentMsg>) {
        let now = Instant::now();
        for w in self.workers.values_mut() {
            if w.last_interrupt.is_some_and(|at| at + CANCEL_AGAIN <= now) {
                home_io::interrupt_thread(w.thread);
                w.last_interrupt = Some(now);
            }
        }
        let due: Vec<Retry> = {
            let (due, later) = std::mem::take(&mut self.retries)
                .into_iter()
                .partition(|w| w.next_try <= now);
            self.retries = later;
            due
        };
        for mut w in due {
            match self.attempt(w.fd, &w.call, home) {
                Ok(None) => {
                    w.pause = (w.pause * 2).min(RETRY_MOST);
                    w.next_try = Instant::now() + w.pause;
                    self.retries.push(w);
                }
                Ok(Some(outcome)) => out.push(done_msg(w.id, outcome)),
                Err(e) => out.push(done_msg(
                    w.id,
                    failed(e.raw_os_error().unwrap_or(libc::EIO)),
                )),
            }
        }
    }

    /// Bytes a cancelled read took that the host kept for the process, now
    /// going home: an eventfd gets its value back; other bytes cannot be
    /// put back and are reported lost.
    pub fn on_unclaimed(&mut self, fd: i32, bytes: Vec<u8>) {
        let eventfd = self.originals.get(&fd).is_some_and(|o| o.eventfd);
        match self.dup(fd) {
            Some(dup) if eventfd => {
                for value in bytes.chunks_exact(8) {
                    home_io::run_on(
                        dup.as_fd(),
                        &Call::Write {
                            data: value.to_vec(),
                        },
                    );
                }
            }
            _ => tracing::warn!(
                fd,
                lost = bytes.len(),
                "bytes read for a call given up cannot go back"
            ),
        }
    }
}

fn is_held_elsewhere(result: i64) -> bool {
    result == -i64::from(libc::EAGAIN) || result == -i64::from(libc::EACCES)
}

fn failed(errno: i32) -> Outcome {
    Outcome {
        result: -i64::from(errno),
        data: Vec::new(),
    }
}

fn done_msg(id: u64, outcome: Outcome) -> AgentMsg {
    AgentMsg::CallDone {
        id,
        result: outcome.result,
        data: outcome.data,
    }
}
