//! Local processes: one task per unix-socket connection (one per process),
//! frames with descriptors alongside, and the request flows that span nodes.

use super::core::SharedCore;
use super::store::{MappingRecord, ProcId};
use crate::fdpass;
use crate::ids::{IpcId, IpcKey, IpcKind, NodeId, SegmentId, SemSetId, PAGE_SIZE};
use crate::pidfd;
use crate::sysv::{Credentials, IPC_CREAT, IPC_EXCL};
use crate::uffd::{self, Uffd};
use crate::wire::{
    self, AttachmentRecord, ClientReply, ClientRequest, Creation, NodeInfo, RpcRequest,
    RpcResponse, SemCtl, SemResult,
};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;
use sysv::sem::{SemBuf, SEM_UNDO};
use tokio::io::unix::AsyncFd;
use tokio::net::UnixListener;

pub async fn accept_loop(core: SharedCore, listener: UnixListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("accept on the local socket: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let core = core.clone();
        tokio::task::spawn_local(async move {
            let Ok(std_stream) = stream.into_std() else {
                return;
            };
            let cred = match fdpass::peer_credentials(&std_stream) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("no peer credentials: {e}");
                    return;
                }
            };
            use std::os::fd::AsFd;
            let pidfd = fdpass::peer_pidfd(std_stream.as_fd())
                .or_else(|_| pidfd::open(cred.pid))
                .ok();
            let Ok(fd) = fdpass::async_stream(std_stream) else {
                return;
            };
            let mut conn = Connection {
                fd,
                inbuf: Vec::new(),
                fds: VecDeque::new(),
                readbuf: vec![0u8; 16384].into_boxed_slice(),
            };
            let session_id = core.borrow_mut().new_session();
            let mut session = Session {
                core,
                pid: cred.pid,
                uid: cred.uid,
                gid: cred.gid,
                pidfd,
                proc: None,
                fault_task: None,
                session: 0,
                unmapped: vec![],
                cred_cache: None,
            };
            session.session = session_id;
            if let Err(e) = session.serve(&mut conn).await {
                tracing::debug!(pid = cred.pid, "client connection ended: {e}");
            }
            session.cleanup();
        });
    }
}

struct Connection {
    fd: AsyncFd<UnixStream>,
    inbuf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
    /// Where each read lands (zeroed once, not per read).
    readbuf: Box<[u8]>,
}

