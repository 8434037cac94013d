//! Every byte that crosses a socket is encoded and decoded here, so the
//! format can change in one place.
//!
//! * Peers (TCP): length-delimited frames (`tokio-util`). The first byte of a
//!   frame is its kind. Control frames are `postcard`; coherence frames are a
//!   small `postcard` header followed by the raw page bytes, which are sliced
//!   out of the received buffer without another copy.
//! * Local clients (unix stream): a little-endian `u32` length, then a
//!   `postcard` body; descriptors travel alongside as SCM_RIGHTS.
//!
//! A connection starts with [`Hello`] carrying [`PROTOCOL_VERSION`]; a peer
//! speaking another version is refused.

use crate::coherence::CohMsg;
use crate::ids::{IpcId, IpcKey, NodeId, PageKey, SegmentId, SemSetId, PAGE_SIZE};
use crate::sysv::{Credentials, IpcPerm, ShmStat};
use bytes::{BufMut, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use sysv::sem::{SemBuf, SemSet};

pub const PROTOCOL_VERSION: u32 = 5;
pub const MAGIC: [u8; 4] = *b"MSHM";
/// Largest peer frame: a read grant with the full read-ahead, plus slack.
pub const PEER_FRAME_MAX: usize = (crate::coherence::PREFETCH_PAGES_MAX as usize + 2) * PAGE_SIZE;
/// Largest client frame (an `ipcs` listing of thousands of segments fits).
pub const CLIENT_FRAME_MAX: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("empty frame")]
    Empty,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
}

// ---- peers -----------------------------------------------------------------

/// First frame in each direction of a peer connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 4],
    pub version: u32,
    pub node: NodeId,
    /// Changes every time a daemon starts, so a restarted node is known as new.
    pub incarnation: u64,
    /// Challenge the other side must answer with the cluster secret.
    pub nonce: [u8; 32],
}

/// Requests one daemon makes of another (directory and home services).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RpcRequest {
    /// At a key's directory node.
    KeyLookup {
        key: IpcKey,
    },
    KeyRegister {
        key: IpcKey,
        id: IpcId,
    },
    KeyUnregister {
        key: IpcKey,
        id: IpcId,
    },
    /// At a segment's home: `shmctl(SHM_LOCK/SHM_UNLOCK)`, with the
    /// caller's RLIMIT_MEMLOCK.
    SegLock {
        id: SegmentId,
        lock: bool,
        cred: Credentials,
        memlock: u64,
    },
    /// At a segment's home: `shmget` of an existing key (size and mode checks).
    SegOpen {
        id: SegmentId,
        size: u64,
        flags: i32,
        cred: Credentials,
    },
    /// `inherited`: a forked child takes over its parent's attachment
    /// (counted, not permission-checked, as `fork` does).
    SegAttach {
        id: SegmentId,
        readonly: bool,
        inherited: bool,
        cred: Credentials,
    },
    SegDetach {
        id: SegmentId,
        pid: i32,
    },
    SegStat {
        id: SegmentId,
        cred: Credentials,
    },
    SegSet {
        id: SegmentId,
        cred: Credentials,
        uid: u32,
        gid: u32,
        mode: u32,
    },
    SegRemove {
        id: SegmentId,
        cred: Credentials,
    },
    /// Every segment homed at the node (for a cluster-wide `ipcs`).
    SegList,
    /// Create an object homed at the node (its key is registered by the
    /// asker): answered `Created`.
    Create(Creation),
    /// An object created for a `Create` whose key another node won: it
    /// never existed.
    Discard {
        id: IpcId,
        kind: crate::ids::IpcKind,
    },
    /// At a set's home: `semget` of an existing key (size and mode checks).
    SemOpen {
        id: SemSetId,
        nsems: i32,
        flags: i32,
        cred: Credentials,
    },
    /// At a set's home: `semctl`.
    SemCtl {
        id: SemSetId,
        cred: Credentials,
        cmd: SemCtl,
    },
    /// Every semaphore set homed at the node.
    SemList,
    /// Counters for `omctl status`.
    Status,
    /// Start a host for a process of the asking node moving here; the
    /// deputy will connect with `token`.
    StartHost {
        token: u128,
        home_pid: i32,
        /// Placed by hand or locked: its new node's balancer leaves it.
        pinned: bool,
    },
    /// This node's migrated and guest processes.
    Migrations,
    /// `omctl migrate`, asked on the node a process runs on, for its home
    /// (which does it): the caller's uid, the home pid, the target; and
    /// who asks (the balancer's requests are refused for a process that is
    /// locked or was placed by hand).
    Migrate {
        uid: u32,
        pid: i32,
        to: Option<NodeId>,
        cause: MoveCause,
    },
    /// `omctl lock|unlock PID`, asked on the node a process runs on, for
    /// its home (which keeps the lock).
    Lock {
        uid: u32,
        pid: i32,
        locked: bool,
    },
    /// The moves this node made in the last minute (`omctl top`).
    RecentMoves,
    /// Every process under `omrun` homed or running here, and why it is
    /// where it is (`omctl ps`).
    Placements,
    /// To a migrated process's home: process `pid` of this node, running
    /// on the asking node, is about to make SEM_UNDO operations on `set`:
    /// its exit here must apply them. `Err(ESRCH)`: it is gone.
    SemNoteUndo {
        pid: i32,
        set: SemSetId,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RpcResponse {
    Ok,
    Err(i32),
    KeyFound(IpcId),
    KeyAbsent,
    /// The key was registered meanwhile by another object.
    KeyExists(IpcId),
    Opened {
        size: u64,
    },
    /// The object is removed (a segment: marked for removal); its key
    /// must now be unregistered.
    Removed {
        key: i32,
        kind: crate::ids::IpcKind,
    },
    Stat(ShmStat),
    Segments(Vec<ShmStat>),
    Status(NodeStatus),
    /// `semctl` GETVAL, GETPID, GETNCNT, GETZCNT.
    Value(i32),
    /// `semctl` GETALL.
    Values(Vec<u16>),
    SemStat(SemSetStat),
    SemSets(Vec<SemSetStat>),
    /// The set is lent and being recalled: ask again shortly.
    Moving,
    Created(IpcId),
    /// Where the host listens for the deputy.
    HostPort(u16),
    /// A request refused or failed, with the reason for the user.
    Refused(String),
    Migrations(Vec<MigrationEntry>),
    /// A `SemOp` withdrawn for a migration (`ClientRequest::WithdrawWaits`):
    /// nothing of it was applied; the caller asks again, from wherever it
    /// runs by then.
    Withdrawn,
    Moves(Vec<MoveRecord>),
    Placements(Vec<Placement>),
}

/// Who moves a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MoveCause {
    /// `omctl migrate`, `omrun --node`.
    Hand,
    Balancer,
    /// Its node was told to send its guests home (`omctl expel`).
    Expelled,
}

