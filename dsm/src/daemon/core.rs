//! The daemon's state, owned by one thread: the coherence engine, the home
//! services (segment metadata, key directory), peers and pending RPCs.
//!
//! Every method runs to completion without awaiting; async flows (a `shmget`
//! that asks the key's directory, then the segment's home) live in the client
//! tasks and call [`Core::rpc`] between short borrows.

use super::sems::{SemAction, SemService};
use super::store::{LocalProcess, LocalSegment, NodeStore, ProcId, Waiter};
use crate::coherence::{CohMsg, Engine};
use crate::guardian::{Guarded, Guardian};
use crate::ids::{
    pages_for, IpcId, IpcKey, IpcKind, NodeId, NodeSet, PageIndex, PageKey, SegmentId, PAGE_SIZE,
};
use crate::memfd::Memfd;
use crate::semregion::{self, Region};
use crate::sysv::{self, Credentials, IpcPerm, ShmLimits, ShmStat, SHM_DEST};
use crate::wire::{
    self, Control, Creation, NodeStatus, Notice, RpcRequest, RpcResponse, SemResult,
};
use bytes::Bytes;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

pub type SharedCore = Rc<RefCell<Core>>;

/// Marks an exit-set token as a semaphore watch (its generation), not a
/// connection (its session id).
const SEM_WATCH_TOKEN: u64 = 1 << 63;

/// Guardian tokens: a local process is its `ProcId`; an undo holder and a
/// fast-path region are marked.
const GUARD_UNDO: u64 = 1 << 62;
const GUARD_REGION: u64 = 1 << 61;
const GUARD_GUEST: u64 = 1 << 60;

/// What one local connection has attached (counted at the homes).
struct SessionAttachments {
    pid: i32,
    /// To see the process's exit before its connection's end is read.
    exited: Option<OwnedFd>,
    segments: Vec<SegmentId>,
}

/// Work on a set, waiting for a process to let go of its values.
type DeferredSemWork = Box<dyn FnOnce(&mut SemService)>;

/// How long the daemon waits for a process inside a fast-path semaphore
/// operation (a few hundred ns when it runs) before deferring the set's work.
const REGION_PATIENCE: Duration = Duration::from_micros(50);

/// What a peer link is doing.
pub enum PeerLink {
    /// Never connected yet: frames wait here (bounded) until it is.
    Connecting {
        backlog: Vec<Vec<Bytes>>,
        since: Instant,
    },
    Up {
        tx: mpsc::UnboundedSender<Vec<Bytes>>,
        incarnation: u64,
        generation: u64,
        /// When the peer last sent us anything.
        last_seen: Instant,
        /// The newest moment of ours that the peer is known to have heard
        /// us after (the sending time of the newest ping it answered, or
        /// the start of our handshake): the lease counts from here, so
        /// that it runs out on a one-way cut too (see [`Core::heartbeat`]).
        heard_us: Instant,
    },
    /// The link ended, or the peer fell silent for longer than the lease:
    /// nothing it gave is used here any more (fenced), but it is declared
    /// lost only once it has been silent for the whole peer timeout, so
    /// that it has fenced too whatever it saw (see [`Core::heartbeat`]).
    Closed {
        incarnation: u64,
        last_seen: Instant,
    },
    /// Lost. A new incarnation of it may join again.
    Down { incarnation: Option<u64> },
}

pub struct Peer {
    pub address: SocketAddr,
    pub link: PeerLink,
}

/// Metadata of a segment homed here (what IPC_STAT shows).
pub struct HomeSegment {
    pub perm: IpcPerm,
    pub size: u64,
    pub atime: i64,
    pub dtime: i64,
    pub ctime: i64,
    pub cpid: i32,
    pub lpid: i32,
    pub attaches: BTreeMap<NodeId, u64>,
    /// Nodes that opened a copy (to be told when the segment goes).
    pub cached_on: NodeSet,
    pub space: sysv::ShmSpace,
}

impl HomeSegment {
    fn nattch(&self) -> u64 {
        self.attaches.values().sum()
    }
}

const BACKLOG_MAX: usize = 4096;

pub struct Core {
    pub me: NodeId,
    pub incarnation: u64,
    pub members: Vec<NodeId>,
    pub peers: BTreeMap<NodeId, Peer>,
    pub listen: SocketAddr,
    pub rpc_timeout: Duration,
    /// Silence after which a peer's pages stop being used here (the
    /// lease): three heartbeats short of the peer timeout.
    fence_after: Duration,
    /// Where the clock that pings carry starts.
    clock_origin: Instant,
    pub engine: Engine<Waiter>,
    pub store: NodeStore,
    pub homes: BTreeMap<SegmentId, HomeSegment>,
    /// The key directory for keys that hash to this node.
    pub keys: HashMap<IpcKey, IpcId>,
    /// Semaphore sets homed here, and operations sent to other homes.
    pub sems: SemService,
    /// Connections waiting for a semaphore operation, by wait id.
    sem_waiters: HashMap<u64, oneshot::Sender<SemResult>>,
    /// Local processes holding undo adjustments: a pidfd each, to know
    /// when they exit however they die.
    pub sem_watched: HashMap<i32, (u64, OwnedFd)>,
    /// The fast path of the sets homed here that have one: their values in
    /// memory shared with the local processes (see `semregion`).
    sem_regions: HashMap<IpcId, (Region, Memfd)>,
    /// Segment attachments of local processes, counted at their homes, by
    /// connection: what a process's exit must uncount.
    attachments: HashMap<u64, SessionAttachments>,
    next_session: u64,
    /// Processes whose connection ended while they still map segments,
    /// served until they exit or reconnect, by pid.
    pub orphans: HashMap<i32, super::clients::Orphan>,
    /// Each session's process and its side of the connection, for migrators.
    pub links: HashMap<u64, (i32, wire::ClientLink)>,
    /// Attachments a migrator let a process adopt (`GrantAdopt`): per pid,
    /// the granting session (the grant ends with it) and the records.
    pub adopt_grants: HashMap<i32, (u64, Vec<wire::AttachmentRecord>)>,
    /// Per connection with a `semop` waiting: its process, and what wakes
    /// the wait to withdraw it for a migration.
    pub sem_waiting: HashMap<u64, (i32, Rc<tokio::sync::Notify>)>,
    pub migrations: Rc<super::migration::Migrations>,
    /// This core itself, for work started here that outlives a call (an
    /// RPC answered once a migration is done).
    pub self_ref: std::rc::Weak<RefCell<Core>>,
    /// The pidfds of both tables above, to find the processes that exited
    /// in one call (`None` if epoll failed: exits are then settled as
    /// connections end and watchers fire).
    exits: Option<crate::pidfd::ExitSet>,
    /// Requests for sets whose values a process holds, in order (see
    /// [`Core::with_set`]); `sem_retry` wakes the task that retries them.
    sem_deferred: BTreeMap<IpcId, VecDeque<DeferredSemWork>>,
    pub sem_retry: Rc<tokio::sync::Notify>,
    /// The CPUs this node serves (`--cpus`), and whether they were given
    /// (then the processes it serves are kept on them).
    pub cpus: Vec<usize>,
    pub cpus_given: bool,
    /// What the load sampler last saw (`load.rs`).
    pub load: std::sync::Arc<std::sync::Mutex<super::load::NodeLoad>>,
    /// The loads heard from the other nodes (`gossip.rs`).
    pub gossip: super::gossip::Gossip,
    /// Holds what must outlive this daemon (see `crate::guardian`): each
    /// local process's uffd and pidfd, the pidfds of undo holders, the
    /// fast-path regions. `None` only if no guardian could be started.
    pub guardian: Option<Guardian>,
    /// Userfaultfds of the memory moved processes' hosts serve, held for
    /// as long as each process lives (see `hold_for_guest`), by token.
    guest_uffds: HashMap<u64, (i32, OwnedFd, OwnedFd)>,
    next_guest_hold: u64,
    next_watch: u64,
    next_seq: u32,
    next_rpc: u64,
    rpcs: HashMap<u64, (NodeId, oneshot::Sender<RpcResponse>)>,
    self_queue: VecDeque<CohMsg>,
    pub next_proc: ProcId,
    next_generation: u64,
    pub remote_requests: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Where processes run and why; the balancer (`placement.rs`).
    pub placement: super::placement::Placements,
    /// CPUs times speed: what a process's demand is divided by here.
    pub capacity: f64,
    /// Faults served and pages sent or received per second, over the last
    /// gossip interval, and the counts and time they were taken from.
    rates: (u32, u32),
    rates_from: (Instant, u64, u64),
    /// Keeps idle CPUs awake during bursts of faults (`wakeups.rs`).
    pub wakeups: super::wakeups::Wakeups,
}

