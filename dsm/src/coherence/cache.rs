//! The cache role: this node's copy of each page and the faults waiting on it.

use super::table::{PageTable, PageValue};
use super::{
    page_in_range, Access, CohMsg, Engine, PageStore, Resolution, FRESH_RUN_MAX, PREFETCH_PAGES_MAX,
};

/// A stream is established once the read-ahead window reached this.
const SPECULATIVE_WINDOW_MIN: u32 = 4;
/// Speculative reads in flight per segment.
const SPECULATIVE_DEPTH: u32 = 4;
/// Neighbours mapped along with a page held Exclusive (64 KiB, the
/// kernel's fault-around).
const FAULT_AROUND_PAGES: u32 = 16;
use crate::ids::{NodeId, PageIndex, PageKey, SegmentId};
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};

/// This node's copy of a page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PageState {
    /// Not present: any access faults.
    #[default]
    Invalid,
    /// Present; every local mapping is write-protected.
    Shared,
    /// Present and writable on this node only.
    Exclusive,
    /// Can never be served again (its only copy was lost): accesses SIGBUS.
    Lost,
}

impl PageValue for PageState {
    type Word = u16;
    fn pack(self) -> u64 {
        match self {
            PageState::Invalid => 0,
            PageState::Shared => 1,
            PageState::Exclusive => 2,
            PageState::Lost => 3,
        }
    }
    fn unpack(bits: u64) -> Self {
        match bits {
            1 => PageState::Shared,
            2 => PageState::Exclusive,
            3 => PageState::Lost,
            _ => PageState::Invalid,
        }
    }
}

/// What this node has asked the home for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Asked {
    Read,
    Write,
}

pub(super) struct Pending<W> {
    asked: Asked,
    reads: Vec<W>,
    writes: Vec<W>,
    /// Asked for ahead of any fault (read-ahead of a sequential stream).
    speculative: bool,
}

impl<W> Pending<W> {
    /// A request made for one fault.
    fn for_fault(asked: Asked, write: bool, waiter: W) -> Self {
        let (reads, writes) = if write {
            (vec![], vec![waiter])
        } else {
            (vec![waiter], vec![])
        };
        Pending {
            asked,
            reads,
            writes,
            speculative: false,
        }
    }

    pub(super) fn poison_all(self, page: PageKey, out: &mut VecDeque<Resolution<W>>) {
        self.resolve_all(page, Access::Poison, 0, out);
    }

    /// Answers every waiter with `access`; the first also maps the
    /// `also_mapped` pages after `page`, which it installed.
    fn resolve_all(
        self,
        page: PageKey,
        access: Access,
        also_mapped: u32,
        out: &mut VecDeque<Resolution<W>>,
    ) {
        let mut also = also_mapped;
        for waiter in self.reads.into_iter().chain(self.writes) {
            out.push_back(Resolution {
                waiter,
                page,
                access,
                also_mapped: std::mem::take(&mut also),
            });
        }
    }
}

pub(super) struct CacheSegment<W> {
    home: NodeId,
    /// The home is gone: pages not held here can never be fetched.
    home_lost: bool,
    states: PageTable<PageState>,
    pub(super) pending: BTreeMap<PageIndex, Pending<W>>,
    /// Read-ahead: the stream of read misses.
    reads: Stream,
    /// Speculative reads in flight, and the first page none has asked for.
    speculative_in_flight: u32,
    speculative_frontier: u32,
    /// Fresh runs: the stream of write misses.
    writes: Stream,
}

/// Sequential misses: the page the stream would miss next, and how many
/// pages beyond a miss to ask for. The window doubles while misses follow
/// on and closes otherwise.
#[derive(Clone, Copy, Debug)]
struct Stream {
    next: u32,
    window: u32,
}

impl Stream {
    const NONE: Stream = Stream {
        next: u32::MAX,
        window: 0,
    };

    /// A miss on `page` of a segment of `pages`: the pages to ask for
    /// beyond it (at most `max`).
    fn on_miss(&mut self, page: PageIndex, max: u32, pages: u32) -> u32 {
        if page.0 == self.next {
            self.window = (self.window * 2).clamp(1, max);
        } else {
            self.window = 0;
        }
        self.window.min(pages.saturating_sub(page.0 + 1))
    }
}

