//! The deputy: on the process's home node, moves the process to a host and
//! then stands in for it there. The process itself stays, parked in
//! `pause()` under our ptrace, so its pid, its parent and its place in its
//! process group never change: every signal sent to it stops it for us and
//! is passed to the host; when the migrated copy ends, the home process
//! ends the same way (exit status or signal); `kill -9` of the home pid ends
//! the copy; and bringing it home restores the host's checkpoint into it.
//!
//! Reports one line per event on `report`: `running PID frozen_us=N` (N:
//! how long the process was stopped) or `error MSG` after the move;
//! `home accepted=N` (N: connections accepted for it while away) or
//! `error MSG` after each request to come home; `ended …` last.

use std::io::{BufRead, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::accept::HomeListeners;
use crate::checkpoint::{checkpoint_with, Transfer};
use crate::daemon::DaemonConn;
use crate::home_calls::{HomeCalls, HomeProcess};
use crate::image::{FdEntry, FdKind};
use crate::link::{self, line, AgentMsg};
use crate::ptrace::{self, Stop, Tracee};
use crate::relay::{RelayEvent, Relays};
use crate::restore::directions;
use crate::{restore_into, Image, MigrateError};

/// How often peeked sockets are looked at for new bytes while the host
/// has not yet said the process read the earlier ones.
const RELAY_TICK: Duration = Duration::from_millis(2);

/// Bound on each wait for the host during a move or a return.
const HOST_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Deputy {
    pub pid: i32,
    pub home_socket: PathBuf,
    pub host: SocketAddr,
    pub token: u128,
}

/// Checkpoint the process and start it on the host: all or nothing; on any
/// failure the process runs on at home as if nothing happened.
type Moved = (
    Tracee,
    TcpStream,
    i32,
    dsm::wire::ProcessInfo,
    Image,
    std::time::Instant,
);

fn move_out(d: &Deputy) -> Result<Moved, MigrateError> {
    let mut daemon = DaemonConn::connect(&d.home_socket)?;
    // Everything that needs no stop first: the host starts the process's
    // shell while we checkpoint it.
    let mut stream = TcpStream::connect_timeout(&d.host, HOST_TIMEOUT)?;
    stream.set_read_timeout(Some(HOST_TIMEOUT))?;
    stream.set_nodelay(true)?;
    // Little queued ahead of a page the process waits for.
    ptrace::limit_send_buffer(stream.as_fd(), LINK_BUFFER)?;
    let shell = crate::checkpoint::shell_spec_of(d.pid)?;
    link::send(
        &mut stream,
        &AgentMsg::Hello {
            token: d.token,
            shell,
        },
    )?;
    dsm::faults::point("deputy.connected");
    let frozen = std::time::Instant::now();
    let mut tracee = Tracee::seize(d.pid)?;
    dsm::faults::point("deputy.seized");
    // Read stopped: the connections it has now.
    let info = daemon.process_info(d.pid)?;
    let mut image = checkpoint_with(&mut tracee, &info, Transfer::Lazy, Some(&mut daemon))?;
    // Pending where it stopped: pending in the copy before it runs (taken
    // from the home process once the copy runs, see `drain_pending`).
    image.pending_signals = tracee
        .pending_signals()?
        .iter()
        .map(|s| s.to_vec())
        .collect();
    tracing::debug!(pid = d.pid, elapsed = ?frozen.elapsed(), bytes = image.private_bytes(), lazy = image.lazy_bytes(), "checkpointed");
    dsm::faults::point("deputy.checkpointed");
    let bytes = image
        .encode()
        .map_err(|e| MigrateError::Link(e.to_string()))?;
    link::send(&mut stream, &AgentMsg::Image(bytes))?;
    match link::receive(&mut stream)? {
        AgentMsg::Running { pid } => {
            tracing::debug!(pid = d.pid, elapsed = ?frozen.elapsed(), "running on the host");
            stream.set_read_timeout(None)?;
            Ok((tracee, stream, pid, info, image, frozen))
        }
        AgentMsg::Failed(why) => Err(MigrateError::Restore(why)),
        other => Err(MigrateError::Link(format!("unexpected {other:?}"))),
    }
}

/// Stop the stopped home process's interval and POSIX timers (a return
/// sets them again from the copy's image).
fn disarm_timers(t: &mut Tracee, image: &Image) -> Result<(), MigrateError> {
    if image.itimers.is_empty() && image.posix_timers.is_empty() {
        return Ok(());
    }
    with_page(t, |t, page| {
        // A fresh page is zero: a disarming setting.
        for (which, _) in &image.itimers {
            t.syscall_ok(libc::SYS_setitimer, &[*which as u64, page, 0])?;
        }
        for timer in &image.posix_timers {
            t.syscall_ok(libc::SYS_timer_settime, &[timer.id as u64, 0, page, 0])?;
        }
        Ok(())
    })
}

/// Run `f` with a fresh page mapped in the stopped home process (its
/// address), unmapped after.
fn with_page<R>(
    t: &mut Tracee,
    f: impl FnOnce(&mut Tracee, u64) -> Result<R, MigrateError>,
) -> Result<R, MigrateError> {
    let page = t.syscall_ok(
        libc::SYS_mmap,
        &[
            0,
            PAGE,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
            u64::MAX,
            0,
        ],
    )?;
    let done = f(t, page);
    t.syscall_ok(libc::SYS_munmap, &[page, PAGE])?;
    done
}

/// Take every signal pending in the stopped home process; those not in
/// `moved` (the ones the copy got with its image), in order.
fn drain_pending(t: &mut Tracee, moved: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, MigrateError> {
    let drained = with_page(t, |t, page| {
        // Every signal (the kernel leaves out SIGKILL and SIGSTOP), no wait.
        let (set, timeout, info) = (page, page + 8, page + 64);
        t.write(set, &u64::MAX.to_le_bytes())?;
        t.write(timeout, &[0u8; 16])?;
        let mut drained = Vec::new();
        while t.syscall(libc::SYS_rt_sigtimedwait, &[set, info, timeout, 8])? > 0 {
            drained.push(t.read(info, 128)?);
        }
        Ok(drained)
    })?;
    let mut left: Vec<&Vec<u8>> = moved.iter().collect();
    Ok(drained
        .into_iter()
        .filter(|d| match left.iter().position(|m| *m == d) {
            Some(i) => {
                left.remove(i);
                false
            }
            None => true,
        })
        .collect())
}

/// The home process lets go of what the copy now holds: its segments
/// (so each is counted once, on the host's node) and its connections to
/// the daemon.
fn release_dsm_state(t: &mut Tracee, info: &dsm::wire::ProcessInfo) -> Result<(), MigrateError> {
    for a in &info.attachments {
        t.syscall_ok(libc::SYS_munmap, &[a.addr, a.len])?;
    }
    for l in &info.links {
        t.syscall_ok(libc::SYS_close, &[l.fd as u64])?;
    }
    Ok(())
}

/// Send buffer of the link: small, so that the answer to a fault never
/// waits behind much streamed memory.
const LINK_BUFFER: usize = 256 << 10;

const PAGE: u64 = crate::procfs::PAGE_SIZE;

/// Bytes of lazily moved memory per `Pages` message when streaming.
const PUSH_CHUNK: u64 = 256 << 10;

/// Streams the pages that stayed behind to the host, from the parked home
/// process's memory, between everything else. Streaming goes on from just
/// after the pages the process last faulted on: it is probably headed there.
struct Pusher {
    /// Every page to send, in address order, and whether it went.
    pages: Vec<u64>,
    sent: Vec<bool>,
    cursor: usize,
    left: usize,
    finished: bool,
}

impl Pusher {
    fn new(runs: &[(u64, u64)]) -> Pusher {
        let mut pages: Vec<u64> = runs
            .iter()
            .flat_map(|&(addr, len)| (0..len / PAGE).map(move |i| addr + i * PAGE))
            .collect();
        pages.sort_unstable();
        Pusher {
            sent: vec![false; pages.len()],
            left: pages.len(),
            // Nothing to say if nothing stayed behind.
            finished: pages.is_empty(),
            pages,
            cursor: 0,
        }
    }

    fn pending(&self) -> bool {
        !self.finished
    }

    /// The host is gone: nothing more to stream.
    fn stop(&mut self) {
        self.finished = true;
    }

    /// The host asked for these pages (and gets them at once).
    fn requested(&mut self, addr: u64, len: u64) {
        let first = self.pages.partition_point(|&p| p < addr);
        let mut i = first;
        while i < self.pages.len() && self.pages[i] < addr + len {
            if !self.sent[i] {
                self.sent[i] = true;
                self.left -= 1;
            }
            i += 1;
        }
        if i < self.pages.len() {
            self.cursor = i;
        }
    }

    fn send_next(&mut self, t: &Tracee, host: &mut TcpStream) -> Result<(), MigrateError> {
        if self.finished {
            return Ok(());
        }
        if self.left == 0 {
            self.finished = true;
            return link::send(host, &AgentMsg::PushDone);
        }
        while self.sent[self.cursor] {
            self.cursor = (self.cursor + 1) % self.pages.len();
        }
        let start = self.cursor;
        let mut n = 0;
        while start + n < self.pages.len()
            && (n as u64) < PUSH_CHUNK / PAGE
            && !self.sent[start + n]
            && self.pages[start + n] == self.pages[start] + n as u64 * PAGE
        {
            self.sent[start + n] = true;
            n += 1;
        }
        self.left -= n;
        self.cursor = (start + n) % self.pages.len();
        dsm::faults::point("deputy.streaming");
        let bytes = t.read(self.pages[start], n * PAGE as usize)?;
        link::send(
            host,
            &AgentMsg::Pages {
                addr: self.pages[start],
                bytes,
            },
        )
    }
}

/// The home process's originals of its relayed descriptors.
fn relays_for(pid: i32, fds: &[FdEntry]) -> Result<Relays, MigrateError> {
    let mut relays = Relays::default();
    for entry in fds {
        if let FdKind::Relayed { what, .. } = &entry.kind {
            let original = ptrace::take_fd(pid, entry.fd as u64)?;
            let (process_reads, process_writes) = directions(entry.flags);
            // We read what the process would read, and write what it writes.
            relays.add(entry.fd, original, process_reads, process_writes);
            if what.starts_with("socket:") {
                relays.peek_socket(entry.fd);
            }
        }
    }
    Ok(relays)
}

/// How long relayed bytes may take to drain before the process ends or
/// comes home.
const FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// Park the home process again, passing on to the copy the signals that
/// arrived while we held it.
fn park(t: &mut Tracee, host: &mut TcpStream) -> Result<(), MigrateError> {
    for info in t.take_held_signals() {
        tell(host, &AgentMsg::SignalInfo(info.to_vec()));
    }
    t.park()?;
    Ok(())
}

/// Stop the parked home process, passing on the signals that arrive on the
/// way.
fn hold(t: &mut Tracee, host: &mut TcpStream) -> Result<(), MigrateError> {
    for info in t.interrupt()? {
        tell(host, &AgentMsg::SignalInfo(info.to_vec()));
    }
    Ok(())
}

/// Send to the host while the copy runs. A host that went away may have
/// left its last word (the copy's exit) unread in our socket: the failure
/// is only logged, and reading decides (that word, or the host lost).
fn tell(host: &mut TcpStream, msg: &AgentMsg) {
    if let Err(e) = link::send(host, msg) {
        tracing::debug!("the host does not take messages (any more): {e}");
    }
}

/// The parked home process, held (stopped) from the first call made in
/// it until `release` parks it again.
struct Held<'a> {
    t: &'a mut Tracee,
    host: &'a mut TcpStream,
    held: bool,
}

impl<'a> Held<'a> {
    fn new(t: &'a mut Tracee, host: &'a mut TcpStream) -> Held<'a> {
        Held {
            t,
            host,
            held: false,
        }
    }

    fn hold(&mut self) -> std::io::Result<()> {
        if !self.held {
            hold(self.t, self.host).map_err(std::io::Error::other)?;
            self.held = true;
        }
        Ok(())
    }

    fn release(self) -> Result<(), MigrateError> {
        if self.held {
            park(self.t, self.host)?;
        }
        Ok(())
    }
}

