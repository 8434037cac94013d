//! A migrator's own connection to a node's daemon (plain blocking calls of
//! the local protocol in `dsm::wire`).

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use dsm::fdpass;
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
        let frame = wire::encode_client(id, req);
        let sock = self.stream.as_raw_fd();
        let mut fds: Vec<i32> = fd.iter().map(|f| f.as_raw_fd()).collect();
        let mut sent = 0;
        while sent < frame.len() {
            sent += fdpass::send_with_fds(sock, &frame[sent..], &fds)?;
            fds.clear();
        }
        let mut buf = Vec::new();
        let mut received = Vec::new();
        loop {
            if let Some(len) =
                wire::client_frame_len(&buf).map_err(|e| MigrateError::Daemon(e.to_string()))?
            {
                if buf.len() >= len {
                    let (reply_id, reply): (u64, ClientReply) =
                        wire::decode_client(&buf[4..len])
                            .map_err(|e| MigrateError::Daemon(e.to_string()))?;
                    if reply_id != id {
                        return Err(protocol(reply_id));
                    }
                    return Ok((reply, received.pop()));
                }
            }
            let mut chunk = [0u8; 16384];
            let n = fdpass::recv_with_fds(sock, &mut chunk, &mut received)?;
            if n == 0 {
                return Err(MigrateError::Daemon(
                    "the daemon closed the connection".into(),
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
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

    /// The node's memfd of segment `id`, counted as attached by this
    /// connection until it closes.
    pub fn segment_memfd(&mut self, id: i32, readonly: bool) -> Result<OwnedFd, MigrateError> {
        match self.call(&ClientRequest::ShmAttachForMigration { id, readonly }, None)? {
            (ClientReply::Attached { .. }, Some(fd)) => Ok(fd),
            (other, _) => Err(MigrateError::Daemon(format!("segment {id}: {other:?}"))),
        }
    }
}
