//! Relays for what cannot be reopened on another node: pipes and sockets.
//! The migrated process gets one end of a socketpair at the descriptor's
//! number; its host pumps bytes between the other end and the deputy, which
//! pumps them to and from the home process's original descriptor. Each side
//! sends `Data` as bytes come and `Shut` when its source reaches end of
//! file; bytes are written on only when the descriptor can take them, so
//! neither agent ever blocks on a slow reader. A datagram or seqpacket
//! socket is relayed a message at a time (`Relay::messages`): each `Data`
//! is one message, written as one.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::link::AgentMsg;

/// Bytes read from one descriptor per turn.
const CHUNK: usize = 64 << 10;
/// Bytes written per turn: a pipe that reports POLLOUT takes a page
/// without blocking.
const WRITE_STEP: usize = 4096;
/// Longest message read from a datagram or seqpacket socket (a unix
/// socket's default send buffer, 208 KiB, bounds what a peer sends).
const MOST_MESSAGE: usize = 256 << 10;

pub struct Relay {
    /// The descriptor's number in the process.
    pub fd: i32,
    end: File,
    /// Bytes flow from `end` to the other side.
    reads: bool,
    /// Bytes from the other side are written to `end`.
    writes: bool,
    pending: VecDeque<u8>,
    /// A datagram (SOCK_DGRAM, or SOCK_SEQPACKET: `datagram` false) socket
    /// on both sides: messages, each kept whole.
    messages: bool,
    datagram: bool,
    pending_messages: VecDeque<Vec<u8>>,
    /// The other side's source ended: shut `end` once `pending` is written.
    shut_after_pending: bool,
    /// `end` reached end of file (or failed).
    read_done: bool,
    /// The other side's source ended and all of it was written.
    peer_done: bool,
    is_socket: bool,
    /// Deputy, a socket of the process: its bytes are peeked (SO_PEEK_OFF)
    /// and taken only once the host says the process read them, so that
    /// those it has not read when it comes home are still in the socket.
    /// Messages are peeked one at a time: the host can tell that one was
    /// read (its end is no longer readable), not how many of several
    /// (SIOCINQ gives a datagram socket's first message only).
    peeking: bool,
    /// Bytes (messages) peeked and sent, and of those, taken.
    peeked: u64,
    taken: u64,
    /// Host: the process's end (its unread bytes: how far it has read),
    /// for a relay whose home side is a socket the deputy peeks.
    theirs: Option<OwnedFd>,
    /// Host: bytes (messages) written to the process's end, and how many
    /// of them it was last said to have read.
    written: u64,
    reported: u64,
}

impl Relay {
    /// A relayed connection (not a descriptor of the process: its key is
    /// negative, see `accept.rs`).
    fn is_connection(&self) -> bool {
        self.fd < 0
    }

    /// Peeked and not yet taken: what is still in the socket is not all
    /// new, so it is looked at on ticks instead of polled.
    fn outstanding(&self) -> bool {
        self.peeking && self.peeked > self.taken
    }

    fn wanted_events(&self) -> i16 {
        let mut events = 0;
        if self.reads && !self.read_done && !self.outstanding() {
            events |= libc::POLLIN;
        }
        if self.has_pending() {
            events |= libc::POLLOUT;
        }
        events
    }

    /// Something from the other side is still to be written.
    fn has_pending(&self) -> bool {
        !self.pending.is_empty() || !self.pending_messages.is_empty()
    }

    fn finished(&self) -> bool {
        self.read_done && self.peer_done && !self.has_pending()
    }
}

/// What the owner of the relays must do besides sending messages.
#[derive(Debug, PartialEq, Eq)]
pub enum RelayEvent {
    /// A pipe the process wrote to was closed on the other side: close the
    /// process's own descriptor too, so the reader sees end of file.
    CloseInProcess(i32),
}

#[derive(Default)]
pub struct Relays {
    pub list: Vec<Relay>,
}