impl<W> CacheSegment<W> {
    pub(super) fn new(home: NodeId, pages: u32) -> Self {
        CacheSegment {
            home,
            home_lost: false,
            states: PageTable::new(pages),
            pending: BTreeMap::new(),
            reads: Stream::NONE,
            speculative_in_flight: 0,
            speculative_frontier: 0,
            writes: Stream::NONE,
        }
    }

    pub(super) fn state(&self, page: PageIndex) -> Option<PageState> {
        (page.0 < self.states.pages()).then(|| self.states.get(page.0))
    }

    fn pages(&self) -> u32 {
        self.states.pages()
    }

    /// The state of page `index` (Invalid beyond the segment).
    fn at(&self, index: u32) -> PageState {
        self.states.get(index)
    }

    fn put(&mut self, index: u32, state: PageState) {
        self.states.set(index, state);
    }

    pub(super) fn heap_bytes(&self) -> usize {
        self.states.heap_bytes()
    }

    pub(super) fn resident(&self) -> u32 {
        self.states
            .present()
            .filter(|(_, s)| matches!(s, PageState::Shared | PageState::Exclusive))
            .count() as u32
    }

    /// Remove the request in flight for `page`, keeping the count of
    /// speculative ones right.
    fn take_pending(&mut self, page: PageIndex) -> Option<Pending<W>> {
        let p = self.pending.remove(&page)?;
        if p.speculative {
            self.speculative_in_flight -= 1;
        }
        Some(p)
    }

    /// How many pages right after `page` are held in `state` here (at most
    /// `limit`): a process faulting on `page` may map them at once.
    fn run_after(&self, page: PageIndex, state: PageState, limit: u32) -> u32 {
        let first = page.0 + 1;
        let end = first.saturating_add(limit).min(self.pages());
        (first..end).take_while(|q| self.at(*q) == state).count() as u32
    }
}

impl<W: Clone> Engine<W> {
    /// A local process faulted on `page` (`write`: it wants to write).
    pub fn handle_fault(
        &mut self,
        page: PageKey,
        write: bool,
        waiter: W,
        store: &mut impl PageStore,
    ) {
        let me = self.me;
        let Some(seg) = self.cache.get_mut(&page.seg) else {
            self.resolve(waiter, page, Access::Poison, 0);
            return;
        };
        let Some(state) = seg.state(page.page) else {
            self.resolve(waiter, page, Access::Poison, 0);
            return;
        };
        // Served from the node's copy?
        match (state, write) {
            (PageState::Exclusive, _) => {
                // Fault-around, as the kernel's own does: the neighbours
                // held Exclusive are mapped too, instead of faulting to the
                // daemon once per page.
                let run = seg.run_after(page.page, PageState::Exclusive, FAULT_AROUND_PAGES);
                return self.resolve(waiter, page, Access::Writable, run);
            }
            (PageState::Shared, false) => {
                // At most one read-ahead window of Shared neighbours.
                let run = seg.run_after(page.page, PageState::Shared, PREFETCH_PAGES_MAX);
                self.resolve(waiter, page, Access::ReadOnly, run);
                return self.top_up_read_ahead(page.seg);
            }
            (PageState::Lost, _) => return self.resolve(waiter, page, Access::Poison, 0),
            _ => {}
        }
        if seg.home_lost {
            let pending = Pending::for_fault(Asked::Read, write, waiter);
            fail_pending(seg, page, pending, store, &mut self.resolutions);
            return;
        }
        if let Some(pending) = seg.pending.get_mut(&page.page) {
            // Join the request in flight; a write behind a read is asked for
            // when the read completes.
            if write {
                pending.writes.push(waiter);
            } else {
                pending.reads.push(waiter);
            }
            return;
        }
        let home = seg.home;
        let msg = if write {
            let have_copy = state == PageState::Shared;
            let fresh_ahead = if have_copy {
                0
            } else {
                let pages = seg.pages();
                seg.writes.on_miss(page.page, FRESH_RUN_MAX, pages)
            };
            seg.pending
                .insert(page.page, Pending::for_fault(Asked::Write, true, waiter));
            CohMsg::Write {
                page,
                have_copy,
                fresh_ahead,
            }
        } else {
            let pages = seg.pages();
            let prefetch = seg.reads.on_miss(page.page, PREFETCH_PAGES_MAX, pages);
            seg.pending
                .insert(page.page, Pending::for_fault(Asked::Read, false, waiter));
            CohMsg::Read { page, prefetch }
        };
        debug_assert!(home != me || self.homes.contains_key(&page.seg));
        self.send(home, msg);
    }

