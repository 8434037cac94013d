//! The host's side of calls carried out at home (`forward.rs`): the
//! moved process's stand-ins (one end of a socketpair each, whose other
//! end the host keeps to mirror the original's readiness), the filter's
//! notifications, and the calls waiting for the deputy's answer.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::forward::{self, Call, CallerMemory, Decision, Reply, Watch};
use crate::home_pids::{self, LocalPids, PidDecision};
use crate::image::{FdKind, Image};
use crate::link::AgentMsg;
use crate::seccomp::{self, Listener, Notification, Watched};
use crate::waits::{self, Target, WaitRequest};

/// A call is checked after this long for a caller that gave up on it (a
/// signal it did not restart after).
const STILL_WAITING_CHECK: Duration = Duration::from_millis(5);
/// First and longest pause between two looks at home for a wait that may
/// also end here (the process has children on both sides).
const BOTH_SIDES_FIRST: Duration = Duration::from_millis(5);
const BOTH_SIDES_MOST: Duration = Duration::from_millis(40);

struct StandIn {
    /// The stand-in's inode as /proc names it ("socket:[N]"): a number
    /// that names something else in the caller is not ours.
    name: String,
    /// Our end: a byte written makes the stand-in readable.
    ours: UnixStream,
    /// The process's end, kept to take that byte back.
    theirs: UnixStream,
    marked: bool,
}

struct Pending {
    pid: i32,
    fd: i32,
    reply: Reply,
    /// Closes still to be done before the call runs as it is; None: the
    /// call is answered with the result.
    closes_left: Option<usize>,
    is_read: bool,
    since: Instant,
    wait: Option<PendingWait>,
    /// A call made by pid (`home_pids.rs`): its number and arguments.
    by_pid: Option<(i64, [u64; 6])>,
}

/// A call by pid given up by its caller after it was sent home, where it
/// is carried out all the same (the deputy makes it at once): a signal
/// interrupted the wait for its answer, often the very signal it sent,
/// and the caller makes it again. That again is answered with this one's
/// result, and not made twice.
struct Carried {
    id: u64,
    nr: i64,
    args: [u64; 6],
    result: Option<i64>,
    /// The call made again, waiting for the result.
    answer_to: Option<u64>,
    /// When it was given up: a restart follows at once, and an equal call
    /// much later is a new one.
    at: Instant,
    /// Given up by the host before a signal it queued for the caller (see
    /// `before_signal`), not by the caller: if that signal did not stop the
    /// wait after all, the caller still waits in this very call.
    ahead_of_signal: bool,
}

impl Carried {
    fn new(id: u64, nr: i64, args: [u64; 6], result: Option<i64>) -> Carried {
        Carried {
            id,
            nr,
            args,
            result,
            answer_to: None,
            at: Instant::now(),
            ahead_of_signal: false,
        }
    }
}

/// How soon after a call by pid was given up the same call is taken for
/// its restart.
const RESTART_WITHIN: Duration = Duration::from_millis(500);

/// How long a call given up ahead of a signal may still be waited in
/// before it is taken that the signal did not interrupt it: a task the
/// signal woke leaves the wait within microseconds of running again.
const SIGNAL_LEAVES_WITHIN: Duration = Duration::from_millis(100);

impl Pending {
    /// A call of task `pid` made by the home process (no descriptor of its
    /// own), answered with its value.
    fn of_home_process(pid: i32) -> Pending {
        Pending {
            pid,
            fd: -1,
            reply: Reply::Value,
            closes_left: None,
            is_read: false,
            since: Instant::now(),
            wait: None,
            by_pid: None,
        }
    }
}

/// A wait for children carried out at home (`waits.rs`).
#[derive(Debug, Clone)]
struct PendingWait {
    req: WaitRequest,
    /// The process has children here too: home is asked without waiting,
    /// again after `pause` while neither side has anything.
    both_sides: bool,
    /// When to ask home again (None: a call is out).
    again_at: Option<Instant>,
    pause: Duration,
}

