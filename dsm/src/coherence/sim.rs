//! Deterministic, seeded simulator of the coherence protocol.
//!
//! One seed decides everything: cluster size, segments and their homes,
//! processes, the operations they run, which message is delivered when
//! (links stay FIFO, as TCP is, but are drained in random order, so messages
//! on different links overtake each other arbitrarily) and which nodes crash.
//! A safety phase with crashes is followed by a liveness phase without: every
//! process must then finish. An independent checker looks at every step:
//!
//! * at most one node holds a page Exclusive, and then no node holds it Shared;
//! * a writable mapping exists only on the Exclusive node, a read-only one only
//!   where the page is present;
//! * every read returns the latest completed write of that page (values are
//!   unique and never zero, so a zero-filled or lost page is caught);
//! * SIGBUS only where the page's only copy, or its home, was lost.
//!
//! Failures report `SEED=<n>`; `cargo run -p dsm --bin dsm-sim -- --seed <n>`
//! replays one.

use super::{Access, CohMsg, Engine, PageState, PageStore};
use crate::ids::{NodeId, PageIndex, PageKey, SegmentId};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;

/// SplitMix64: tiny and stable, so a seed means the same run forever.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pte {
    ReadOnly,
    Writable,
}

type ProcId = usize;

/// One node's memory: the node copy (memfd), the home copy and every local
/// process's page table entries.
#[derive(Default)]
struct SimStore {
    local: HashMap<PageKey, u64>,
    home: HashMap<PageKey, u64>,
    ptes: HashMap<(ProcId, PageKey), Pte>,
}

fn encode(v: u64) -> Bytes {
    Bytes::copy_from_slice(&v.to_le_bytes())
}
fn decode(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&data[..8]);
    u64::from_le_bytes(b)
}