    pub(super) fn resolve(&mut self, waiter: W, page: PageKey, access: Access, also_mapped: u32) {
        self.resolutions.push_back(Resolution {
            waiter,
            page,
            access,
            also_mapped,
        });
    }

    /// Messages a home sends to the nodes that cache its pages.
    pub(super) fn handle_cache_message(
        &mut self,
        from: NodeId,
        msg: CohMsg,
        store: &mut impl PageStore,
    ) {
        let page = msg.page();
        if from == self.me && matches!(msg, CohMsg::Invalidate { .. }) {
            // The home drops its own copy: it may be the only current one.
            self.before_own_copy_dropped(page, store);
        }
        let Some(seg) = self.cache.get_mut(&page.seg) else {
            // A segment this node closed: nothing here to give or take. Answer
            // what needs an answer so the home's transaction completes.
            match msg {
                CohMsg::Invalidate { .. } => {
                    self.send(from, CohMsg::InvalidateAck { page, data: None })
                }
                CohMsg::Downgrade { .. } => {
                    self.send(from, CohMsg::DowngradeAck { page, data: None })
                }
                _ => tracing::debug!(?page, "message for a segment not open here"),
            }
            return;
        };
        if from != seg.home || !page_in_range(seg.pages(), page.page) {
            tracing::warn!(
                ?page,
                ?from,
                "coherence message from a node that is not the home"
            );
            return;
        }
        let index = page.page.0;
        match msg {
            CohMsg::Downgrade { .. } => {
                let data = match seg.at(index) {
                    PageState::Exclusive => {
                        store.protect_local(page);
                        seg.put(index, PageState::Shared);
                        Some(store.read_local(page))
                    }
                    PageState::Shared => Some(store.read_local(page)),
                    _ => None,
                };
                self.send(from, CohMsg::DowngradeAck { page, data });
            }
            CohMsg::Invalidate { .. } => {
                let data = match seg.at(index) {
                    PageState::Exclusive => {
                        store.protect_local(page);
                        let data = store.read_local(page);
                        store.punch_local(page);
                        Some(data)
                    }
                    PageState::Shared => {
                        store.punch_local(page);
                        None
                    }
                    PageState::Invalid | PageState::Lost => None,
                };
                if seg.at(index) != PageState::Lost {
                    seg.put(index, PageState::Invalid);
                }
                self.send(from, CohMsg::InvalidateAck { page, data });
            }
            CohMsg::ReadGrant { data, extra, .. } => {
                // The page and the run of read-ahead pages still Invalid here
                // go into the node copy with one write.
                let installable = extra
                    .iter()
                    .enumerate()
                    .take_while(|(i, _)| {
                        seg.state(PageIndex(index + 1 + *i as u32)) == Some(PageState::Invalid)
                    })
                    .count();
                let mut run = Vec::with_capacity(1 + installable);
                run.push(data);
                run.extend(extra.iter().take(installable).cloned());
                store.write_local_run(page, &run);
                seg.put(index, PageState::Shared);
                for offset in 0..installable {
                    let q = PageIndex(page.page.0 + 1 + offset as u32);
                    seg.put(q.0, PageState::Shared);
                    // Faults already waiting on a prefetched page need no
                    // request of their own any more; a write still does.
                    if let Some(p) = seg.pending.get_mut(&q) {
                        for waiter in p.reads.drain(..) {
                            let page = PageKey {
                                seg: page.seg,
                                page: q,
                            };
                            self.resolutions.push_back(Resolution {
                                waiter,
                                page,
                                access: Access::ReadOnly,
                                also_mapped: 0,
                            });
                        }
                    }
                }
                let also_mapped = installable as u32;
                seg.reads.next = page.page.0 + 1 + extra.len() as u32;
                let Some(mut pending) = seg.take_pending(page.page) else {
                    return self.top_up_read_ahead(page.seg);
                };
                let mut first = true;
                for waiter in pending.reads.drain(..) {
                    let also = if first { also_mapped } else { 0 };
                    first = false;
                    self.resolutions.push_back(Resolution {
                        waiter,
                        page,
                        access: Access::ReadOnly,
                        also_mapped: also,
                    });
                }
                if !pending.writes.is_empty() {
                    pending.asked = Asked::Write;
                    pending.speculative = false;
                    let home = seg.home;
                    seg.pending.insert(page.page, pending);
                    self.send(
                        home,
                        CohMsg::Write {
                            page,
                            have_copy: true,
                            fresh_ahead: 0,
                        },
                    );
                }
                self.top_up_read_ahead(page.seg);
            }
            CohMsg::WriteGrant { data, .. } => {
                match data {
                    Some(data) => store.write_local(page, &data),
                    None if !matches!(seg.at(index), PageState::Shared | PageState::Exclusive) => {
                        // The home believed we hold the page and we do not:
                        // mapping the hole would show zeros. Refuse.
                        tracing::error!(?page, "write grant without data for a page not held");
                        seg.put(index, PageState::Lost);
                        if let Some(p) = seg.take_pending(page.page) {
                            p.poison_all(page, &mut self.resolutions);
                        }
                        return;
                    }
                    None => {}
                }
                seg.put(index, PageState::Exclusive);
                seg.writes.next = page.page.0 + 1;
                if let Some(p) = seg.take_pending(page.page) {
                    p.resolve_all(page, Access::Writable, 0, &mut self.resolutions);
                }
            }
            CohMsg::FreshGrant { count, .. } => {
                let count = count.clamp(1, seg.pages() - page.page.0);
                // Only pages not held here get zeros; every page of the run
                // was never handed out, so that is all of them unless the
                // home is wrong, and then what is held here is kept.
                let mut q = page.page.0;
                let end = page.page.0 + count;
                while q < end {
                    let held = seg.at(q);
                    if held != PageState::Invalid {
                        if held != PageState::Lost {
                            tracing::error!(?page, q, ?held, "fresh grant of a page held here");
                            seg.put(q, PageState::Exclusive);
                        }
                        q += 1;
                        continue;
                    }
                    let len = (q..end)
                        .take_while(|r| seg.at(*r) == PageState::Invalid)
                        .count() as u32;
                    let first = PageKey {
                        seg: page.seg,
                        page: PageIndex(q),
                    };
                    store.zero_local_run(first, len);
                    for r in q..q + len {
                        seg.put(r, PageState::Exclusive);
                    }
                    q += len;
                }
                seg.writes.next = end;
                // Requests this node made for pages of the run before it
                // arrived are answered "you hold it" by the home.
                let mapped = seg.run_after(page.page, PageState::Exclusive, count - 1);
                let access = if seg.at(index) == PageState::Exclusive {
                    Access::Writable
                } else {
                    Access::Poison
                };
                if let Some(p) = seg.take_pending(page.page) {
                    p.resolve_all(page, access, mapped, &mut self.resolutions);
                }
            }
            CohMsg::Unavailable { .. } => {
                if seg.at(index) == PageState::Invalid {
                    seg.put(index, PageState::Lost);
                }
                if let Some(p) = seg.take_pending(page.page) {
                    fail_pending(seg, page, p, store, &mut self.resolutions);
                }
            }
            CohMsg::Read { .. }
            | CohMsg::Write { .. }
            | CohMsg::DowngradeAck { .. }
            | CohMsg::InvalidateAck { .. } => {
                unreachable!("home messages are routed to the home role")
            }
        }
    }