/// A task's memory, read for the host's decisions.
struct Task(i32);

impl CallerMemory for Task {
    fn read(&self, addr: u64, len: usize) -> std::io::Result<Vec<u8>> {
        seccomp::read_task(self.0, addr, len)
    }

    fn cwd(&self) -> std::io::Result<String> {
        Ok(std::fs::read_link(format!("/proc/{}/cwd", self.0))?
            .to_string_lossy()
            .into_owned())
    }
}

#[derive(Default)]
pub struct HostCalls {
    listener: Option<Listener>,
    /// The moved process (a call from another task is from a child).
    process: i32,
    /// Its pid at home.
    home_pid: i32,
    stand_ins: HashMap<i32, StandIn>,
    /// Reopened files whose locks are taken at home: (device, inode) of
    /// what we opened for the process.
    lock_homes: HashMap<i32, (u64, u64)>,
    numbers: Vec<i32>,
    pending: HashMap<u64, Pending>,
    /// The call each task waits in (a task is in one call at a time: a
    /// new one means the old one was given up).
    waiting: HashMap<i32, u64>,
    /// Bytes a given-up read took, for the next read of that stand-in.
    unclaimed: HashMap<i32, VecDeque<u8>>,
    /// Reads given up, by id, with their stand-in (their answer may
    /// still come, with bytes).
    given_up: HashMap<u64, i32>,
    /// The extra closes of a call that closes several descriptors: their
    /// ids, and the call's.
    close_of: HashMap<u64, u64>,
    /// The process may have children at home (its waits go there).
    children_at_home: bool,
    /// Waits given up while a call was out at home: a child it reaped
    /// meanwhile is kept for the next wait.
    given_up_waits: std::collections::HashSet<u64>,
    /// What those reaped (`siginfo_t` and `struct rusage`).
    unclaimed_waits: Vec<Vec<u8>>,
    /// Calls by pid carried out at home that their caller gave up, by
    /// task.
    carried: HashMap<i32, Carried>,
}

impl HostCalls {
    /// The stand-ins an image needs (the ends to give the process, by
    /// descriptor number) and what the filter watches.
    pub fn for_image(
        image: &Image,
    ) -> std::io::Result<(HostCalls, HashMap<i32, OwnedFd>, Watched)> {
        let mut calls = HostCalls::default();
        let mut ends = HashMap::new();
        let mut watched = Watched::default();
        for entry in &image.fds {
            match entry.kind {
                FdKind::Forwarded { .. } => {
                    let (ours, theirs) = UnixStream::pair()?;
                    ours.set_nonblocking(true)?;
                    theirs.set_nonblocking(true)?;
                    let name = std::fs::read_link(format!(
                        "/proc/self/fd/{}",
                        std::os::fd::AsRawFd::as_raw_fd(&theirs)
                    ))?
                    .to_string_lossy()
                    .into_owned();
                    ends.insert(entry.fd, OwnedFd::from(theirs.try_clone()?));
                    calls.stand_ins.insert(
                        entry.fd,
                        StandIn {
                            name,
                            ours,
                            theirs,
                            marked: false,
                        },
                    );
                    watched.stand_ins.push(entry.fd);
                }
                FdKind::File { .. } => {
                    calls.lock_homes.insert(entry.fd, (0, 0));
                    watched.lock_homes.push(entry.fd);
                }
                // Another number for a reopened file: its locks too.
                FdKind::Duplicate { of }
                    if image
                        .fds
                        .iter()
                        .any(|f| f.fd == of && matches!(f.kind, FdKind::File { .. })) =>
                {
                    calls.lock_homes.insert(entry.fd, (0, 0));
                    watched.lock_homes.push(entry.fd);
                }
                _ => {}
            }
        }
        calls.children_at_home = image.has_children;
        calls.home_pid = image.pid;
        watched.waits = image.has_children;
        watched.pids = true;
        calls.numbers = watched
            .stand_ins
            .iter()
            .chain(&watched.lock_homes)
            .copied()
            .collect();
        Ok((calls, ends, watched))
    }

