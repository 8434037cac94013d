//! The host: on the node a process moves to, restores it (as our child),
//! passes on the signals its deputy forwards, reports how it ends, and
//! checkpoints it again when it is called home. If the deputy goes away,
//! the copy is killed: a process never runs without its home pid.
//!
//! Reports `guest PID` when the copy is built (before it runs), `running
//! PID` or `error MSG` on `report` once the move is done,
//! then `ended …`.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

use crate::accept::StandIns;
use crate::checkpoint::{checkpoint_with, Transfer};
use crate::daemon::DaemonConn;
use crate::host_calls::HostCalls;
use crate::lazy::LazyMemory;
use crate::link::{self, line, AgentMsg};
use crate::ptrace::{self, Stop, Tracee};
use crate::relay::Relays;
use crate::restore::{Shell, ShellSpec};
use crate::{Image, MigrateError};

/// How long the host waits for its deputy to connect and send the image.
const DEPUTY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Host {
    pub node_socket: PathBuf,
    pub token: u128,
}

type MovedIn = (
    TcpStream,
    i32,
    Image,
    Relays,
    Option<LazyMemory>,
    StandIns,
    HostCalls,
);

/// Take the deputy's connection and the image; restore it.
fn move_in(
    h: &Host,
    listener: &TcpListener,
    report: &mut dyn Write,
) -> Result<MovedIn, MigrateError> {
    if !ptrace::readable_within(listener.as_fd(), DEPUTY_TIMEOUT)? {
        return Err(MigrateError::Link("no deputy came".into()));
    }
    let (mut stream, _) = listener.accept()?;
    stream.set_read_timeout(Some(DEPUTY_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let shell = match link::receive_at_most(&mut stream, link::HELLO_MAX)? {
        AgentMsg::Hello { token, shell } if token == h.token => Shell::start(&shell),
        _ => return Err(MigrateError::Link("a connection without the token".into())),
    };
    let image = match link::receive(&mut stream)? {
        AgentMsg::Image(bytes) => {
            Image::decode(&bytes).map_err(|e| MigrateError::Link(e.to_string()))?
        }
        other => return Err(MigrateError::Link(format!("unexpected {other:?}"))),
    };
    dsm::faults::point("host.image");
    let started = std::time::Instant::now();
    let (stand_ins, mut ends) = StandIns::for_image(&image)?;
    let (mut calls, call_ends, watched) = HostCalls::for_image(&image)?;
    ends.extend(call_ends);
    let node = Some(h.node_socket.as_path());
    let restored = match shell {
        Ok(shell) => shell.restore_with(&image, node, ends, &watched),
        Err(_) => Shell::start(&ShellSpec::of(&image))
            .and_then(|s| s.restore_with(&image, node, ends, &watched)),
    };
    tracing::debug!(elapsed = ?started.elapsed(), "restored");
    match restored {
        Ok(restored) => {
            let pid = restored.pid();
            dsm::faults::point("host.restored");
            // Before it runs, the daemon learns whose process it is (its
            // semaphore operations are its home process's).
            // (A host started by hand, not by its daemon, is unknown there:
            // the copy's semaphore operations then count as its own.)
            line(report, &format!("guest {pid}"));
            let guest = dsm::wire::ClientRequest::Guest {
                pid,
                token: h.token,
            };
            // With the uffd of its lazy memory, which the daemon holds
            // while the copy lives: if this host dies, the copy's faults
            // wait (and its PDEATHSIG kills it) instead of the kernel
            // filling that memory with zeros.
            let lazy_uffd = restored.lazy_uffd();
            match DaemonConn::connect(&h.node_socket)?
                .call(&guest, lazy_uffd)?
                .0
            {
                dsm::wire::ClientReply::Ok => {}
                other => tracing::warn!(pid, ?other, "the daemon did not take the guest"),
            }
            link::send(&mut stream, &AgentMsg::Running { pid })?;
            // Dropping `restored` on any failure here kills the copy.
            let mut running = match link::receive(&mut stream)? {
                AgentMsg::Go => {
                    dsm::faults::point("host.before_run");
                    restored.run()?
                }
                other => return Err(MigrateError::Link(format!("unexpected {other:?}"))),
            };
            // Its calls on stand-ins wait in the listener until we look.
            calls.start(pid, running.calls.take());
            // We reap it ourselves (waitpid), never through `Child`.
            std::mem::forget(running.child);
            stream.set_read_timeout(None)?;
            Ok((
                stream,
                pid,
                image,
                running.relays,
                running.lazy,
                stand_ins,
                calls,
            ))
        }
        Err(e) => {
            let _ = link::send(&mut stream, &AgentMsg::Failed(e.to_string()));
            Err(e)
        }
    }
}

pub fn run(h: &Host, listener: TcpListener, report: &mut dyn Write) -> Result<(), MigrateError> {
    let events = ptrace::child_events()?;
    let (mut deputy, pid, first, mut relays, mut lazy, mut stand_ins, mut calls) =
        match move_in(h, &listener, report) {
            Ok(moved) => moved,
            Err(e) => {
                line(report, &format!("error {e}"));
                return Err(e);
            }
        };
    drop(listener);
    line(report, &format!("running {pid}"));
    loop {
        let mut watched = vec![
            (events.as_fd(), libc::POLLIN),
            (deputy.as_fd(), libc::POLLIN),
        ];
        let relay_set = relays.poll_set();
        let relay_count = relay_set.len();
        watched.extend(relay_set);
        let calls_set = calls.poll_set();
        let calls_count = calls_set.len();
        watched.extend(calls_set);
        let lazy_at = 2 + relay_count + calls_count;
        if let Some(l) = &lazy {
            watched.extend(l.poll_set());
        }
        // A process with listeners is looked at now and then: it may start
        // waiting for a connection at any time.
        let look_again = [
            stand_ins.needs_ticks().then_some(STAND_IN_TICK),
            calls.next_tick(),
            relays.needs_ticks().then_some(READS_REPORT_TICK),
        ]
        .into_iter()
        .flatten()
        .min();
        let ready = ptrace::wait_ready_within(&watched, look_again)?;
        drop(watched);
        let mut out = Vec::new();
        // Sockets only on this side: no descriptor to close in the process.
        relays.service(&ready[2..2 + relay_count], &mut out);
        calls.service(&ready[2 + relay_count..lazy_at], &mut out);
        calls.tick(&mut out);
        relays.tick(&mut out);
        if let Some(l) = &mut lazy {
            if ready[lazy_at..].iter().any(|r| *r != 0) {
                dsm::faults::point("host.serving");
            }
            l.service(&ready[lazy_at..], &mut out);
        }
        stand_ins.tick(pid, &relays, &mut out);
        for msg in &out {
            link::send(&mut deputy, msg)?;
        }
        if ready[0] != 0 {
            ptrace::drain_child_events(events.as_fd());
            let end = match ptrace::poll_child(pid)? {
                Some(Stop::Exited(code)) => {
                    Some((AgentMsg::Exited(code), format!("ended exit {code}")))
                }
                Some(Stop::Killed(sig)) => {
                    Some((AgentMsg::Killed(sig), format!("ended signal {sig}")))
                }
                _ => None,
            };
            if let Some((msg, text)) = end {
                // Its last output first.
                let mut out = Vec::new();
                relays.drain(&mut out);
                for m in out.iter().chain([&msg]) {
                    let _ = link::send(&mut deputy, m);
                }
                line(report, &text);
                return Ok(());
            }
        }
        if ready[1] != 0 {
            match link::receive(&mut deputy) {
                Ok(AgentMsg::Signal(sig)) => {
                    signal_coming(&mut calls, sig, &mut deputy)?;
                    let _ = ptrace::kill(pid, sig);
                }
                Ok(AgentMsg::SignalInfo(info)) => {
                    signal_coming(&mut calls, ptrace::signo_of(&info), &mut deputy)?;
                    ptrace::queue_signal(pid, &info);
                }
                Ok(msg @ (AgentMsg::Data { .. } | AgentMsg::Shut { .. })) => {
                    relays.on_message(msg);
                }
                Ok(AgentMsg::Accepted { fd, conn }) => {
                    let mut out = Vec::new();
                    stand_ins.on_accepted(fd, conn, &mut relays, &mut out);
                    for msg in &out {
                        link::send(&mut deputy, msg)?;
                    }
                }
                Ok(AgentMsg::Quiesce) => {
                    stand_ins.quiesce();
                    // Answered at once when there is nothing to wait for.
                    let mut out = Vec::new();
                    stand_ins.tick(pid, &relays, &mut out);
                    for msg in &out {
                        link::send(&mut deputy, msg)?;
                    }
                }
                Ok(AgentMsg::CallDone { id, result, data }) => calls.on_done(id, result, data),
                Ok(AgentMsg::Readable { fd, readable }) => calls.on_readable(fd, readable),
                Ok(AgentMsg::Pages { addr, bytes }) => {
                    if let Some(l) = &mut lazy {
                        l.on_pages(addr, &bytes);
                    }
                }
                Ok(AgentMsg::PushDone) => {
                    if let Some(l) = &mut lazy {
                        l.on_done();
                    }
                }
                Ok(AgentMsg::ComeHome) if lazy.as_ref().is_some_and(|l| !l.is_done()) => {
                    // Its memory is not all here yet: a checkpoint now
                    // would leave pages behind.
                    link::send(
                        &mut deputy,
                        &AgentMsg::Failed("the transfer of its memory is not complete".into()),
                    )?;
                    stand_ins.resume();
                }
                Ok(AgentMsg::ComeHome) => {
                    if send_home(h, pid, &first, &mut deputy, &mut relays, &mut calls)? {
                        reap(pid);
                        line(report, "ended went home");
                        return Ok(());
                    }
                    stand_ins.resume();
                }
                Ok(other) => tracing::warn!(?other, "unexpected message from the deputy"),
                Err(e) => {
                    tracing::error!(pid, "deputy lost, ending the copy: {e}");
                    let _ = ptrace::kill(pid, libc::SIGKILL);
                    reap(pid);
                    line(report, "ended deputy lost");
                    return Ok(());
                }
            }
        }
    }
}

/// Before signal `signo` is given to the copy: a call it waits in at home
/// is given up first (`HostCalls::before_signal`).
fn signal_coming(
    calls: &mut HostCalls,
    signo: i32,
    deputy: &mut TcpStream,
) -> Result<(), MigrateError> {
    let mut out = Vec::new();
    calls.before_signal(signo, &mut out);
    for msg in &out {
        link::send(deputy, msg)?;
    }
    Ok(())
}

/// How often a process with listeners is looked at (is it waiting for a
/// connection?).
const STAND_IN_TICK: Duration = Duration::from_millis(1);

/// How often the deputy is told how much of a socket relayed to the
/// process it has read (while it has not read all).
const READS_REPORT_TICK: Duration = Duration::from_millis(5);

/// Times a process caught opening a connection here is let run on before
/// a return is refused.
const SETTLE_TRIES: u32 = 50;

/// A checkpoint of the copy that can go home: every pipe or socket in it
/// is one of our relays (the home process has its original). A socket the
/// copy opened here is not: one caught while the library opens a daemon
/// connection (before the daemon knows it as a link) is let run a moment
/// until it does; any other is a reason not to return yet.
fn checkpoint_for_home(
    h: &Host,
    pid: i32,
    tracee: &mut Tracee,
    relays: &Relays,
    calls: &HostCalls,
    first: &Image,
) -> Result<Image, MigrateError> {
    let mut tries = 0;
    loop {
        let mut daemon = DaemonConn::connect(&h.node_socket)?;
        let info = daemon.process_info(pid)?;
        let mut image = checkpoint_with(tracee, &info, Transfer::Eager, Some(&mut daemon))?;
        // Our stand-ins are the originals at home.
        for entry in &mut image.fds {
            if calls.is_stand_in(pid, entry.fd) {
                if let Some(at_home) = first.fds.iter().find(|f| f.fd == entry.fd) {
                    entry.kind = at_home.kind.clone();
                    entry.flags = at_home.flags;
                }
            }
        }
        let foreign = image.fds.iter().find(|f| {
            matches!(f.kind, crate::image::FdKind::Relayed { .. })
                && !relays.list.iter().any(|r| r.fd == f.fd)
        });
        match foreign {
            None => return Ok(image),
            Some(f) if tries < SETTLE_TRIES => {
                tracing::debug!(
                    pid,
                    fd = f.fd,
                    "a descriptor opened here; letting it settle"
                );
                tries += 1;
                tracee.run_briefly(Duration::from_millis(1))?;
            }
            Some(f) => {
                return Err(MigrateError::CannotMigrate(format!(
                    "fd {} was opened on this node and cannot go home; try again",
                    f.fd
                )))
            }
        }
    }
}

fn reap(pid: i32) {
    let _ = ptrace::wait_stop(pid);
}

/// Checkpoint the copy and send it to the deputy; true once the process
/// runs at home (the copy is killed), false if it stays here (resumed).
fn send_home(
    h: &Host,
    pid: i32,
    first: &Image,
    deputy: &mut TcpStream,
    relays: &mut Relays,
    calls: &mut HostCalls,
) -> Result<bool, MigrateError> {
    let mut tracee = Tracee::seize(pid)?;
    // What it wrote before it stopped goes home ahead of it; the calls it
    // waited in (the stop ended them) it makes again there.
    let mut out = Vec::new();
    relays.drain(&mut out);
    calls.give_up_all(&mut out);
    for msg in &out {
        link::send(deputy, msg)?;
    }
    let image = match checkpoint_for_home(h, pid, &mut tracee, relays, calls, first) {
        Ok(mut image) => {
            // The library's socket slot does not move; its connections may
            // not have been reopened here yet.
            image.socket_slot = image.socket_slot.or(first.socket_slot);
            image.keep_identities_of(first);
            // This copy is killed once the process runs at home: what
            // waits for it goes home with it.
            match crate::checkpoint::take_pending_signals(&mut tracee) {
                Ok(signals) => image.pending_signals = signals,
                Err(e) => tracing::warn!(pid, "reading pending signals: {e}"),
            }
            image
        }
        Err(e) => {
            link::send(deputy, &AgentMsg::Failed(e.to_string()))?;
            return Ok(false);
        }
    };
    let bytes = image
        .encode()
        .map_err(|e| MigrateError::Link(e.to_string()))?;
    dsm::faults::point("host.checkpointed");
    // How much it read, as it stopped: taken at home before the return.
    let mut read = Vec::new();
    relays.tick(&mut read);
    for msg in read
        .iter()
        .filter(|m| matches!(m, AgentMsg::Consumed { .. }))
    {
        link::send(deputy, msg)?;
    }
    // What was relayed to it and it has not read goes home too.
    let unread = relays.take_unread(pid);
    for (fd, bytes) in &unread {
        link::send(
            deputy,
            &AgentMsg::Unread {
                fd: *fd,
                bytes: bytes.clone(),
            },
        )?;
    }
    link::send(deputy, &AgentMsg::Image(bytes))?;
    deputy.set_read_timeout(Some(DEPUTY_TIMEOUT))?;
    let answer = link::receive(deputy);
    deputy.set_read_timeout(None)?;
    if !matches!(answer, Ok(AgentMsg::HomeOk) | Err(_)) {
        // It stays here: it reads them here.
        for (fd, bytes) in unread {
            relays.put_back(fd, bytes);
        }
    }
    match answer {
        Ok(AgentMsg::HomeOk) => {
            dsm::faults::point("host.home_ok");
            tracee.forget();
            let _ = ptrace::kill(pid, libc::SIGKILL);
            Ok(true)
        }
        // Resumed here (dropping the tracee detaches it).
        Ok(_) => Ok(false),
        Err(e) => {
            // Neither side can vouch for the other: the home process is
            // the one its parent waits for, so the copy gives way.
            tracing::error!(pid, "deputy lost while going home: {e}");
            tracee.forget();
            let _ = ptrace::kill(pid, libc::SIGKILL);
            Ok(true)
        }
    }
}