    /// The cache side of losing touch with a home (see
    /// [`Engine::fence_home`]): segments homed there can no longer fetch
    /// anything; copies held Shared are dropped (the home may be alive on
    /// the other side of a partition and let another node write them), so
    /// every later access to them is SIGBUS; pages held Exclusive stay
    /// usable (the home takes them for lost, nobody else can have them).
    pub(super) fn cache_peer_down(&mut self, dead: NodeId, store: &mut impl PageStore) {
        for (seg_id, seg) in self.cache.iter_mut() {
            if seg.home != dead || seg.home_lost {
                continue;
            }
            seg.home_lost = true;
            seg.speculative_in_flight = 0;
            for (page, pending) in std::mem::take(&mut seg.pending) {
                let key = PageKey { seg: *seg_id, page };
                fail_pending(seg, key, pending, store, &mut self.resolutions);
            }
            let shared: Vec<u32> = seg
                .states
                .present()
                .filter(|(_, s)| *s == PageState::Shared)
                .map(|(p, _)| p)
                .collect();
            for index in shared {
                store.punch_local(PageKey {
                    seg: *seg_id,
                    page: PageIndex(index),
                });
                seg.put(index, PageState::Lost);
            }
        }
    }

    /// Keep a sequential reader's next windows in flight before it faults
    /// on them, so fetching overlaps reading: once misses have shown a
    /// stream, up to `SPECULATIVE_DEPTH` reads ahead of it.
    fn top_up_read_ahead(&mut self, seg_id: SegmentId) {
        let Some(seg) = self.cache.get_mut(&seg_id) else {
            return;
        };
        if seg.home_lost || seg.reads.window < SPECULATIVE_WINDOW_MIN || seg.reads.next == u32::MAX
        {
            return;
        }
        let pages = seg.pages();
        seg.speculative_frontier = seg.speculative_frontier.max(seg.reads.next);
        let mut requests = Vec::new();
        let mut skipped = 0;
        while seg.speculative_in_flight < SPECULATIVE_DEPTH
            && seg.speculative_frontier < pages
            && skipped < PREFETCH_PAGES_MAX
        {
            let p = PageIndex(seg.speculative_frontier);
            if seg.at(p.0) != PageState::Invalid || seg.pending.contains_key(&p) {
                seg.speculative_frontier += 1;
                skipped += 1;
                continue;
            }
            // Hits no longer grow the window as misses did: the stream does.
            seg.reads.window = (seg.reads.window * 2).min(PREFETCH_PAGES_MAX);
            let prefetch = seg.reads.window.min(pages - p.0 - 1);
            seg.pending.insert(
                p,
                Pending {
                    asked: Asked::Read,
                    reads: vec![],
                    writes: vec![],
                    speculative: true,
                },
            );
            seg.speculative_in_flight += 1;
            seg.speculative_frontier = p.0 + 1 + prefetch;
            requests.push(CohMsg::Read {
                page: PageKey {
                    seg: seg_id,
                    page: p,
                },
                prefetch,
            });
        }
        let home = seg.home;
        for msg in requests {
            self.send(home, msg);
        }
    }