    /// The restored process `pid` and its filter's listener (None if it
    /// has nothing to forward).
    pub fn start(&mut self, pid: i32, listener: Option<OwnedFd>) {
        self.process = pid;
        self.listener = listener.map(Listener::new);
        for (&fd, identity) in &mut self.lock_homes {
            if let Ok(m) = std::fs::metadata(format!("/proc/{pid}/fd/{fd}")) {
                use std::os::unix::fs::MetadataExt;
                *identity = (m.dev(), m.ino());
            }
        }
    }

    /// Whether descriptor `fd` of `task` is a stand-in of `stand_ins` (and
    /// not something else now at that number).
    pub fn is_stand_in(&self, task: i32, fd: i32) -> bool {
        self.stand_ins.get(&fd).is_some_and(|s| {
            std::fs::read_link(format!("/proc/{task}/fd/{fd}"))
                .is_ok_and(|p| p.as_os_str() == s.name.as_str())
        })
    }

    fn watch(&self, task: i32, fd: i32) -> Option<Watch> {
        if self.is_stand_in(task, fd) {
            return Some(Watch::StandIn);
        }
        let &(dev, ino) = self.lock_homes.get(&fd)?;
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/{task}/fd/{fd}"))
            .ok()
            .filter(|m| m.dev() == dev && m.ino() == ino)
            .map(|_| Watch::LockHome)
    }

    pub fn poll_set(&self) -> Vec<(BorrowedFd<'_>, i16)> {
        self.listener
            .iter()
            .map(|l| (l.fd(), libc::POLLIN))
            .collect()
    }

    /// How soon `tick` should look at the calls waiting.
    pub fn next_tick(&self) -> Option<Duration> {
        let undecided = self
            .carried
            .values()
            .any(|c| c.ahead_of_signal && c.result.is_some());
        (!self.pending.is_empty() || undecided).then_some(STILL_WAITING_CHECK)
    }

    /// A signal for the process is about to be queued. If the process
    /// waits in a call by pid carried out at home, the signal will
    /// interrupt that wait, and the kernel may then drop an answer sent
    /// while the task is waking (the reply is taken, the call restarted
    /// all the same: the call would be made at home twice). So the call is
    /// given up first, and its restart answered with its result.
    pub fn before_signal(&mut self, signo: i32, out: &mut Vec<AgentMsg>) {
        let process = self.process;
        let Some(&id) = self.waiting.get(&process) else {
            return;
        };
        let carried_out = self.pending.get(&id).is_some_and(|p| p.by_pid.is_some());
        let restart_waiting = self
            .carried
            .get(&process)
            .is_some_and(|c| c.answer_to == Some(id));
        if !(carried_out || restart_waiting) {
            return;
        }
        // Unreadable: taken as interrupting; `tick` finds out otherwise.
        if !crate::procfs::signal_interrupts(process, signo).unwrap_or(true) {
            return;
        }
        if carried_out {
            self.give_up(id, out);
        } else {
            self.waiting.remove(&process);
        }
        if let Some(c) = self.carried.get_mut(&process) {
            // The next restart is the one after this signal.
            c.answer_to = None;
            c.at = Instant::now();
            c.ahead_of_signal = true;
        }
    }

    /// After a poll of `poll_set`.
    pub fn service(&mut self, revents: &[i16], out: &mut Vec<AgentMsg>) {
        if revents.first().is_none_or(|r| *r == 0) {
            return;
        }
        let Some(listener) = &self.listener else {
            return;
        };
        match listener.receive() {
            Ok(Some(n)) => self.on_notification(n, out),
            Ok(None) => {}
            Err(e) => {
                tracing::error!("the calls of the moved process can no longer be received: {e}");
                self.listener = None;
            }
        }
    }

    fn answer(&self, id: u64, result: i64) {
        if let Some(l) = &self.listener {
            if let Err(e) = l.answer(id, result) {
                tracing::warn!(id, "answering a call: {e}");
            }
        }
    }

