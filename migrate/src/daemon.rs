//! A migrator's own connection to a node's daemon (plain blocking calls of
//! the local protocol in `dsm::wire`).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use dsm::wire::{self, ClientReply, ClientRequest};

use crate::MigrateError;

const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub struct DaemonConn {
    stream: UnixStream,
    next_id: u64,
}

fn protocol(what: impl std::fmt::Debug) -> MigrateError {
    MigrateError::Daemon(format!("unexpected answer: {what:?}"))
}

impl DaemonConn {
    pub fn connect(socket: &Path) -> Result<DaemonConn, MigrateError> {
        let stream = UnixStream::connect(socket)
            .map_err(|e| MigrateError::Daemon(format!("{}: {e}", socket.display())))?;
        DaemonConn::over(stream)
    }

    /// Speak the protocol over an existing connection (one a process being
    /// restored opened, so that the daemon takes it for that process's).
    pub fn over(stream: UnixStream) -> Result<DaemonConn, MigrateError> {
        DaemonConn::over_as(stream, None)
    }

    /// `over`, telling the daemon what a later migrator needs to find the
    /// process's client library (see `dsm::wire::ClientLink`).
    pub fn over_as(
        stream: UnixStream,
        link: Option<dsm::wire::ClientLink>,
    ) -> Result<DaemonConn, MigrateError> {
        stream.set_read_timeout(Some(CALL_TIMEOUT))?;
        stream.set_write_timeout(Some(CALL_TIMEOUT))?;
        let mut conn = DaemonConn { stream, next_id: 1 };
        match conn.call(
            &ClientRequest::Hello {
                version: wire::PROTOCOL_VERSION,
                link,
            },
            None,
        )? {
            (ClientReply::Welcome { .. }, _) => Ok(conn),
            (other, _) => Err(protocol(other)),
        }
    }

    pub fn call(
        &mut self,
        req: &ClientRequest,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(ClientReply, Option<OwnedFd>), MigrateError> {
        let id = self.next_id;
        self.next_id += 1;
        dsm::client::exchange(self.stream.as_fd(), id, req, fd).map_err(|e| match e {
            dsm::client::Error::Io(io) => MigrateError::Io(io),
            other => MigrateError::Daemon(other.to_string()),
        })
    }

    /// A call answered `Ok`.
    pub fn call_ok(
        &mut self,
        req: &ClientRequest,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), MigrateError> {
        match self.call(req, fd)?.0 {
            ClientReply::Ok => Ok(()),
            ClientReply::Err(e) => Err(MigrateError::Daemon(format!(
                "{req:?}: {}",
                std::io::Error::from_raw_os_error(e)
            ))),
            other => Err(protocol(other)),
        }
    }

    pub fn process_info(&mut self, pid: i32) -> Result<wire::ProcessInfo, MigrateError> {
        match self.call(&ClientRequest::ProcessInfo { pid }, None)?.0 {
            ClientReply::ProcessInfo(info) => Ok(info),
            other => Err(protocol(other)),
        }
    }

    /// End every `semop` of local process `pid` that waits (each answered
    /// `Withdrawn` to the process, or with the outcome it had reached);
    /// how many waited.
    pub fn withdraw_waits(&mut self, pid: i32) -> Result<usize, MigrateError> {
        match self.call(&ClientRequest::WithdrawWaits { pid }, None)?.0 {
            ClientReply::Value(n) => Ok(n.max(0) as usize),
            other => Err(protocol(other)),
        }
    }

    /// The node's memfd of segment `id`, counted as attached by this
    /// connection until it closes.
    pub fn segment_memfd(&mut self, id: i32, readonly: bool) -> Result<OwnedFd, MigrateError> {
        match self.call(&ClientRequest::ShmAttachForMigration { id, readonly }, None)? {
            (ClientReply::Attached { .. }, Some(fd)) => Ok(fd),
            (other, _) => Err(MigrateError::Daemon(format!("segment {id}: {other:?}"))),
        }
    }
}