impl PageStore for SimStore {
    fn protect_local(&mut self, page: PageKey) {
        for ((_, p), pte) in self.ptes.iter_mut() {
            if *p == page {
                *pte = Pte::ReadOnly;
            }
        }
    }
    fn read_local(&mut self, page: PageKey) -> Bytes {
        // Reading a hole through the fd gives zeros, which the checker
        // then catches if the protocol ever relies on it.
        encode(self.local.get(&page).copied().unwrap_or(0))
    }
    fn write_local(&mut self, page: PageKey, data: &[u8]) {
        self.local.insert(page, decode(data));
    }
    fn punch_local(&mut self, page: PageKey) {
        self.local.remove(&page);
        self.ptes.retain(|(_, p), _| *p != page);
    }
    fn read_home(&mut self, page: PageKey) -> Bytes {
        encode(self.home.get(&page).copied().unwrap_or(0))
    }
    fn write_home(&mut self, page: PageKey, data: &[u8]) {
        self.home.insert(page, decode(data));
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Read(PageKey),
    Write(PageKey),
}

struct Process {
    node: NodeId,
    ops_left: u32,
    current: Option<Op>,
    blocked: bool,
    /// The previous operation's page, and whether it wrote.
    last: Option<(PageKey, bool)>,
}

enum Envelope {
    Msg(CohMsg),
    /// The receiver lost touch with this node (a cut): it fences it, then
    /// tells (through the daemon's timing) that it has, by letting the
    /// other side declare it lost.
    Fence(NodeId),
    PeerDown(NodeId),
}

struct SimNode {
    engine: Engine<ProcId>,
    store: SimStore,
}

/// Summary of one run.
#[derive(Debug, Default)]
pub struct Report {
    pub steps: u64,
    pub messages: u64,
    pub reads: u64,
    pub writes: u64,
    pub poisoned: u64,
    /// Fresh grants of more than one page, and the pages they granted.
    pub fresh_runs: u64,
    pub fresh_run_pages: u64,
    pub crashes: u32,
    pub partitions: u32,
}

pub struct Sim {
    rng: Rng,
    seed: u64,
    nodes: BTreeMap<NodeId, SimNode>,
    crashed: HashSet<NodeId>,
    /// Pairs (a, b) cut apart by a partition: nothing goes from a to b.
    cut: HashSet<(NodeId, NodeId)>,
    links: BTreeMap<(NodeId, NodeId), VecDeque<Envelope>>,
    segments: Vec<(SegmentId, NodeId, u32)>,
    procs: Vec<Process>,
    /// The latest completed write of every page (0 = never written).
    latest: HashMap<PageKey, u64>,
    /// Pages whose only up-to-date copy died with a node.
    lost_allowed: HashSet<PageKey>,
    next_value: u64,
    crash_budget: u32,
    partition_budget: u32,
    trace: VecDeque<Event>,
    report: Report,
}

impl Sim {
    pub fn new(seed: u64) -> Sim {
        let mut rng = Rng::new(seed);
        let node_count = 2 + rng.below(4) as u8; // 2..=5
        let mut nodes = BTreeMap::new();
        for n in 1..=node_count {
            let id = NodeId(n);
            nodes.insert(
                id,
                SimNode {
                    engine: Engine::new(id),
                    store: SimStore::default(),
                },
            );
        }
        let mut segments = Vec::new();
        for s in 0..(1 + rng.below(2)) {
            let home = NodeId(1 + rng.below(u64::from(node_count)) as u8);
            let pages = 1 + rng.below(8) as u32;
            let seg = SegmentId::new(home, s as u32 + 1);
            segments.push((seg, home, pages));
            if let Some(h) = nodes.get_mut(&home) {
                h.engine.create_home(seg, pages);
            }
            for node in nodes.values_mut() {
                node.engine.open_cache(seg, home, pages);
            }
        }
        let mut procs = Vec::new();
        for n in 1..=node_count {
            for _ in 0..(1 + rng.below(3)) {
                procs.push(Process {
                    node: NodeId(n),
                    ops_left: 20 + rng.below(60) as u32,
                    current: None,
                    blocked: false,
                    last: None,
                });
            }
        }
        let crash_budget = if rng.chance(50) {
            rng.below(u64::from(node_count) - 1) as u32
        } else {
            0
        };
        let partition_budget = u32::from(rng.chance(30));
        Sim {
            rng,
            seed,
            nodes,
            crashed: HashSet::new(),
            cut: HashSet::new(),
            partition_budget,
            links: BTreeMap::new(),
            segments,
            procs,
            latest: HashMap::new(),
            lost_allowed: HashSet::new(),
            next_value: 1,
            crash_budget,
            trace: VecDeque::new(),
            report: Report::default(),
        }
    }

    /// Run to completion: `Ok` with a report, or `Err` with the seed, the
    /// broken invariant and the last events.
    pub fn run(mut self) -> Result<Report, String> {
        let step_limit = 200_000;
        // Safety phase: crashes allowed. Liveness phase: no new faults, and
        // everything still in flight must drain with every process done.
        while self.report.steps < step_limit {
            self.report.steps += 1;
            if let Err(e) = self.step() {
                return Err(self.failure(&e));
            }
            if self.quiescent() {
                return Ok(self.report);
            }
        }
        Err(self.failure("liveness: the cluster did not settle (a waiter is stuck)"))
    }

    fn failure(&self, what: &str) -> String {
        let mut s = format!("SEED={} {what}\nlast events:\n", self.seed);
        for line in &self.trace {
            let _ = writeln!(s, "  {}", line.describe());
        }
        s
    }

    fn log(&mut self, line: Event) {
        if self.trace.len() == 40 {
            self.trace.pop_front();
        }
        self.trace.push_back(line);
    }

    fn quiescent(&self) -> bool {
        self.links.values().all(|q| q.is_empty())
            && self
                .procs
                .iter()
                .all(|p| self.crashed.contains(&p.node) || (p.ops_left == 0 && p.current.is_none()))
    }