impl MoveCause {
    pub fn as_str(self) -> &'static str {
        match self {
            MoveCause::Hand => "by hand",
            MoveCause::Balancer => "balancer",
            MoveCause::Expelled => "expelled",
        }
    }
}

/// A move a home node made of one of its processes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRecord {
    pub home: NodeId,
    pub home_pid: i32,
    pub from: NodeId,
    pub to: NodeId,
    /// How long ago it ended, when sent.
    pub ago_ms: u32,
    pub cause: MoveCause,
    /// Whether the process runs at `to` now (else the reason it failed).
    pub failed: Option<String>,
}

/// Where a process under `omrun` runs, and why there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub home: NodeId,
    pub home_pid: i32,
    pub runs_on: NodeId,
    pub pid_there: i32,
    /// `moved by the balancer`, `moved by hand`, `locked`, `cannot move:
    /// REASON`, `at home`...
    pub why: String,
}

/// `omctl top`'s frame: every node's figures, the moves of the last
/// minute, whether this node balances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopFrame {
    pub nodes: Vec<LoadEntry>,
    pub moves: Vec<MoveRecord>,
}

/// One-way notices between daemons.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Notice {
    /// The segment was destroyed at its home; drop the node's copy.
    SegmentGone { id: SegmentId },
    /// A key directory entry copied between a key's primary and secondary
    /// directory nodes (`None`: the key was freed).
    KeyReplica { key: IpcKey, id: Option<IpcId> },
    /// To a set's home (or forwarded to the node it is lent to, or sent
    /// back): apply `sops` for process `pid` of node `origin`, waiting if it
    /// must. Always answered by one [`Notice::SemResult`] to `origin`.
    SemOp {
        origin: NodeId,
        wait: u64,
        set: SemSetId,
        sops: Vec<SemBuf>,
        pid: i32,
        cred: Credentials,
        /// The node whose process `pid` is (its undo record's key): the
        /// origin, or the home of a process that migrated to the origin.
        owner: NodeId,
    },
    /// To a set's home: give up waiting (signal, timeout, caller gone). The
    /// answer is the op's own `SemResult`: `Cancelled`, or the outcome it
    /// had already reached.
    SemCancel {
        origin: NodeId,
        set: SemSetId,
        wait: u64,
    },
    /// From a set's home: how a `SemOp` ended.
    SemResult { wait: u64, result: SemResult },
    /// To a set's home: a process of node `origin` exited; apply its undo
    /// adjustments and drop its waiters.
    SemProcessExited {
        origin: NodeId,
        set: SemSetId,
        pid: i32,
    },
    /// From a set's home: arbitrate the set for now (it is quiet).
    SemLend { set: SemSetId, state: Box<SemSet> },
    /// To a set's home: the set lent is given back.
    SemReturn { set: SemSetId, state: Box<SemSet> },
    /// From a set's home: give the lent set back.
    SemRecall { set: SemSetId },
    /// To a set's home, from the node it lent the set to: that node
    /// applied the exit of its process `pid` (ops of the process that still
    /// wait at the home must be followed by the exit).
    SemExitApplied { set: SemSetId, pid: i32 },
    /// Loads the sender knows, its own first (`daemon/gossip.rs`).
    Load { entries: Vec<LoadEntry> },
}