impl Core {
    pub fn new(config: &super::Config) -> Core {
        let incarnation = rand::random::<u64>() | 1;
        let now = Instant::now();
        let peers = config
            .peers
            .iter()
            .map(|(id, address)| {
                (
                    *id,
                    Peer {
                        address: *address,
                        link: PeerLink::Connecting {
                            backlog: vec![],
                            since: now,
                        },
                    },
                )
            })
            .collect();
        Core {
            cpus: config.cpus.clone(),
            cpus_given: config.cpus_given,
            load: Default::default(),
            gossip: super::gossip::Gossip::new(
                config.node,
                u64::from(config.node.0) ^ std::process::id().rotate_left(8) as u64,
            ),
            me: config.node,
            incarnation,
            members: config.members(),
            peers,
            listen: config.listen,
            rpc_timeout: config.peer_timeout * 2,
            fence_after: config.peer_timeout.saturating_sub(config.heartbeat * 3),
            clock_origin: Instant::now(),
            engine: Engine::new(config.node),
            store: NodeStore::default(),
            homes: BTreeMap::new(),
            keys: HashMap::new(),
            sems: {
                let mut sems = SemService::new(config.node, ::sysv::sem::SemLimits::from_proc());
                sems.set_lend_after(config.sem_lend_after);
                sems.use_live_limits();
                sems
            },
            sem_waiters: HashMap::new(),
            sem_watched: HashMap::new(),
            sem_regions: HashMap::new(),
            sem_deferred: BTreeMap::new(),
            attachments: HashMap::new(),
            next_session: 1,
            orphans: HashMap::new(),
            links: HashMap::new(),
            sem_waiting: HashMap::new(),
            adopt_grants: HashMap::new(),
            migrations: super::migration::Migrations::new(config.node, &config.socket),
            self_ref: std::rc::Weak::new(),
            exits: crate::pidfd::ExitSet::new().ok(),
            sem_retry: Rc::new(tokio::sync::Notify::new()),
            guardian: None,
            guest_uffds: HashMap::new(),
            next_guest_hold: 1,
            next_watch: 1,
            // Start the sequence somewhere new each run so a restarted node
            // does not hand out the ids of its previous life at once.
            next_seq: (rand::random::<u32>() & SegmentId::SEQ_MASK) | 1,
            next_rpc: 1,
            rpcs: HashMap::new(),
            self_queue: VecDeque::new(),
            next_proc: 1,
            next_generation: 1,
            remote_requests: 0,
            bytes_sent: 0,
            bytes_received: 0,
            placement: super::placement::Placements::new(
                config.node,
                &config.socket,
                config.balance,
            ),
            capacity: config.cpus.len().max(1) as f64 * config.speed,
            rates: (0, 0),
            rates_from: (now, 0, 0),
            wakeups: super::wakeups::Wakeups::new(config.low_latency),
        }
    }

    /// The key's primary directory node (hashed over the membership) and
    /// its secondary (the next member), which holds a replica of every entry
    /// and arbitrates while the primary is down.
    fn directory_pair(&self, key: IpcKey) -> (NodeId, NodeId) {
        let h = (key.key as u32).wrapping_mul(0x9E37_79B1) as usize % self.members.len();
        (self.members[h], self.members[(h + 1) % self.members.len()])
    }

    /// The node to ask about `key` now: the primary if up, else the secondary.
    pub fn directory_of(&self, key: IpcKey) -> NodeId {
        let (primary, secondary) = self.directory_pair(key);
        if self.is_up(primary) {
            primary
        } else {
            secondary
        }
    }

    /// After a change to the key table as the primary, keep the secondary's
    /// replica in step (the link is FIFO, so replicas apply in order).
    fn replicate_key(&mut self, key: IpcKey, id: Option<IpcId>) {
        let (primary, secondary) = self.directory_pair(key);
        if primary == self.me && secondary != self.me {
            self.send_control(secondary, &Control::Notice(Notice::KeyReplica { key, id }));
        }
    }

    pub fn is_up(&self, node: NodeId) -> bool {
        node == self.me
            || matches!(
                self.peers.get(&node).map(|p| &p.link),
                Some(PeerLink::Up { .. })
            )
    }

    // ---- sending -------------------------------------------------------------

    fn send_frame(&mut self, to: NodeId, frame: Vec<Bytes>) {
        let Some(peer) = self.peers.get_mut(&to) else {
            tracing::warn!(?to, "frame for a node not in the cluster");
            return;
        };
        self.bytes_sent += frame.iter().map(|b| b.len() as u64).sum::<u64>();
        match &mut peer.link {
            PeerLink::Up { tx, .. } => {
                let _ = tx.send(frame);
            }
            PeerLink::Connecting { backlog, .. } if backlog.len() < BACKLOG_MAX => {
                backlog.push(frame)
            }
            PeerLink::Connecting { .. } => tracing::warn!(?to, "backlog full; frame dropped"),
            PeerLink::Closed { .. } | PeerLink::Down { .. } => {}
        }
    }

    pub fn send_control(&mut self, to: NodeId, msg: &Control) {
        self.send_frame(to, vec![wire::encode_control(msg)]);
    }

    /// Start an RPC; the answer (or EHOSTDOWN if the node is lost) arrives on
    /// the returned channel. Requests to this node are answered at once.
    pub fn start_rpc(&mut self, to: NodeId, body: RpcRequest) -> oneshot::Receiver<RpcResponse> {
        let (tx, rx) = oneshot::channel();
        if to == self.me {
            let reply = self.handle_rpc(to, body);
            let _ = tx.send(reply);
            return rx;
        }
        if !self.peers.contains_key(&to)
            || matches!(
                self.peers[&to].link,
                PeerLink::Down { .. } | PeerLink::Closed { .. }
            )
        {
            let _ = tx.send(RpcResponse::Err(libc::EHOSTDOWN));
            return rx;
        }
        let id = self.next_rpc;
        self.next_rpc += 1;
        self.rpcs.insert(id, (to, tx));
        self.remote_requests += 1;
        self.send_control(to, &Control::Request { id, body });
        rx
    }

    // ---- coherence -----------------------------------------------------------

    /// Route everything the engine produced, delivering messages to this
    /// node in order, until it is quiet.
    pub fn drain_engine(&mut self) {
        loop {
            while let Some((to, msg)) = self.engine.poll_transmit() {
                if to == self.me {
                    self.self_queue.push_back(msg);
                } else {
                    self.send_frame(to, wire::encode_coherence_parts(&msg));
                }
            }
            while let Some(res) = self.engine.poll_resolution() {
                tracing::trace!(?res.waiter, ?res.page, ?res.access, res.also_mapped, "resolve");
                self.store.apply(&res);
            }
            match self.self_queue.pop_front() {
                Some(msg) => {
                    tracing::trace!(?msg, "coherence message to self");
                    self.engine.handle_message(self.me, msg, &mut self.store)
                }
                None => return,
            }
        }
    }

    pub fn on_fault(&mut self, proc: ProcId, addr: u64, write: bool) {
        let page_addr = addr & !(PAGE_SIZE as u64 - 1);
        let Some(m) = self.store.mapping_at(proc, page_addr) else {
            // A fault racing a detach: the range is gone, let the thread
            // retry (it will not come back here).
            if let Some(p) = self.store.procs.get(&proc) {
                let _ = p.uffd.wake(page_addr, PAGE_SIZE as u64);
            }
            return;
        };
        let page = PageKey {
            seg: m.seg,
            page: PageIndex(m.page_at(page_addr) as u32),
        };
        tracing::trace!(proc, ?page, write, "fault");
        self.wakeups.event();
        if let Some(p) = self.store.procs.get_mut(&proc) {
            p.faults += 1;
        }
        if page.seg.home() != Some(self.me) {
            crate::faults::point("dsmd.remote_fault");
        }
        self.engine.handle_fault(
            page,
            write,
            Waiter {
                proc,
                addr: page_addr,
                readonly: m.readonly,
            },
            &mut self.store,
        );
        self.drain_engine();
    }

    // ---- peers ---------------------------------------------------------------