impl Relays {
    /// Relay `end` for descriptor `fd`: `reads` if bytes flow out of it,
    /// `writes` if bytes from the other side go into it.
    pub fn add(&mut self, fd: i32, end: OwnedFd, reads: bool, writes: bool) {
        let is_socket = std::fs::read_link(format!("/proc/self/fd/{}", end.as_raw_fd()))
            .is_ok_and(|p| p.to_string_lossy().starts_with("socket:"));
        let kind = if is_socket {
            crate::ptrace::socket_domain_and_type(end.as_fd()).map_or(libc::SOCK_STREAM, |d| d.1)
        } else {
            libc::SOCK_STREAM
        };
        self.list.push(Relay {
            fd,
            end: File::from(end),
            reads,
            writes,
            pending: VecDeque::new(),
            messages: kind == libc::SOCK_DGRAM || kind == libc::SOCK_SEQPACKET,
            datagram: kind == libc::SOCK_DGRAM,
            pending_messages: VecDeque::new(),
            shut_after_pending: false,
            read_done: false,
            peer_done: false,
            is_socket,
            peeking: false,
            peeked: 0,
            taken: 0,
            theirs: None,
            written: 0,
            reported: 0,
        });
    }

    /// Deputy: peek socket `fd`'s bytes instead of taking them (see
    /// `Relay::peeking`); stays as it is where the socket cannot.
    pub fn peek_socket(&mut self, fd: i32) {
        if let Some(r) = self
            .list
            .iter_mut()
            .find(|r| r.fd == fd && r.reads && r.is_socket)
        {
            r.peeking = crate::ptrace::set_peek_offset(r.end.as_fd(), 0).is_ok();
        }
    }

    /// Host: tell the deputy how much of what is written to `fd` the
    /// process reads (`theirs`: its end).
    pub fn report_reads(&mut self, fd: i32, theirs: OwnedFd) {
        if let Some(r) = self.list.iter_mut().find(|r| r.fd == fd && r.writes) {
            r.theirs = Some(theirs);
        }
    }

    /// Whether `tick` has something to look at.
    pub fn needs_ticks(&self) -> bool {
        self.list.iter().any(|r| {
            (r.outstanding() && !r.read_done && !r.messages)
                || (r.theirs.is_some() && r.written > r.reported)
        })
    }

    /// Deputy: new bytes behind those peeked (not polled, see
    /// `outstanding`). Host: how much the process has read, told.
    pub fn tick(&mut self, out: &mut Vec<AgentMsg>) {
        for r in &mut self.list {
            if r.outstanding() && !r.read_done && !r.messages {
                read_some(r, out);
            }
            if let Some(theirs) = &r.theirs {
                let unread = if r.messages {
                    // One message at a time: read once no longer readable.
                    u64::from(readable_now(theirs.as_fd()))
                } else {
                    crate::ptrace::unread_bytes(theirs.as_fd()).unwrap_or(0) as u64
                };
                let read = r.written.saturating_sub(unread);
                if read > r.reported {
                    r.reported = read;
                    out.push(AgentMsg::Consumed {
                        fd: r.fd,
                        total: read,
                    });
                }
            }
        }
    }

    /// Deputy: the process has read `total` bytes of `fd`: take them.
    pub fn on_consumed(&mut self, fd: i32, total: u64) {
        let Some(r) = self.list.iter_mut().find(|r| r.fd == fd && r.peeking) else {
            return;
        };
        let total = total.min(r.peeked);
        while r.messages && r.taken < total {
            match crate::ptrace::take_message(r.end.as_fd(), MOST_MESSAGE) {
                Ok(Some(_)) => r.taken += 1,
                _ => {
                    tracing::warn!(fd, "a message the process read is no longer in its socket");
                    r.taken = total;
                }
            }
        }
        while r.taken < total {
            let want = (total - r.taken).min(CHUNK as u64) as usize;
            match crate::ptrace::take_queued(r.end.as_fd(), want) {
                Ok(got) if !got.is_empty() => r.taken += got.len() as u64,
                _ => {
                    tracing::warn!(fd, "bytes the process read are no longer in its socket");
                    r.taken = total;
                }
            }
        }
    }

