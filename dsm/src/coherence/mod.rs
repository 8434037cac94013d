//! The coherence protocol as a pure state machine.
//!
//! Node-level, home-based, multiple-reader/single-writer, write-invalidate
//! (DESIGN.md §3). Every node runs one [`Engine`], which plays two roles:
//!
//! * **cache**: the node's copy of each page it has open is `Invalid`,
//!   `Shared` (present, every local mapping read-only) or `Exclusive`
//!   (present, writable); local faults either resolve at once or become a
//!   request to the page's home;
//! * **home**: for the segments this node created, a directory entry per page
//!   (owner or copyset), the authoritative copy of every page no node holds
//!   exclusively, and **one transaction per page at a time** with a FIFO queue
//!   of the requests behind it.
//!
//! The engine does no I/O and reads no clock. It is driven by
//! [`Engine::handle_fault`], [`Engine::handle_message`] and
//! [`Engine::handle_peer_down`]; it emits messages through
//! [`Engine::poll_transmit`] and fault resolutions through
//! [`Engine::poll_resolution`]. Effects on local memory (write-protect every
//! mapping, read, write, punch) happen through [`PageStore`] at the moment the
//! protocol requires them, because their order is part of correctness:
//! an Exclusive page is write-protected *before* it is read and punched.
//!
//! Messages between two nodes, including a node and itself, must be delivered
//! in order (TCP, or a local FIFO): a grant sent before an invalidation is
//! applied before it.

mod cache;
mod home;
pub mod sim;
mod table;

use crate::ids::{NodeId, NodeSet, PageIndex, PageKey, SegmentId};
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};

pub use cache::PageState;

/// Most pages a single read miss may bring along after the faulting one.
pub const PREFETCH_PAGES_MAX: u32 = 512;
/// Most fresh pages a single write miss may be granted after the faulting
/// one (2 MiB with it).
pub const FRESH_RUN_MAX: u32 = 511;

/// Effects on this node's memory, done by the driver (memfd + uffd in
/// `dsmd`, plain maps in the simulator).
pub trait PageStore {
    /// Write-protect the page in every local process mapping.
    fn protect_local(&mut self, page: PageKey);
    /// The node's copy of the page (present when Shared or Exclusive).
    fn read_local(&mut self, page: PageKey) -> Bytes;
    /// Place data in the node's copy.
    fn write_local(&mut self, page: PageKey, data: &[u8]);
    /// Drop the node's copy; every local mapping loses the page.
    fn punch_local(&mut self, page: PageKey);
    /// The home's authoritative copy (valid while no node holds the page
    /// exclusively). Only called for segments homed here.
    fn read_home(&mut self, page: PageKey) -> Bytes;
    fn write_home(&mut self, page: PageKey, data: &[u8]);
    /// Make a run of pages no node ever wrote present in the node's copy,
    /// as zeros, so that it can be mapped at once (for a memfd: allocate
    /// it with `fallocate`, no data copied).
    fn zero_local_run(&mut self, first: PageKey, count: u32) {
        let zeros = vec![0u8; crate::ids::PAGE_SIZE];
        for page in run(first, count) {
            self.write_local(page, &zeros);
        }
    }

    // Runs of consecutive pages (read-ahead). A store may do each with one
    // system call; these defaults do it page by page.

    fn protect_local_run(&mut self, first: PageKey, count: u32) {
        for page in run(first, count) {
            self.protect_local(page);
        }
    }
    fn read_local_run(&mut self, first: PageKey, count: u32) -> Vec<Bytes> {
        run(first, count).map(|p| self.read_local(p)).collect()
    }
    fn write_local_run(&mut self, first: PageKey, data: &[Bytes]) {
        for (page, d) in run(first, data.len() as u32).zip(data) {
            self.write_local(page, d);
        }
    }
    fn read_home_run(&mut self, first: PageKey, count: u32) -> Vec<Bytes> {
        run(first, count).map(|p| self.read_home(p)).collect()
    }
    fn write_home_run(&mut self, first: PageKey, data: &[Bytes]) {
        for (page, d) in run(first, data.len() as u32).zip(data) {
            self.write_home(page, d);
        }
    }
}

/// The `count` pages from `first` on.
pub fn run(first: PageKey, count: u32) -> impl Iterator<Item = PageKey> {
    (0..count).map(move |i| PageKey {
        seg: first.seg,
        page: PageIndex(first.page.0 + i),
    })
}

/// Protocol messages between nodes (encoded by `wire`, payloads raw).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CohMsg {
    /// node → home: read miss; `prefetch` following pages are welcome too.
    Read {
        page: PageKey,
        prefetch: u32,
    },
    /// node → home: write miss, or write to a Shared page (`have_copy`).
    /// `fresh_ahead`: the writer goes sequentially; that many following
    /// pages are welcome too if no node ever had them.
    Write {
        page: PageKey,
        have_copy: bool,
        fresh_ahead: u32,
    },
    /// home → exclusive owner: become Shared and send the data.
    Downgrade {
        page: PageKey,
    },
    /// home → holder: drop the page (send the data if it was Exclusive).
    Invalidate {
        page: PageKey,
    },
    /// owner → home. `None` only if the owner had no copy (a protocol fault).
    DowngradeAck {
        page: PageKey,
        data: Option<Bytes>,
    },
    InvalidateAck {
        page: PageKey,
        data: Option<Bytes>,
    },
    /// home → node: the page, Shared; `extra` are the pages right after it.
    ReadGrant {
        page: PageKey,
        data: Bytes,
        extra: Vec<Bytes>,
    },
    /// home → node: Exclusive; data unless the node already holds it.
    WriteGrant {
        page: PageKey,
        data: Option<Bytes>,
    },
    /// home → node: `count` pages from `page` on, none ever handed out
    /// before, Exclusive: zeros by definition, so no data travels.
    FreshGrant {
        page: PageKey,
        count: u32,
    },
    /// home → node: the page cannot be served (its only copy was on a lost
    /// node, or the segment is gone).
    Unavailable {
        page: PageKey,
    },
}