/// One node's load, as gossiped and as `omctl loads` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadEntry {
    pub node: NodeId,
    /// Runnable threads per CPU over speed, in thousandths.
    pub load_milli: u32,
    pub free_kib: u64,
    /// How long ago it was measured, when sent.
    pub age_ms: u32,
    /// Its CPUs times its speed, in thousandths (what a process's demand
    /// is divided by there).
    pub capacity_milli: u32,
    /// It takes no guests (`omctl block`, `expel`).
    pub blocked: bool,
    /// Its balancer runs (`omctl balance on|off`, `dsmd --no-balance`).
    pub balancing: bool,
    /// Processes from other nodes running there.
    pub guests: u16,
    /// Processes under `omrun` running there (guests included).
    pub procs: u16,
    /// Page faults its daemon served, and pages it sent and received over
    /// the network, per second (over the last gossip interval).
    pub faults_per_s: u32,
    pub pages_per_s: u32,
}

/// An object to create (`key` 0: `IPC_PRIVATE`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Creation {
    Segment {
        key: i32,
        size: u64,
        /// `shmflg`: permission bits and SHM_HUGETLB/SHM_NORESERVE.
        flags: i32,
        cred: Credentials,
        space: crate::sysv::ShmSpace,
        /// The id asked for (`kernel.shm_next_id`), else the home's next.
        id: Option<IpcId>,
    },
    SemSet {
        key: i32,
        nsems: i32,
        mode: u32,
        cred: Credentials,
        /// The id asked for (`kernel.sem_next_id`).
        id: Option<IpcId>,
    },
}

impl Notice {
    /// The semaphore set a notice is about (`None` for a result, which is
    /// about a wait of this node, and for segment notices).
    pub fn sem_set(&self) -> Option<SemSetId> {
        match self {
            Notice::SemOp { set, .. }
            | Notice::SemCancel { set, .. }
            | Notice::SemProcessExited { set, .. }
            | Notice::SemLend { set, .. }
            | Notice::SemReturn { set, .. }
            | Notice::SemRecall { set }
            | Notice::SemExitApplied { set, .. } => Some(*set),
            Notice::SemResult { .. }
            | Notice::SegmentGone { .. }
            | Notice::KeyReplica { .. }
            | Notice::Load { .. } => None,
        }
    }
}

/// How a `semop` sent to a set's home ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SemResult {
    /// Applied, atomically, as a whole.
    Done,
    /// Not applied, with the errno for the caller.
    Failed(i32),
    /// Withdrawn before it could apply: nothing of it was applied.
    Cancelled,
}

/// A `semctl` command with its argument.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SemCtl {
    GetVal {
        semnum: i32,
    },
    SetVal {
        semnum: i32,
        value: i32,
    },
    GetAll,
    SetAll {
        values: Vec<u16>,
    },
    GetPid {
        semnum: i32,
    },
    GetNcnt {
        semnum: i32,
    },
    GetZcnt {
        semnum: i32,
    },
    Stat,
    /// `IPC_STAT` without the read permission (`SEM_STAT_ANY`, and what
    /// `SETALL` needs to know of a set it may only write).
    StatAny,
    Set {
        uid: u32,
        gid: u32,
        mode: u32,
    },
    Remove,
}