    /// Deputy, the process back home: its sockets are its own again.
    pub fn stop_peeking(&mut self) {
        for r in self.list.iter_mut().filter(|r| r.peeking) {
            let _ = crate::ptrace::set_peek_offset(r.end.as_fd(), -1);
            r.peeking = false;
        }
    }

    /// (descriptor, poll events) for every relay that has something to do
    /// (one that has not would wake the poll for ever with POLLHUP).
    pub fn poll_set(&self) -> Vec<(BorrowedFd<'_>, i16)> {
        self.list
            .iter()
            .filter(|r| r.wanted_events() != 0)
            .map(|r| (r.end.as_fd(), r.wanted_events()))
            .collect()
    }

    /// After a poll: read what came in (as messages for the other side) and
    /// write what can be written. `revents` is in `poll_set` order (the
    /// relays are as they were when it was made).
    pub fn service(&mut self, revents: &[i16], out: &mut Vec<AgentMsg>) -> Vec<RelayEvent> {
        let mut events = Vec::new();
        let polled = self.list.iter_mut().filter(|r| r.wanted_events() != 0);
        for (r, &rev) in polled.zip(revents) {
            if rev == 0 {
                continue;
            }
            if r.reads && !r.read_done && rev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
            {
                read_some(r, out);
            }
            if r.has_pending() && rev & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) != 0 {
                write_some(r);
            }
            if !r.has_pending() && r.shut_after_pending {
                r.shut_after_pending = false;
                events.extend(shut(r));
            }
        }
        // Connections done both ways are forgotten (closed).
        self.list.retain(|r| !(r.is_connection() && r.finished()));
        events
    }

    /// Whether every relayed connection is over both ways (then the
    /// process closes its side, as it has seen both ends shut).
    pub fn connections_over(&self) -> bool {
        !self.list.iter().any(|r| r.is_connection())
    }

    /// A message from the other side.
    pub fn on_message(&mut self, msg: AgentMsg) -> Vec<RelayEvent> {
        let (fd, data, is_shut) = match msg {
            AgentMsg::Data { fd, bytes } => (fd, bytes, false),
            AgentMsg::Shut { fd } => (fd, Vec::new(), true),
            _ => return Vec::new(),
        };
        let Some(r) = self.list.iter_mut().find(|r| r.fd == fd && r.writes) else {
            tracing::warn!(fd, "relay data for a descriptor that takes none");
            return Vec::new();
        };
        if r.messages {
            if !is_shut {
                // An empty datagram is a message too.
                r.pending_messages.push_back(data);
            }
        } else {
            r.pending.extend(data);
        }
        if is_shut {
            r.shut_after_pending = true;
        }
        if !r.has_pending() && r.shut_after_pending {
            r.shut_after_pending = false;
            return shut(r);
        }
        Vec::new()
    }

    /// Stop relaying `fd` (its descriptor was closed in the process).
    pub fn remove(&mut self, fd: i32) {
        self.list.retain(|r| r.fd != fd);
    }

    /// Host, the process stopped to go home: the bytes it has not read
    /// yet, per relayed descriptor it reads (those in its end, `pid`'s
    /// descriptor, then those still to be written there), taken out.
    pub fn take_unread(&mut self, pid: i32) -> Vec<(i32, Vec<u8>)> {
        let mut unread = Vec::new();
        for r in self
            .list
            .iter_mut()
            .filter(|r| r.writes && !r.is_connection())
        {
            if r.messages {
                // Those it has not read are still in the socket at home
                // (peeked), and a return that fails finds them here.
                continue;
            }
            let mut bytes = Vec::new();
            if let Ok(theirs) = crate::ptrace::take_fd(pid, r.fd as u64) {
                while let Ok(chunk) = crate::ptrace::take_queued(theirs.as_fd(), CHUNK) {
                    if chunk.is_empty() {
                        break;
                    }
                    bytes.extend(chunk);
                }
            }
            bytes.extend(r.pending.drain(..));
            if !bytes.is_empty() {
                unread.push((r.fd, bytes));
            }
        }
        unread
    }

    /// Host, the return failed: the process reads `bytes` first again.
    pub fn put_back(&mut self, fd: i32, bytes: Vec<u8>) {
        if let Some(r) = self.list.iter_mut().find(|r| r.fd == fd && r.writes) {
            let later: Vec<u8> = r.pending.drain(..).collect();
            r.pending.extend(bytes);
            r.pending.extend(later);
        }
    }

    /// Deputy, the process back home: `bytes` it had not read go back in
    /// front of what its pipe holds now (read out and written again after
    /// them, through a write end opened on the pipe). A socket cannot take
    /// bytes back: how many were lost is returned.
    pub fn give_back(&mut self, fd: i32, bytes: &[u8]) -> usize {
        let Some(r) = self.list.iter_mut().find(|r| r.fd == fd && r.reads) else {
            return bytes.len();
        };
        if r.is_socket {
            return bytes.len();
        }
        let mut all = bytes.to_vec();
        while readable_now(r.end.as_fd()) {
            let mut buf = vec![0u8; CHUNK];
            match (&r.end).read(&mut buf) {
                Ok(n) if n > 0 => all.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        let writer = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(format!("/proc/self/fd/{}", r.end.as_raw_fd()));
        let Ok(mut writer) = writer else {
            return bytes.len();
        };
        if let Err(e) = crate::ptrace::grow_pipe(writer.as_fd(), all.len()) {
            tracing::warn!(fd, "making room in a pipe: {e}");
        }
        match writer.write_all(&all) {
            Ok(()) => 0,
            Err(e) => {
                tracing::warn!(fd, "giving a pipe its bytes back: {e}");
                bytes.len()
            }
        }
    }

    /// Everything readable right now, without waiting (before a move).
    pub fn drain(&mut self, out: &mut Vec<AgentMsg>) {
        for r in self.list.iter_mut().filter(|r| r.reads && !r.read_done) {
            while readable_now(r.end.as_fd()) && !r.read_done {
                if !read_some(r, out) {
                    break;
                }
            }
        }
    }

    /// Write everything pending, waiting up to `limit` in all.
    pub fn flush(&mut self, limit: std::time::Duration) -> Vec<RelayEvent> {
        let deadline = std::time::Instant::now() + limit;
        let mut events = Vec::new();
        for r in &mut self.list {
            while r.has_pending() && std::time::Instant::now() < deadline {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if crate::ptrace::writable_within(r.end.as_fd(), left).unwrap_or(false) {
                    write_some(r);
                }
            }
            if !r.has_pending() && r.shut_after_pending {
                r.shut_after_pending = false;
                events.extend(shut(r));
            }
        }
        events
    }
}

/// Whether socket `fd`'s peer shut its side or went (POLLRDHUP).
fn peer_shut(fd: BorrowedFd<'_>) -> bool {
    crate::ptrace::wait_ready_within(&[(fd, libc::POLLRDHUP)], Some(std::time::Duration::ZERO))
        .is_ok_and(|r| {
            r.first()
                .is_some_and(|e| e & (libc::POLLRDHUP | libc::POLLHUP) != 0)
        })
}

fn readable_now(fd: BorrowedFd<'_>) -> bool {
    crate::ptrace::readable_within(fd, std::time::Duration::ZERO).unwrap_or(false)
}

/// One read; false when nothing more will come from it.
fn read_some(r: &mut Relay, out: &mut Vec<AgentMsg>) -> bool {
    if r.messages {
        return read_message(r, out);
    }
    if r.peeking {
        return match crate::ptrace::peek_next(r.end.as_fd(), CHUNK) {
            Ok(None) => true,
            Ok(Some(bytes)) if !bytes.is_empty() => {
                r.peeked += bytes.len() as u64;
                out.push(AgentMsg::Data { fd: r.fd, bytes });
                true
            }
            Ok(Some(_)) | Err(_) => {
                r.read_done = true;
                out.push(AgentMsg::Shut { fd: r.fd });
                false
            }
        };
    }
    let mut buf = vec![0u8; CHUNK];
    match (&r.end).read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => true,
        Ok(0) | Err(_) => {
            r.read_done = true;
            out.push(AgentMsg::Shut { fd: r.fd });
            false
        }
        Ok(n) => {
            buf.truncate(n);
            out.push(AgentMsg::Data {
                fd: r.fd,
                bytes: buf,
            });
            true
        }
    }
}