    /// A peer finished its handshake. Returns the link generation for the
    /// reader to quote, or `None` if the connection must be refused.
    pub fn peer_connected(
        &mut self,
        node: NodeId,
        incarnation: u64,
        hello_sent: Instant,
        tx: mpsc::UnboundedSender<Vec<Bytes>>,
    ) -> Option<u64> {
        let previous = match self.peers.get(&node).map(|p| &p.link) {
            None => return None,
            Some(PeerLink::Up {
                incarnation: old,
                generation,
                ..
            }) => Some((*old, Some(*generation))),
            Some(PeerLink::Closed {
                incarnation: old, ..
            }) => Some((*old, None)),
            Some(PeerLink::Down { incarnation: old }) => {
                if *old == Some(incarnation) {
                    // A lost node cannot come back as the same life: its
                    // pages were already declared lost.
                    tracing::warn!(?node, "refusing a lost incarnation");
                    return None;
                }
                None
            }
            Some(PeerLink::Connecting { .. }) => None,
        };
        if let Some((old, generation)) = previous {
            if old == incarnation {
                // The same life after a dropped link: messages may have been
                // lost, so it is lost too, but only once it has been silent
                // for the whole timeout (it fences meanwhile, as we do).
                tracing::warn!(?node, "peer reconnected after a dropped link: refused");
                if let Some(g) = generation {
                    self.link_closed(node, g);
                }
                return None;
            }
            // A new life: the old one is dead (its guardian killed its
            // processes), so nothing it held is in use any more.
            tracing::warn!(?node, "peer restarted; its previous life is declared lost");
            self.peer_lost(node);
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        let backlog = match std::mem::replace(
            &mut self.peers.get_mut(&node)?.link,
            PeerLink::Up {
                tx: tx.clone(),
                incarnation,
                generation,
                last_seen: Instant::now(),
                heard_us: hello_sent,
            },
        ) {
            PeerLink::Connecting { backlog, .. } => backlog,
            _ => vec![],
        };
        for frame in backlog {
            let _ = tx.send(frame);
        }
        self.engine.handle_peer_up(node);
        self.sems.peer_up(node);
        // Entries this node holds as secondary for keys whose primary is the
        // node that just (re)joined: it starts with an empty table.
        let handed_back: Vec<(IpcKey, IpcId)> = self
            .keys
            .iter()
            .filter(|(key, _)| self.directory_pair(**key) == (node, self.me))
            .map(|(k, id)| (*k, *id))
            .collect();
        for (key, id) in handed_back {
            self.send_control(
                node,
                &Control::Notice(Notice::KeyReplica { key, id: Some(id) }),
            );
        }
        tracing::info!(?node, incarnation, "peer up");
        Some(generation)
    }

    pub fn is_current(&self, node: NodeId, generation: u64) -> bool {
        matches!(self.peers.get(&node).map(|p| &p.link), Some(PeerLink::Up { generation: g, .. }) if *g == generation)
    }

    /// A frame arrived from `node` on link `generation`.
    pub fn on_peer_frame(
        &mut self,
        node: NodeId,
        generation: u64,
        frame: Bytes,
    ) -> Result<(), wire::WireError> {
        if !self.is_current(node, generation) {
            return Ok(());
        }
        self.bytes_received += frame.len() as u64;
        if let Some(Peer {
            link: PeerLink::Up { last_seen, .. },
            ..
        }) = self.peers.get_mut(&node)
        {
            *last_seen = Instant::now();
        }
        match wire::decode_peer(frame)? {
            wire::PeerFrame::Coh(msg) => {
                tracing::trace!(?node, ?msg, "coherence message");
                self.wakeups.event();
                self.engine.handle_message(node, msg, &mut self.store);
                self.drain_engine();
            }
            wire::PeerFrame::Control(Control::Ping { sent_ns }) => {
                self.send_control(node, &Control::Pong { echo_ns: sent_ns });
            }
            wire::PeerFrame::Control(Control::Pong { echo_ns }) => self.on_pong(node, echo_ns),
            wire::PeerFrame::Control(Control::Request {
                id,
                body:
                    RpcRequest::Migrate {
                        uid,
                        pid,
                        to,
                        cause,
                    },
            }) => {
                // Answered when the move is done, by a task of its own.
                let Some(core) = self.self_ref.upgrade() else {
                    return Ok(());
                };
                tokio::task::spawn_local(async move {
                    let reply = match super::migration::migrate(&core, uid, pid, to, cause).await {
                        wire::ClientReply::Ok => RpcResponse::Ok,
                        wire::ClientReply::Refused(why) => RpcResponse::Refused(why),
                        wire::ClientReply::Err(e) => RpcResponse::Err(e),
                        other => RpcResponse::Refused(format!("{other:?}")),
                    };
                    core.borrow_mut()
                        .send_control(node, &Control::Response { id, body: reply });
                });
            }
            wire::PeerFrame::Control(Control::Request { id, body }) => {
                self.wakeups.event();
                let reply = self.handle_rpc(node, body);
                self.send_control(node, &Control::Response { id, body: reply });
            }
            wire::PeerFrame::Control(Control::Response { id, body }) => match self.rpcs.remove(&id)
            {
                Some((from, tx)) if from == node => {
                    let _ = tx.send(body);
                }
                Some(entry) => {
                    tracing::warn!(?node, id, "response from the wrong node");
                    self.rpcs.insert(id, entry);
                }
                None => tracing::debug!(?node, id, "response to an unknown or timed-out request"),
            },
            wire::PeerFrame::Control(Control::Notice(Notice::Load { entries })) => {
                let now = self.clock_ms();
                self.gossip.receive(now, &entries);
            }
            wire::PeerFrame::Control(Control::Notice(Notice::SegmentGone { id })) => {
                if id.home() == Some(node) {
                    self.drop_local_segment(id);
                }
            }
            wire::PeerFrame::Control(Control::Notice(Notice::KeyReplica { key, id })) => {
                // From the key's primary (a replica for us as secondary), or
                // from its secondary handing entries back to a restarted
                // primary. Entries of lost homes are never taken.
                let (primary, secondary) = self.directory_pair(key);
                let from_directory = (node == primary && secondary == self.me)
                    || (node == secondary && primary == self.me);
                match id {
                    _ if !from_directory => tracing::warn!(
                        ?node,
                        ?key,
                        "key replica from a node that is not its directory"
                    ),
                    Some(id) if id.home().is_some_and(|h| self.is_up(h)) => {
                        self.keys.insert(key, id);
                    }
                    Some(_) => {}
                    None => {
                        self.keys.remove(&key);
                    }
                }
            }
            wire::PeerFrame::Control(Control::Notice(notice)) => self.on_sem_notice(node, notice),
            wire::PeerFrame::Control(Control::Hello(_) | Control::Auth { .. }) => {
                return Err(wire::WireError::Malformed(
                    "handshake frame after the handshake".into(),
                ));
            }
        }
        Ok(())
    }

    /// Our clock as pings carry it.
    fn clock_ns(&self, at: Instant) -> u64 {
        at.duration_since(self.clock_origin).as_nanos() as u64
    }

    /// The peer answered the ping we sent at `echo_ns`: it heard us then.
    /// An echo of a moment still to come (a bad frame) extends nothing.
    fn on_pong(&mut self, node: NodeId, echo_ns: u64) {
        let now = Instant::now();
        if echo_ns > self.clock_ns(now) {
            tracing::warn!(?node, echo_ns, "pong for a ping not sent yet: ignored");
            return;
        }
        let sent = self.clock_origin + Duration::from_nanos(echo_ns);
        if let Some(Peer {
            link: PeerLink::Up { heard_us, .. },
            ..
        }) = self.peers.get_mut(&node)
        {
            *heard_us = (*heard_us).max(sent);
        }
    }

    /// Declare a peer lost: nothing it held can be had any more, and every
    /// wait on it ends now.
    /// This node's own load, as the sampler last saw it.
    fn own_load(&self) -> super::load::NodeLoad {
        *self.load.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn clock_ms(&self) -> u64 {
        self.clock_ns(Instant::now()) / 1_000_000
    }

    /// The peers whose link is up.
    fn peers_up(&self) -> Vec<NodeId> {
        self.peers
            .iter()
            .filter(|(_, p)| matches!(p.link, PeerLink::Up { .. }))
            .map(|(id, _)| *id)
            .collect()
    }

    /// A gossip interval: this node's load, and the newest it heard, to
    /// one node that is up.
    pub fn gossip_tick(&mut self) {
        let now_instant = Instant::now();
        let (since, faults, pages) = self.rates_from;
        let pages_now = (self.bytes_sent + self.bytes_received) / crate::ids::PAGE_SIZE as u64;
        let secs = now_instant.duration_since(since).as_secs_f64();
        if secs > 0.0 {
            let per_s = |n: u64| (n as f64 / secs).round().min(f64::from(u32::MAX)) as u32;
            self.rates = (
                per_s(self.store.faults_served.saturating_sub(faults)),
                per_s(pages_now.saturating_sub(pages)),
            );
        }
        self.rates_from = (now_instant, self.store.faults_served, pages_now);
        if !self.own_load().measured {
            return;
        }
        let up = self.peers_up();
        let mine = self.own_entry();
        let now = self.clock_ms();
        if let Some((to, entries)) = self.gossip.tick(now, mine, &up) {
            self.send_control(to, &Control::Notice(Notice::Load { entries }));
        }
    }

    /// This node's figures, as gossiped.
    fn own_entry(&self) -> wire::LoadEntry {
        let load = self.own_load();
        wire::LoadEntry {
            node: self.me,
            load_milli: (load.load * 1000.0).round() as u32,
            free_kib: load.free_kib,
            age_ms: 0,
            capacity_milli: (self.capacity * 1000.0).round() as u32,
            blocked: self.placement.blocked,
            balancing: self.placement.enabled,
            guests: self
                .migrations
                .guest_list()
                .len()
                .min(usize::from(u16::MAX)) as u16,
            procs: self.placement.running_here.min(usize::from(u16::MAX)) as u16,
            faults_per_s: self.rates.0,
            pages_per_s: self.rates.1,
        }
    }

    /// The loads known here, this node's first, with their ages now.
    pub fn loads(&self) -> Vec<wire::LoadEntry> {
        let now = self.clock_ms();
        let mut all = vec![self.own_entry()];
        all.extend(self.gossip.known().values().map(|k| wire::LoadEntry {
            age_ms: now.saturating_sub(k.measured_ms).min(u64::from(u32::MAX)) as u32,
            ..k.entry
        }));
        all
    }

    /// What a balancing round weighs (`placement::round`): the time, this
    /// node's load, the other nodes' (known and up), the processes it may
    /// move. `None` when there is nothing to weigh.
    pub fn balance_inputs(&mut self) -> Option<super::placement::RoundInputs> {
        use super::balance::NodeView;
        let now = self.clock_ms();
        if !self.own_load().measured {
            return None;
        }
        let up = self.peers_up();
        let others: Vec<NodeView> = self
            .gossip
            .known()
            .values()
            .filter(|k| up.contains(&k.entry.node))
            .map(|k| NodeView {
                node: k.entry.node,
                load: f64::from(k.entry.load_milli) / 1000.0,
                capacity: f64::from(k.entry.capacity_milli.max(1)) / 1000.0,
                measured_ms: k.measured_ms,
                blocked: k.entry.blocked,
            })
            .collect();
        let here = NodeView {
            node: self.me,
            load: self.own_load().load,
            capacity: self.capacity,
            measured_ms: now,
            blocked: self.placement.blocked,
        };
        let mut faults: HashMap<i32, u64> = HashMap::new();
        for p in self.store.procs.values() {
            *faults.entry(p.pid).or_default() += p.faults;
        }
        let copies = self.migrations.copies_elsewhere();
        let home_here: Vec<(i32, u64)> = self
            .placement
            .started_here(now)
            .into_iter()
            .filter(|(pid, _)| {
                self.migrations.runs_or_moves_to(*pid).is_none() && !copies.contains(pid)
            })
            .map(|(pid, _)| (pid, faults.get(&pid).copied().unwrap_or(0)))
            .collect();
        let guests: Vec<_> = self
            .migrations
            .guest_list()
            .into_iter()
            .map(|g| {
                (
                    g.pid,
                    g.home,
                    g.home_pid,
                    g.pinned,
                    self.clock_ns(g.arrived) / 1_000_000,
                    faults.get(&g.pid).copied().unwrap_or(0),
                )
            })
            .collect();
        let candidates = self.placement.candidates(self.me, now, &home_here, &guests);
        if others.is_empty() {
            return None;
        }
        Some((now, here, others, candidates))
    }

    /// `omctl lock|unlock PID` at the process's home.
    pub fn lock(&mut self, uid: u32, pid: i32, locked: bool) -> Result<(), i32> {
        super::migration::may_act_on(uid, pid)?;
        self.placement.set_lock(pid, locked);
        Ok(())
    }

    /// Every process under `omrun` homed here or running here as a guest,
    /// and why it is where it is.
    pub fn placements(&mut self) -> Vec<wire::Placement> {
        let mut out = Vec::new();
        let now = self.clock_ms();
        let copies = self.migrations.copies_elsewhere();
        let started: Vec<i32> = self
            .placement
            .started_here(now)
            .into_iter()
            .map(|(pid, _)| pid)
            .filter(|pid| !copies.contains(pid))
            .collect();
        for pid in started {
            let away = self.migrations.is_migrated(pid);
            let pid_there = self
                .migrations
                .entries()
                .into_iter()
                .find(|e| e.home == self.me && e.home_pid == pid)
                .map_or(pid, |e| e.pid_there);
            let locked = self.placement.is_locked(pid);
            let last = self.placement.last_move(pid);
            let moved = |cause: wire::MoveCause| match cause {
                wire::MoveCause::Balancer => "moved by the balancer",
                wire::MoveCause::Hand => "moved by hand",
                wire::MoveCause::Expelled => "sent home (its node expelled its guests)",
            };
            let why = match (away, last) {
                (Some(_), Some((cause, _))) if locked => format!("{}, locked", moved(cause)),
                (Some(_), Some((cause, _))) => moved(cause).to_string(),
                (Some(_), None) => "moved".to_string(),
                (None, _) if locked => "locked".to_string(),
                (None, _) => match self.placement.balancer.stay_reason(pid) {
                    Some(reason) => format!("cannot move: {}", reason.replace('\n', "; ")),
                    None if !self.placement.enabled => "at home (balancing off)".to_string(),
                    None => match last {
                        Some((cause, _)) => format!("at home ({})", moved(cause)),
                        None => "at home".to_string(),
                    },
                },
            };
            out.push(wire::Placement {
                home: self.me,
                home_pid: pid,
                runs_on: away.unwrap_or(self.me),
                pid_there,
                why,
            });
        }
        for g in self.migrations.guest_list() {
            let why = match self.placement.balancer.stay_reason(g.pid) {
                Some(reason) => format!("guest; cannot move: {}", reason.replace('\n', "; ")),
                None if g.pinned => "guest, pinned".to_string(),
                None => "guest".to_string(),
            };
            out.push(wire::Placement {
                home: g.home,
                home_pid: g.home_pid,
                runs_on: self.me,
                pid_there: g.pid,
                why,
            });
        }
        out
    }

    pub fn peer_lost(&mut self, node: NodeId) {
        self.gossip.forget(node);
        let Some(peer) = self.peers.get_mut(&node) else {
            return;
        };
        let incarnation = match &peer.link {
            PeerLink::Up { incarnation, .. } | PeerLink::Closed { incarnation, .. } => {
                Some(*incarnation)
            }
            PeerLink::Down { .. } => return,
            PeerLink::Connecting { .. } => None,
        };
        peer.link = PeerLink::Down { incarnation };
        tracing::warn!(?node, "peer lost");
        self.engine.handle_peer_down(node, &mut self.store);
        self.drain_engine();
        self.fail_rpcs_to(node);
        let now = sysv::now_seconds();
        let ids: Vec<IpcId> = self.sem_regions.keys().copied().collect();
        let (taken, held): (Vec<IpcId>, Vec<IpcId>) =
            ids.into_iter().partition(|id| self.take_set(*id));
        self.sems.peer_lost(node, now, &held);
        for id in taken {
            self.put_back_set(id);
        }
        for id in held {
            self.with_set(id, move |sems| sems.purge_lost(id, now));
        }
        self.drain_sems();
        // Its objects are gone cluster-wide: free their keys here, and
        // mark the copies of them this node holds.
        self.keys.retain(|_, id| id.home() != Some(node));
        for id in self.engine.cached_segments_homed_at(node) {
            if let Some(seg) = self.store.segments.get_mut(&id) {
                seg.home_lost = true;
            }
        }
        // Its processes' attachments to segments homed here are gone.
        let ids: Vec<SegmentId> = self.homes.keys().copied().collect();
        for id in ids {
            if let Some(h) = self.homes.get_mut(&id) {
                h.attaches.remove(&node);
                h.cached_on.remove(node);
            }
            self.destroy_if_done(id);
        }
    }

    /// The link to `node` (of `generation`) ended, or the peer's lease ran
    /// out: fence it now, declare it lost at the timeout.
    pub fn link_closed(&mut self, node: NodeId, generation: u64) {
        let Some(peer) = self.peers.get_mut(&node) else {
            return;
        };
        let PeerLink::Up {
            incarnation,
            generation: g,
            last_seen,
            ..
        } = peer.link
        else {
            return;
        };
        if g != generation {
            return;
        }
        // Dropping the sender ends the writer, which shuts the socket.
        peer.link = PeerLink::Closed {
            incarnation,
            last_seen,
        };
        tracing::warn!(
            ?node,
            "lost touch with the peer: nothing it gave is used here any more; lost at the timeout"
        );
        self.engine.fence_home(node, &mut self.store);
        self.drain_engine();
        self.fail_rpcs_to(node);
        for id in self.engine.cached_segments_homed_at(node) {
            if let Some(seg) = self.store.segments.get_mut(&id) {
                seg.home_lost = true;
            }
        }
    }

    fn fail_rpcs_to(&mut self, node: NodeId) {
        let failed: Vec<u64> = self
            .rpcs
            .iter()
            .filter(|(_, (to, _))| *to == node)
            .map(|(id, _)| *id)
            .collect();
        for id in failed {
            if let Some((_, tx)) = self.rpcs.remove(&id) {
                let _ = tx.send(RpcResponse::Err(libc::EHOSTDOWN));
            }
        }
    }

    /// Heartbeat tick: ping every live peer, fence those whose lease ran
    /// out, declare lost those silent for the whole timeout.
    ///
    /// The lease on a peer counts from the newest moment it is known to
    /// have heard us (`heard_us`: the sending time of the newest ping it
    /// answered), not from when we last heard it: on a one-way cut we may
    /// go on hearing a peer that no longer hears us, and it will declare
    /// us lost. A peer declares us lost no sooner than `timeout` after the
    /// last frame it got from us, which is no earlier than `heard_us`; we
    /// fence at most `fence_after` plus a tick after `heard_us`. With
    /// `fence_after` three heartbeats short of `timeout`, no node ever
    /// takes back (and hands to a writer) a page that a cut-off node still
    /// reads, whichever way the cut goes. A healthy link renews the lease
    /// every heartbeat (a ping, its pong at once), so its age at a tick is
    /// a heartbeat plus a round trip: `dsmd` wants `timeout` to be at
    /// least five heartbeats, which leaves two of margin.
    pub fn heartbeat(&mut self, timeout: Duration) {
        // The guardian's lease on this daemon (see `Guardian::tick`).
        if let Some(g) = &self.guardian {
            if let Err(e) = g.tick() {
                tracing::warn!("guardian tick: {e}");
            }
        }
        let now = Instant::now();
        let mut lost = Vec::new();
        let mut fenced = Vec::new();
        for (id, peer) in &self.peers {
            match &peer.link {
                PeerLink::Up { last_seen, .. } | PeerLink::Closed { last_seen, .. }
                    if now.duration_since(*last_seen) > timeout =>
                {
                    lost.push(*id)
                }
                PeerLink::Up {
                    heard_us,
                    generation,
                    ..
                } if now.duration_since(*heard_us) > self.fence_after => {
                    fenced.push((*id, *generation))
                }
                PeerLink::Connecting { since, .. } if now.duration_since(*since) > timeout => {
                    lost.push(*id)
                }
                _ => {}
            }
        }
        for (id, generation) in fenced {
            self.link_closed(id, generation);
        }
        for id in lost {
            if let Some(PeerLink::Up { generation, .. }) = self.peers.get(&id).map(|p| &p.link) {
                let generation = *generation;
                self.link_closed(id, generation);
            }
            self.peer_lost(id);
        }
        let up = self.peers_up();
        let sent_ns = self.clock_ns(Instant::now());
        for id in up {
            self.send_control(id, &Control::Ping { sent_ns });
        }
    }

    // ---- local segments and processes ------------------------------------------

    /// Make sure this node has a copy of `id` (`size` bytes).
    pub fn open_local_segment(&mut self, id: SegmentId, size: u64) -> Result<(), i32> {
        if let Some(seg) = self.store.segments.get(&id) {
            return if seg.home_lost {
                Err(libc::EIDRM)
            } else {
                Ok(())
            };
        }
        let home = id.home().ok_or(libc::EINVAL)?;
        if size == 0 || size > crate::ids::SEGMENT_BYTES_MAX {
            return Err(libc::EINVAL);
        }
        let len = u64::from(pages_for(size)) * PAGE_SIZE as u64;
        let memfd = Memfd::create(&format!("migshm-{}", id.0), len)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::ENOMEM))?;
        self.store.segments.insert(
            id,
            LocalSegment {
                memfd,
                size,
                mappings: vec![],
                home_lost: false,
            },
        );
        self.engine.open_cache(id, home, pages_for(size));
        Ok(())
    }