/// What `semctl(IPC_STAT)` and `ipcs -s` show of a set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SemSetStat {
    pub id: i32,
    pub perm: IpcPerm,
    pub otime: i64,
    pub ctime: i64,
    pub nsems: u32,
    pub home: u8,
    /// The node arbitrating the set now: its home, or the node it is lent
    /// to (values shown are then as of the lending).
    pub arbiter: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    Hello(Hello),
    /// HMAC-SHA256 of the other side's nonce with the cluster secret.
    Auth {
        mac: Vec<u8>,
    },
    /// A heartbeat: `sent_ns` is the sender's clock when it sent it, to be
    /// echoed back at once in a [`Control::Pong`].
    Ping {
        sent_ns: u64,
    },
    /// The answer to a ping: proof that the peer heard us after `echo_ns`
    /// (our clock), which is what a lease may count from.
    Pong {
        echo_ns: u64,
    },
    Request {
        id: u64,
        body: RpcRequest,
    },
    Response {
        id: u64,
        body: RpcResponse,
    },
    Notice(Notice),
}

/// A decoded peer frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerFrame {
    Control(Control),
    Coh(CohMsg),
}

fn auth_hmac(
    secret: &[u8],
    nonce: &[u8; 32],
    node: NodeId,
    incarnation: u64,
) -> Option<Hmac<Sha256>> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).ok()?;
    mac.update(b"migshm peer auth v1");
    mac.update(nonce);
    mac.update(&[node.0]);
    mac.update(&incarnation.to_le_bytes());
    Some(mac)
}

/// The answer to a peer's challenge: HMAC-SHA256 over its nonce and our
/// identity, keyed by the cluster secret.
pub fn auth_mac(secret: &[u8], nonce: &[u8; 32], node: NodeId, incarnation: u64) -> Vec<u8> {
    auth_hmac(secret, nonce, node, incarnation)
        .map(|m| m.finalize().into_bytes().to_vec())
        .unwrap_or_default()
}

/// Check a peer's answer to our challenge (in constant time).
pub fn auth_verify(
    secret: &[u8],
    nonce: &[u8; 32],
    node: NodeId,
    incarnation: u64,
    tag: &[u8],
) -> bool {
    auth_hmac(secret, nonce, node, incarnation).is_some_and(|m| m.verify_slice(tag).is_ok())
}

const KIND_CONTROL: u8 = 1;
const KIND_COHERENCE: u8 = 2;

/// The coherence message without its pages.
#[derive(Serialize, Deserialize)]
enum CohHeader {
    Read {
        page: PageKey,
        prefetch: u32,
    },
    Write {
        page: PageKey,
        have_copy: bool,
        fresh_ahead: u32,
    },
    Downgrade {
        page: PageKey,
    },
    Invalidate {
        page: PageKey,
    },
    DowngradeAck {
        page: PageKey,
        pages: u32,
    },
    InvalidateAck {
        page: PageKey,
        pages: u32,
    },
    ReadGrant {
        page: PageKey,
        pages: u32,
    },
    WriteGrant {
        page: PageKey,
        pages: u32,
    },
    Unavailable {
        page: PageKey,
    },
    FreshGrant {
        page: PageKey,
        count: u32,
    },
}

pub fn encode_control(msg: &Control) -> Bytes {
    let mut out = BytesMut::with_capacity(64);
    out.put_u8(KIND_CONTROL);
    // Encoding our own types into a Vec cannot fail.
    let body = postcard::to_stdvec(msg).unwrap_or_default();
    out.extend_from_slice(&body);
    out.freeze()
}

/// A coherence frame as parts to write back to back: a small header, then
/// the pages themselves, never copied in user space.
pub fn encode_coherence_parts(msg: &CohMsg) -> Vec<Bytes> {
    let some = |d: &Option<Bytes>| u32::from(d.is_some());
    let (header, pages): (CohHeader, Vec<&Bytes>) = match msg {
        CohMsg::Read { page, prefetch } => (
            CohHeader::Read {
                page: *page,
                prefetch: *prefetch,
            },
            vec![],
        ),
        CohMsg::Write {
            page,
            have_copy,
            fresh_ahead,
        } => (
            CohHeader::Write {
                page: *page,
                have_copy: *have_copy,
                fresh_ahead: *fresh_ahead,
            },
            vec![],
        ),
        CohMsg::FreshGrant { page, count } => (
            CohHeader::FreshGrant {
                page: *page,
                count: *count,
            },
            vec![],
        ),
        CohMsg::Downgrade { page } => (CohHeader::Downgrade { page: *page }, vec![]),
        CohMsg::Invalidate { page } => (CohHeader::Invalidate { page: *page }, vec![]),
        CohMsg::DowngradeAck { page, data } => (
            CohHeader::DowngradeAck {
                page: *page,
                pages: some(data),
            },
            data.iter().collect(),
        ),
        CohMsg::InvalidateAck { page, data } => (
            CohHeader::InvalidateAck {
                page: *page,
                pages: some(data),
            },
            data.iter().collect(),
        ),
        CohMsg::ReadGrant { page, data, extra } => (
            CohHeader::ReadGrant {
                page: *page,
                pages: 1 + extra.len() as u32,
            },
            std::iter::once(data).chain(extra.iter()).collect(),
        ),
        CohMsg::WriteGrant { page, data } => (
            CohHeader::WriteGrant {
                page: *page,
                pages: some(data),
            },
            data.iter().collect(),
        ),
        CohMsg::Unavailable { page } => (CohHeader::Unavailable { page: *page }, vec![]),
    };
    let head = postcard::to_stdvec(&header).unwrap_or_default();
    let mut first = BytesMut::with_capacity(3 + head.len());
    first.put_u8(KIND_COHERENCE);
    first.put_u16_le(head.len() as u16);
    first.extend_from_slice(&head);
    let mut parts = Vec::with_capacity(1 + pages.len());
    parts.push(first.freeze());
    for p in pages {
        if p.len() == PAGE_SIZE {
            parts.push(p.clone());
        } else {
            // Pages are always whole; pad defensively so the receiver's
            // length check holds.
            let mut whole = BytesMut::zeroed(PAGE_SIZE);
            let n = p.len().min(PAGE_SIZE);
            whole[..n].copy_from_slice(&p[..n]);
            parts.push(whole.freeze());
        }
    }
    parts
}

