//! The connection between a migrated process's deputy (on its home node)
//! and its host (on the node it runs on): length-prefixed postcard
//! messages over TCP, opened with a one-time token the two daemons agreed
//! on over their authenticated link.

use std::io::{Read, Write};
use std::net::TcpStream;

use serde::{Deserialize, Serialize};

use crate::MigrateError;

/// Largest message: an image of 4 GiB of private memory.
const MESSAGE_MAX: u64 = 4 << 30;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMsg {
    /// Deputy → host, first: the token the daemons agreed on, and what to
    /// start for the process while it is checkpointed.
    Hello {
        token: u128,
        shell: crate::restore::ShellSpec,
    },
    /// A checkpoint (postcard `Image`): deputy → host to move the process
    /// there, host → deputy to bring it home.
    Image(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Host → deputy: the process is rebuilt here under this pid, stopped
    /// until the deputy answers `Go` (it never runs beside its home copy).
    Running {
        pid: i32,
    },
    /// Deputy → host: the home process is parked for good; let the copy run.
    Go,
    /// Either way: the step asked for failed; the process runs where it ran.
    Failed(String),
    /// Deputy → host: a signal sent to the process's home pid.
    Signal(i32),
    /// Deputy → host: the same, with the `siginfo_t` it came with (a
    /// `sigqueue` value, its sender), to be queued as it was.
    SignalInfo(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Host → deputy: the process ended with this status.
    Exited(i32),
    /// Host → deputy: the process was killed by this signal.
    Killed(i32),
    /// Deputy → host: checkpoint the process and send it home.
    ComeHome,
    /// Deputy → host: the process runs at home again; end the copy here.
    HomeOk,
    /// Either way: bytes for relayed descriptor `fd` (its number in the
    /// process).
    Data {
        fd: i32,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Either way: no more bytes will come for relayed descriptor `fd`.
    Shut {
        fd: i32,
    },
    /// Host → deputy: the process faulted on pages that stayed behind.
    PageRequest {
        addr: u64,
        len: u64,
    },
    /// Deputy → host: pages that stayed behind (asked for, or streamed).
    Pages {
        addr: u64,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Deputy → host: every page that stayed behind has been sent.
    PushDone,
    /// Host → deputy: the process waits for a connection on listener `fd`:
    /// accept one for it.
    Want {
        fd: i32,
    },
    /// Deputy → host, before `ComeHome`: no more connections come (the
    /// deputy accepts none from now on); answer `Quiet` once the process
    /// has taken every one it was given and closed them all, or `Failed`.
    Quiesce,
    Quiet,
    /// Deputy → host: a connection accepted from listener `fd`, relayed as
    /// `conn` (a relay key below every descriptor number) from now on.
    Accepted {
        fd: i32,
        conn: i32,
    },
    /// Host → deputy: the process made call `id` on descriptor `fd` (a
    /// stand-in, or a reopened file's lock): carry it out at home
    /// (`forward.rs`). `by_process`: the process itself made it, not a
    /// child it started where it runs.
    Call {
        id: u64,
        fd: i32,
        by_process: bool,
        call: crate::forward::Call,
    },
    /// Deputy → host: what call `id` returned (a negative errno on
    /// failure) and the bytes it filled.
    CallDone {
        id: u64,
        result: i64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Host → deputy: call `id` is no longer waited for (its caller got a
    /// signal, or the process is going home).
    CancelCall {
        id: u64,
    },
    /// Deputy → host: the original of stand-in `fd` became readable, or
    /// stopped being so (the stand-in's `poll` readiness follows).
    Readable {
        fd: i32,
        readable: bool,
    },
    /// Host → deputy: the process has read `total` bytes relayed to it on
    /// descriptor `fd` (a socket at home, whose bytes the deputy only
    /// peeks until then).
    Consumed {
        fd: i32,
        total: u64,
    },
    /// Host → deputy, before the image when the process goes home: bytes
    /// relayed toward relayed descriptor `fd` that the process has not
    /// read; they go back in front of what its pipe holds at home.
    Unread {
        fd: i32,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Host → deputy, before the image when the process goes home: bytes
    /// a given-up read took from stand-in `fd` and the process never got.
    Unclaimed {
        fd: i32,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
}

pub fn send(stream: &mut TcpStream, msg: &AgentMsg) -> Result<(), MigrateError> {
    let body = postcard::to_stdvec(msg).map_err(|e| MigrateError::Link(e.to_string()))?;
    stream.write_all(&(body.len() as u64).to_le_bytes())?;
    stream.write_all(&body)?;
    Ok(())
}

/// One report line of an agent (for dsmd, which reads them).
pub fn line(report: &mut dyn std::io::Write, text: &str) {
    let _ = writeln!(report, "{}", text.replace('\n', " "));
    let _ = report.flush();
}

/// Largest message before the token is checked.
pub const HELLO_MAX: u64 = 64 << 10;

pub fn receive(stream: &mut TcpStream) -> Result<AgentMsg, MigrateError> {
    receive_at_most(stream, MESSAGE_MAX)
}

/// `receive`, refusing a message longer than `max` before reading it.
pub fn receive_at_most(stream: &mut TcpStream, max: u64) -> Result<AgentMsg, MigrateError> {
    let mut len = [0u8; 8];
    stream.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > max {
        return Err(MigrateError::Link(format!("message of {len} bytes")));
    }
    let mut body = vec![0u8; len as usize];
    stream.read_exact(&mut body)?;
    postcard::from_bytes(&body).map_err(|e| MigrateError::Link(e.to_string()))
}