    /// Downgrade this node's Exclusive copy to Shared, returning its data.
    pub(super) fn downgrade_exclusive(
        &mut self,
        page: PageKey,
        store: &mut impl PageStore,
    ) -> Option<Bytes> {
        if self.page_state(page) != Some(PageState::Exclusive) {
            return None;
        }
        self.downgrade_exclusive_run(page, 1, store).pop()
    }

    /// Downgrade `count` pages from `first`, all Exclusive here, to Shared:
    /// one write-protect and one read for the whole run.
    pub(super) fn downgrade_exclusive_run(
        &mut self,
        first: PageKey,
        count: u32,
        store: &mut impl PageStore,
    ) -> Vec<Bytes> {
        let Some(seg) = self.cache.get_mut(&first.seg) else {
            return vec![];
        };
        let range = first.page.0..first.page.0 + count;
        debug_assert!(range.clone().all(|q| seg.at(q) == PageState::Exclusive));
        store.protect_local_run(first, count);
        for q in range {
            seg.put(q, PageState::Shared);
        }
        store.read_local_run(first, count)
    }

    /// Segments cached here whose home is `node`.
    pub fn cached_segments_homed_at(&self, node: NodeId) -> Vec<SegmentId> {
        self.cache
            .iter()
            .filter(|(_, c)| c.home == node)
            .map(|(s, _)| *s)
            .collect()
    }
}

/// End the faults waiting on a page that can no longer be fetched. Readers
/// of a page still held Shared go on reading it. A writer cannot be granted
/// the page, and its mapping may already hold it read-only (a SIGBUS could
/// not be delivered over that), so the node's copy is dropped first: the page
/// is Lost here, and every access to it ends in SIGBUS rather than stale data.
fn fail_pending<W>(
    seg: &mut CacheSegment<W>,
    page: PageKey,
    pending: Pending<W>,
    store: &mut impl PageStore,
    out: &mut VecDeque<Resolution<W>>,
) {
    let index = page.page.0;
    let held = seg.at(index) == PageState::Shared;
    if held && !pending.writes.is_empty() {
        store.punch_local(page);
        seg.put(index, PageState::Lost);
    }
    let readable = seg.at(index) == PageState::Shared;
    for waiter in pending.reads {
        let access = if readable {
            Access::ReadOnly
        } else {
            Access::Poison
        };
        out.push_back(Resolution {
            waiter,
            page,
            access,
            also_mapped: 0,
        });
    }
    for waiter in pending.writes {
        out.push_back(Resolution {
            waiter,
            page,
            access: Access::Poison,
            also_mapped: 0,
        });
    }
}