    fn drop_local_segment(&mut self, id: SegmentId) {
        if let Some(seg) = self.store.segments.get(&id) {
            if !seg.mappings.is_empty() {
                tracing::warn!(?id, "segment destroyed while mapped here");
            }
        }
        self.store.segments.remove(&id);
        if !self.homes.contains_key(&id) {
            self.engine.close(id);
            self.drain_engine();
        }
    }

    // ---- attachments counted at the homes ------------------------------------------

    pub fn new_session(&mut self) -> u64 {
        let id = self.next_session;
        self.next_session += 1;
        id
    }

    /// Connection `session` (of process `pid`) holds one more attachment
    /// of `id`, counted at its home.
    /// A local process's attachments and connections, for a migrator.
    pub fn process_info(&self, pid: i32) -> wire::ProcessInfo {
        let attachments = self
            .store
            .segments
            .values()
            .flat_map(|s| s.mappings.iter())
            .filter(|m| self.store.procs.get(&m.proc).is_some_and(|p| p.pid == pid))
            .map(|m| wire::AttachmentRecord {
                id: m.seg.0,
                addr: m.addr,
                len: m.len,
                pgoff: m.pgoff,
                handle: m.handle,
                readonly: m.readonly,
            })
            .collect();
        let links = self
            .links
            .values()
            .filter(|(p, _)| *p == pid)
            .map(|(_, link)| *link)
            .collect();
        wire::ProcessInfo { attachments, links }
    }