    fn step(&mut self) -> Result<(), String> {
        let busy_links: Vec<(NodeId, NodeId)> = self
            .links
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(k, _)| *k)
            .collect();
        let runnable: Vec<ProcId> = (0..self.procs.len())
            .filter(|&i| {
                let p = &self.procs[i];
                !self.crashed.contains(&p.node)
                    && !p.blocked
                    && (p.current.is_some() || p.ops_left > 0)
            })
            .collect();
        if busy_links.is_empty() && runnable.is_empty() {
            return Err("liveness: no message in flight, yet a process waits".into());
        }
        if self.crash_budget > 0 && self.rng.chance(1) && self.rng.chance(10) {
            self.crash_budget -= 1;
            let live: Vec<NodeId> = self.nodes.keys().copied().collect();
            let victim = live[self.rng.below(live.len() as u64) as usize];
            return self.crash(victim);
        }
        if self.partition_budget > 0 && self.rng.chance(1) && self.rng.chance(10) {
            self.partition_budget -= 1;
            return self.partition();
        }
        let deliver = !busy_links.is_empty() && (runnable.is_empty() || self.rng.chance(55));
        if deliver {
            let link = busy_links[self.rng.below(busy_links.len() as u64) as usize];
            self.deliver(link)
        } else {
            let p = runnable[self.rng.below(runnable.len() as u64) as usize];
            self.run_process(p)
        }
    }

    fn pick_op(&mut self, p: ProcId) -> Op {
        let (seg, _, pages) = self.segments[self.rng.below(self.segments.len() as u64) as usize];
        let page = PageKey {
            seg,
            page: PageIndex(self.rng.below(u64::from(pages)) as u32),
        };
        // Often continue sequentially after the previous page, reading or
        // writing as before, which exercises read-ahead and fresh runs.
        if let Some((prev, was_write)) = self.procs[p].last {
            let pages = self
                .segments
                .iter()
                .find(|s| s.0 == prev.seg)
                .map_or(0, |s| s.2);
            if prev.page.0 + 1 < pages && self.rng.chance(40) {
                let next = PageKey {
                    seg: prev.seg,
                    page: PageIndex(prev.page.0 + 1),
                };
                self.procs[p].last = Some((next, was_write));
                return if was_write {
                    Op::Write(next)
                } else {
                    Op::Read(next)
                };
            }
        }
        let write = self.rng.chance(40);
        self.procs[p].last = Some((page, write));
        if write {
            Op::Write(page)
        } else {
            Op::Read(page)
        }
    }

    fn run_process(&mut self, p: ProcId) -> Result<(), String> {
        let op = match self.procs[p].current {
            Some(op) => op,
            None => {
                let op = self.pick_op(p);
                self.procs[p].ops_left -= 1;
                self.procs[p].current = Some(op);
                op
            }
        };
        let node_id = self.procs[p].node;
        let (page, write) = match op {
            Op::Read(page) => (page, false),
            Op::Write(page) => (page, true),
        };
        let pte = self.nodes[&node_id].store.ptes.get(&(p, page)).copied();
        let allowed = matches!(
            (pte, write),
            (Some(Pte::Writable), _) | (Some(Pte::ReadOnly), false)
        );
        if !allowed {
            self.log(Event::Fault {
                node: node_id,
                proc: p,
                page,
                write,
            });
            self.procs[p].blocked = true;
            let node = self
                .nodes
                .get_mut(&node_id)
                .ok_or("process on a missing node")?;
            node.engine.handle_fault(page, write, p, &mut node.store);
            return self.after_engine(node_id);
        }
        let node = self
            .nodes
            .get_mut(&node_id)
            .ok_or("process on a missing node")?;
        if write {
            let value = self.next_value;
            self.next_value += 1;
            node.store.local.insert(page, value);
            self.latest.insert(page, value);
            self.report.writes += 1;
            self.log(Event::Write {
                node: node_id,
                proc: p,
                page,
                value,
            });
        } else {
            let Some(&seen) = node.store.local.get(&page) else {
                return Err(format!(
                    "{node_id:?} proc{p} has a mapping of {page:?} but the node copy is absent"
                ));
            };
            let want = self.latest.get(&page).copied().unwrap_or(0);
            self.report.reads += 1;
            if seen != want {
                return Err(format!(
                    "{node_id:?} proc{p} read {page:?} = {seen}, latest write was {want}"
                ));
            }
        }
        self.procs[p].current = None;
        self.check()
    }