    /// Answer call `id`; false if its caller had left it.
    fn reaches(&self, id: u64, result: i64) -> bool {
        self.listener
            .as_ref()
            .is_some_and(|l| l.answer_reached(id, result).unwrap_or(true))
    }

    fn run_as_is(&self, id: u64) {
        if let Some(l) = &self.listener {
            if let Err(e) = l.run_as_is(id) {
                tracing::warn!(id, "letting a call run: {e}");
            }
        }
    }

    fn on_notification(&mut self, n: Notification, out: &mut Vec<AgentMsg>) {
        // A task waits in one call at a time: a call it left for a signal
        // is over.
        if let Some(&old) = self.waiting.get(&n.pid) {
            self.give_up(old, out);
        }
        self.waiting.insert(n.pid, n.id);
        if n.nr == libc::SYS_wait4 || n.nr == libc::SYS_waitid {
            return self.on_wait(n, out);
        }
        if home_pids::CALLS.contains(&n.nr) {
            return self.on_pid_call(n, out);
        }
        // The task went on to something else: what it gave up is over.
        self.carried.remove(&n.pid);
        let decision = forward::decide(
            n.nr,
            n.args,
            &self.numbers,
            &|fd| self.watch(n.pid, fd),
            &Task(n.pid),
        );
        let by_process = n.pid == self.process;
        match decision {
            Decision::RunAsIs => {
                self.waiting.remove(&n.pid);
                self.run_as_is(n.id);
            }
            Decision::Answer(result) => {
                self.waiting.remove(&n.pid);
                self.answer(n.id, result);
            }
            Decision::Forward { fd, call, reply } => {
                let is_read = matches!(call, Call::Read { .. });
                if is_read {
                    if let Some(bytes) = self.take_unclaimed(fd, &call) {
                        self.waiting.remove(&n.pid);
                        self.deliver(n.pid, n.id, &reply, bytes.len() as i64, &bytes);
                        return;
                    }
                }
                self.pending.insert(
                    n.id,
                    Pending {
                        pid: n.pid,
                        fd,
                        reply,
                        closes_left: None,
                        is_read,
                        since: Instant::now(),
                        wait: None,
                        by_pid: None,
                    },
                );
                out.push(AgentMsg::Call {
                    id: n.id,
                    fd,
                    by_process,
                    call,
                });
            }
            Decision::CloseFirst(fds) => {
                // One call per descriptor, each with an id of its own: the
                // notification's, then ids no notification has (the
                // kernel's are 64-bit counters, never near the top).
                self.pending.insert(
                    n.id,
                    Pending {
                        pid: n.pid,
                        fd: fds[0],
                        reply: Reply::Value,
                        closes_left: Some(fds.len()),
                        is_read: false,
                        since: Instant::now(),
                        wait: None,
                        by_pid: None,
                    },
                );
                for (i, fd) in fds.into_iter().enumerate() {
                    let id = if i == 0 { n.id } else { close_id(n.id, i) };
                    if i > 0 {
                        self.close_of.insert(id, n.id);
                    }
                    out.push(AgentMsg::Call {
                        id,
                        fd,
                        by_process,
                        call: Call::Close,
                    });
                }
            }
        }
    }

    /// A `wait4` or `waitid`: run here if only children here can answer
    /// it, carried out at home if only children there can, and asked on
    /// both sides in turn if either can.
    fn on_wait(&mut self, n: Notification, out: &mut Vec<AgentMsg>) {
        let req = match waits::wait_request(n.nr, n.args) {
            Some(req) if n.pid == self.process && self.children_at_home => req,
            // A child started here waits for its own, here.
            _ => return self.run_here(n),
        };
        if let Some(data) = self.take_kept(&req) {
            self.waiting.remove(&n.pid);
            return self.deliver_wait(n.pid, n.id, &req, 0, &data);
        }
        let here = crate::procfs::children(self.process);
        let both_sides = match req.target() {
            Target::Child(pid) if here.contains(&pid) => return self.run_here(n),
            Target::Child(_) => false,
            Target::Any => !here.is_empty(),
        };
        if both_sides && ready_here(&here, &req) {
            return self.run_here(n);
        }
        self.pending.insert(
            n.id,
            Pending {
                wait: Some(PendingWait {
                    req,
                    both_sides,
                    again_at: None,
                    pause: BOTH_SIDES_FIRST,
                }),
                ..Pending::of_home_process(n.pid)
            },
        );
        out.push(AgentMsg::Call {
            id: n.id,
            fd: -1,
            by_process: true,
            call: req.call(both_sides),
        });
    }