/// A coherence frame in one buffer.
pub fn encode_coherence(msg: &CohMsg) -> Bytes {
    let parts = encode_coherence_parts(msg);
    let mut out = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
    for p in parts {
        out.extend_from_slice(&p);
    }
    out.freeze()
}

pub fn decode_peer(frame: Bytes) -> Result<PeerFrame, WireError> {
    let Some(&kind) = frame.first() else {
        return Err(WireError::Empty);
    };
    match kind {
        KIND_CONTROL => postcard::from_bytes(&frame[1..])
            .map(PeerFrame::Control)
            .map_err(|e| WireError::Malformed(e.to_string())),
        KIND_COHERENCE => decode_coherence(frame).map(PeerFrame::Coh),
        other => Err(WireError::UnknownKind(other)),
    }
}

fn decode_coherence(frame: Bytes) -> Result<CohMsg, WireError> {
    if frame.len() < 3 {
        return Err(WireError::Malformed("short coherence frame".into()));
    }
    let head_len = u16::from_le_bytes([frame[1], frame[2]]) as usize;
    let head_end = 3 + head_len;
    if frame.len() < head_end {
        return Err(WireError::Malformed("truncated coherence header".into()));
    }
    let header: CohHeader = postcard::from_bytes(&frame[3..head_end])
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    let payload = frame.slice(head_end..);
    let take = |count: u32| -> Result<Vec<Bytes>, WireError> {
        if payload.len() != count as usize * PAGE_SIZE {
            return Err(WireError::Malformed(format!(
                "{} payload bytes for {count} pages",
                payload.len()
            )));
        }
        Ok((0..count as usize)
            .map(|i| payload.slice(i * PAGE_SIZE..(i + 1) * PAGE_SIZE))
            .collect())
    };
    let one = |count: u32| -> Result<Option<Bytes>, WireError> {
        if count > 1 {
            return Err(WireError::Malformed("more than one page".into()));
        }
        Ok(take(count)?.pop())
    };
    Ok(match header {
        CohHeader::Read { page, prefetch } => {
            take(0)?;
            CohMsg::Read { page, prefetch }
        }
        CohHeader::Write {
            page,
            have_copy,
            fresh_ahead,
        } => {
            take(0)?;
            CohMsg::Write {
                page,
                have_copy,
                fresh_ahead,
            }
        }
        CohHeader::FreshGrant { page, count } => {
            take(0)?;
            if count == 0 || count > crate::coherence::FRESH_RUN_MAX + 1 {
                return Err(WireError::Malformed(format!(
                    "fresh grant of {count} pages"
                )));
            }
            CohMsg::FreshGrant { page, count }
        }
        CohHeader::Downgrade { page } => {
            take(0)?;
            CohMsg::Downgrade { page }
        }
        CohHeader::Invalidate { page } => {
            take(0)?;
            CohMsg::Invalidate { page }
        }
        CohHeader::Unavailable { page } => {
            take(0)?;
            CohMsg::Unavailable { page }
        }
        CohHeader::DowngradeAck { page, pages } => CohMsg::DowngradeAck {
            page,
            data: one(pages)?,
        },
        CohHeader::InvalidateAck { page, pages } => CohMsg::InvalidateAck {
            page,
            data: one(pages)?,
        },
        CohHeader::WriteGrant { page, pages } => CohMsg::WriteGrant {
            page,
            data: one(pages)?,
        },
        CohHeader::ReadGrant { page, pages } => {
            if pages == 0 || pages > crate::coherence::PREFETCH_PAGES_MAX + 1 {
                return Err(WireError::Malformed(format!("read grant of {pages} pages")));
            }
            let mut all = take(pages)?;
            let extra = all.split_off(1);
            let data = all
                .pop()
                .ok_or_else(|| WireError::Malformed("no page".into()))?;
            CohMsg::ReadGrant { page, data, extra }
        }
    })
}