impl CohMsg {
    pub fn page(&self) -> PageKey {
        match self {
            CohMsg::Read { page, .. }
            | CohMsg::Write { page, .. }
            | CohMsg::Downgrade { page }
            | CohMsg::Invalidate { page }
            | CohMsg::DowngradeAck { page, .. }
            | CohMsg::InvalidateAck { page, .. }
            | CohMsg::ReadGrant { page, .. }
            | CohMsg::WriteGrant { page, .. }
            | CohMsg::FreshGrant { page, .. }
            | CohMsg::Unavailable { page } => *page,
        }
    }
}

/// How a waiting fault is to be resolved by the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Map the page write-protected (node holds it Shared).
    ReadOnly,
    /// Map the page writable (node holds it Exclusive).
    Writable,
    /// The page cannot be served honestly: deliver SIGBUS.
    Poison,
}

/// A fault that the driver must now resolve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution<W> {
    pub waiter: W,
    pub page: PageKey,
    pub access: Access,
    /// Pages after `page` that arrived with it and may be mapped into the
    /// same waiter at once (read-only), so a sequential scan faults rarely.
    pub also_mapped: u32,
}

/// The coherence engine of one node. `W` identifies a waiting fault (which
/// process, which address); the engine only stores and returns it.
pub struct Engine<W> {
    me: NodeId,
    cache: BTreeMap<SegmentId, cache::CacheSegment<W>>,
    homes: BTreeMap<SegmentId, home::HomeSegment>,
    transmit: VecDeque<(NodeId, CohMsg)>,
    resolutions: VecDeque<Resolution<W>>,
    /// Nodes declared lost; their late requests are ignored until they
    /// rejoin as a new incarnation.
    dead: NodeSet,
}

impl<W: Clone> Engine<W> {
    pub fn new(me: NodeId) -> Self {
        Engine {
            me,
            cache: BTreeMap::new(),
            homes: BTreeMap::new(),
            transmit: VecDeque::new(),
            resolutions: VecDeque::new(),
            dead: NodeSet::EMPTY,
        }
    }

    /// A node that was lost came back as a fresh incarnation (with no
    /// state): it may be served again.
    pub fn handle_peer_up(&mut self, node: NodeId) {
        self.dead.remove(node);
    }

    pub fn node(&self) -> NodeId {
        self.me
    }

    /// This node lost touch with `home` (its link closed, or it fell
    /// silent for longer than the lease): stop using what it gave. Faults
    /// on its segments end in SIGBUS, Shared copies are dropped; pages held
    /// Exclusive stay. Must happen before `home` may declare this node lost
    /// (`handle_peer_down` there), which the daemon's timing guarantees.
    pub fn fence_home(&mut self, home: NodeId, store: &mut impl PageStore) {
        if home != self.me {
            self.cache_peer_down(home, store);
        }
    }

    // ---- segment lifecycle -------------------------------------------------

    /// Start serving `seg` as its home. Every page starts as zeros in the
    /// home copy, held by no node.
    pub fn create_home(&mut self, seg: SegmentId, pages: u32) {
        self.homes.insert(seg, home::HomeSegment::new(pages));
    }

    /// Open the node's cache of `seg` (all pages Invalid).
    pub fn open_cache(&mut self, seg: SegmentId, home: NodeId, pages: u32) {
        self.cache
            .entry(seg)
            .or_insert_with(|| cache::CacheSegment::new(home, pages));
    }

    pub fn has_cache(&self, seg: SegmentId) -> bool {
        self.cache.contains_key(&seg)
    }

    /// Forget a segment that no process uses any more. Waiters left (there
    /// should be none) are poisoned rather than left hanging.
    pub fn close(&mut self, seg: SegmentId) {
        if let Some(mut c) = self.cache.remove(&seg) {
            for (page, pending) in std::mem::take(&mut c.pending) {
                pending.poison_all(PageKey { seg, page }, &mut self.resolutions);
            }
        }
        self.homes.remove(&seg);
    }

    /// State of this node's copy of a page (for tests and `omctl status`).
    pub fn page_state(&self, page: PageKey) -> Option<PageState> {
        self.cache.get(&page.seg).and_then(|c| c.state(page.page))
    }

    /// Number of this node's pages of `seg` that are present.
    pub fn resident_pages(&self, seg: SegmentId) -> u32 {
        self.cache.get(&seg).map_or(0, |c| c.resident())
    }

    /// Heap bytes of every page table this node keeps (directories of the
    /// segments it homes, states of those it caches): what its segments
    /// cost the daemon per page touched.
    pub fn table_bytes(&self) -> u64 {
        let homes: usize = self.homes.values().map(|h| h.heap_bytes()).sum();
        let caches: usize = self.cache.values().map(|c| c.heap_bytes()).sum();
        (homes + caches) as u64
    }

    // ---- outputs -----------------------------------------------------------

    pub fn poll_transmit(&mut self) -> Option<(NodeId, CohMsg)> {
        self.transmit.pop_front()
    }

    pub fn poll_resolution(&mut self) -> Option<Resolution<W>> {
        self.resolutions.pop_front()
    }

    fn send(&mut self, to: NodeId, msg: CohMsg) {
        self.transmit.push_back((to, msg));
    }
}

/// A page outside its segment, or a segment this node does not know.
fn page_in_range(pages: u32, page: PageIndex) -> bool {
    page.0 < pages
}