impl Connection {
    /// Next complete frame (id, request), or `None` at end of stream.
    async fn next(
        &mut self,
    ) -> std::io::Result<Option<(u64, Result<ClientRequest, wire::WireError>)>> {
        loop {
            if let Some(len) = wire::client_frame_len(&self.inbuf).map_err(std::io::Error::other)? {
                if self.inbuf.len() >= len {
                    let body: Vec<u8> = self.inbuf.drain(..len).skip(4).collect();
                    let decoded = wire::decode_client::<ClientRequest>(&body);
                    return Ok(Some(match decoded {
                        Ok((id, req)) => (id, Ok(req)),
                        Err(e) => (0, Err(e)),
                    }));
                }
            }
            let mut guard = self.fd.readable().await?;
            let mut fds = Vec::new();
            let buf = &mut self.readbuf;
            match guard.try_io(|s| fdpass::recv_with_fds(s.get_ref().as_raw_fd(), buf, &mut fds)) {
                Ok(Ok(0)) => return Ok(None),
                Ok(Ok(n)) => self.inbuf.extend_from_slice(&self.readbuf[..n]),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
            self.fds.extend(fds);
            if self.fds.len() > fdpass::MAX_FDS {
                return Err(std::io::Error::other(
                    "client sent descriptors it was not asked for",
                ));
            }
        }
    }

    async fn send(
        &mut self,
        id: u64,
        reply: &ClientReply,
        fd: Option<&OwnedFd>,
    ) -> std::io::Result<()> {
        let frame = wire::encode_client(id, reply);
        let mut sent = 0;
        let mut fds: Vec<i32> = fd.iter().map(|f| f.as_raw_fd()).collect();
        while sent < frame.len() {
            let mut guard = self.fd.writable().await?;
            match guard
                .try_io(|s| fdpass::send_with_fds(s.get_ref().as_raw_fd(), &frame[sent..], &fds))
            {
                Ok(Ok(n)) => {
                    sent += n;
                    fds.clear();
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

/// What the daemon knows about one connected process.
struct Session {
    core: SharedCore,
    pid: i32,
    uid: u32,
    gid: u32,
    /// The process, as the kernel knew it when it connected.
    pidfd: Option<OwnedFd>,
    proc: Option<ProcId>,
    fault_task: Option<tokio::task::AbortHandle>,
    /// This connection's key in the daemon's table of attachments counted
    /// at their homes (`Core::attachments`).
    session: u64,
    /// Attaches answered but not yet mapped (each allows one `ShmMapped`).
    unmapped: Vec<SegmentId>,
    /// Credentials last read for a `semop` (see [`Session::semop_cred`]).
    cred_cache: Option<Credentials>,
}

/// The `withdrawn` mark of a `semop` a migrator withdrew (not an errno).
const MIGRATING: i32 = -1;

fn errno_of(r: RpcResponse) -> i32 {
    match r {
        RpcResponse::Err(e) => e,
        other => {
            tracing::warn!(?other, "unexpected RPC response");
            libc::EPROTO
        }
    }
}

impl Session {
    fn cred(&self) -> Credentials {
        Credentials::of_process(self.pid, self.uid, self.gid)
    }

    async fn rpc(&self, to: crate::ids::NodeId, req: RpcRequest) -> RpcResponse {
        let (rx, timeout) = {
            let mut core = self.core.borrow_mut();
            (core.start_rpc(to, req), core.rpc_timeout)
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => RpcResponse::Err(libc::EHOSTDOWN),
            Err(_) => RpcResponse::Err(libc::ETIMEDOUT),
        }
    }

    async fn serve(&mut self, conn: &mut Connection) -> std::io::Result<()> {
        while let Some((id, req)) = conn.next().await? {
            self.core.borrow_mut().wakeups.event();
            let req = match req {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(pid = self.pid, "malformed request, closing: {e}");
                    conn.send(0, &ClientReply::Err(libc::EBADMSG), None).await?;
                    return Ok(());
                }
            };
            match req {
                ClientRequest::SemOp {
                    id: set,
                    sops,
                    timeout_ns,
                    euid,
                    egid,
                } => {
                    conn.fds.clear();
                    match self
                        .semop(conn, IpcId(set), sops, timeout_ns, euid, egid)
                        .await
                    {
                        Some(reply) => conn.send(id, &reply, None).await?,
                        None => return Ok(()),
                    }
                    continue;
                }
                // Nothing pending to withdraw (the op it meant already
                // ended): not answered, as no cancel is.
                ClientRequest::SemCancel => {
                    conn.fds.clear();
                    continue;
                }
                _ => {}
            }
            let (reply, fd) = self.handle(req, &mut conn.fds).await;
            // Descriptors belong to the request they came with: any the
            // request did not take are closed, never handed to a later one.
            conn.fds.clear();
            conn.send(id, &reply, fd.as_ref()).await?;
        }
        Ok(())
    }

    async fn handle(
        &mut self,
        req: ClientRequest,
        fds: &mut VecDeque<OwnedFd>,
    ) -> (ClientReply, Option<OwnedFd>) {
        let reply = match req {
            ClientRequest::Hello { version, link } => {
                if version != wire::PROTOCOL_VERSION {
                    ClientReply::Err(libc::EPROTONOSUPPORT)
                } else {
                    if let Some(link) = link {
                        let mut core = self.core.borrow_mut();
                        core.links.insert(self.session, (self.pid, link));
                        // A process it serves runs on its CPUs (a guest
                        // restored here, or one started under omrun); a
                        // program using the library (which may talk to
                        // several nodes) is left where it runs.
                        let served = core.migrations.guest(self.pid).is_some()
                            || core.placement.under_omrun(self.pid);
                        if core.cpus_given && served {
                            if let Err(e) = super::load::pin(self.pid, &core.cpus) {
                                tracing::warn!(
                                    pid = self.pid,
                                    "keeping it on this node's CPUs: {e}"
                                );
                            }
                        }
                    }
                    let core = self.core.borrow();
                    ClientReply::Welcome {
                        node: core.me,
                        version: wire::PROTOCOL_VERSION,
                        cpus: if core.cpus_given {
                            core.cpus.iter().map(|&c| c as u16).collect()
                        } else {
                            Vec::new()
                        },
                    }
                }
            }
            ClientRequest::ShmGet {
                key,
                size,
                flags,
                home,
                space,
            } => match self.shmget(key, size, flags, home, space).await {
                Ok(id) => ClientReply::ShmId(id.0),
                Err(e) => ClientReply::Err(e),
            },
            ClientRequest::ShmAttach { id, readonly } => {
                return self.attach(IpcId(id), readonly, false).await
            }
            ClientRequest::ShmAttachForMigration { id, readonly } => {
                if self.uid != 0 {
                    return (ClientReply::Err(libc::EPERM), None);
                }
                return self.attach(IpcId(id), readonly, true).await;
            }
            ClientRequest::ShmMapped {
                id,
                addr,
                len,
                readonly,
                with_uffd,
                handle,
            } => {
                let uffd = if with_uffd { fds.pop_front() } else { None };
                match self.mapped(IpcId(id), addr, len, readonly, uffd, handle) {
                    Ok(()) => ClientReply::Ok,
                    Err(e) => {
                        // The process holds no usable mapping: uncount it.
                        self.undo_attach(IpcId(id)).await;
                        ClientReply::Err(e)
                    }
                }
            }
            ClientRequest::ShmDetach { id, handle } => self.detach(IpcId(id), handle).await,
            ClientRequest::ShmViews { id, handle, views } => {
                self.set_views(IpcId(id), handle, views).await
            }
            ClientRequest::ShmMemfd { id } => {
                let fd = {
                    let core = self.core.borrow();
                    let has_it = self.proc.is_some_and(|p| {
                        core.store
                            .segments
                            .get(&IpcId(id))
                            .is_some_and(|s| s.mappings.iter().any(|m| m.proc == p))
                    });
                    has_it
                        .then(|| core.store.segments.get(&IpcId(id))?.memfd_dup().ok())
                        .flatten()
                };
                return match fd {
                    Some(fd) => (ClientReply::Ok, Some(fd)),
                    None => (ClientReply::Err(libc::EINVAL), None),
                };
            }
            ClientRequest::ShmStat { id } => {
                self.core.borrow_mut().flush_exited_processes();
                let req = RpcRequest::SegStat {
                    id: IpcId(id),
                    cred: self.cred(),
                };
                match self.ask_home(IpcId(id), req).await {
                    Ok(RpcResponse::Stat(s)) => ClientReply::Stat(s),
                    Ok(other) => ClientReply::Err(errno_of(other)),
                    Err(e) => ClientReply::Err(e),
                }
            }
            ClientRequest::ShmLock { id, lock } => {
                let req = RpcRequest::SegLock {
                    id: IpcId(id),
                    lock,
                    cred: self.cred(),
                    memlock: sysv::perm::memlock_limit(self.pid),
                };
                match self.ask_home(IpcId(id), req).await {
                    Ok(RpcResponse::Ok) => ClientReply::Ok,
                    Ok(other) => ClientReply::Err(errno_of(other)),
                    Err(e) => ClientReply::Err(e),
                }
            }
            ClientRequest::ShmSet { id, uid, gid, mode } => {
                let req = RpcRequest::SegSet {
                    id: IpcId(id),
                    cred: self.cred(),
                    uid,
                    gid,
                    mode,
                };
                match self.ask_home(IpcId(id), req).await {
                    Ok(RpcResponse::Ok) => ClientReply::Ok,
                    Ok(other) => ClientReply::Err(errno_of(other)),
                    Err(e) => ClientReply::Err(e),
                }
            }
            ClientRequest::ShmRemove { id } => {
                let req = RpcRequest::SegRemove {
                    id: IpcId(id),
                    cred: self.cred(),
                };
                self.remove(IpcKind::Segment, IpcId(id), req).await
            }
            ClientRequest::SemGet {
                key,
                nsems,
                flags,
                home,
            } => match self.semget(key, nsems, flags, home).await {
                Ok(id) => ClientReply::SemId(id.0),
                Err(e) => ClientReply::Err(e),
            },
            ClientRequest::SemCtl {
                id,
                cmd: SemCtl::Remove,
            } => {
                self.core.borrow_mut().flush_exited_processes();
                let req = RpcRequest::SemCtl {
                    id: IpcId(id),
                    cred: self.cred(),
                    cmd: SemCtl::Remove,
                };
                self.remove(IpcKind::SemSet, IpcId(id), req).await
            }
            ClientRequest::SemCtl { id, cmd } => {
                self.core.borrow_mut().flush_exited_processes();
                let req = RpcRequest::SemCtl {
                    id: IpcId(id),
                    cred: self.cred(),
                    cmd,
                };
                match self.ask_sem_home(IpcId(id), req).await {
                    Ok(RpcResponse::Ok) => ClientReply::Ok,
                    Ok(RpcResponse::Value(v)) => ClientReply::Value(v),
                    Ok(RpcResponse::Values(v)) => ClientReply::Values(v),
                    Ok(RpcResponse::SemStat(s)) => ClientReply::SemStat(s),
                    Ok(other) => ClientReply::Err(errno_of(other)),
                    Err(e) => ClientReply::Err(e),
                }
            }
            ClientRequest::Reclaim => {
                // The process lost its connection (it closed it) but is
                // still served: this connection takes that state over.
                let orphan = self.core.borrow_mut().orphans.remove(&self.pid);
                match orphan {
                    Some(o) if self.proc.is_none() => {
                        let mut core = self.core.borrow_mut();
                        let link = core.links.remove(&self.session);
                        core.session_ended(self.session);
                        if let Some(link) = link {
                            core.links.insert(o.session, link);
                        }
                        drop(core);
                        self.proc = o.proc;
                        self.fault_task = o.fault_task;
                        self.session = o.session;
                        ClientReply::Ok
                    }
                    Some(o) => {
                        self.core.borrow_mut().orphans.insert(self.pid, o);
                        ClientReply::Err(libc::EINVAL)
                    }
                    None => ClientReply::Err(libc::ENOENT),
                }
            }
            ClientRequest::UffdDevice => {
                // Lets an unprivileged process that attaches segments make
                // the userfaultfd that syscalls into a segment need (as
                // vm.unprivileged_userfaultfd=1 would, for it alone).
                return match std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open("/dev/userfaultfd")
                {
                    Ok(f) => (ClientReply::Ok, Some(OwnedFd::from(f))),
                    Err(e) => (
                        ClientReply::Err(e.raw_os_error().unwrap_or(libc::ENOENT)),
                        None,
                    ),
                };
            }
            ClientRequest::SemRegion { id } => {
                // A process that moved here operates as its home process:
                // the fast path (which knows local pids only) is not for it.
                if self.core.borrow().migrations.guest(self.pid).is_some() {
                    return (ClientReply::Err(libc::ENOENT), None);
                }
                let found = self.core.borrow().sem_region_fd(IpcId(id), &self.cred());
                return match found {
                    Ok(fd) => (ClientReply::Ok, Some(fd)),
                    Err(e) => (ClientReply::Err(e), None),
                };
            }
            ClientRequest::SemIpcs => {
                let mut all = Vec::new();
                for reply in self.ask_every_live_node(RpcRequest::SemList).await {
                    if let RpcResponse::SemSets(list) = reply {
                        all.extend(list);
                    }
                }
                all.sort_by_key(|s| s.id);
                ClientReply::SemSets(all)
            }
            // Served by `serve` itself: they involve the connection.
            ClientRequest::SemOp { .. } | ClientRequest::SemCancel => {
                ClientReply::Err(libc::EINVAL)
            }
            ClientRequest::Adopt { attachments } => match fds.pop_front() {
                Some(fd) => self.adopt(attachments, fd).await,
                None => ClientReply::Err(libc::EINVAL),
            },
            ClientRequest::Loads => ClientReply::Loads(self.core.borrow().loads()),
            ClientRequest::Nodes => {
                let core = self.core.borrow();
                let mut nodes = vec![NodeInfo {
                    node: core.me,
                    address: core.listen.to_string(),
                    up: true,
                    this_node: true,
                }];
                for (id, peer) in &core.peers {
                    nodes.push(NodeInfo {
                        node: *id,
                        address: peer.address.to_string(),
                        up: core.is_up(*id),
                        this_node: false,
                    });
                }
                nodes.sort_by_key(|n| n.node);
                ClientReply::Nodes(nodes)
            }
            ClientRequest::Ipcs => {
                self.core.borrow_mut().flush_exited_processes();
                let mut all = Vec::new();
                for reply in self.ask_every_live_node(RpcRequest::SegList).await {
                    if let RpcResponse::Segments(list) = reply {
                        all.extend(list);
                    }
                }
                all.sort_by_key(|s| s.id);
                ClientReply::Segments(all)
            }
            ClientRequest::Migrate { pid, to } => {
                super::migration::migrate(&self.core, self.uid, pid, to, wire::MoveCause::Hand)
                    .await
            }
            ClientRequest::Balance { .. } | ClientRequest::Block { .. } | ClientRequest::Expel
                if self.uid != 0 =>
            {
                ClientReply::Err(libc::EPERM)
            }
            ClientRequest::Balance { on } => {
                self.core.borrow_mut().placement.enabled = on;
                tracing::info!(on, "balancing");
                ClientReply::Ok
            }
            ClientRequest::Block { blocked } => {
                self.core.borrow_mut().placement.blocked = blocked;
                tracing::info!(blocked, "guests");
                ClientReply::Ok
            }
            ClientRequest::Expel => {
                let guests = {
                    let mut core = self.core.borrow_mut();
                    core.placement.blocked = true;
                    core.migrations.guest_list()
                };
                let mut sent = 0;
                for g in guests {
                    let reply = super::migration::migrate(
                        &self.core,
                        0,
                        g.home_pid,
                        None,
                        wire::MoveCause::Expelled,
                    )
                    .await;
                    match reply {
                        ClientReply::Ok => sent += 1,
                        other => {
                            tracing::warn!(home = ?g.home, pid = g.home_pid, "expel: {other:?}")
                        }
                    }
                }
                ClientReply::Value(sent)
            }
            ClientRequest::Lock { pid, locked } => {
                let home = self.core.borrow().migrations.home_of_guest(pid);
                let result = match home {
                    Some(home) => {
                        let req = RpcRequest::Lock {
                            uid: self.uid,
                            pid,
                            locked,
                        };
                        match self.rpc(home, req).await {
                            RpcResponse::Ok => Ok(()),
                            RpcResponse::Err(e) => Err(e),
                            _ => Err(libc::EPROTO),
                        }
                    }
                    None => self.core.borrow_mut().lock(self.uid, pid, locked),
                };
                match result {
                    Ok(()) => ClientReply::Ok,
                    Err(e) => ClientReply::Err(e),
                }
            }
            ClientRequest::Placements => {
                let mut all: Vec<wire::Placement> = Vec::new();
                let replies = self
                    .ask_every_live_node_by_node(RpcRequest::Placements)
                    .await;
                // A moved process is listed by its home and by the node it
                // runs on; the home's entry says why it moved, and wins.
                for (from, reply) in replies {
                    let RpcResponse::Placements(list) = reply else {
                        continue;
                    };
                    for p in list {
                        match all
                            .iter_mut()
                            .find(|a| a.home == p.home && a.home_pid == p.home_pid)
                        {
                            Some(known) if from == p.home => *known = p,
                            Some(_) => {}
                            None => all.push(p),
                        }
                    }
                }
                all.sort_by_key(|p| (p.home, p.home_pid));
                ClientReply::Placements(all)
            }
            ClientRequest::Top => {
                let nodes = self.core.borrow().loads();
                let mut moves = Vec::new();
                for reply in self.ask_every_live_node(RpcRequest::RecentMoves).await {
                    if let RpcResponse::Moves(list) = reply {
                        moves.extend(list);
                    }
                }
                moves.sort_by_key(|m| m.ago_ms);
                ClientReply::Top(wire::TopFrame { nodes, moves })
            }
            ClientRequest::MigrateCheck { pid } => {
                super::migration::check(&self.core, self.uid, pid).await
            }
            ClientRequest::Ps => {
                let mut all: Vec<wire::MigrationEntry> = Vec::new();
                for reply in self.ask_every_live_node(RpcRequest::Migrations).await {
                    if let RpcResponse::Migrations(list) = reply {
                        for e in list {
                            // Both ends report a move; list it once.
                            if !all
                                .iter()
                                .any(|a| a.home == e.home && a.home_pid == e.home_pid)
                            {
                                all.push(e);
                            }
                        }
                    }
                }
                all.sort_by_key(|e| (e.home, e.home_pid));
                ClientReply::Migrations(all)
            }
            ClientRequest::GrantAdopt { pid, attachments } => {
                if self.uid != 0 {
                    ClientReply::Err(libc::EPERM)
                } else {
                    self.core
                        .borrow_mut()
                        .adopt_grants
                        .insert(pid, (self.session, attachments));
                    ClientReply::Ok
                }
            }
            ClientRequest::WithdrawWaits { pid } => {
                if self.uid != 0 {
                    ClientReply::Err(libc::EPERM)
                } else {
                    ClientReply::Value(self.core.borrow().withdraw_waits(pid) as i32)
                }
            }
            ClientRequest::Guest { pid, token } => {
                let migrations = self.core.borrow().migrations.clone();
                if self.uid != 0 {
                    ClientReply::Err(libc::EPERM)
                } else if migrations.guest_of_host(pid, token) {
                    // With the userfaultfd through which its host serves
                    // the memory that stayed at home: held until it exits,
                    // so that the host's end never lets the kernel fill
                    // that memory with zeros (the copy dies first).
                    match fds.pop_front() {
                        Some(uffd) => match self.core.borrow_mut().hold_for_guest(pid, uffd) {
                            Ok(()) => ClientReply::Ok,
                            Err(e) => ClientReply::Err(e),
                        },
                        None => ClientReply::Ok,
                    }
                } else {
                    ClientReply::Err(libc::ENOENT)
                }
            }
            ClientRequest::ProcessInfo { pid } => {
                if self.uid != 0 {
                    ClientReply::Err(libc::EPERM)
                } else {
                    ClientReply::ProcessInfo(self.core.borrow().process_info(pid))
                }
            }
            ClientRequest::Status => {
                let replies = self.ask_every_live_node(RpcRequest::Status).await;
                ClientReply::Status(
                    replies
                        .into_iter()
                        .filter_map(|r| match r {
                            RpcResponse::Status(s) => Some(s),
                            _ => None,
                        })
                        .collect(),
                )
            }
        };
        (reply, None)
    }

    /// The same request to every node that is up (this one included), in
    /// member order; the answers of those that answered.
    async fn ask_every_live_node(&self, req: RpcRequest) -> Vec<RpcResponse> {
        self.ask_every_live_node_by_node(req)
            .await
            .into_iter()
            .map(|(_, r)| r)
            .collect()
    }

    /// [`Self::ask_every_live_node`], each answer with the node it came
    /// from.
    async fn ask_every_live_node_by_node(
        &self,
        req: RpcRequest,
    ) -> Vec<(crate::ids::NodeId, RpcResponse)> {
        let members = self.core.borrow().members.clone();
        let mut replies = Vec::new();
        for node in members {
            if self.core.borrow().is_up(node) {
                replies.push((node, self.rpc(node, req.clone()).await));
            }
        }
        replies
    }

    /// Send a request to the segment's home; an error answer becomes the
    /// errno (EIDRM once the home is known lost).
    async fn ask_home(&self, id: SegmentId, req: RpcRequest) -> Result<RpcResponse, i32> {
        let home = self.home_of(id)?;
        match self.rpc(home, req).await {
            RpcResponse::Err(e) => Err(self.lost_home_errno(id, e)),
            other => Ok(other),
        }
    }

    /// `semop`: sent to the set's home, answered when it ends. While it
    /// waits the connection may only withdraw it (`SemCancel`: EINTR); the
    /// timeout (EAGAIN) and the caller's going withdraw it too. A withdrawal
    /// never loses an operation the home already applied. `None`: the
    /// connection ended meanwhile.
    async fn semop(
        &mut self,
        conn: &mut Connection,
        id: SemSetId,
        sops: Vec<SemBuf>,
        timeout_ns: Option<u64>,
        euid: u32,
        egid: u32,
    ) -> Option<ClientReply> {
        if self.home_of(id).is_err() {
            return Some(ClientReply::Err(libc::EINVAL));
        }
        let mut cred = self.semop_cred(euid, egid);
        self.core.borrow_mut().flush_exited_processes();
        // A process that moved here operates as the process it is at home.
        let guest = self.core.borrow().migrations.guest(self.pid);
        let owner = match guest {
            Some((home, home_pid)) => {
                cred.pid = home_pid;
                home
            }
            None => self.core.borrow().me,
        };
        if sops.iter().any(|s| s.flags & SEM_UNDO != 0) {
            match self.watch_for_undo(id, guest).await {
                Ok(()) => {}
                // The process is gone and this frame outlived it: applying
                // it now would leave an adjustment nobody will ever undo.
                Err(None) => return None,
                Err(Some(errno)) => return Some(ClientReply::Err(errno)),
            }
        }
        let (wait, mut rx) = self.core.borrow_mut().sem_submit(id, sops, cred, owner);
        let withdraw = std::rc::Rc::new(tokio::sync::Notify::new());
        self.core
            .borrow_mut()
            .sem_waiting
            .insert(self.session, (self.pid, withdraw.clone()));
        let reply = self
            .await_semop(conn, id, wait, &mut rx, timeout_ns, &withdraw)
            .await;
        self.core.borrow_mut().sem_waiting.remove(&self.session);
        reply
    }

    /// The rest of [`Session::semop`]: wait for the outcome of `wait`,
    /// withdrawing it on a cancel, the timeout or a migrator's demand.
    async fn await_semop(
        &mut self,
        conn: &mut Connection,
        id: SemSetId,
        wait: u64,
        rx: &mut tokio::sync::oneshot::Receiver<SemResult>,
        timeout_ns: Option<u64>,
        withdraw: &tokio::sync::Notify,
    ) -> Option<ClientReply> {
        let never = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
        let deadline = timeout_ns.map(|ns| tokio::time::Instant::now() + Duration::from_nanos(ns));
        let timer = tokio::time::sleep_until(deadline.unwrap_or(never));
        tokio::pin!(timer);
        let mut withdrawn: Option<i32> = None;
        let mut connection_open = true;
        loop {
            tokio::select! {
                biased;
                result = &mut *rx => {
                    let reply = match result {
                        Ok(SemResult::Done) => ClientReply::Ok,
                        Ok(SemResult::Failed(e)) => ClientReply::Err(self.lost_home_errno(id, e)),
                        Ok(SemResult::Cancelled) if withdrawn == Some(MIGRATING) => {
                            ClientReply::Withdrawn
                        }
                        Ok(SemResult::Cancelled) => {
                            ClientReply::Err(withdrawn.unwrap_or(libc::EINTR))
                        }
                        Err(_) => ClientReply::Err(libc::EIDRM),
                    };
                    return connection_open.then_some(reply);
                }
                _ = withdraw.notified(), if withdrawn.is_none() => {
                    withdrawn = Some(MIGRATING);
                    self.core.borrow_mut().sem_cancel(id, wait);
                }
                _ = &mut timer, if deadline.is_some() && withdrawn.is_none() => {
                    withdrawn = Some(libc::EAGAIN);
                    self.core.borrow_mut().sem_cancel(id, wait);
                }
                frame = conn.next(), if withdrawn.is_none() => {
                    match frame {
                        Ok(Some((_, Ok(ClientRequest::SemCancel)))) => {}
                        Ok(Some(_)) => {
                            tracing::warn!(pid = self.pid, "request during a semop; closing");
                            connection_open = false;
                        }
                        Ok(None) | Err(_) => connection_open = false,
                    }
                    withdrawn = Some(libc::EINTR);
                    self.core.borrow_mut().sem_cancel(id, wait);
                }
            }
        }
    }

    /// The caller's credentials for a `semop`: read again from `/proc` only
    /// when the effective ids it reports differ from the last ones read
    /// (a read costs ~14 µs; the ids change when a server drops privileges).
    fn semop_cred(&mut self, euid: u32, egid: u32) -> Credentials {
        match &self.cred_cache {
            Some(c) if c.uid == euid && c.gid == egid => c.clone(),
            _ => {
                let c = self.cred();
                self.cred_cache = Some(c.clone());
                c
            }
        }
    }

    /// Before a `SEM_UNDO` operation: make sure the process's exit will
    /// apply it. For a process that moved here, its home is told (its
    /// exit there applies it). `Err(None)`: the process is gone (the frame
    /// outlived it); `Err(Some(errno))`: its home could not be told.
    async fn watch_for_undo(
        &mut self,
        id: SemSetId,
        guest: Option<(NodeId, i32)>,
    ) -> Result<(), Option<i32>> {
        let Some((home, home_pid)) = guest else {
            return match self.core.borrow_mut().watch_for_undo(self.pid, id) {
                true => Ok(()),
                false => Err(None),
            };
        };
        let migrations = self.core.borrow().migrations.clone();
        if !migrations.first_undo_on(self.pid, id) {
            return Ok(());
        }
        match self
            .rpc(
                home,
                RpcRequest::SemNoteUndo {
                    pid: home_pid,
                    set: id,
                },
            )
            .await
        {
            RpcResponse::Ok => Ok(()),
            other => {
                tracing::warn!(
                    pid = self.pid,
                    ?home,
                    home_pid,
                    ?other,
                    "home not told of undo"
                );
                migrations.undo_not_noted(self.pid, id);
                match other {
                    RpcResponse::Err(libc::ESRCH) => Err(None),
                    _ => Err(Some(self.lost_home_errno(id, libc::EHOSTDOWN))),
                }
            }
        }
    }

    fn home_of(&self, id: SegmentId) -> Result<crate::ids::NodeId, i32> {
        let home = id.home().ok_or(libc::EINVAL)?;
        let core = self.core.borrow();
        if !core.members.contains(&home) {
            return Err(libc::EINVAL);
        }
        Ok(home)
    }

    /// A segment whose home was lost is gone: its id answers EIDRM.
    fn lost_home_errno(&self, id: SegmentId, errno: i32) -> i32 {
        if errno == libc::EHOSTDOWN || errno == libc::ETIMEDOUT {
            let core = self.core.borrow();
            if id.home().is_some_and(|h| !core.is_up(h)) {
                return libc::EIDRM;
            }
        }
        errno
    }

    async fn shmget(
        &mut self,
        key: i32,
        size: u64,
        flags: i32,
        home: Option<NodeId>,
        space: crate::sysv::ShmSpace,
    ) -> Result<SegmentId, i32> {
        let cred = self.cred();
        let creation = Creation::Segment {
            key,
            size,
            flags,
            cred: cred.clone(),
            space,
            id: None,
        };
        let open = move |id| RpcRequest::SegOpen {
            id,
            size,
            flags,
            cred: cred.clone(),
        };
        self.get_by_key(space.key_kind(), key, flags, creation, home, open)
            .await
    }

    async fn semget(
        &mut self,
        key: i32,
        nsems: i32,
        flags: i32,
        home: Option<NodeId>,
    ) -> Result<SemSetId, i32> {
        let cred = self.cred();
        let creation = Creation::SemSet {
            key,
            nsems,
            mode: (flags & 0o777) as u32,
            cred: cred.clone(),
            id: None,
        };
        let open = move |id| RpcRequest::SemOpen {
            id,
            nsems,
            flags,
            cred: cred.clone(),
        };
        self.get_by_key(IpcKind::SemSet, key, flags, creation, home, open)
            .await
    }

    /// Create an object homed at `home` (this node unless asked). As the
    /// kernel, a SysV creation takes the id `kernel.shm_next_id` or
    /// `sem_next_id` asks for, once, if it is free (else another id). Here
    /// the id must name a member as its home (ids encode it), which then
    /// creates it; an id that names none gets another id. The kernel
    /// resets the sysctl to -1, which user space cannot write: it is set
    /// to INT_MAX instead, which stands for "unset" here.
    async fn create_at(&mut self, mut home: NodeId, mut creation: Creation) -> Result<IpcId, i32> {
        let sysctl = match &creation {
            Creation::Segment { space, .. } if *space == crate::sysv::ShmSpace::SysV => {
                "/proc/sys/kernel/shm_next_id"
            }
            Creation::Segment { .. } => "",
            Creation::SemSet { .. } => "/proc/sys/kernel/sem_next_id",
        };
        let asked = std::fs::read_to_string(sysctl)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .filter(|n| (0..i32::MAX).contains(n))
            .map(IpcId);
        if let Some(id) = asked {
            let _ = std::fs::write(sysctl, i32::MAX.to_string());
            match id.home().filter(|h| self.core.borrow().members.contains(h)) {
                Some(h) => {
                    home = h;
                    match &mut creation {
                        Creation::Segment { id: want, .. } | Creation::SemSet { id: want, .. } => {
                            *want = Some(id)
                        }
                    }
                }
                None => tracing::warn!(?id, "{sysctl} names no node of the cluster: another id"),
            }
        }
        self.create_on(home, creation).await
    }

    async fn create_on(&mut self, home: NodeId, creation: Creation) -> Result<IpcId, i32> {
        match self.rpc(home, RpcRequest::Create(creation)).await {
            RpcResponse::Created(id) if id.home() == Some(home) => Ok(id),
            RpcResponse::Created(_) => Err(libc::EPROTO),
            other => Err(errno_of(other)),
        }
    }

    /// `shmget`/`semget` of a key: ask the key's directory; open the object
    /// at its home, or create one (here, or on the node asked for) and
    /// register it. When nodes race to create, the directory registers
    /// exactly one; the losers discard theirs, which nobody could have seen.
    async fn get_by_key(
        &mut self,
        kind: IpcKind,
        key: i32,
        flags: i32,
        creation: Creation,
        home: Option<NodeId>,
        open: impl Fn(IpcId) -> RpcRequest,
    ) -> Result<IpcId, i32> {
        let me = self.core.borrow().me;
        let home = home.unwrap_or(me);
        if !self.core.borrow().members.contains(&home) {
            return Err(libc::EINVAL);
        }
        if key == 0 {
            return self.create_at(home, creation).await;
        }
        let key = IpcKey { kind, key };
        let directory = self.core.borrow().directory_of(key);
        // Bounded: each retry follows a removal or a lost race.
        for _ in 0..16 {
            match self.rpc(directory, RpcRequest::KeyLookup { key }).await {
                RpcResponse::KeyFound(id) => {
                    if flags & IPC_CREAT != 0 && flags & IPC_EXCL != 0 {
                        return Err(libc::EEXIST);
                    }
                    let at = id.home().ok_or(libc::EINVAL)?;
                    match self.rpc(at, open(id)).await {
                        RpcResponse::Opened { .. } | RpcResponse::Ok => return Ok(id),
                        // Removed or lost meanwhile: look the key up again.
                        RpcResponse::Err(libc::EIDRM | libc::EHOSTDOWN) => {
                            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                            continue;
                        }
                        other => return Err(errno_of(other)),
                    }
                }
                RpcResponse::KeyAbsent => {
                    if flags & IPC_CREAT == 0 {
                        return Err(libc::ENOENT);
                    }
                    let id = self.create_at(home, creation.clone()).await?;
                    match self
                        .rpc(directory, RpcRequest::KeyRegister { key, id })
                        .await
                    {
                        RpcResponse::Ok => return Ok(id),
                        RpcResponse::KeyExists(_) => {
                            // Another node won the race: ours never existed.
                            let _ = self
                                .rpc(home, RpcRequest::Discard { id, kind: key.kind })
                                .await;
                            if flags & IPC_EXCL != 0 {
                                return Err(libc::EEXIST);
                            }
                        }
                        other => {
                            let _ = self
                                .rpc(home, RpcRequest::Discard { id, kind: key.kind })
                                .await;
                            return Err(errno_of(other));
                        }
                    }
                }
                other => return Err(errno_of(other)),
            }
        }
        Err(libc::EAGAIN)
    }

    /// `inherited`: no permission check and allowed after IPC_RMID, as for
    /// an attachment a process already has.
    async fn attach(
        &mut self,
        id: SegmentId,
        readonly: bool,
        inherited: bool,
    ) -> (ClientReply, Option<OwnedFd>) {
        let req = RpcRequest::SegAttach {
            id,
            readonly,
            inherited,
            cred: self.cred(),
        };
        let size = match self.ask_home(id, req).await {
            Ok(RpcResponse::Opened { size }) => size,
            Ok(other) => return (ClientReply::Err(errno_of(other)), None),
            Err(e) => return (ClientReply::Err(e), None),
        };
        self.core
            .borrow_mut()
            .session_attached(self.session, self.pid, id);
        let opened = self.core.borrow_mut().open_local_segment(id, size);
        if let Err(e) = opened {
            self.undo_attach(id).await;
            return (ClientReply::Err(e), None);
        }
        let fd = {
            let core = self.core.borrow();
            core.store
                .segments
                .get(&id)
                .and_then(|s| s.memfd_dup().ok())
        };
        match fd {
            Some(fd) => {
                self.unmapped.push(id);
                (ClientReply::Attached { size }, Some(fd))
            }
            None => {
                self.undo_attach(id).await;
                (ClientReply::Err(libc::ENOMEM), None)
            }
        }
    }

    async fn undo_attach(&mut self, id: SegmentId) {
        if self.core.borrow_mut().session_detached(self.session, id) {
            if let Some(home) = id.home() {
                let _ = self
                    .rpc(home, RpcRequest::SegDetach { id, pid: self.pid })
                    .await;
            }
        }
    }

    /// Take the process's userfaultfd (first attachment only) and start
    /// serving its faults.
    fn ensure_process(&mut self, uffd_fd: Option<OwnedFd>) -> Result<ProcId, i32> {
        if let Some(p) = self.proc {
            self.core.borrow_mut().ensure_guarded(p)?;
            return Ok(p);
        }
        let fd = uffd_fd.ok_or(libc::EINVAL)?;
        let uffd = Uffd::from_fd(fd);
        let granted = uffd.api(uffd::REQUIRED_FEATURES).map_err(|e| {
            tracing::warn!(pid = self.pid, "uffd handshake: {e}");
            libc::EINVAL
        })?;
        if granted & uffd::REQUIRED_FEATURES != uffd::REQUIRED_FEATURES {
            return Err(libc::ENOSYS);
        }
        let uffd = Arc::new(uffd);
        let pidfd = self
            .pidfd
            .as_ref()
            .and_then(|fd| fd.try_clone().ok())
            .ok_or(libc::ESRCH)?;
        let proc = self
            .core
            .borrow_mut()
            .add_process(self.pid, pidfd, uffd.clone())?;
        self.proc = Some(proc);
        let task = tokio::task::spawn_local(serve_faults(self.core.clone(), proc, uffd));
        self.fault_task = Some(task.abort_handle());
        Ok(proc)
    }

    fn mapped(
        &mut self,
        id: SegmentId,
        addr: u64,
        len: u64,
        readonly: bool,
        uffd_fd: Option<OwnedFd>,
        handle: u64,
    ) -> Result<(), i32> {
        let Some(i) = self.unmapped.iter().position(|s| *s == id) else {
            return Err(libc::EINVAL);
        };
        self.unmapped.remove(i);
        if !addr.is_multiple_of(PAGE_SIZE as u64) {
            return Err(libc::EINVAL);
        }
        let proc = self.ensure_process(uffd_fd)?;
        self.register(
            proc,
            MappingRecord {
                proc,
                seg: id,
                addr,
                len,
                readonly,
                pgoff: 0,
                handle,
            },
        )
    }

    /// Serve the faults of piece `m` from now on (registered on the
    /// process's uffd). A piece may reach past the segment's end, as a
    /// mapping of a file may (the kernel answers SIGBUS there itself).
    fn register(&mut self, proc: ProcId, m: MappingRecord) -> Result<(), i32> {
        let mut core = self.core.borrow_mut();
        let Some(seg) = core.store.segments.get(&m.seg) else {
            return Err(libc::EIDRM);
        };
        let pages = u64::from(crate::ids::pages_for(seg.size));
        let page = PAGE_SIZE as u64;
        if m.len == 0
            || !m.len.is_multiple_of(page)
            || !m.addr.is_multiple_of(page)
            || m.pgoff >= pages
            || m.addr.checked_add(m.len).is_none()
        {
            return Err(libc::EINVAL);
        }
        let Some(p) = core.store.procs.get(&proc) else {
            return Err(libc::EINVAL);
        };
        let mode = if m.readonly {
            u64::from(
                linux_raw_sys::general::UFFDIO_REGISTER_MODE_MISSING
                    | linux_raw_sys::general::UFFDIO_REGISTER_MODE_MINOR,
            )
        } else {
            uffd::MODE_ALL
        };
        if let Err(e) = p.uffd.register(m.addr, m.len, mode) {
            tracing::warn!(pid = self.pid, addr = m.addr, "uffd register: {e}");
            return Err(libc::EINVAL);
        }
        if let Some(seg) = core.store.segments.get_mut(&m.seg) {
            seg.mappings.push(m);
        }
        Ok(())
    }

    async fn detach(&mut self, id: SegmentId, handle: u64) -> ClientReply {
        let Some(proc) = self.proc else {
            return ClientReply::Err(libc::EINVAL);
        };
        let gone = self
            .core
            .borrow_mut()
            .forget_mappings(proc, Some((id, handle)));
        if gone.is_empty() {
            return ClientReply::Err(libc::EINVAL);
        }
        // The client unmapped the pieces before it asked.
        let kernel_maps_any = still_maps_segments(self.pid);
        self.core
            .borrow_mut()
            .release_if_unmapped(proc, kernel_maps_any);
        for _ in gone {
            self.undo_attach(id).await;
        }
        ClientReply::Ok
    }

    /// Attachment `handle` of `id` is now `views`: its records are
    /// replaced (each new piece registered), and as many attachments are
    /// counted at the home as there are pieces.
    async fn set_views(
        &mut self,
        id: SegmentId,
        handle: u64,
        views: Vec<wire::View>,
    ) -> ClientReply {
        let Some(proc) = self.proc else {
            return ClientReply::Err(libc::EINVAL);
        };
        if views.len() > 4096 {
            return ClientReply::Err(libc::ENOMEM);
        }
        let readonly = {
            let core = self.core.borrow();
            let Some(seg) = core.store.segments.get(&id) else {
                return ClientReply::Err(libc::EINVAL);
            };
            match seg
                .mappings
                .iter()
                .find(|m| m.proc == proc && m.handle == handle)
            {
                Some(m) => m.readonly,
                None => return ClientReply::Err(libc::EINVAL),
            }
        };
        let before = self
            .core
            .borrow_mut()
            .forget_mappings(proc, Some((id, handle)))
            .len();
        let mut after = 0;
        let mut failed = None;
        for v in &views {
            let m = MappingRecord {
                proc,
                seg: id,
                addr: v.addr,
                len: v.len,
                readonly,
                pgoff: v.pgoff,
                handle,
            };
            match self.register(proc, m) {
                Ok(()) => after += 1,
                Err(e) => failed = Some(e),
            }
        }
        // Count the pieces at the home, as Linux counts VMAs.
        for _ in before..after {
            let req = RpcRequest::SegAttach {
                id,
                readonly,
                inherited: true,
                cred: self.cred(),
            };
            if let Ok(RpcResponse::Opened { .. }) = self.ask_home(id, req).await {
                self.core
                    .borrow_mut()
                    .session_attached(self.session, self.pid, id);
            }
        }
        for _ in after..before {
            self.undo_attach(id).await;
        }
        match failed {
            Some(e) => ClientReply::Err(e),
            None => ClientReply::Ok,
        }
    }

    /// A `semctl` at the set's home; a lent set is recalled first, which
    /// takes one round trip to the borrower (or its loss).
    async fn ask_sem_home(&self, id: SemSetId, req: RpcRequest) -> Result<RpcResponse, i32> {
        let deadline = tokio::time::Instant::now() + self.core.borrow().rpc_timeout;
        loop {
            match self.ask_home(id, req.clone()).await {
                Ok(RpcResponse::Moving) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
                Ok(RpcResponse::Moving) => return Err(libc::EAGAIN),
                other => return other,
            }
        }
    }

    /// `IPC_RMID` at the object's home; its key is freed at the directory
    /// before the answer, so a `shmget`/`semget` that follows this call
    /// anywhere in the cluster cannot find it.
    async fn remove(&mut self, kind: IpcKind, id: IpcId, req: RpcRequest) -> ClientReply {
        let asked = match kind {
            IpcKind::SemSet => self.ask_sem_home(id, req).await,
            IpcKind::Segment | IpcKind::PosixShm => self.ask_home(id, req).await,
        };
        match asked {
            Ok(RpcResponse::Removed { key, kind }) => {
                if key != 0 {
                    let key = IpcKey { kind, key };
                    let directory = self.core.borrow().directory_of(key);
                    let _ = self
                        .rpc(directory, RpcRequest::KeyUnregister { key, id })
                        .await;
                }
                ClientReply::Ok
            }
            Ok(other) => ClientReply::Err(errno_of(other)),
            Err(e) => ClientReply::Err(e),
        }
    }

    /// A forked child takes over the attachments it inherited.
    async fn adopt(&mut self, attachments: Vec<AttachmentRecord>, uffd_fd: OwnedFd) -> ClientReply {
        if self.proc.is_some() || attachments.len() > 4096 {
            return ClientReply::Err(libc::EINVAL);
        }
        let proc = match self.ensure_process(Some(uffd_fd)) {
            Ok(p) => p,
            Err(e) => return ClientReply::Err(e),
        };
        let cred = self.cred();
        let vouched = self.vouched_attachments();
        for a in attachments {
            let id = IpcId(a.id);
            let Ok(home) = self.home_of(id) else {
                return ClientReply::Err(libc::EINVAL);
            };
            // What it did not inherit (nor was granted) it must be allowed
            // to attach, as with shmat.
            let inherited = vouched.iter().any(|v| {
                v.id == a.id
                    && v.addr == a.addr
                    && v.len == a.len
                    && v.pgoff == a.pgoff
                    && (a.readonly || !v.readonly)
            });
            match self
                .rpc(
                    home,
                    RpcRequest::SegAttach {
                        id,
                        readonly: a.readonly,
                        inherited,
                        cred: cred.clone(),
                    },
                )
                .await
            {
                RpcResponse::Opened { .. } => {
                    self.core
                        .borrow_mut()
                        .session_attached(self.session, self.pid, id)
                }
                other => return ClientReply::Err(self.lost_home_errno(id, errno_of(other))),
            }
            let m = MappingRecord {
                proc,
                seg: id,
                addr: a.addr,
                len: a.len,
                readonly: a.readonly,
                pgoff: a.pgoff,
                handle: a.handle,
            };
            if let Err(e) = self.register(proc, m) {
                return ClientReply::Err(e);
            }
        }
        crate::faults::point("dsmd.adopt");
        ClientReply::Ok
    }

    /// The attachments this process may adopt without a permission check:
    /// those its parent has (a forked child inherits them) and those a
    /// migrator granted it (taken: a grant is used once).
    fn vouched_attachments(&self) -> Vec<AttachmentRecord> {
        let mut core = self.core.borrow_mut();
        let mut vouched = core
            .adopt_grants
            .remove(&self.pid)
            .map(|(_, records)| records)
            .unwrap_or_default();
        if let Some(parent) = parent_of(self.pid) {
            vouched.extend(core.process_info(parent).attachments);
        }
        vouched
    }

    /// The connection ended: the process exited or exec'd (its mappings
    /// are gone: detach everything now), or it closed the connection while
    /// it still maps segments (a program closing "all" descriptors): then
    /// its faults keep being served, and everything is detached when it
    /// exits, so its memory never silently stops being coherent.
    fn cleanup(&mut self) {
        let core = self.core.clone();
        let (proc, fault_task, session) = (self.proc.take(), self.fault_task.take(), self.session);
        let pidfd = pidfd::open(self.pid)
            .ok()
            .filter(|fd| !pidfd::has_exited(fd));
        match pidfd {
            Some(fd) if proc.is_some() && still_maps_segments(self.pid) => {
                tracing::warn!(
                    pid = self.pid,
                    "a process closed its connection but still maps segments: served until it exits"
                );
                let pid = self.pid;
                core.borrow_mut().orphans.insert(
                    pid,
                    Orphan {
                        proc,
                        fault_task,
                        session,
                    },
                );
                tokio::task::spawn_local(async move {
                    pidfd::exited(fd).await;
                    // Unless a new connection of the process took it back.
                    let left = core.borrow_mut().orphans.remove(&pid);
                    if let Some(o) = left.filter(|o| o.session == session) {
                        detach_process(&core, o.proc, o.fault_task, o.session);
                    }
                });
            }
            _ => detach_process(&core, proc, fault_task, session),
        }
    }
}

/// What a connection that ended left served (see [`Session::cleanup`]):
/// taken back by the process's next connection (`Reclaim`).
pub struct Orphan {
    proc: Option<ProcId>,
    fault_task: Option<tokio::task::AbortHandle>,
    session: u64,
}

/// Stop serving a process's faults and uncount its attachments.
fn detach_process(
    core: &SharedCore,
    proc: Option<ProcId>,
    fault_task: Option<tokio::task::AbortHandle>,
    session: u64,
) {
    if let Some(task) = fault_task {
        task.abort();
    }
    let mut core = core.borrow_mut();
    if let Some(proc) = proc {
        core.forget_mappings(proc, None);
        core.remove_process(proc);
    }
    core.session_ended(session);
}

/// Does the process still map a segment's memfd (after an exec it does
/// not: its fds are closed once the new image is in place)?
fn still_maps_segments(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|maps| {
        maps.lines().any(|l| {
            l.split("/memfd:migshm-")
                .nth(1)
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
    })
}

/// Read the process's faults as they come and feed them to the engine.
async fn serve_faults(core: SharedCore, proc: ProcId, uffd: Arc<Uffd>) {
    let Ok(fd) = uffd::async_uffd(uffd.clone()) else {
        return;
    };
    let mut events = Vec::with_capacity(64);
    loop {
        let Ok(mut guard) = fd.readable().await else {
            return;
        };
        events.clear();
        if let Err(e) = uffd.read_events(&mut events, 64) {
            tracing::debug!(proc, "uffd read: {e}");
            return;
        }
        if events.is_empty() {
            guard.clear_ready();
        }
        if !core.borrow().store.procs.contains_key(&proc) {
            return;
        }
        let mut c = core.borrow_mut();
        for event in events.drain(..) {
            match event {
                uffd::Event::PageFault {
                    addr, write, wp, ..
                } => c.on_fault(proc, addr, write || wp),
                other => tracing::debug!(proc, ?other, "uffd event ignored"),
            }
        }
    }
}

/// The parent of process `pid` (from /proc), if it is still there.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid ...: comm may hold spaces and parentheses.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