    pub fn session_attached(&mut self, session: u64, pid: i32, id: SegmentId) {
        let exits = &self.exits;
        self.attachments
            .entry(session)
            .or_insert_with(|| {
                let exited = crate::pidfd::open(pid).ok();
                if let (Some(set), Some(fd)) = (exits, &exited) {
                    let _ = set.add(fd, session);
                }
                SessionAttachments {
                    pid,
                    exited,
                    segments: Vec::new(),
                }
            })
            .segments
            .push(id);
    }

    /// One attachment of `id` by `session` is gone; false if it had none
    /// (already uncounted).
    pub fn session_detached(&mut self, session: u64, id: SegmentId) -> bool {
        let Some(entry) = self.attachments.get_mut(&session) else {
            return false;
        };
        match entry.segments.iter().position(|s| *s == id) {
            Some(i) => {
                entry.segments.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// The connection ended: uncount what it still had attached.
    pub fn session_ended(&mut self, session: u64) {
        self.links.remove(&session);
        self.adopt_grants
            .retain(|_, (granter, _)| *granter != session);
        if let Some(entry) = self.attachments.remove(&session) {
            if let (Some(exits), Some(fd)) = (&self.exits, &entry.exited) {
                exits.remove(fd);
            }
            self.uncount(entry);
        }
    }

    fn uncount(&mut self, entry: SessionAttachments) {
        for id in entry.segments {
            if let Some(home) = id.home() {
                // The answer is not awaited: nobody waits for this detach.
                drop(self.start_rpc(home, RpcRequest::SegDetach { id, pid: entry.pid }));
            }
        }
    }

    /// Settle now the exits of local processes whose end the daemon has
    /// not read yet (their attachments are uncounted, their semaphore undo
    /// applied), so that a call that follows a `wait()` for them sees what
    /// Linux shows then. The notices reach each home before the request
    /// that follows: links are FIFO. One `poll` for all of them.
    pub fn flush_exited_processes(&mut self) {
        let Some(exits) = &self.exits else {
            return;
        };
        // Up to 64 exits per call; the rest are settled as their
        // connections end, or by the next call.
        for token in exits.exited() {
            if token & SEM_WATCH_TOKEN != 0 {
                let generation = token & !SEM_WATCH_TOKEN;
                let pid = self
                    .sem_watched
                    .iter()
                    .find(|(_, (g, _))| *g == generation)
                    .map(|(pid, _)| *pid);
                if let Some(pid) = pid {
                    self.sem_process_exited(pid, generation);
                }
            } else if let Some(entry) = self.attachments.remove(&token) {
                if let (Some(exits), Some(fd)) = (&self.exits, &entry.exited) {
                    exits.remove(fd);
                }
                self.uncount(entry);
            }
        }
    }

    /// Serve a local process's faults from now on. Its uffd and pidfd are
    /// in the guardian's hands before this returns (so before the process
    /// is told it may touch the memory), else it is refused (ENOMEM).
    pub fn add_process(
        &mut self,
        pid: i32,
        pidfd: OwnedFd,
        uffd: std::sync::Arc<crate::uffd::Uffd>,
    ) -> Result<ProcId, i32> {
        let id = self.next_proc;
        self.next_proc += 1;
        self.store.procs.insert(
            id,
            LocalProcess {
                pid,
                pidfd,
                uffd,
                guarded: false,
                faults: 0,
            },
        );
        if let Err(e) = self.ensure_guarded(id) {
            self.store.procs.remove(&id);
            return Err(e);
        }
        Ok(id)
    }

    /// Have the guardian hold a served process again (before it is told it
    /// may touch a new mapping). ENOMEM if no guardian takes it.
    pub fn ensure_guarded(&mut self, proc: ProcId) -> Result<(), i32> {
        match self.store.procs.get(&proc) {
            Some(p) if p.guarded => return Ok(()),
            Some(_) => {}
            None => return Err(libc::EINVAL),
        }
        if !self.guard(proc) {
            return Err(libc::ENOMEM);
        }
        if let Some(p) = self.store.procs.get_mut(&proc) {
            p.guarded = true;
        }
        Ok(())
    }

    /// A process that maps no segment any more (in our records, and in the
    /// kernel's: `kernel_maps_any`) cannot read anything a dead daemon
    /// would fail to give: the guardian lets it go rather than kill it
    /// with the daemon. Its next attachment hands it over again.
    pub fn release_if_unmapped(&mut self, proc: ProcId, kernel_maps_any: bool) {
        let mapped = self
            .store
            .segments
            .values()
            .any(|seg| seg.mappings.iter().any(|m| m.proc == proc));
        if mapped || kernel_maps_any {
            return;
        }
        if let Some(p) = self.store.procs.get_mut(&proc) {
            if p.guarded {
                p.guarded = false;
                self.unguard(proc);
            }
        }
    }

    /// Stop serving a local process (its mappings are already forgotten).
    pub fn remove_process(&mut self, proc: ProcId) {
        if self.store.procs.remove(&proc).is_some_and(|p| p.guarded) {
            self.unguard(proc);
        }
    }

    /// Hold `uffd` (the one through which a host serves the moved process
    /// `pid`'s lazy memory) until `pid` exits, and have the guardian hold
    /// it too: whichever of the host, this daemon or both dies, the process
    /// is killed before the kernel could resolve a fault with zeros.
    pub fn hold_for_guest(&mut self, pid: i32, uffd: OwnedFd) -> Result<(), i32> {
        let pidfd = crate::pidfd::open(pid).map_err(|_| libc::ESRCH)?;
        let watch = pidfd.try_clone().map_err(|_| libc::ENOMEM)?;
        let token = GUARD_GUEST | self.next_guest_hold;
        self.next_guest_hold += 1;
        self.guest_uffds.insert(token, (pid, pidfd, uffd));
        if !self.guard(token) {
            self.guest_uffds.remove(&token);
            return Err(libc::ENOMEM);
        }
        let Some(shared) = self.self_ref.upgrade() else {
            return Ok(());
        };
        tokio::task::spawn_local(async move {
            crate::pidfd::exited(watch).await;
            let mut core = shared.borrow_mut();
            core.guest_uffds.remove(&token);
            core.unguard(token);
        });
        Ok(())
    }

    /// What the guardian holds under `token`, from the tables.
    fn guarded(&self, token: u64) -> Option<Guarded<'_>> {
        use std::os::fd::AsFd;
        if token & GUARD_GUEST != 0 {
            let (pid, pidfd, uffd) = self.guest_uffds.get(&token)?;
            return Some(Guarded::Process {
                pid: *pid,
                pidfd: pidfd.as_fd(),
                uffd: Some(uffd.as_fd()),
            });
        }
        if token & GUARD_REGION != 0 {
            let id = IpcId((token & !GUARD_REGION) as i32);
            let (_, memfd) = self.sem_regions.get(&id)?;
            return Some(Guarded::Region {
                memfd: memfd.as_fd(),
            });
        }
        if token & GUARD_UNDO != 0 {
            let generation = token & !GUARD_UNDO;
            let (pid, (_, fd)) = self
                .sem_watched
                .iter()
                .find(|(_, (g, _))| *g == generation)?;
            return Some(Guarded::Process {
                pid: *pid,
                pidfd: fd.as_fd(),
                uffd: None,
            });
        }
        let p = self.store.procs.get(&token)?;
        Some(Guarded::Process {
            pid: p.pid,
            pidfd: p.pidfd.as_fd(),
            uffd: Some(p.uffd.as_fd()),
        })
    }

    /// Every token the guardian must hold.
    fn guarded_tokens(&self) -> Vec<u64> {
        let mut tokens: Vec<u64> = self
            .store
            .procs
            .iter()
            .filter(|(_, p)| p.guarded)
            .map(|(id, _)| *id)
            .collect();
        tokens.extend(self.guest_uffds.keys().copied());
        tokens.extend(self.sem_watched.values().map(|(g, _)| GUARD_UNDO | g));
        tokens.extend(
            self.sem_regions
                .keys()
                .map(|id| GUARD_REGION | u64::from(id.0 as u32)),
        );
        tokens
    }

    /// Hand what `token` names (already in the tables) to the guardian; if
    /// it cannot take it, start a new guardian with everything. False if
    /// no guardian holds it.
    fn guard(&mut self, token: u64) -> bool {
        let held = match (&self.guardian, self.guarded(token)) {
            (Some(g), Some(what)) => g.hold(token, what),
            (None, _) => Err(std::io::Error::other("no guardian")),
            (_, None) => return false,
        };
        match held {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("the guardian did not take a descriptor ({e}); starting a new one");
                self.restart_guardian()
            }
        }
    }

    fn unguard(&mut self, token: u64) {
        if let Some(g) = &self.guardian {
            if let Err(e) = g.forget(token) {
                tracing::warn!("guardian: {e}");
            }
        }
    }

    /// Start a (new) guardian and hand it everything it must hold. The old
    /// one, if alive, sees its socket close and, taking the daemon for
    /// gone, would kill the processes: so it is killed first.
    pub fn restart_guardian(&mut self) -> bool {
        if let Some(mut old) = self.guardian.take() {
            old.kill();
        }
        let guardian = match Guardian::start(self.fence_after) {
            Ok(g) => g,
            Err(e) => {
                tracing::error!("cannot start a guardian: {e}");
                return false;
            }
        };
        let mut all = true;
        for token in self.guarded_tokens() {
            if let Some(what) = self.guarded(token) {
                if let Err(e) = guardian.hold(token, what) {
                    tracing::error!("the new guardian did not take a descriptor: {e}");
                    all = false;
                }
            }
        }
        tracing::info!(pid = guardian.pid(), "guardian started");
        self.guardian = Some(guardian);
        all
    }

    /// Forget a process's mappings (it detached or exited; `only`: the
    /// pieces of one attachment, by segment and handle); returns the
    /// segments it was attached to, once per piece.
    pub fn forget_mappings(
        &mut self,
        proc: ProcId,
        only: Option<(SegmentId, u64)>,
    ) -> Vec<SegmentId> {
        let mut gone = Vec::new();
        for (id, seg) in self.store.segments.iter_mut() {
            seg.mappings.retain(|m| {
                let hit = m.proc == proc && only.is_none_or(|(s, h)| s == *id && h == m.handle);
                if hit {
                    gone.push(*id);
                }
                !hit
            });
        }
        gone
    }

    // ---- home services ----------------------------------------------------------

    /// Create a segment homed here (the caller registers its key).
    pub fn create_home_segment(
        &mut self,
        key: i32,
        size: u64,
        flags: i32,
        cred: &Credentials,
        space: sysv::ShmSpace,
        asked: Option<IpcId>,
    ) -> Result<SegmentId, i32> {
        // The limits as they are now (they may change at run time), in the
        // kernel's order (newseg, then ipc_addid). Only SysV segments count.
        let limits = ShmLimits::from_proc();
        if size < limits.shmmin || size > limits.shmmax {
            return Err(libc::EINVAL);
        }
        let pages = size.div_ceil(PAGE_SIZE as u64);
        let sysv_homes = || {
            self.homes
                .values()
                .filter(|h| h.space == sysv::ShmSpace::SysV)
        };
        if space == sysv::ShmSpace::SysV {
            let pages_now: u64 = sysv_homes()
                .map(|h| h.size.div_ceil(PAGE_SIZE as u64))
                .sum();
            if pages_now.saturating_add(pages) > limits.shmall {
                return Err(libc::ENOSPC);
            }
        }
        if flags & sysv::SHM_HUGETLB != 0 {
            sysv::hugetlb_allowed(cred, size, flags)?;
        }
        // Within the kernel's SHMMAX but more than a segment can be here:
        // what Linux says when it cannot back a segment.
        if size > crate::ids::SEGMENT_BYTES_MAX {
            return Err(libc::ENOMEM);
        }
        if space == sysv::ShmSpace::SysV && sysv_homes().count() as u64 >= limits.shmmni {
            return Err(libc::ENOSPC);
        }
        let mode = (flags & 0o777) as u32;
        let id = self.id_for(asked, IpcKind::Segment)?;
        let len = u64::from(pages_for(size)) * PAGE_SIZE as u64;
        let home_copy =
            Memfd::create(&format!("migshm-home-{}", id.0), len).map_err(|_| libc::ENOMEM)?;
        self.store.home_copies.insert(id, home_copy);
        self.engine.create_home(id, pages_for(size));
        let now = sysv::now_seconds();
        self.homes.insert(
            id,
            HomeSegment {
                perm: IpcPerm::new(key, mode, cred),
                size,
                atime: 0,
                dtime: 0,
                ctime: now,
                cpid: cred.pid,
                lpid: 0,
                attaches: BTreeMap::new(),
                cached_on: NodeSet::EMPTY,
                space,
            },
        );
        Ok(id)
    }

    /// A fresh id for an object homed here (segments and sets share the
    /// sequence, so an id names one object).
    /// The id asked for if no object of its kind has it and it is homed
    /// here, else a fresh one (as the kernel does when `*_next_id` is
    /// taken). Segments and sets have ids of their own, as on Linux, so an
    /// asked id may name one of each; fresh ids come from one sequence.
    fn id_for(&mut self, asked: Option<IpcId>, kind: IpcKind) -> Result<IpcId, i32> {
        let taken = |core: &Self, id: IpcId| match kind {
            IpcKind::SemSet => core.sems.is_homed_here(id),
            _ => core.homes.contains_key(&id),
        };
        match asked {
            Some(id) if id.0 > 0 && id.home() == Some(self.me) && !taken(self, id) => Ok(id),
            _ => Ok(self.allocate_id()),
        }
    }

    fn allocate_id(&mut self) -> IpcId {
        loop {
            let candidate = IpcId::new(self.me, self.next_seq);
            self.next_seq = (self.next_seq + 1) & IpcId::SEQ_MASK;
            if candidate.0 > 0
                && !self.homes.contains_key(&candidate)
                && !self.sems.is_homed_here(candidate)
            {
                return candidate;
            }
        }
    }

    // ---- semaphore sets ---------------------------------------------------------

    /// `semget` creating a set homed here (the caller registers its key).
    pub fn create_home_set(
        &mut self,
        key: i32,
        nsems: i32,
        mode: u32,
        cred: &Credentials,
        asked: Option<IpcId>,
    ) -> Result<IpcId, i32> {
        let id = self.id_for(asked, IpcKind::SemSet)?;
        self.sems
            .create(id, key, nsems, mode, cred, sysv::now_seconds())?;
        self.open_region(id);
        Ok(id)
    }

    /// Give a set now arbitrated here its fast path (small sets only).
    fn open_region(&mut self, id: IpcId) {
        if self.sem_regions.contains_key(&id) {
            return;
        }
        let Some((snap, perm, waiters)) = self.sems.export(id) else {
            return;
        };
        if snap.values.len() > semregion::NSEMS_MAX {
            return;
        }
        // A new region is the daemon's until filled from the set.
        match Region::create(snap.values.len(), &perm) {
            Ok((region, memfd)) => {
                region.store(&snap);
                if !waiters {
                    region.release();
                }
                self.sem_regions.insert(id, (region, memfd));
                self.guard(GUARD_REGION | u64::from(id.0 as u32));
            }
            Err(e) => tracing::warn!(?id, "no fast path for the set: {e}"),
        }
    }

    /// A set created here whose key another node won: it never existed.
    pub fn discard_home_set(&mut self, id: IpcId) {
        self.sems.discard(id);
        if let Some((region, _)) = self.sem_regions.remove(&id) {
            region.retire();
            self.unguard(GUARD_REGION | u64::from(id.0 as u32));
        }
    }

    /// Take set `id`'s values out of its region (if it has one) into the
    /// engine; false if a process holds them too long (see `semregion`).
    fn take_set(&mut self, id: IpcId) -> bool {
        if self.sem_deferred.contains_key(&id) {
            return false;
        }
        let Some((region, _)) = self.sem_regions.get(&id) else {
            return true;
        };
        if !region.try_acquire(REGION_PATIENCE) {
            return false;
        }
        let snap = region.load();
        self.sems.absorb(id, &snap);
        true
    }

    /// Put set `id`'s values back into its region after the engine worked
    /// on them; the daemon keeps holding them while the set has waiters,
    /// and retires the region once the set is gone from here.
    fn put_back_set(&mut self, id: IpcId) {
        match self.sems.export(id) {
            Some((snap, perm, waiters)) => {
                if let Some((region, _)) = self.sem_regions.get(&id) {
                    region.store(&snap);
                    region.set_perm(&perm);
                    if !waiters {
                        region.release();
                    }
                }
            }
            None => {
                if let Some((region, _)) = self.sem_regions.remove(&id) {
                    region.retire();
                    self.unguard(GUARD_REGION | u64::from(id.0 as u32));
                }
            }
        }
    }

    /// Run `f` on the semaphore service with set `id`'s values taken out of
    /// its region. If a process holds them (stopped inside an operation, or
    /// starved of CPU), `f` waits, after whatever waits already, until it
    /// lets go: the set pauses, the daemon does not.
    fn with_set(&mut self, id: IpcId, f: impl FnOnce(&mut SemService) + 'static) {
        if self.take_set(id) {
            f(&mut self.sems);
            self.put_back_set(id);
        } else {
            if !self.sem_deferred.contains_key(&id) {
                tracing::warn!(?id, "a process holds the set's values; its requests wait");
            }
            self.sem_deferred
                .entry(id)
                .or_default()
                .push_back(Box::new(f));
            self.sem_retry.notify_one();
        }
        self.drain_sems();
    }

    /// Like `with_set`, for a call that must answer now: `None` if the
    /// set's values are held by a process.
    fn with_set_now<R>(&mut self, id: IpcId, f: impl FnOnce(&mut SemService) -> R) -> Option<R> {
        if !self.take_set(id) {
            return None;
        }
        let out = f(&mut self.sems);
        self.put_back_set(id);
        self.drain_sems();
        Some(out)
    }

    /// Run the requests that waited for sets whose values a process held.
    /// True while some still wait.
    pub fn retry_deferred_sems(&mut self) -> bool {
        let ids: Vec<IpcId> = self.sem_deferred.keys().copied().collect();
        for id in ids {
            let Some(queue) = self.sem_deferred.remove(&id) else {
                continue;
            };
            if !self.take_set(id) {
                self.sem_deferred.insert(id, queue);
                continue;
            }
            for f in queue {
                f(&mut self.sems);
            }
            self.put_back_set(id);
        }
        self.drain_sems();
        !self.sem_deferred.is_empty()
    }

    /// Every set homed here, for `ipcs` (a set whose values a process holds
    /// is shown as the daemon last saw it).
    fn sem_list(&mut self) -> Vec<wire::SemSetStat> {
        let ids: Vec<IpcId> = self.sem_regions.keys().copied().collect();
        let taken: Vec<IpcId> = ids.into_iter().filter(|id| self.take_set(*id)).collect();
        let list = self.sems.list();
        for id in taken {
            self.put_back_set(id);
        }
        list
    }

    /// The set's region, for a local process that may alter the set.
    pub fn sem_region_fd(&self, id: IpcId, cred: &Credentials) -> Result<OwnedFd, i32> {
        let perm = self.sems.perm_of(id).ok_or(libc::ENOENT)?;
        let (_, memfd) = self.sem_regions.get(&id).ok_or(libc::ENOENT)?;
        if !perm.permits(cred, 0o222) {
            return Err(libc::EACCES);
        }
        use std::os::fd::AsFd;
        memfd
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EMFILE))
    }

    /// Start a `semop` at the set's home; its result arrives on the
    /// returned channel (the wait id withdraws it, see [`Core::sem_cancel`]).
    /// `owner` is the node whose process `cred.pid` is (see
    /// [`SemService::submit_as`]).
    pub fn sem_submit(
        &mut self,
        id: IpcId,
        sops: Vec<::sysv::sem::SemBuf>,
        cred: Credentials,
        owner: NodeId,
    ) -> (u64, oneshot::Receiver<SemResult>) {
        let (tx, rx) = oneshot::channel();
        let pid = cred.pid;
        let now = sysv::now_seconds();
        let wait = self.sems.reserve_wait();
        self.sem_waiters.insert(wait, tx);
        self.with_set(id, move |sems| {
            sems.submit_as(wait, id, sops, pid, cred, owner, now)
        });
        (wait, rx)
    }

    /// Before SEM_UNDO operations of local process `pid` on `id`: make
    /// sure its exit will be seen (a pidfd) and settle them. False if the
    /// process is already gone.
    pub fn watch_for_undo(&mut self, pid: i32, id: IpcId) -> bool {
        if let Some((generation, fd)) = self.sem_watched.get(&pid) {
            if !crate::pidfd::has_exited(fd) {
                self.sems.note_undo(pid, id);
                return true;
            }
            // That process exited and its watcher has not run yet: settle
            // it now; this caller may be a new process with its pid.
            let generation = *generation;
            self.sem_process_exited(pid, generation);
        }
        let Some(shared) = self.self_ref.upgrade() else {
            return false;
        };
        let Ok(fd) = crate::pidfd::open(pid) else {
            return false;
        };
        if crate::pidfd::has_exited(&fd) {
            return false;
        }
        let Ok(watch) = fd.try_clone() else {
            return false;
        };
        let generation = self.watch_process(pid, fd);
        self.sems.note_undo(pid, id);
        tokio::task::spawn_local(async move {
            crate::pidfd::exited(watch).await;
            shared.borrow_mut().sem_process_exited(pid, generation);
        });
        true
    }

    /// `ClientRequest::WithdrawWaits`: end every `semop` of local process
    /// `pid` that waits; how many did.
    pub fn withdraw_waits(&self, pid: i32) -> usize {
        let mut n = 0;
        for (waiter, withdraw) in self.sem_waiting.values() {
            if *waiter == pid {
                withdraw.notify_one();
                n += 1;
            }
        }
        n
    }

    /// Withdraw the `semop` `wait` on set `id` (see [`Core::sem_submit`]).
    pub fn sem_cancel(&mut self, id: IpcId, wait: u64) {
        self.with_set(id, move |sems| sems.cancel(wait));
    }

    /// Watch a local process that holds undo adjustments; returns the
    /// generation its watcher reports the exit with.
    pub fn watch_process(&mut self, pid: i32, fd: OwnedFd) -> u64 {
        let generation = self.next_watch;
        self.next_watch += 1;
        if let Some(exits) = &self.exits {
            let _ = exits.add(&fd, SEM_WATCH_TOKEN | generation);
        }
        if let Some((old_generation, old)) = self.sem_watched.insert(pid, (generation, fd)) {
            if let Some(exits) = &self.exits {
                exits.remove(&old);
            }
            self.unguard(GUARD_UNDO | old_generation);
        }
        self.guard(GUARD_UNDO | generation);
        generation
    }

    /// A watched local process exited (`generation` tells it from a later
    /// process with the same pid, already settled).
    pub fn sem_process_exited(&mut self, pid: i32, generation: u64) {
        if self.sem_watched.get(&pid).map(|(g, _)| *g) != Some(generation) {
            return;
        }
        if let Some((_, fd)) = self.sem_watched.remove(&pid) {
            if let Some(exits) = &self.exits {
                exits.remove(&fd);
            }
            self.unguard(GUARD_UNDO | generation);
        }
        let now = sysv::now_seconds();
        for id in self.sems.take_undo_sets(pid) {
            self.with_set(id, move |sems| sems.local_process_exited_at(id, pid, now));
        }
    }

    /// Carry out what the semaphore service asked for.
    fn drain_sems(&mut self) {
        while let Some(action) = self.sems.poll_action() {
            match action {
                SemAction::Send(to, notice) => self.send_control(to, &Control::Notice(notice)),
                SemAction::Complete { wait, result } => {
                    if let Some(tx) = self.sem_waiters.remove(&wait) {
                        let _ = tx.send(result);
                    }
                }
                SemAction::Arbitrating(id) => self.open_region(id),
            }
        }
    }

    fn on_sem_notice(&mut self, node: NodeId, notice: Notice) {
        let now = sysv::now_seconds();
        match notice.sem_set() {
            // With the set's values out of its fast-path region, in order
            // behind any work that waits for them.
            Some(set) => self.with_set(set, move |sems| {
                sems.on_notice(node, notice, now);
            }),
            None => {
                self.sems.on_notice(node, notice, now);
                self.drain_sems();
            }
        }
    }

    /// Destroy a removed segment once nothing is attached anywhere.
    pub fn destroy_if_done(&mut self, id: SegmentId) {
        let Some(h) = self.homes.get(&id) else { return };
        if h.perm.mode & SHM_DEST == 0 || h.nattch() > 0 {
            return;
        }
        let cached_on = h.cached_on;
        self.homes.remove(&id);
        self.store.home_copies.remove(&id);
        for node in cached_on.iter() {
            if node != self.me {
                self.send_control(node, &Control::Notice(Notice::SegmentGone { id }));
            }
        }
        self.store.segments.remove(&id);
        self.engine.close(id);
        self.drain_engine();
        tracing::debug!(?id, "segment destroyed");
    }

    fn stat_of(&self, id: SegmentId, h: &HomeSegment) -> ShmStat {
        ShmStat {
            id: id.0,
            perm: h.perm.clone(),
            size: h.size,
            atime: h.atime,
            dtime: h.dtime,
            ctime: h.ctime,
            cpid: h.cpid,
            lpid: h.lpid,
            nattch: h.nattch(),
            home: self.me.0,
            space: h.space,
        }
    }

    /// Serve a request from another daemon (or from this one).
    pub fn handle_rpc(&mut self, from: NodeId, req: RpcRequest) -> RpcResponse {
        use RpcResponse as R;
        match req {
            RpcRequest::KeyLookup { key } => match self.keys.get(&key) {
                Some(id) => R::KeyFound(*id),
                None => R::KeyAbsent,
            },
            RpcRequest::KeyRegister { key, id } => match self.keys.get(&key) {
                Some(existing) if *existing != id => R::KeyExists(*existing),
                _ => {
                    self.keys.insert(key, id);
                    self.replicate_key(key, Some(id));
                    R::Ok
                }
            },
            RpcRequest::KeyUnregister { key, id } => {
                if self.keys.get(&key) == Some(&id) {
                    self.keys.remove(&key);
                    self.replicate_key(key, None);
                }
                R::Ok
            }
            RpcRequest::SegOpen {
                id,
                size,
                flags,
                cred,
            } => {
                let Some(h) = self.homes.get(&id) else {
                    return R::Err(libc::EIDRM);
                };
                if h.perm.mode & SHM_DEST != 0 {
                    return R::Err(libc::EIDRM);
                }
                if size > h.size {
                    return R::Err(libc::EINVAL);
                }
                if !h.perm.permits(&cred, (flags & 0o777) as u32) {
                    return R::Err(libc::EACCES);
                }
                R::Opened { size: h.size }
            }
            RpcRequest::SegAttach {
                id,
                readonly,
                inherited,
                cred,
            } => {
                let Some(h) = self.homes.get_mut(&id) else {
                    return R::Err(libc::EINVAL);
                };
                if !inherited && !h.perm.permits_attach(&cred, readonly) {
                    return R::Err(libc::EACCES);
                }
                *h.attaches.entry(from).or_default() += 1;
                h.cached_on.insert(from);
                h.atime = sysv::now_seconds();
                h.lpid = cred.pid;
                R::Opened { size: h.size }
            }
            RpcRequest::SegDetach { id, pid } => {
                let Some(h) = self.homes.get_mut(&id) else {
                    return R::Err(libc::EINVAL);
                };
                match h.attaches.get_mut(&from) {
                    Some(n) if *n > 0 => {
                        *n -= 1;
                        if *n == 0 {
                            h.attaches.remove(&from);
                        }
                    }
                    _ => return R::Err(libc::EINVAL),
                }
                h.dtime = sysv::now_seconds();
                h.lpid = pid;
                self.destroy_if_done(id);
                R::Ok
            }
            RpcRequest::SegStat { id, cred } => {
                let Some(h) = self.homes.get(&id) else {
                    return R::Err(libc::EINVAL);
                };
                if !h.perm.permits_read(&cred) {
                    return R::Err(libc::EACCES);
                }
                R::Stat(self.stat_of(id, h))
            }
            RpcRequest::SegSet {
                id,
                cred,
                uid,
                gid,
                mode,
            } => {
                let Some(h) = self.homes.get_mut(&id) else {
                    return R::Err(libc::EINVAL);
                };
                if !h.perm.may_control(&cred) {
                    return R::Err(libc::EPERM);
                }
                if let Err(e) = h.perm.update(uid, gid, mode) {
                    return R::Err(e);
                }
                h.ctime = sysv::now_seconds();
                R::Ok
            }
            RpcRequest::SegRemove { id, cred } => {
                let Some(h) = self.homes.get_mut(&id) else {
                    return R::Err(libc::EINVAL);
                };
                if !h.perm.may_control(&cred) {
                    return R::Err(libc::EPERM);
                }
                let key = h.perm.key;
                let kind = h.space.key_kind();
                // As on Linux: the key is freed at once, the memory when the
                // last attachment goes.
                h.perm.mode |= SHM_DEST;
                h.perm.key = 0;
                h.ctime = sysv::now_seconds();
                self.destroy_if_done(id);
                R::Removed { key, kind }
            }
            RpcRequest::SemOpen {
                id,
                nsems,
                flags,
                cred,
            } => match self.sems.open(id, nsems, flags, &cred) {
                Ok(()) => R::Ok,
                Err(e) => R::Err(e),
            },
            RpcRequest::SemCtl { id, cred, cmd } => {
                let now = sysv::now_seconds();
                let reply = self
                    .with_set_now(id, |sems| sems.ctl(from, id, &cred, cmd, now))
                    .unwrap_or(RpcResponse::Moving);
                self.drain_sems();
                reply
            }
            RpcRequest::SemList => R::SemSets(self.sem_list()),
            RpcRequest::Create(Creation::Segment {
                key,
                size,
                flags,
                cred,
                space,
                id,
            }) => self
                .create_home_segment(key, size, flags, &cred, space, id)
                .map_or_else(R::Err, R::Created),
            RpcRequest::SegLock {
                id,
                lock,
                cred,
                memlock,
            } => {
                let Some(h) = self.homes.get_mut(&id) else {
                    return R::Err(libc::EINVAL);
                };
                // As shmctl_do_lock: without CAP_IPC_LOCK only the owner or
                // creator, and locking needs a memlock limit.
                if !cred.cap_ipc_lock {
                    if cred.uid != h.perm.uid && cred.uid != h.perm.cuid {
                        return R::Err(libc::EPERM);
                    }
                    if lock && memlock == 0 {
                        return R::Err(libc::EPERM);
                    }
                }
                if lock {
                    h.perm.mode |= sysv::SHM_LOCKED;
                } else {
                    h.perm.mode &= !sysv::SHM_LOCKED;
                }
                R::Ok
            }
            RpcRequest::Create(Creation::SemSet {
                key,
                nsems,
                mode,
                cred,
                id,
            }) => self
                .create_home_set(key, nsems, mode, &cred, id)
                .map_or_else(R::Err, R::Created),
            RpcRequest::Discard { id, kind } => {
                match kind {
                    IpcKind::SemSet => self.discard_home_set(id),
                    IpcKind::Segment | IpcKind::PosixShm => {
                        if let Some(h) = self.homes.get_mut(&id) {
                            h.perm.mode |= SHM_DEST;
                            self.destroy_if_done(id);
                        }
                    }
                }
                R::Ok
            }
            RpcRequest::SegList => R::Segments(
                self.homes
                    .iter()
                    .map(|(id, h)| self.stat_of(*id, h))
                    .collect(),
            ),
            RpcRequest::Status => R::Status(self.status()),
            RpcRequest::StartHost { .. } if self.placement.blocked => R::Refused(format!(
                "node {} takes no guests (blocked: omctl unblock)",
                self.me
            )),
            RpcRequest::StartHost {
                token,
                home_pid,
                pinned,
            } => {
                match self
                    .migrations
                    .start_host(self.listen.ip(), token, from, home_pid, pinned)
                {
                    Ok(port) => {
                        crate::faults::point("dsmd.start_host");
                        R::HostPort(port)
                    }
                    Err(e) => {
                        tracing::error!(?from, home_pid, "cannot host a migrating process: {e}");
                        R::Err(libc::EIO)
                    }
                }
            }
            RpcRequest::Migrations => R::Migrations(self.migrations.entries()),
            RpcRequest::RecentMoves => R::Moves(self.placement.recent(self.clock_ms())),
            RpcRequest::Placements => R::Placements(self.placements()),
            RpcRequest::Lock { uid, pid, locked } => match self.lock(uid, pid, locked) {
                Ok(()) => R::Ok,
                Err(e) => R::Err(e),
            },
            RpcRequest::SemNoteUndo { pid, set } => {
                if self.migrations.runs_or_moves_to(pid) != Some(from) {
                    R::Err(libc::EPERM)
                } else if self.watch_for_undo(pid, set) {
                    R::Ok
                } else {
                    R::Err(libc::ESRCH)
                }
            }
            // Answered by a task (see the peer frame dispatch).
            RpcRequest::Migrate { .. } => R::Err(libc::EINVAL),
        }
    }

    pub fn status(&self) -> NodeStatus {
        let load = self.own_load();
        NodeStatus {
            node: self.me.0,
            segments_homed: self.homes.len() as u64,
            sem_sets_homed: self.sems.sets_homed() as u64,
            segments_cached: self.store.segments.len() as u64,
            resident_pages: self
                .store
                .segments
                .keys()
                .map(|id| u64::from(self.engine.resident_pages(*id)))
                .sum(),
            faults_served: self.store.faults_served,
            remote_requests: self.remote_requests,
            bytes_sent: self.bytes_sent,
            bytes_received: self.bytes_received,
            attached_processes: self.store.procs.len() as u64,
            cpus: super::load::format_cpu_list(&self.cpus),
            load_milli: (load.load * 1000.0).round() as u64,
            free_kib: load.free_kib,
            table_bytes: self.engine.table_bytes(),
            low_latency_held_ms: self.wakeups.held_ms(),
        }
    }
}