/// One message; false when nothing more will come from it (a seqpacket
/// peer's end; a datagram socket has none).
fn read_message(r: &mut Relay, out: &mut Vec<AgentMsg>) -> bool {
    // Without waiting: the deputy's duplicate shares the process's file,
    // whose O_NONBLOCK is the process's.
    let got = if r.peeking {
        crate::ptrace::peek_next(r.end.as_fd(), MOST_MESSAGE)
    } else {
        crate::ptrace::take_message(r.end.as_fd(), MOST_MESSAGE)
    };
    if r.peeking && matches!(got, Ok(Some(_))) {
        r.peeked += 1;
    }
    match got {
        Ok(None) => true,
        // Nothing read from a seqpacket socket: its end, or an empty
        // message while its peer is still there.
        Ok(Some(bytes)) if bytes.is_empty() && !r.datagram && peer_shut(r.end.as_fd()) => {
            r.read_done = true;
            out.push(AgentMsg::Shut { fd: r.fd });
            false
        }
        Ok(Some(mut bytes)) => {
            // Read into room for the longest: keep only what it holds.
            bytes.shrink_to_fit();
            out.push(AgentMsg::Data { fd: r.fd, bytes });
            true
        }
        // A datagram socket's error (a refused send) is reported once.
        Err(e) if r.datagram => {
            tracing::debug!(fd = r.fd, "relayed datagram socket: {e}");
            true
        }
        Err(_) => {
            r.read_done = true;
            out.push(AgentMsg::Shut { fd: r.fd });
            false
        }
    }
}