impl HomeProcess for Held<'_> {
    fn call(&mut self, nr: libc::c_long, args: &[u64]) -> std::io::Result<i64> {
        self.hold()?;
        self.t.syscall(nr, args)
    }

    fn read(&mut self, addr: u64, len: usize) -> std::io::Result<Vec<u8>> {
        self.hold()?;
        self.t.read(addr, len)
    }

    fn write(&mut self, addr: u64, data: &[u8]) -> std::io::Result<()> {
        self.hold()?;
        self.t.write(addr, data)
    }
}

/// Close descriptors in the parked home process (a pipe the copy closed).
fn close_in_process(
    t: &mut Tracee,
    host: &mut TcpStream,
    relays: &mut Relays,
    events: Vec<RelayEvent>,
) -> Result<(), MigrateError> {
    for RelayEvent::CloseInProcess(fd) in events {
        relays.remove(fd);
        hold(t, host)?;
        t.syscall_ok(libc::SYS_close, &[fd as u64])?;
        park(t, host)?;
    }
    Ok(())
}

pub fn run(
    d: &Deputy,
    commands: &mut dyn BufRead,
    report: &mut dyn Write,
) -> Result<(), MigrateError> {
    let events = ptrace::child_events()?;
    let (mut tracee, mut host, remote_pid, info, image, frozen) = match move_out(d) {
        Ok(moved) => moved,
        Err(e) => {
            line(report, &format!("error {e}"));
            return Err(e);
        }
    };
    // What stays at home and serves the copy, taken while the process can
    // still go on here if that fails (the host kills a copy never let go).
    let served = relays_for(d.pid, &image.fds).and_then(|relays| {
        Ok((
            relays,
            HomeListeners::of(d.pid, &image.fds)?,
            HomeCalls::of(d.pid, &image.fds)?,
        ))
    });
    let (mut relays, mut listeners, mut home_calls) = match served {
        Ok(served) => served,
        Err(e) => {
            drop(tracee);
            line(report, &format!("error {e}"));
            return Err(e);
        }
    };
    // From here the copy runs: the home process must never run on.
    tracee.kill_if_we_die()?;
    dsm::faults::point("deputy.before_go");
    if let Err(e) = link::send(&mut host, &AgentMsg::Go) {
        // The copy never ran: the process goes on at home.
        tracee.keep_if_we_die()?;
        drop(tracee);
        line(report, &format!("error {e}"));
        return Err(e);
    }
    // Frozen here until the copy was let run.
    let downtime = frozen.elapsed();
    // What the copy got pending is no longer the home process's; what
    // came since goes to the copy as any later signal.
    for info in drain_pending(&mut tracee, &image.pending_signals)? {
        tell(&mut host, &AgentMsg::SignalInfo(info));
    }
    // Its timers run in the copy now: here they would fire twice.
    if let Err(e) = disarm_timers(&mut tracee, &image) {
        tracing::warn!(pid = d.pid, "stopping the home process's timers: {e}");
    }
    // The parked process blocks nothing: every signal sent to it, and any
    // it had blocked and pending, stops it for us and goes to the copy,
    // whose own mask (restored from the image) decides.
    tracee.set_sigmask(0)?;
    // The home process lets go of its segments once the copy has all its
    // memory: serving the copy's first faults comes first.
    let mut released = false;
    // A return asked for, waiting for the host's `Quiet`.
    let mut returning = false;
    let mut push = Pusher::new(&image.lazy);
    park(&mut tracee, &mut host)?;
    let mut out = Vec::new();
    home_calls.first_readiness(&mut out);
    for msg in &out {
        tell(&mut host, msg);
    }
    line(
        report,
        &format!("running {remote_pid} frozen_us={}", downtime.as_micros()),
    );
    dsm::faults::point("deputy.after_go");

    let mut commands_open = true;
    loop {
        if !released && !push.pending() {
            hold(&mut tracee, &mut host)?;
            if let Err(e) = release_dsm_state(&mut tracee, &info) {
                tracing::warn!(pid = d.pid, "releasing the home process's segments: {e}");
            }
            park(&mut tracee, &mut host)?;
            released = true;
        }
        let stdin_handle = std::io::stdin();
        let stdin = stdin_handle.as_fd();
        let host_events = if push.pending() {
            libc::POLLIN | libc::POLLOUT
        } else {
            libc::POLLIN
        };
        let mut watched: Vec<(BorrowedFd<'_>, i16)> =
            vec![(events.as_fd(), libc::POLLIN), (host.as_fd(), host_events)];
        // Once closed (the daemon is gone), stdin is not watched: its
        // POLLHUP would wake every poll.
        let stdin_at = commands_open.then(|| {
            watched.push((stdin, libc::POLLIN));
            watched.len() - 1
        });
        let relays_at = watched.len();
        let relay_set = relays.poll_set();
        let relay_count = relay_set.len();
        watched.extend(relay_set);
        let listeners_at = relays_at + relay_count;
        watched.extend(listeners.poll_set());
        let calls_at = watched.len();
        watched.extend(home_calls.poll_set());
        let tick = [
            home_calls.next_tick(),
            relays.needs_ticks().then_some(RELAY_TICK),
        ]
        .into_iter()
        .flatten()
        .min();
        let ready = ptrace::wait_ready_within(&watched, tick)?;
        drop(watched);
        let mut out = Vec::new();
        let relay_events = relays.service(&ready[relays_at..listeners_at], &mut out);
        listeners.service(&ready[listeners_at..calls_at], &mut relays, &mut out);
        home_calls.service(&ready[calls_at..], &mut out);
        relays.tick(&mut out);
        // (Held only if a lock is tried.)
        let mut home = Held::new(&mut tracee, &mut host);
        home_calls.tick(&mut home, &mut out);
        home.release()?;
        for msg in &out {
            tell(&mut host, msg);
        }
        close_in_process(&mut tracee, &mut host, &mut relays, relay_events)?;
        if ready[0] != 0 {
            ptrace::drain_child_events(events.as_fd());
            while let Some(stop) = ptrace::poll_child(d.pid)? {
                match stop {
                    Stop::Signal(sig) => {
                        // With its siginfo: a queued value travels.
                        let info = tracee.signal_info(sig);
                        tell(&mut host, &AgentMsg::SignalInfo(info.to_vec()));
                        tracee.resume(0)?;
                    }
                    Stop::Exited(_) | Stop::Killed(_) => {
                        // Killed at home (SIGKILL cannot be intercepted):
                        // the copy goes too.
                        let _ = link::send(&mut host, &AgentMsg::Signal(libc::SIGKILL));
                        tracee.forget();
                        line(report, "ended killed at home");
                        return Ok(());
                    }
                    Stop::Event(_) | Stop::Syscall => tracee.resume(0)?,
                }
            }
        }
        if ready[1] & libc::POLLOUT != 0 {
            if let Err(e) = push.send_next(&tracee, &mut host) {
                // As for `tell`: reading decides.
                tracing::debug!(pid = d.pid, "streaming memory to the host: {e}");
                push.stop();
            }
        }
        if ready[1] & !libc::POLLOUT != 0 {
            match link::receive(&mut host) {
                Ok(AgentMsg::PageRequest { addr, len }) => {
                    push.requested(addr, len);
                    let bytes = tracee.read(addr, len as usize)?;
                    // The copy may have ended meanwhile: reading decides.
                    tell(&mut host, &AgentMsg::Pages { addr, bytes });
                }
                Ok(msg @ (AgentMsg::Data { .. } | AgentMsg::Shut { .. })) => {
                    let events = relays.on_message(msg);
                    close_in_process(&mut tracee, &mut host, &mut relays, events)?;
                }
                Ok(AgentMsg::Want { fd }) => listeners.want(fd),
                Ok(AgentMsg::Call {
                    id,
                    fd,
                    by_process,
                    call,
                }) => {
                    let mut out = Vec::new();
                    let mut home = Held::new(&mut tracee, &mut host);
                    home_calls.on_call(id, fd, by_process, call, &mut home, &mut out);
                    home.release()?;
                    for msg in &out {
                        tell(&mut host, msg);
                    }
                }
                Ok(AgentMsg::CancelCall { id }) => home_calls.on_cancel(id),
                Ok(AgentMsg::Unclaimed { fd, bytes }) => home_calls.on_unclaimed(fd, bytes),
                Ok(AgentMsg::Consumed { fd, total }) => relays.on_consumed(fd, total),
                Ok(AgentMsg::Quiet) if returning => {
                    returning = false;
                    if go_home(
                        d,
                        &mut tracee,
                        &mut host,
                        &mut relays,
                        &mut push,
                        &mut released,
                        &info,
                        &mut home_calls,
                        report,
                    )? {
                        tracee.detach()?;
                        line(report, &format!("home accepted={}", listeners.accepted));
                        return Ok(());
                    }
                    listeners.resume();
                }
                Ok(AgentMsg::Failed(why)) if returning => {
                    returning = false;
                    listeners.resume();
                    line(report, &format!("error {why}"));
                }
                Ok(AgentMsg::Exited(code)) => {
                    // What the copy wrote reaches the readers before its end.
                    relays.flush(FLUSH_LIMIT);
                    tracee.interrupt()?;
                    tracee.exit_with(code)?;
                    line(report, &format!("ended exit {code}"));
                    return Ok(());
                }
                Ok(AgentMsg::Killed(sig)) => {
                    relays.flush(FLUSH_LIMIT);
                    tracee.interrupt()?;
                    tracee.die_of(sig)?;
                    line(report, &format!("ended signal {sig}"));
                    return Ok(());
                }
                Ok(other) => tracing::warn!(?other, "unexpected message from the host"),
                Err(e) => {
                    // The host (or its node) is gone, and the process with it.
                    tracing::error!(pid = d.pid, "host lost: {e}");
                    tracee.interrupt()?;
                    tracee.die_of(libc::SIGKILL)?;
                    line(report, "ended host lost");
                    return Ok(());
                }
            }
        }
        if stdin_at.is_some_and(|i| ready[i] != 0) {
            let mut cmd = String::new();
            if commands.read_line(&mut cmd)? == 0 {
                commands_open = false;
                continue;
            }
            if cmd.trim() != "home" {
                line(report, &format!("error unknown command {:?}", cmd.trim()));
                continue;
            }
            if returning {
                line(report, "error a return is already under way");
                continue;
            }
            // No more connections for the copy; the host answers `Quiet`
            // once it is done with those it has.
            listeners.quiesce();
            tell(&mut host, &AgentMsg::Quiesce);
            returning = true;
        }
    }
}

/// The return itself, once the copy is quiet: every page first, the home
/// process's segments released, then its checkpoint restored here. True
/// when the process runs at home again (still traced); false (reported)
/// if it stays where it runs.
#[allow(clippy::too_many_arguments)]
fn go_home(
    d: &Deputy,
    tracee: &mut Tracee,
    host: &mut TcpStream,
    relays: &mut Relays,
    push: &mut Pusher,
    released: &mut bool,
    info: &dsm::wire::ProcessInfo,
    home_calls: &mut HomeCalls,
    report: &mut dyn Write,
) -> Result<bool, MigrateError> {
    // Every page first: the host checkpoints only a whole process.
    if push.pending() || !*released {
        while push.pending() {
            push.send_next(tracee, host)?;
        }
        hold(tracee, host)?;
        if let Err(e) = release_dsm_state(tracee, info) {
            tracing::warn!(pid = d.pid, "releasing the home process's segments: {e}");
        }
        park(tracee, host)?;
        *released = true;
    }
    match come_home(tracee, host, &d.home_socket, relays, home_calls) {
        Ok(()) => Ok(true),
        Err(e) => {
            // The copy runs on; the home process waits (again).
            line(report, &format!("error {e}"));
            Ok(false)
        }
    }
}

/// Ask the host for its checkpoint and restore it into the home process.
/// On failure the host resumes its copy, and the home process is parked
/// again.
fn come_home(
    t: &mut Tracee,
    host: &mut TcpStream,
    home_socket: &Path,
    relays: &mut Relays,
    home_calls: &mut HomeCalls,
) -> Result<(), MigrateError> {
    host.set_read_timeout(Some(HOST_TIMEOUT))?;
    link::send(host, &AgentMsg::ComeHome)?;
    let mut unread: Vec<(i32, Vec<u8>)> = Vec::new();
    let received = (|| loop {
        let reply = link::receive(host);
        match reply {
            // What the copy wrote before it stopped.
            Ok(msg @ (AgentMsg::Data { .. } | AgentMsg::Shut { .. })) => {
                let events = relays.on_message(msg);
                close_in_process(t, host, relays, events)?;
            }
            Ok(AgentMsg::Image(bytes)) => {
                break Image::decode(&bytes).map_err(|e| MigrateError::Link(e.to_string()))
            }
            // Sent before the host saw `ComeHome`: nothing is accepted now.
            Ok(AgentMsg::Want { .. }) => {}
            // Calls the stop ended: made again at home. A call sent
            // before is given up by the host too.
            Ok(AgentMsg::CancelCall { id }) => home_calls.on_cancel(id),
            Ok(AgentMsg::Unclaimed { fd, bytes }) => home_calls.on_unclaimed(fd, bytes),
            Ok(AgentMsg::Call { .. }) => {}
            Ok(AgentMsg::Unread { fd, bytes }) => unread.push((fd, bytes)),
            Ok(AgentMsg::Consumed { fd, total }) => relays.on_consumed(fd, total),
            // A fault of the copy asked before the pages pushed ahead of
            // `ComeHome` reached the host: every page was in them.
            Ok(AgentMsg::PageRequest { .. }) => {}
            // The host could not checkpoint its copy (and resumed it).
            Ok(AgentMsg::Failed(why)) => {
                host.set_read_timeout(None)?;
                return Err(MigrateError::Restore(why));
            }
            Ok(other) => break Err(MigrateError::Link(format!("unexpected {other:?}"))),
            Err(e) => break Err(e),
        }
    })();
    let image = match received {
        Ok(image) => image,
        Err(e) => {
            // The host waits for our word: it resumes its copy.
            let _ = link::send(host, &AgentMsg::Failed(e.to_string()));
            host.set_read_timeout(None)?;
            return Err(e);
        }
    };
    host.set_read_timeout(None)?;
    dsm::faults::point("deputy.returning");
    let signals = t.interrupt()?;
    for event in relays.flush(FLUSH_LIMIT) {
        let RelayEvent::CloseInProcess(fd) = event;
        t.syscall_ok(libc::SYS_close, &[fd as u64])?;
    }
    let restored = restore_into(t, &image, Some(home_socket), &Default::default(), None);
    match restored {
        Ok(_lazy_none) => {
            dsm::faults::point("deputy.restored");
            // What it had not read of its sockets is still in them.
            relays.stop_peeking();
            for (fd, bytes) in &unread {
                let lost = relays.give_back(*fd, bytes);
                if lost > 0 {
                    tracing::warn!(fd, lost, "bytes the process had not read could not go back");
                }
            }
            link::send(host, &AgentMsg::HomeOk)?;
            for info in &signals {
                ptrace::queue_signal(t.pid, info);
            }
            Ok(())
        }
        Err(e) => {
            let _ = link::send(host, &AgentMsg::Failed(e.to_string()));
            // Whatever the restore did to it is rewritten by the next one;
            // parked, it blocks nothing again (its signals go to the copy).
            t.set_sigmask(0)?;
            park(t, host)?;
            for info in &signals {
                ptrace::queue_signal(t.pid, info);
            }
            Err(e)
        }
    }
}