    fn deliver(&mut self, link: (NodeId, NodeId)) -> Result<(), String> {
        let Some(envelope) = self.links.get_mut(&link).and_then(|q| q.pop_front()) else {
            return Ok(());
        };
        let (from, to) = link;
        let Some(node) = self.nodes.get_mut(&to) else {
            return Ok(());
        };
        match envelope {
            Envelope::Msg(msg) => {
                self.report.messages += 1;
                if let CohMsg::FreshGrant { count, .. } = msg {
                    if count > 1 {
                        self.report.fresh_runs += 1;
                        self.report.fresh_run_pages += u64::from(count);
                    }
                }
                let event = Event::Msg {
                    from,
                    to,
                    msg: msg.clone(),
                };
                node.engine.handle_message(from, msg, &mut node.store);
                self.log(event);
            }
            Envelope::Fence(peer) => {
                node.engine.fence_home(peer, &mut node.store);
                self.log(Event::Fence { node: to, peer });
                // Only now may the other side declare this node lost (in
                // the daemon: the lease is shorter than the peer timeout).
                self.links
                    .entry((to, from))
                    .or_default()
                    .push_back(Envelope::PeerDown(to));
            }
            Envelope::PeerDown(dead) => {
                // A home that learns of a loss may have granted the dead node
                // a page since the crash (it cannot tell): that page is lost.
                for &(seg, home, pages) in &self.segments {
                    if home != to {
                        continue;
                    }
                    for i in 0..pages {
                        let page = PageKey {
                            seg,
                            page: PageIndex(i),
                        };
                        if node.engine.directory(page).and_then(|d| d.0) == Some(dead) {
                            self.lost_allowed.insert(page);
                        }
                    }
                }
                node.engine.handle_peer_down(dead, &mut node.store);
                self.log(Event::Down { node: to, dead });
            }
        }
        self.after_engine(to)
    }

    /// Route the engine's outputs: messages onto links, resolutions onto
    /// page tables, then check every invariant.
    fn after_engine(&mut self, node_id: NodeId) -> Result<(), String> {
        let Some(node) = self.nodes.get_mut(&node_id) else {
            return Ok(());
        };
        while let Some((to, msg)) = node.engine.poll_transmit() {
            if !self.crashed.contains(&to) && !self.cut.contains(&(node_id, to)) {
                self.links
                    .entry((node_id, to))
                    .or_default()
                    .push_back(Envelope::Msg(msg));
            }
        }
        while let Some(res) = node.engine.poll_resolution() {
            let p = res.waiter;
            let state = node.engine.page_state(res.page);
            match res.access {
                Access::ReadOnly | Access::Writable => {
                    let pte = if res.access == Access::Writable {
                        Pte::Writable
                    } else {
                        Pte::ReadOnly
                    };
                    node.store.ptes.insert((p, res.page), pte);
                    for i in 1..=res.also_mapped {
                        let q = PageKey {
                            seg: res.page.seg,
                            page: PageIndex(res.page.page.0 + i),
                        };
                        node.store.ptes.entry((p, q)).or_insert(pte);
                    }
                }
                Access::Poison => {
                    let home = res.page.seg.home().ok_or("bad segment id")?;
                    let allowed = self.lost_allowed.contains(&res.page)
                        || self.crashed.contains(&home)
                        || self.cut.contains(&(node_id, home));
                    if !allowed {
                        return Err(format!(
                            "{node_id:?} proc{p} got SIGBUS on {:?} (state {state:?}) though no copy was lost",
                            res.page
                        ));
                    }
                    self.report.poisoned += 1;
                    // The access ends in SIGBUS; the process moves on.
                    self.procs[p].current = None;
                }
            }
            self.procs[p].blocked = false;
        }
        self.check()
    }

