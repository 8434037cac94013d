//! The home role: the directory of a segment's pages and one transaction per
//! page at a time.

use super::table::{value_bits, PageTable, PageValue};
use super::{page_in_range, CohMsg, Engine, PageState, PageStore};
use crate::ids::{NodeId, NodeSet, PageIndex, PageKey};
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct DirEntry {
    /// The node holding the page Exclusive; the home copy is stale meanwhile.
    owner: Option<NodeId>,
    /// Nodes holding the page Shared (never together with an owner).
    copyset: NodeSet,
    /// The only up-to-date copy was on a node that was lost.
    lost: bool,
    /// The home node's own copy (held Shared) is the authoritative data and
    /// the home copy is stale: set when the home downgrades its own
    /// Exclusive copy, so the page is not copied a second time; flushed into
    /// the home copy before that own copy is dropped.
    in_own_copy: bool,
    /// The page was handed out once. Until then it is *fresh*: zeros by
    /// definition, in no node's memory, and granted without a transaction.
    touched: bool,
}

impl DirEntry {
    fn is_fresh(&self) -> bool {
        !self.touched
    }
}

/// A directory entry in the table's word: owner, flags, and the copyset of
/// nodes `1..INLINE_NODES`; a copyset reaching further sets `WIDE` and
/// keeps its whole set in `HomeSegment::wide_copysets`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct DirWord(u64);

const OWNER_MASK: u64 = 0x7f;
const LOST: u64 = 1 << 7;
const IN_OWN_COPY: u64 = 1 << 8;
const TOUCHED: u64 = 1 << 9;
const WIDE: u64 = 1 << 10;
const COPYSET_SHIFT: u32 = 11;
/// Copyset bits kept in the word (bit n for node n, bit 0 unused).
const INLINE_NODES: u32 = value_bits::<u64>() - COPYSET_SHIFT;

impl PageValue for DirWord {
    type Word = u64;
    fn pack(self) -> u64 {
        self.0
    }
    fn unpack(bits: u64) -> Self {
        DirWord(bits)
    }
}

pub(super) struct HomeSegment {
    dir: PageTable<DirWord>,
    /// Whole copysets of the pages whose copyset does not fit their word.
    wide_copysets: BTreeMap<PageIndex, NodeSet>,
    busy: BTreeMap<PageIndex, Busy>,
}

impl HomeSegment {
    pub(super) fn new(pages: u32) -> Self {
        HomeSegment {
            dir: PageTable::new(pages),
            wide_copysets: BTreeMap::new(),
            busy: BTreeMap::new(),
        }
    }

    fn pages(&self) -> u32 {
        self.dir.pages()
    }

    fn entry(&self, page: PageIndex) -> DirEntry {
        let DirWord(w) = self.dir.get(page.0);
        let inline = NodeSet::from_bits(u128::from(w >> COPYSET_SHIFT));
        DirEntry {
            owner: NodeId::new((w & OWNER_MASK) as u8),
            copyset: if w & WIDE != 0 {
                self.wide_copysets.get(&page).copied().unwrap_or(inline)
            } else {
                inline
            },
            lost: w & LOST != 0,
            in_own_copy: w & IN_OWN_COPY != 0,
            touched: w & TOUCHED != 0,
        }
    }

    /// Record `entry`; a page whose entry changes has been handed out, so
    /// it is no longer fresh.
    fn set_entry(&mut self, page: PageIndex, entry: DirEntry) {
        let mut w = entry.owner.map_or(0, |n| u64::from(n.0)) | TOUCHED;
        if entry.lost {
            w |= LOST;
        }
        if entry.in_own_copy {
            w |= IN_OWN_COPY;
        }
        let bits = entry.copyset.bits();
        if bits >> INLINE_NODES == 0 {
            w |= (bits as u64) << COPYSET_SHIFT;
            self.wide_copysets.remove(&page);
        } else {
            w |= WIDE;
            self.wide_copysets.insert(page, entry.copyset);
        }
        self.dir.set(page.0, DirWord(w));
    }

    fn update(&mut self, page: PageIndex, change: impl FnOnce(&mut DirEntry)) {
        let mut entry = self.entry(page);
        change(&mut entry);
        self.set_entry(page, entry);
    }

    /// The pages handed out at least once.
    fn touched_pages(&self) -> Vec<PageIndex> {
        self.dir.present().map(|(p, _)| PageIndex(p)).collect()
    }

    pub(super) fn heap_bytes(&self) -> usize {
        self.dir.heap_bytes()
    }
}