// ---- local clients -----------------------------------------------------------

/// A node as `omctl nodes` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node: NodeId,
    pub address: String,
    pub up: bool,
    pub this_node: bool,
}

/// Counters of one node for `omctl status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: u8,
    pub segments_homed: u64,
    pub sem_sets_homed: u64,
    pub segments_cached: u64,
    pub resident_pages: u64,
    pub faults_served: u64,
    pub remote_requests: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub attached_processes: u64,
    /// The CPUs it serves (`0-3`), their smoothed runnable threads per CPU
    /// over its speed, in thousandths, and its available memory in KiB.
    pub cpus: String,
    pub load_milli: u64,
    pub free_kib: u64,
    /// Heap bytes of the daemon's per-page tables (nothing for pages never
    /// touched).
    pub table_bytes: u64,
    /// Milliseconds this daemon kept idle CPUs polling (`--low-latency`).
    pub low_latency_held_ms: u64,
}

/// A request from a local process to its node's daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRequest {
    Hello {
        version: u32,
        /// What a migrator needs to move the process (`None`: tools that
        /// never migrate, such as omctl).
        link: Option<ClientLink>,
    },
    ShmGet {
        key: i32,
        size: u64,
        flags: i32,
        /// Where a segment this call creates is homed (`None`: this node).
        home: Option<NodeId>,
        space: crate::sysv::ShmSpace,
    },
    /// `shmctl(SHM_LOCK)` (`lock`) or `SHM_UNLOCK`.
    ShmLock {
        id: i32,
        lock: bool,
    },
    /// Answered with `Attached` and the node's memfd of the segment.
    ShmAttach {
        id: i32,
        readonly: bool,
    },
    /// The process mapped the memfd at `addr`; the daemon registers the range
    /// on the process's userfaultfd, which comes with this message the first
    /// time (`with_uffd`).
    ShmMapped {
        id: i32,
        addr: u64,
        len: u64,
        readonly: bool,
        with_uffd: bool,
        /// Names the attachment in later `ShmViews`/`ShmDetach` (chosen by
        /// the process, unique among its attachments).
        handle: u64,
    },
    /// Attachment `handle` of segment `id` is now these pieces (the
    /// program unmapped, moved, grew or protected parts of it); none: it is
    /// detached. The process counts one attachment per piece (`nattch`), as
    /// Linux counts the VMAs.
    ShmViews {
        id: i32,
        handle: u64,
        views: Vec<View>,
    },
    /// `shmdt`: attachment `handle` goes, all its pieces.
    ShmDetach {
        id: i32,
        handle: u64,
    },
    /// A descriptor of the node's copy of segment `id`, for a process that
    /// has it attached (to map more of it: mremap).
    ShmMemfd {
        id: i32,
    },
    ShmStat {
        id: i32,
    },
    ShmSet {
        id: i32,
        uid: u32,
        gid: u32,
        mode: u32,
    },
    ShmRemove {
        id: i32,
    },
    /// A forked child takes over its inherited attachments, with its own
    /// new userfaultfd attached. Each must be one its parent has (same
    /// segment, address and length; read-only stays read-only), one a
    /// migrator granted it (`GrantAdopt`), or one it could attach itself:
    /// else EACCES.
    Adopt {
        attachments: Vec<AttachmentRecord>,
    },
    /// For a migrator (root only): local process `pid` may adopt these
    /// attachments (a process being restored, whose image holds them),
    /// until this connection ends.
    GrantAdopt {
        pid: i32,
        attachments: Vec<AttachmentRecord>,
    },
    Nodes,
    Ipcs,
    Status,
    /// The loads this node has heard of, its own first.
    Loads,
    /// A migrator (root only) takes the node's memfd of a segment that a
    /// process moving here has attached, whatever its permissions or a
    /// pending removal (as a fork inherits it); counted as this
    /// connection's attachment until it ends, so that the node's copy stays
    /// while the process is rebuilt and adopts its attachments.
    ShmAttachForMigration {
        id: i32,
        readonly: bool,
    },
    /// `omctl migrate PID NODE|home`: move a process homed here to `to`,
    /// or bring it home (`None`). Answered once it runs there.
    Migrate {
        pid: i32,
        to: Option<NodeId>,
    },
    /// `omctl migrate --check PID`: every reason a local process cannot
    /// move, without moving it (`Refused`, a reason per line), or `Ok`.
    MigrateCheck {
        pid: i32,
    },
    /// `omctl ps`: migrated processes, cluster-wide.
    Ps,
    /// `omctl balance on|off` (root only).
    Balance {
        on: bool,
    },
    /// `omctl block|unblock` (root only): take guests or not.
    Block {
        blocked: bool,
    },
    /// `omctl expel` (root only): block, and send every guest home.
    /// Answered `Value(n)`: how many went home.
    Expel,
    /// `omctl lock|unlock PID`: the balancer never moves a locked process
    /// (PID as `omctl migrate` takes it).
    Lock {
        pid: i32,
        locked: bool,
    },
    /// `omctl ps` with reasons: every process under `omrun`, cluster-wide.
    Placements,
    /// `omctl top`: answered `Top`.
    Top,
    /// Attachments and connections of a local process (root only).
    ProcessInfo {
        pid: i32,
    },
    /// `semget`.
    SemGet {
        key: i32,
        nsems: i32,
        flags: i32,
        /// Where a set this call creates is homed (`None`: this node).
        home: Option<NodeId>,
    },
    /// `semop`/`semtimedop`. Answered when the operation completes, which
    /// may be much later; meanwhile the connection carries only
    /// [`ClientRequest::SemCancel`].
    SemOp {
        id: i32,
        sops: Vec<SemBuf>,
        /// `semtimedop`'s timeout; `None` waits as long as it takes.
        timeout_ns: Option<u64>,
        /// The caller's effective uid and gid now: when they differ from
        /// what the daemon last read for the process it reads them again.
        euid: u32,
        egid: u32,
    },
    /// The caller was interrupted: withdraw its pending `SemOp`. Not
    /// answered itself; the `SemOp` is, with EINTR or with the outcome it
    /// had already reached.
    SemCancel,
    SemCtl {
        id: i32,
        cmd: SemCtl,
    },
    /// Every semaphore set of the cluster, like `ipcs -s`.
    SemIpcs,
    /// Take over what the process's previous connection left served (it
    /// closed that connection while it still mapped segments).
    Reclaim,
    /// An fd of `/dev/userfaultfd`, for a process that may not create a
    /// userfaultfd handling kernel faults itself (answered `Ok` with it).
    UffdDevice,
    /// The set's fast-path region (see `semregion`), answered `Ok` with
    /// its memfd if the set is arbitrated on this node and the caller may
    /// alter it; ENOENT if it has none here.
    SemRegion {
        id: i32,
    },
    /// For a migrator (root only): every `SemOp` of local process `pid`
    /// that waits ends now with [`ClientReply::Withdrawn`] (nothing of it
    /// applied), or with the outcome it had already reached. Answered
    /// `Value(n)`: how many waited.
    WithdrawWaits {
        pid: i32,
    },
    /// For a host agent (root only), before the copy it made runs: local
    /// process `pid` is the process the host with `token` receives, moved
    /// here. Its semaphore operations count as its home process's (its
    /// undo record stays at home).
    Guest {
        pid: i32,
        token: u128,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    pub id: i32,
    pub addr: u64,
    pub len: u64,
    pub readonly: bool,
    /// The segment page mapped at `addr` (a piece left by a partial
    /// munmap, or moved by mremap, maps from further in).
    pub pgoff: u64,
    /// Which attachment (`shmat`) of the process the piece belongs to.
    pub handle: u64,
}