    /// A call naming a process by pid: run here for this node's, made by
    /// the home process for the others.
    fn on_pid_call(&mut self, n: Notification, out: &mut Vec<AgentMsg>) {
        if let Some(c) = self.carried.remove(&n.pid) {
            if (c.nr, c.args) == (n.nr, n.args) && c.at.elapsed() < RESTART_WITHIN {
                // Made again after a signal: it was made once at home.
                match c.result {
                    Some(result) => {
                        self.waiting.remove(&n.pid);
                        if !self.reaches(n.id, result) {
                            // Left again: for the next try.
                            self.carried.insert(n.pid, c);
                        }
                    }
                    None => {
                        self.carried.insert(
                            n.pid,
                            Carried {
                                answer_to: Some(n.id),
                                ..c
                            },
                        );
                    }
                }
                return;
            }
        }
        let local = Here {
            process: self.process,
            caller: n.pid,
        };
        let mut call = match home_pids::decide(n.nr, n.args, &local, &Task(n.pid)) {
            PidDecision::RunHere => return self.run_here(n),
            PidDecision::Answer(result) => {
                self.waiting.remove(&n.pid);
                return self.answer(n.id, result);
            }
            PidDecision::AtHome(call) => call,
            PidDecision::AtHomeAndGroupHere { call, signal } => {
                // The process itself gets it from home, through the deputy.
                let group = local.own_group();
                for member in descendants(self.process) {
                    if crate::procfs::group(member) == Some(group) {
                        // Gone meanwhile: nothing to signal.
                        let _ = crate::ptrace::kill(member, signal);
                    }
                }
                call
            }
        };
        if let Call::ByPid { info, .. } = &mut call {
            // The sender glibc wrote (its pid here) is, at home, the home pid.
            home_pids::sender_seen_at_home(info, self.process, self.home_pid);
        }
        self.pending.insert(
            n.id,
            Pending {
                by_pid: Some((n.nr, n.args)),
                ..Pending::of_home_process(n.pid)
            },
        );
        out.push(AgentMsg::Call {
            id: n.id,
            fd: -1,
            by_process: n.pid == self.process,
            call,
        });
    }

    /// A child reaped at home for a wait given up, that `req` is for.
    fn take_kept(&mut self, req: &WaitRequest) -> Option<Vec<u8>> {
        let i = self
            .unclaimed_waits
            .iter()
            .position(|d| match req.target() {
                Target::Any => true,
                Target::Child(pid) => waits::child_of(d) == Some(pid),
            })?;
        Some(self.unclaimed_waits.remove(i))
    }

    fn run_here(&mut self, n: Notification) {
        self.waiting.remove(&n.pid);
        self.run_as_is(n.id);
    }