/// Where the data of a page handed out by a read comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    HomeCopy,
    OwnCopy,
    /// Held Exclusive by this node: downgraded in place first.
    OwnExclusive,
}

#[derive(Clone, Copy, Debug)]
enum Request {
    Read {
        from: NodeId,
        prefetch: u32,
    },
    Write {
        from: NodeId,
        have_copy: bool,
        fresh_ahead: u32,
    },
}

impl Request {
    fn from(self) -> NodeId {
        match self {
            Request::Read { from, .. } | Request::Write { from, .. } => from,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Txn {
    /// Waiting for the owner to downgrade.
    Read {
        from: NodeId,
        prefetch: u32,
        owner: NodeId,
    },
    /// Waiting for every other holder to invalidate.
    Write {
        from: NodeId,
        send_data: bool,
        waiting: NodeSet,
        owner: Option<NodeId>,
        data_lost: bool,
    },
}

#[derive(Default)]
struct Busy {
    txn: Option<Txn>,
    queue: VecDeque<Request>,
}

impl<W: Clone> Engine<W> {
    /// Feed a message from `from` (possibly this node itself).
    pub fn handle_message(&mut self, from: NodeId, msg: CohMsg, store: &mut impl PageStore) {
        match msg {
            CohMsg::Read { page, prefetch } => {
                let prefetch = prefetch.min(super::PREFETCH_PAGES_MAX);
                self.home_request(page, Request::Read { from, prefetch }, store)
            }
            CohMsg::Write {
                page,
                have_copy,
                fresh_ahead,
            } => {
                let fresh_ahead = fresh_ahead.min(super::FRESH_RUN_MAX);
                let request = Request::Write {
                    from,
                    have_copy,
                    fresh_ahead,
                };
                self.home_request(page, request, store)
            }
            CohMsg::DowngradeAck { page, data } => self.home_downgrade_ack(from, page, data, store),
            CohMsg::InvalidateAck { page, data } => {
                self.home_invalidate_ack(from, page, data, store)
            }
            other => self.handle_cache_message(from, other, store),
        }
    }

    /// A node was lost: forget it everywhere and fail what waited on it.
    pub fn handle_peer_down(&mut self, dead: NodeId, store: &mut impl PageStore) {
        if dead == self.me {
            return;
        }
        self.dead.insert(dead);
        self.cache_peer_down(dead, store);
        let mut restart = Vec::new();
        for (seg_id, home) in self.homes.iter_mut() {
            for page in home.touched_pages() {
                let idle = home.busy.get(&page).is_none_or(|b| b.txn.is_none());
                let mut entry = home.entry(page);
                if entry.copyset.contains(dead) || entry.owner == Some(dead) {
                    entry.copyset.remove(dead);
                    if entry.owner == Some(dead) && idle {
                        entry.owner = None;
                        entry.lost = true;
                    }
                    home.set_entry(page, entry);
                }
            }
            for (page, busy) in home.busy.iter_mut() {
                busy.queue.retain(|r| r.from() != dead);
                let key = PageKey {
                    seg: *seg_id,
                    page: *page,
                };
                match &mut busy.txn {
                    Some(Txn::Read { owner, .. }) if *owner == dead => restart.push(key),
                    Some(Txn::Write {
                        waiting,
                        owner,
                        data_lost,
                        ..
                    }) if waiting.contains(dead) => {
                        waiting.remove(dead);
                        if *owner == Some(dead) {
                            *data_lost = true;
                        }
                        if waiting.is_empty() {
                            restart.push(key);
                        }
                    }
                    _ => {}
                }
            }
        }
        // Finish the transactions that were waiting only on the dead node.
        for key in restart {
            match self
                .homes
                .get(&key.seg)
                .and_then(|h| h.busy.get(&key.page))
                .and_then(|b| b.txn)
            {
                Some(Txn::Read { from, .. }) => {
                    self.mark_lost(key);
                    self.reply_unavailable(from, key);
                    self.finish_txn(key, store);
                }
                Some(Txn::Write { .. }) => self.complete_write(key, store),
                None => {}
            }
        }
    }

    fn home_request(&mut self, page: PageKey, request: Request, store: &mut impl PageStore) {
        if self.dead.contains(request.from()) {
            return;
        }
        let Some(home) = self.homes.get_mut(&page.seg) else {
            tracing::debug!(?page, "request for a segment not homed here");
            self.send(request.from(), CohMsg::Unavailable { page });
            return;
        };
        if !page_in_range(home.pages(), page.page) {
            tracing::warn!(?page, from = ?request.from(), "request for a page beyond the segment");
            self.send(request.from(), CohMsg::Unavailable { page });
            return;
        }
        let busy = home.busy.entry(page.page).or_default();
        busy.queue.push_back(request);
        if busy.txn.is_none() {
            self.start_next(page, store);
        }
    }

    /// Start queued requests until one has to wait for other nodes.
    fn start_next(&mut self, page: PageKey, store: &mut impl PageStore) {
        loop {
            let Some(home) = self.homes.get_mut(&page.seg) else {
                return;
            };
            let entry = home.entry(page.page);
            let Some(busy) = home.busy.get_mut(&page.page) else {
                return;
            };
            debug_assert!(busy.txn.is_none());
            let Some(request) = busy.queue.pop_front() else {
                home.busy.remove(&page.page);
                return;
            };
            if entry.lost {
                self.reply_unavailable(request.from(), page);
                continue;
            }
            match request {
                Request::Read { from, prefetch } => match entry.owner {
                    Some(owner)
                        if owner == self.me
                            && owner != from
                            && self.downgrade_own_copy(page, store) =>
                    {
                        self.grant_read(page, from, prefetch, store);
                    }
                    Some(owner) if owner != from => {
                        let Some(busy) = self
                            .homes
                            .get_mut(&page.seg)
                            .and_then(|h| h.busy.get_mut(&page.page))
                        else {
                            return;
                        };
                        busy.txn = Some(Txn::Read {
                            from,
                            prefetch,
                            owner,
                        });
                        self.send(owner, CohMsg::Downgrade { page });
                        return;
                    }
                    Some(_) => {
                        // The owner asks to read what it holds exclusively:
                        // it asked before the fresh run that made it the
                        // owner reached it (FIFO: the run arrives first).
                        // The home copy is stale; tell it that it holds
                        // the page.
                        tracing::debug!(?page, ?from, "read request from the page's owner");
                        self.send(from, CohMsg::WriteGrant { page, data: None });
                    }
                    None => self.grant_read(page, from, prefetch, store),
                },
                Request::Write {
                    from,
                    have_copy,
                    fresh_ahead,
                } => {
                    if entry.is_fresh() {
                        self.grant_fresh(page, from, fresh_ahead);
                        continue;
                    }
                    if entry.owner == Some(from) {
                        self.send(from, CohMsg::WriteGrant { page, data: None });
                        continue;
                    }
                    let send_data = !(have_copy && entry.copyset.contains(from));
                    let mut waiting = entry.copyset;
                    waiting.remove(from);
                    if let Some(owner) = entry.owner {
                        waiting.insert(owner);
                    }
                    busy.txn = Some(Txn::Write {
                        from,
                        send_data,
                        waiting,
                        owner: entry.owner,
                        data_lost: false,
                    });
                    if waiting.is_empty() {
                        self.complete_write(page, store);
                        return; // complete_write starts the next request
                    }
                    for holder in waiting.iter() {
                        self.send(holder, CohMsg::Invalidate { page });
                    }
                    return;
                }
            }
        }
    }

    /// Grant a page no node ever had, with as many fresh pages after it as
    /// the writer asked for and are not in a transaction: Exclusive, and no
    /// data, since they are zeros by definition. One message and one
    /// directory update per page, no transaction.
    fn grant_fresh(&mut self, page: PageKey, to: NodeId, ahead: u32) {
        let Some(home) = self.homes.get_mut(&page.seg) else {
            return;
        };
        let first = page.page.0;
        let end = first
            .saturating_add(1)
            .saturating_add(ahead)
            .min(home.pages());
        let count = 1
            + ((first + 1)..end)
                .take_while(|q| {
                    let q = PageIndex(*q);
                    !home.busy.contains_key(&q) && home.entry(q).is_fresh()
                })
                .count() as u32;
        let owned = DirEntry {
            owner: Some(to),
            ..DirEntry::default()
        };
        for q in first..first + count {
            home.set_entry(PageIndex(q), owned);
        }
        self.send(to, CohMsg::FreshGrant { page, count });
    }

    /// Reply to a read from the home copy, with as many following pages as
    /// can be handed out right away (no transaction on them, no owner).
    fn grant_read(&mut self, page: PageKey, to: NodeId, prefetch: u32, store: &mut impl PageStore) {
        if self.dead.contains(to) {
            return; // its request outlived it: record nothing, send nothing
        }
        let Some(home) = self.homes.get_mut(&page.seg) else {
            return;
        };
        home.update(page.page, |e| e.copyset.insert(to));
        // The read-ahead run: pages that can be handed out right away, from
        // the home copy, or from this node's own copy (downgraded in place if
        // it holds them Exclusive).
        let mut sources = Vec::new();
        for q in (page.page.0 + 1)..(page.page.0 + 1 + prefetch) {
            let q_key = PageKey {
                seg: page.seg,
                page: PageIndex(q),
            };
            let Some(home) = self.homes.get(&page.seg) else {
                break;
            };
            if q >= home.pages() {
                break;
            }
            let entry = home.entry(PageIndex(q));
            if home.busy.contains_key(&PageIndex(q)) || entry.lost || entry.copyset.contains(to) {
                break;
            }
            match entry.owner {
                None if entry.in_own_copy => sources.push(Source::OwnCopy),
                None => sources.push(Source::HomeCopy),
                Some(owner)
                    if owner == self.me
                        && owner != to
                        && self.page_state(q_key) == Some(PageState::Exclusive) =>
                {
                    sources.push(Source::OwnExclusive)
                }
                Some(_) => break,
            }
        }
        let data = self.home_data(page, store);
        let mut extra = Vec::with_capacity(sources.len());
        let mut offset = 0;
        for (source, len) in runs(&sources) {
            let first = PageKey {
                seg: page.seg,
                page: PageIndex(page.page.0 + 1 + offset),
            };
            match source {
                Source::OwnExclusive => {
                    extra.extend(self.downgrade_exclusive_run(first, len, store))
                }
                Source::OwnCopy => extra.extend(store.read_local_run(first, len)),
                Source::HomeCopy => extra.extend(store.read_home_run(first, len)),
            }
            offset += len;
        }
        let me = self.me;
        if let Some(home) = self.homes.get_mut(&page.seg) {
            for (i, source) in sources.iter().enumerate() {
                home.update(PageIndex(page.page.0 + 1 + i as u32), |entry| {
                    if *source == Source::OwnExclusive {
                        entry.owner = None;
                        entry.copyset.insert(me);
                        entry.in_own_copy = true;
                    }
                    entry.copyset.insert(to);
                });
            }
        }
        self.send(to, CohMsg::ReadGrant { page, data, extra });
    }

    /// The authoritative data of a page no node holds Exclusive.
    fn home_data(&mut self, page: PageKey, store: &mut impl PageStore) -> Bytes {
        let in_own_copy = self
            .homes
            .get(&page.seg)
            .is_some_and(|h| h.entry(page.page).in_own_copy);
        if in_own_copy {
            store.read_local(page)
        } else {
            store.read_home(page)
        }
    }

    /// New authoritative data from an owner that let go.
    fn set_home_data(&mut self, page: PageKey, data: &[u8], store: &mut impl PageStore) {
        store.write_home(page, data);
        self.update_entry(page, |entry| {
            entry.in_own_copy = false;
        });
    }

    /// This node is about to drop its own copy of a page homed here: if that
    /// copy is the authoritative data, save it into the home copy first.
    pub(super) fn before_own_copy_dropped(&mut self, page: PageKey, store: &mut impl PageStore) {
        let Some(home) = self.homes.get_mut(&page.seg) else {
            return;
        };
        if home.entry(page.page).in_own_copy {
            home.update(page.page, |entry| entry.in_own_copy = false);
            let data = store.read_local(page);
            store.write_home(page, &data);
        }
    }

    /// This node itself holds the page Exclusive: downgrade it here and now,
    /// which is what Downgrade and DowngradeAck over the self link would do.
    /// Only when the grant has arrived (state Exclusive); otherwise false.
    fn downgrade_own_copy(&mut self, page: PageKey, store: &mut impl PageStore) -> bool {
        if self.downgrade_exclusive(page, store).is_none() {
            return false;
        }
        let me = self.me;
        self.update_entry(page, |entry| {
            entry.owner = None;
            entry.copyset.insert(me);
            entry.in_own_copy = true;
        });
        true
    }

    fn home_downgrade_ack(
        &mut self,
        from: NodeId,
        page: PageKey,
        data: Option<Bytes>,
        store: &mut impl PageStore,
    ) {
        let Some(txn) = self.current_txn(page) else {
            tracing::warn!(?page, ?from, "downgrade ack with no transaction");
            return;
        };
        let Txn::Read {
            from: reader,
            prefetch,
            owner,
        } = txn
        else {
            tracing::warn!(?page, ?from, "downgrade ack during a write transaction");
            return;
        };
        if owner != from {
            tracing::warn!(
                ?page,
                ?from,
                "downgrade ack from a node that is not the owner"
            );
            return;
        }
        match data {
            Some(data) => {
                self.set_home_data(page, &data, store);
                self.update_entry(page, |entry| {
                    entry.owner = None;
                    entry.copyset.insert(owner);
                });
                self.grant_read(page, reader, prefetch, store);
            }
            None => {
                tracing::error!(?page, ?owner, "owner had no copy to downgrade");
                self.mark_lost(page);
                self.reply_unavailable(reader, page);
            }
        }
        self.finish_txn(page, store);
    }

    fn home_invalidate_ack(
        &mut self,
        from: NodeId,
        page: PageKey,
        data: Option<Bytes>,
        store: &mut impl PageStore,
    ) {
        let Some(home) = self.homes.get_mut(&page.seg) else {
            return;
        };
        let Some(Txn::Write {
            waiting,
            owner,
            data_lost,
            ..
        }) = home.busy.get_mut(&page.page).and_then(|b| b.txn.as_mut())
        else {
            tracing::warn!(?page, ?from, "invalidate ack with no write transaction");
            return;
        };
        if !waiting.contains(from) {
            tracing::warn!(?page, ?from, "unexpected invalidate ack");
            return;
        }
        waiting.remove(from);
        let mut returned = None;
        if *owner == Some(from) {
            match data {
                Some(data) => returned = Some(data),
                None => *data_lost = true,
            }
        }
        let done = waiting.is_empty();
        if let Some(data) = returned {
            self.set_home_data(page, &data, store);
        }
        if done {
            self.complete_write(page, store);
        }
    }

    /// Every other holder has let go: grant the page to the writer.
    fn complete_write(&mut self, page: PageKey, store: &mut impl PageStore) {
        let Some(Txn::Write {
            from,
            send_data,
            data_lost,
            ..
        }) = self.current_txn(page)
        else {
            return;
        };
        let writer_dead = self.dead.contains(from);
        if data_lost {
            self.mark_lost(page);
            self.reply_unavailable(from, page);
        } else if writer_dead {
            // Every copy was collected into the home copy; nobody owns it.
            self.update_entry(page, |entry| {
                entry.owner = None;
                entry.copyset = NodeSet::EMPTY;
            });
        } else {
            let data = send_data.then(|| self.home_data(page, store));
            self.update_entry(page, |entry| {
                entry.owner = Some(from);
                entry.copyset = NodeSet::EMPTY;
                entry.in_own_copy = false;
            });
            self.send(from, CohMsg::WriteGrant { page, data });
        }
        self.finish_txn(page, store);
    }

    fn finish_txn(&mut self, page: PageKey, store: &mut impl PageStore) {
        if let Some(busy) = self
            .homes
            .get_mut(&page.seg)
            .and_then(|h| h.busy.get_mut(&page.page))
        {
            busy.txn = None;
        }
        self.start_next(page, store);
    }

    fn current_txn(&self, page: PageKey) -> Option<Txn> {
        self.homes.get(&page.seg)?.busy.get(&page.page)?.txn
    }

    fn update_entry(&mut self, page: PageKey, change: impl FnOnce(&mut DirEntry)) {
        if let Some(home) = self.homes.get_mut(&page.seg) {
            home.update(page.page, change);
        }
    }

    fn mark_lost(&mut self, page: PageKey) {
        self.update_entry(page, |entry| {
            entry.owner = None;
            entry.lost = true;
        });
    }

    fn reply_unavailable(&mut self, to: NodeId, page: PageKey) {
        if !self.dead.contains(to) {
            self.send(to, CohMsg::Unavailable { page });
        }
    }

    /// Directory view of a page homed here: (owner, copyset, lost).
    pub fn directory(&self, page: PageKey) -> Option<(Option<NodeId>, NodeSet, bool)> {
        let home = self.homes.get(&page.seg)?;
        if page.page.0 >= home.pages() {
            return None;
        }
        let e = home.entry(page.page);
        Some((e.owner, e.copyset, e.lost))
    }
}

/// Consecutive runs of equal values: (value, length).
fn runs<T: Copy + PartialEq>(flags: &[T]) -> Vec<(T, u32)> {
    let mut out: Vec<(T, u32)> = Vec::new();
    for &f in flags {
        match out.last_mut() {
            Some((g, n)) if *g == f => *n += 1,
            _ => out.push((f, 1)),
        }
    }
    out
}