/// One piece of an attachment: `len` bytes at `addr` mapping the segment
/// from page `pgoff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    pub addr: u64,
    pub len: u64,
    pub pgoff: u64,
}

/// A process's side of its connection to the daemon: the descriptor number,
/// and the address of the buffer its client library reads the daemon's
/// socket path from when it reconnects (where a migrator writes the new
/// node's socket).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientLink {
    pub fd: i32,
    pub socket_slot: u64,
    /// The address of the library's count of calls it has in flight on
    /// its daemon connections (a `u32`): a migrator stops the process only
    /// where it is zero, or after withdrawing the call that waits.
    pub calls_in_flight: u64,
}

/// What the daemon knows of one local process, for a migrator.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub attachments: Vec<AttachmentRecord>,
    pub links: Vec<ClientLink>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientReply {
    Ok,
    /// The errno a Linux program would get.
    Err(i32),
    Welcome {
        node: NodeId,
        version: u32,
        /// The CPUs the node serves, if it was given some (`dsmd --cpus`):
        /// `omrun` runs its program there.
        cpus: Vec<u16>,
    },
    ShmId(i32),
    Attached {
        size: u64,
    },
    Stat(ShmStat),
    Nodes(Vec<NodeInfo>),
    Loads(Vec<LoadEntry>),
    Segments(Vec<ShmStat>),
    Status(Vec<NodeStatus>),
    SemId(i32),
    Value(i32),
    Values(Vec<u16>),
    SemStat(SemSetStat),
    SemSets(Vec<SemSetStat>),
    /// The set is lent and being recalled: ask again shortly.
    Moving,
    ProcessInfo(ProcessInfo),
    /// A request refused or failed, with the reason for the user.
    Refused(String),
    Migrations(Vec<MigrationEntry>),
    /// A `SemOp` withdrawn for a migration (`ClientRequest::WithdrawWaits`):
    /// nothing of it was applied; the caller asks again, from wherever it
    /// runs by then.
    Withdrawn,
    Placements(Vec<Placement>),
    Top(TopFrame),
}