    /// Home's answer to wait `id`.
    fn wait_done(&mut self, id: u64, p: Pending, mut w: PendingWait, result: i64, data: &[u8]) {
        let reaped = result >= 0 && waits::child_of(data).is_some_and(|c| c != 0);
        if !self.listener.as_ref().is_some_and(|l| l.still_waiting(id)) {
            if reaped {
                self.unclaimed_waits.push(data.to_vec());
            }
            return;
        }
        if !reaped {
            // Reaped meanwhile for the wait this one replaces (a signal
            // restarted it): that child is this wait's answer.
            if let Some(kept) = self.take_kept(&w.req) {
                return self.deliver_wait(p.pid, id, &w.req, 0, &kept);
            }
        }
        if result == -i64::from(libc::ECHILD) {
            if w.req.is_any_child() {
                // None left at home: every wait is the kernel's here now.
                self.children_at_home = false;
            }
            return self.run_as_is(id);
        }
        if result < 0 || reaped || !w.both_sides {
            return self.deliver_wait(p.pid, id, &w.req, result, data);
        }
        if !w.req.waits() {
            // WNOHANG and nothing at home: what the kernel says here.
            return self.run_as_is(id);
        }
        w.again_at = Some(Instant::now() + w.pause);
        w.pause = (w.pause * 2).min(BOTH_SIDES_MOST);
        self.waiting.insert(p.pid, id);
        self.pending.insert(id, Pending { wait: Some(w), ..p });
    }

    /// Answer wait `id` with `data` from home. A child reaped there whose
    /// answer does not reach the caller (it left the call for a signal,
    /// after the last look) is kept for its next wait.
    fn deliver_wait(&mut self, pid: i32, id: u64, req: &WaitRequest, result: i64, data: &[u8]) {
        let (value, writes) = req.answer(result, data);
        for (addr, bytes) in writes {
            if seccomp::write_task(pid, addr, &bytes).is_err() {
                return self.answer(id, -i64::from(libc::EFAULT));
            }
        }
        let reaped = result >= 0 && waits::child_of(data).is_some_and(|c| c != 0);
        if !self.reaches(id, value) && reaped {
            self.unclaimed_waits.push(data.to_vec());
        }
    }

    /// A call given up ahead of a signal that its caller still waits in
    /// well after: the signal did not interrupt it (blocked or ignored
    /// meanwhile), and it gets its result as any answer.
    fn answer_calls_no_signal_left(&mut self) {
        let Some(l) = &self.listener else {
            return;
        };
        self.carried.retain(|_, c| {
            let Some(result) = c.result else {
                return true;
            };
            if !c.ahead_of_signal || c.at.elapsed() < SIGNAL_LEAVES_WITHIN {
                return true;
            }
            let answered = l.still_waiting(c.id) && l.answer_reached(c.id, result).unwrap_or(false);
            // Not answered: the caller left it, an ordinary carried call now.
            c.ahead_of_signal = false;
            !answered
        });
    }