    fn crash(&mut self, victim: NodeId) -> Result<(), String> {
        self.report.crashes += 1;
        let Some(node) = self.nodes.remove(&victim) else {
            return Ok(());
        };
        self.log(Event::Crash(victim));
        // Pages it alone held up to date cannot come back: those it held
        // Exclusive, and those its home had granted it (the grant may have
        // been in flight: the home cannot know whether it was written).
        for &(seg, home, pages) in &self.segments {
            for i in 0..pages {
                let page = PageKey {
                    seg,
                    page: PageIndex(i),
                };
                let dir_owner = self
                    .nodes
                    .get(&home)
                    .and_then(|h| h.engine.directory(page))
                    .and_then(|d| d.0);
                if node.engine.page_state(page) == Some(PageState::Exclusive)
                    || dir_owner == Some(victim)
                {
                    self.lost_allowed.insert(page);
                }
            }
        }
        self.crashed.insert(victim);
        // Messages to it vanish; of those it sent, a random prefix still
        // arrives; then each survivor learns of the loss, after the last one.
        self.links.retain(|(_, to), _| *to != victim);
        let survivors: Vec<NodeId> = self.nodes.keys().copied().collect();
        for n in survivors {
            let q = self.links.entry((victim, n)).or_default();
            let keep = if q.is_empty() {
                0
            } else {
                self.rng.below(q.len() as u64 + 1) as usize
            };
            q.truncate(keep);
            q.push_back(Envelope::PeerDown(victim));
        }
        self.check()
    }

    /// Cut the live nodes into two sides that can no longer talk: of the
    /// messages in flight across the cut a random prefix still arrives,
    /// then each node fences every node across (as its link closes or its
    /// lease ends), and each learns of the other's loss only after that
    /// other fenced it (see `Envelope::Fence`). Processes go on on both
    /// sides; every invariant must still hold.
    fn partition(&mut self) -> Result<(), String> {
        let live: Vec<NodeId> = self.nodes.keys().copied().collect();
        if live.len() < 2 {
            return Ok(());
        }
        let mut side: Vec<NodeId> = live
            .iter()
            .copied()
            .filter(|_| self.rng.chance(50))
            .collect();
        if side.is_empty() || side.len() == live.len() {
            side = vec![live[0]];
        }
        self.report.partitions += 1;
        self.log(Event::Partition(side.clone()));
        let other: Vec<NodeId> = live.iter().copied().filter(|n| !side.contains(n)).collect();
        for &a in &side {
            for &b in &other {
                for (from, to) in [(a, b), (b, a)] {
                    self.cut.insert((from, to));
                    let q = self.links.entry((from, to)).or_default();
                    // A random prefix of the messages in flight arrives;
                    // events that are not on the wire (a crash's PeerDown)
                    // stay where they are.
                    let msgs = q.iter().filter(|e| matches!(e, Envelope::Msg(_))).count();
                    let keep = self.rng.below(msgs as u64 + 1) as usize;
                    let mut seen = 0;
                    for e in q.drain(..).collect::<Vec<_>>() {
                        if matches!(e, Envelope::Msg(_)) {
                            seen += 1;
                            if seen > keep {
                                continue;
                            }
                        }
                        q.push_back(e);
                    }
                    q.push_back(Envelope::Fence(from));
                }
            }
        }
        self.check()
    }