/// A process that runs away from its home node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationEntry {
    pub home: NodeId,
    pub home_pid: i32,
    pub runs_on: NodeId,
    /// Its pid on the node it runs on.
    pub pid_there: i32,
}

/// `len (u32 LE) | postcard(id, body)`.
pub fn encode_client<T: Serialize>(id: u64, body: &T) -> Vec<u8> {
    let payload = postcard::to_stdvec(&(id, body)).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Length of the frame at the front of `buf`, if its header is complete.
pub fn client_frame_len(buf: &[u8]) -> Result<Option<usize>, WireError> {
    let Some(head) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len > CLIENT_FRAME_MAX {
        return Err(WireError::TooLarge(len));
    }
    Ok(Some(4 + len))
}

pub fn decode_client<T: DeserializeOwned>(frame_body: &[u8]) -> Result<(u64, T), WireError> {
    postcard::from_bytes(frame_body).map_err(|e| WireError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::PageIndex;

    fn page(n: u32) -> PageKey {
        PageKey {
            seg: IpcId(0x0100_0001),
            page: PageIndex(n),
        }
    }

    #[test]
    fn coherence_round_trips_with_pages() {
        let data = Bytes::from(vec![7u8; PAGE_SIZE]);
        let msgs = vec![
            CohMsg::Read {
                page: page(1),
                prefetch: 8,
            },
            CohMsg::Write {
                page: page(2),
                have_copy: true,
                fresh_ahead: 31,
            },
            CohMsg::FreshGrant {
                page: page(7),
                count: 512,
            },
            CohMsg::InvalidateAck {
                page: page(3),
                data: Some(data.clone()),
            },
            CohMsg::InvalidateAck {
                page: page(3),
                data: None,
            },
            CohMsg::ReadGrant {
                page: page(4),
                data: data.clone(),
                extra: vec![data.clone(), data.clone()],
            },
            CohMsg::WriteGrant {
                page: page(5),
                data: None,
            },
            CohMsg::Unavailable { page: page(6) },
        ];
        for m in msgs {
            assert_eq!(
                decode_peer(encode_coherence(&m)).unwrap(),
                PeerFrame::Coh(m)
            );
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let good = encode_coherence(&CohMsg::ReadGrant {
            page: page(0),
            data: Bytes::from(vec![1u8; PAGE_SIZE]),
            extra: vec![],
        });
        for cut in 0..good.len() {
            let _ = decode_peer(good.slice(..cut));
        }
        assert!(decode_peer(good.slice(..good.len() - 1)).is_err());
        assert!(decode_peer(Bytes::from_static(&[9, 1, 2])).is_err());
        for count in [0, crate::coherence::FRESH_RUN_MAX + 2] {
            let oversized = encode_coherence(&CohMsg::FreshGrant {
                page: page(0),
                count,
            });
            assert!(decode_peer(oversized).is_err(), "fresh grant of {count}");
        }
        assert!(decode_peer(Bytes::from_static(&[KIND_CONTROL, 0xff, 0xff, 0xff])).is_err());
        let mut x = 0x1234_5678u32;
        for _ in 0..2000 {
            let len = (x % 64) as usize;
            let mut v = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                v.push(x as u8);
            }
            let _ = decode_peer(Bytes::from(v.clone()));
            let _ = decode_client::<ClientRequest>(&v);
        }
    }
}