    /// Waits on both sides due for another look: run here if a child here
    /// has something, else ask home again.
    fn look_again(&mut self, out: &mut Vec<AgentMsg>) {
        let now = Instant::now();
        let due: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| {
                p.wait
                    .as_ref()
                    .is_some_and(|w| w.again_at.is_some_and(|at| at <= now))
            })
            .map(|(id, _)| *id)
            .collect();
        if due.is_empty() {
            // Called on every turn of the host's loop: no /proc read then.
            return;
        }
        let here = crate::procfs::children(self.process);
        for id in due {
            let Some(p) = self.pending.get_mut(&id) else {
                continue;
            };
            let Some(w) = p.wait.as_mut() else {
                continue;
            };
            if ready_here(&here, &w.req) {
                let pid = p.pid;
                self.pending.remove(&id);
                self.waiting.remove(&pid);
                self.run_as_is(id);
                continue;
            }
            w.again_at = None;
            out.push(AgentMsg::Call {
                id,
                fd: -1,
                by_process: true,
                call: w.req.call(true),
            });
        }
    }

    fn take_unclaimed(&mut self, fd: i32, call: &Call) -> Option<Vec<u8>> {
        let Call::Read { len } = call else {
            return None;
        };
        let queue = self.unclaimed.get_mut(&fd).filter(|q| !q.is_empty())?;
        let n = (*len as usize).min(queue.len());
        let bytes: Vec<u8> = queue.drain(..n).collect();
        if queue.is_empty() {
            self.unclaimed.remove(&fd);
        }
        Some(bytes)
    }

    /// Put `data` where the call's reply goes and answer it with `result`.
    fn deliver(&self, pid: i32, id: u64, reply: &Reply, result: i64, data: &[u8]) {
        let written = match reply {
            // A call that failed wrote nothing.
            _ if result < 0 => Ok(()),
            Reply::Value => Ok(()),
            Reply::Into(addr) => seccomp::write_task(pid, *addr, data),
            Reply::Scatter(bufs) => {
                let mut rest = data;
                let mut done = Ok(());
                for &(addr, len) in bufs {
                    if rest.is_empty() {
                        break;
                    }
                    let n = (len as usize).min(rest.len());
                    done = seccomp::write_task(pid, addr, &rest[..n]);
                    if done.is_err() {
                        break;
                    }
                    rest = &rest[n..];
                }
                done
            }
        };
        match written {
            Ok(()) => self.answer(id, result),
            Err(_) => self.answer(id, -i64::from(libc::EFAULT)),
        }
    }

    /// The deputy's answer to call `id`.
    pub fn on_done(&mut self, id: u64, result: i64, data: Vec<u8>) {
        if let Some(base) = self.close_of.remove(&id) {
            return self.close_done(base);
        }
        if let Some((&task, _)) = self.carried.iter().find(|(_, c)| c.id == id) {
            if let Some(c) = self.carried.get_mut(&task) {
                match c.answer_to {
                    Some(again) => {
                        c.result = Some(result);
                        c.answer_to = None;
                        self.waiting.remove(&task);
                        if self.reaches(again, result) {
                            self.carried.remove(&task);
                        }
                    }
                    None => c.result = Some(result),
                }
            }
            return;
        }
        if self.given_up_waits.remove(&id) {
            if result >= 0 && waits::child_of(&data).is_some_and(|c| c != 0) {
                self.unclaimed_waits.push(data);
            }
            return;
        }
        if let Some(fd) = self.given_up.remove(&id) {
            // What a read given up took waits for the next read.
            if result > 0 && !data.is_empty() {
                self.unclaimed.entry(fd).or_default().extend(&data);
                self.mark(fd, true);
            }
            return;
        }
        let Some(p) = self.pending.get(&id) else {
            return;
        };
        if p.closes_left.is_some() {
            return self.close_done(id);
        }
        let Some(p) = self.pending.remove(&id) else {
            return;
        };
        self.waiting.remove(&p.pid);
        if let Some(w) = p.wait.clone() {
            return self.wait_done(id, p, w, result, &data);
        }
        if let Some((nr, args)) = p.by_pid {
            if self.reaches(id, result) {
                return;
            }
            // Its caller left it for a signal (often the one it sent) and
            // is about to make it again: it gets this result then.
            self.carried
                .insert(p.pid, Carried::new(id, nr, args, Some(result)));
            return;
        }
        let still = self.listener.as_ref().is_some_and(|l| l.still_waiting(id));
        if !still && p.is_read && result > 0 {
            self.unclaimed.entry(p.fd).or_default().extend(&data);
            self.mark(p.fd, true);
            return;
        }
        self.deliver(p.pid, id, &p.reply, result, &data);
    }

    fn close_done(&mut self, base: u64) {
        let Some(p) = self.pending.get_mut(&base) else {
            return;
        };
        let left = p.closes_left.unwrap_or(1).saturating_sub(1);
        p.closes_left = Some(left);
        if left == 0 {
            let pid = p.pid;
            self.pending.remove(&base);
            self.waiting.remove(&pid);
            self.run_as_is(base);
        }
    }

    /// Give up on call `id` (its caller left it): the deputy is told, and
    /// what a read took meanwhile is kept.
    fn give_up(&mut self, id: u64, out: &mut Vec<AgentMsg>) {
        let Some(p) = self.pending.remove(&id) else {
            return;
        };
        if self.waiting.get(&p.pid) == Some(&id) {
            self.waiting.remove(&p.pid);
        }
        if let Some((nr, args)) = p.by_pid {
            // Made at home all the same: kept for the caller's next try.
            self.carried.insert(p.pid, Carried::new(id, nr, args, None));
        } else if let Some(w) = &p.wait {
            // Between two looks, nothing is out at home.
            if w.again_at.is_none() {
                self.given_up_waits.insert(id);
                out.push(AgentMsg::CancelCall { id });
            }
        } else if p.closes_left.is_none() {
            if p.is_read {
                self.given_up.insert(id, p.fd);
            }
            out.push(AgentMsg::CancelCall { id });
        }
    }

    /// The original's readiness, mirrored on stand-in `fd`.
    pub fn on_readable(&mut self, fd: i32, readable: bool) {
        let keep = self.unclaimed.get(&fd).is_some_and(|q| !q.is_empty());
        self.mark(fd, readable || keep);
    }

    fn mark(&mut self, fd: i32, readable: bool) {
        let Some(s) = self.stand_ins.get_mut(&fd) else {
            return;
        };
        if readable && !s.marked {
            s.marked = (&s.ours).write_all(&[1]).is_ok();
        } else if !readable && s.marked {
            let mut byte = [0u8; 1];
            s.marked = !matches!((&s.theirs).read(&mut byte), Ok(1));
        }
    }

    /// Give up on calls whose caller left them (a signal without restart).
    pub fn tick(&mut self, out: &mut Vec<AgentMsg>) {
        let Some(l) = &self.listener else {
            return;
        };
        let now = Instant::now();
        let gone: Vec<u64> = self
            .pending
            .iter()
            .filter(|(id, p)| now - p.since >= STILL_WAITING_CHECK && !l.still_waiting(**id))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.give_up(id, out);
        }
        self.answer_calls_no_signal_left();
        self.look_again(out);
    }

    /// The process goes home: every call still waiting is given up (the
    /// checkpoint stopped its caller, which makes it again at home), and
    /// what given-up reads took goes to the deputy.
    pub fn give_up_all(&mut self, out: &mut Vec<AgentMsg>) {
        let ids: Vec<u64> = self.pending.keys().copied().collect();
        for id in ids {
            self.give_up(id, out);
        }
        self.waiting.clear();
        if !self.unclaimed_waits.is_empty() {
            tracing::warn!(
                children = self.unclaimed_waits.len(),
                "children reaped at home for waits given up: their status is lost"
            );
        }
        for (fd, bytes) in self.unclaimed.drain() {
            out.push(AgentMsg::Unclaimed {
                fd,
                bytes: bytes.into(),
            });
        }
    }
}