    fn check(&self) -> Result<(), String> {
        for (id, node) in &self.nodes {
            for ((_, page), pte) in &node.store.ptes {
                let state = node.engine.page_state(*page);
                let ok = match pte {
                    Pte::Writable => state == Some(PageState::Exclusive),
                    Pte::ReadOnly => {
                        matches!(state, Some(PageState::Shared | PageState::Exclusive))
                    }
                };
                if !ok {
                    return Err(format!(
                        "{id:?} maps {page:?} {pte:?} while the node holds it {state:?}"
                    ));
                }
            }
        }
        for &(seg, _, pages) in &self.segments {
            for i in 0..pages {
                let page = PageKey {
                    seg,
                    page: PageIndex(i),
                };
                let mut exclusive = Vec::new();
                let mut shared = Vec::new();
                for (id, node) in &self.nodes {
                    let state = node.engine.page_state(page);
                    match state {
                        Some(PageState::Exclusive) => exclusive.push(*id),
                        Some(PageState::Shared) => shared.push(*id),
                        _ => continue,
                    }
                    if !node.store.local.contains_key(&page) {
                        return Err(format!("{id:?} holds {page:?} {state:?} with no data"));
                    }
                }
                if exclusive.len() > 1 {
                    return Err(format!("{page:?} Exclusive on {exclusive:?}"));
                }
                if !exclusive.is_empty() && !shared.is_empty() {
                    return Err(format!(
                        "{page:?} Exclusive on {exclusive:?} and Shared on {shared:?}"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// What the trace keeps of each step; formatted only when a run fails.
enum Event {
    Fault {
        node: NodeId,
        proc: ProcId,
        page: PageKey,
        write: bool,
    },
    Write {
        node: NodeId,
        proc: ProcId,
        page: PageKey,
        value: u64,
    },
    Msg {
        from: NodeId,
        to: NodeId,
        msg: CohMsg,
    },
    Down {
        node: NodeId,
        dead: NodeId,
    },
    Crash(NodeId),
    Fence {
        node: NodeId,
        peer: NodeId,
    },
    Partition(Vec<NodeId>),
}

impl Event {
    fn describe(&self) -> String {
        match self {
            Event::Fault {
                node,
                proc,
                page,
                write,
            } => format!("{node:?} proc{proc} fault {page:?} write={write}"),
            Event::Write {
                node,
                proc,
                page,
                value,
            } => format!("{node:?} proc{proc} write {page:?} = {value}"),
            Event::Msg { from, to, msg } => format!("{from:?}->{to:?} {}", short(msg)),
            Event::Down { node, dead } => format!("{node:?} learns {dead:?} is down"),
            Event::Crash(node) => format!("CRASH {node:?}"),
            Event::Fence { node, peer } => format!("{node:?} FENCES {peer:?}"),
            Event::Partition(side) => format!("PARTITION {side:?} | the rest"),
        }
    }
}

fn short(msg: &CohMsg) -> String {
    match msg {
        CohMsg::ReadGrant { page, data, extra } => {
            format!("ReadGrant {page:?} = {} (+{})", decode(data), extra.len())
        }
        CohMsg::WriteGrant { page, data } => format!(
            "WriteGrant {page:?} data={:?}",
            data.as_ref().map(|d| decode(d))
        ),
        CohMsg::DowngradeAck { page, data } => format!(
            "DowngradeAck {page:?} data={:?}",
            data.as_ref().map(|d| decode(d))
        ),
        CohMsg::InvalidateAck { page, data } => format!(
            "InvalidateAck {page:?} data={:?}",
            data.as_ref().map(|d| decode(d))
        ),
        other => format!("{other:?}"),
    }
}

/// Run seeds `first..first+count`; the first failure is returned.
pub fn run_seeds(first: u64, count: u64) -> Result<Report, String> {
    let mut total = Report::default();
    for seed in first..first + count {
        let r = Sim::new(seed).run()?;
        total.steps += r.steps;
        total.messages += r.messages;
        total.reads += r.reads;
        total.writes += r.writes;
        total.poisoned += r.poisoned;
        total.fresh_runs += r.fresh_runs;
        total.fresh_run_pages += r.fresh_run_pages;
        total.crashes += r.crashes;
        total.partitions += r.partitions;
    }
    Ok(total)
}