fn write_some(r: &mut Relay) {
    if r.messages {
        let Some(message) = r.pending_messages.front() else {
            return;
        };
        match crate::ptrace::send_message(r.end.as_fd(), message) {
            Ok(_) => {
                r.written += 1;
                r.pending_messages.pop_front();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                // Refused (no reader, too long): this one goes nowhere.
                tracing::debug!(fd = r.fd, "relayed message: {e}");
                r.pending_messages.pop_front();
            }
        }
        return;
    }
    let step: Vec<u8> = r.pending.iter().take(WRITE_STEP).copied().collect();
    match (&r.end).write(&step) {
        Ok(n) => {
            r.pending.drain(..n);
            r.written += n as u64;
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Err(e) => {
            // The reader is gone (EPIPE): what is left can go nowhere.
            tracing::debug!(fd = r.fd, "relay write: {e}");
            r.pending.clear();
        }
    }
}

fn shut(r: &mut Relay) -> Vec<RelayEvent> {
    r.peer_done = true;
    if r.is_socket {
        if let Err(e) = crate::ptrace::shutdown_write(r.end.as_fd()) {
            tracing::debug!(fd = r.fd, "relay shutdown: {e}");
        }
        Vec::new()
    } else {
        vec![RelayEvent::CloseInProcess(r.fd)]
    }
}