/// Pids where the process runs, from /proc.
struct Here {
    process: i32,
    caller: i32,
}

impl LocalPids for Here {
    fn is_local(&self, pid: i32) -> bool {
        // The process, or one of its descendants here (a chain of parents
        // up to it; a bound, for a chain changing meanwhile).
        let mut at = pid;
        for _ in 0..64 {
            if at == self.process {
                return true;
            }
            match crate::procfs::parent(at) {
                Some(parent) if parent > 1 => at = parent,
                _ => return false,
            }
        }
        false
    }

    fn caller_is_the_process(&self) -> bool {
        self.caller == self.process
    }

    fn own_group(&self) -> i32 {
        crate::procfs::group(self.caller).unwrap_or(0)
    }
}

/// The processes `pid` started here, and theirs (not `pid`).
fn descendants(pid: i32) -> Vec<i32> {
    let mut found = Vec::new();
    let mut next = vec![pid];
    while let Some(p) = next.pop() {
        for child in crate::procfs::children(p) {
            if found.len() < 4096 && !found.contains(&child) {
                found.push(child);
                next.push(child);
            }
        }
    }
    found
}

/// Whether one of the children `here` has something for `req` now.
fn ready_here(here: &[i32], req: &WaitRequest) -> bool {
    here.iter()
        .any(|&c| crate::procfs::state(c).is_some_and(|s| req.ready_in(s)))
}

/// The id of the `i`-th close (from 1) done before call `base` runs.
fn close_id(base: u64, i: usize) -> u64 {
    base ^ (u64::MAX - i as u64)
}
