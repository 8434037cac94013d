//! Newtypes for the kinds of number that must never be mixed up.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Size of one coherence unit: the x86-64 base page.
pub const PAGE_SIZE: usize = 4096;

/// Highest node id. Node ids fit in 7 bits so that a segment id (a positive
/// `int`, as `shmget` returns) can carry its home node.
pub const NODE_ID_MAX: u8 = 127;

/// A node of the cluster, `1..=NODE_ID_MAX`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub u8);

impl NodeId {
    pub fn new(raw: u8) -> Option<NodeId> {
        (1..=NODE_ID_MAX).contains(&raw).then_some(NodeId(raw))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A set of nodes as a bitmask: node ids are below 128.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeSet(u128);

impl NodeSet {
    pub const EMPTY: NodeSet = NodeSet(0);

    pub fn insert(&mut self, node: NodeId) {
        self.0 |= 1u128 << node.0;
    }
    pub fn remove(&mut self, node: NodeId) {
        self.0 &= !(1u128 << node.0);
    }
    pub fn contains(self, node: NodeId) -> bool {
        self.0 & (1u128 << node.0) != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }
    /// Bit `n` for node `n` (bit 0 is never set).
    pub fn bits(self) -> u128 {
        self.0
    }
    /// The set of `bits()`; bits above `NODE_ID_MAX` and bit 0 are dropped.
    pub fn from_bits(bits: u128) -> NodeSet {
        NodeSet(bits & !1 & (u128::MAX >> (127 - NODE_ID_MAX)))
    }
    pub fn iter(self) -> impl Iterator<Item = NodeId> {
        (0..=NODE_ID_MAX)
            .filter(move |n| self.0 & (1u128 << n) != 0)
            .map(NodeId)
    }
}

impl fmt::Debug for NodeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// An IPC object's identifier as `shmget`/`semget` return it: a positive
/// `int` whose bits 30..24 name the home node and bits 23..0 a per-home
/// sequence number, so any node routes an id to its home without a lookup.
/// Segments and semaphore sets draw from one sequence per home, so an id
/// names at most one object.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IpcId(pub i32);

/// The id of a shared segment.
pub type SegmentId = IpcId;
/// The id of a semaphore set.
pub type SemSetId = IpcId;

impl IpcId {
    const SEQ_BITS: u32 = 24;
    pub const SEQ_MASK: u32 = (1 << Self::SEQ_BITS) - 1;

    pub fn new(home: NodeId, seq: u32) -> IpcId {
        IpcId(((u32::from(home.0) << Self::SEQ_BITS) | (seq & Self::SEQ_MASK)) as i32)
    }

    /// The home node, or `None` for a value no node could have issued.
    pub fn home(self) -> Option<NodeId> {
        if self.0 <= 0 {
            return None;
        }
        NodeId::new((self.0 as u32 >> Self::SEQ_BITS) as u8)
    }
}

impl fmt::Debug for IpcId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "id{}", self.0)
    }
}

/// The two namespaces of keys (as on Linux, a key may name a segment and,
/// independently, a semaphore set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum IpcKind {
    Segment,
    SemSet,
    /// POSIX shared memory objects (`shm_open`) made cluster segments by
    /// the interposer: keyed by their name, apart from SysV keys.
    PosixShm,
}

/// A SysV key (`key_t`, never `IPC_PRIVATE` here) in its namespace: what
/// the key directory maps to an id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IpcKey {
    pub kind: IpcKind,
    pub key: i32,
}

/// Index of a page inside a segment.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PageIndex(pub u32);

impl fmt::Debug for PageIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p{}", self.0)
    }
}

/// One page of one segment: the unit of coherence.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PageKey {
    pub seg: SegmentId,
    pub page: PageIndex,
}

impl fmt::Debug for PageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}/{:?}", self.seg, self.page)
    }
}

/// Largest segment: the home keeps a directory entry per page, so the
/// effective SHMMAX is the kernel's or this, whichever is smaller.
pub const SEGMENT_BYTES_MAX: u64 = 64 << 30;

/// Number of pages needed to hold `bytes` (at most `SEGMENT_BYTES_MAX`,
/// which every size is checked against before it gets here).
pub fn pages_for(bytes: u64) -> u32 {
    bytes.min(SEGMENT_BYTES_MAX).div_ceil(PAGE_SIZE as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_id_carries_home() {
        let id = SegmentId::new(NodeId(127), SegmentId::SEQ_MASK);
        assert!(id.0 > 0);
        assert_eq!(id.home(), Some(NodeId(127)));
        assert_eq!(SegmentId::new(NodeId(3), 7).home(), Some(NodeId(3)));
        assert_eq!(IpcId(-1).home(), None);
        assert_eq!(IpcId(5).home(), None);
    }

    #[test]
    fn node_set_ops() {
        let mut s = NodeSet::EMPTY;
        s.insert(NodeId(1));
        s.insert(NodeId(127));
        assert!(s.contains(NodeId(127)) && s.contains(NodeId(1)) && !s.contains(NodeId(2)));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![NodeId(1), NodeId(127)]);
        s.remove(NodeId(1));
        assert_eq!(s.len(), 1);
    }
}
