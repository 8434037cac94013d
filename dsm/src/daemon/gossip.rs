//! How nodes learn each other's load (issue 13), as MOSIX does: every
//! interval each node sends its own load, and the newest half of what it
//! knows, to one node picked at random; each keeps a small window of the
//! newest loads it heard. No broadcast: a node sends one message an
//! interval whatever the cluster's size, and what it says reaches every
//! node in about log2(N) intervals. Ages travel instead of clock times (a
//! receiver dates an entry by its own clock, minus the age), so the nodes'
//! clocks need not agree. A pure state machine: `tick` and `receive` in,
//! messages out; `dsm-sim`-style tests drive it.

use crate::ids::NodeId;
pub use crate::wire::LoadEntry;
use std::collections::BTreeMap;

/// Loads a node keeps (besides its own).
pub const WINDOW: usize = 8;
/// An entry older than this is forgotten: its node may be gone.
pub const FORGET_AFTER_MS: u64 = 10_000;

/// One node's load, as known here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Known {
    /// As it came (its `age_ms` is that of when it came).
    pub entry: LoadEntry,
    /// When it was measured, by this node's clock (ms).
    pub measured_ms: u64,
}

pub struct Gossip {
    me: NodeId,
    window: BTreeMap<NodeId, Known>,
    /// xorshift64* state: the same seed, the same choices.
    rng: u64,
}

impl Gossip {
    pub fn new(me: NodeId, seed: u64) -> Gossip {
        Gossip {
            me,
            window: BTreeMap::new(),
            rng: seed | 1,
        }
    }

    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// An interval is over (`now_ms`, this node's clock): the message to
    /// send, and to which of the nodes `up` (none if no other is up).
    pub fn tick(
        &mut self,
        now_ms: u64,
        mine: LoadEntry,
        up: &[NodeId],
    ) -> Option<(NodeId, Vec<LoadEntry>)> {
        self.forget_old(now_ms);
        let others: Vec<NodeId> = up.iter().copied().filter(|n| *n != self.me).collect();
        if others.is_empty() {
            return None;
        }
        let to = others[(self.next_random() % others.len() as u64) as usize];
        let mut entries = vec![LoadEntry {
            node: self.me,
            age_ms: 0,
            ..mine
        }];
        let mut newest: Vec<(&NodeId, &Known)> =
            self.window.iter().filter(|(n, _)| **n != to).collect();
        newest.sort_by_key(|(n, k)| (std::cmp::Reverse(k.measured_ms), **n));
        entries.extend(newest.into_iter().take(WINDOW / 2).map(|(n, k)| {
            LoadEntry {
                node: *n,
                age_ms: now_ms
                    .saturating_sub(k.measured_ms)
                    .min(u64::from(u32::MAX)) as u32,
                ..k.entry
            }
        }));
        Some((to, entries))
    }

    /// A message came (`now_ms`, this node's clock): keep what is newer
    /// than what is known, and the newest `WINDOW` of all.
    pub fn receive(&mut self, now_ms: u64, entries: &[LoadEntry]) {
        // A message is small; a longer one is not ours to trust whole.
        for e in entries.iter().take(1 + WINDOW) {
            if e.node == self.me {
                continue;
            }
            let measured_ms = now_ms.saturating_sub(u64::from(e.age_ms));
            let newer = self
                .window
                .get(&e.node)
                .is_none_or(|k| k.measured_ms < measured_ms);
            if newer {
                self.window.insert(
                    e.node,
                    Known {
                        entry: *e,
                        measured_ms,
                    },
                );
            }
        }
        while self.window.len() > WINDOW {
            let oldest = self
                .window
                .iter()
                .min_by_key(|(n, k)| (k.measured_ms, **n))
                .map(|(n, _)| *n);
            match oldest {
                Some(n) => self.window.remove(&n),
                None => break,
            };
        }
        self.forget_old(now_ms);
    }

    fn forget_old(&mut self, now_ms: u64) {
        self.window
            .retain(|_, k| now_ms.saturating_sub(k.measured_ms) <= FORGET_AFTER_MS);
    }

    /// The nodes known, with their loads.
    pub fn known(&self) -> &BTreeMap<NodeId, Known> {
        &self.window
    }

    /// A node `node` is lost: what was heard of it goes.
    pub fn forget(&mut self, node: NodeId) {
        self.window.remove(&node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(node: NodeId, load_milli: u32, age_ms: u32) -> LoadEntry {
        LoadEntry {
            node,
            load_milli,
            free_kib: 1 << 20,
            age_ms,
            capacity_milli: 1000,
            blocked: false,
            balancing: true,
            guests: 0,
            procs: 0,
            faults_per_s: 0,
            pages_per_s: 0,
        }
    }

    /// A cluster of `n` gossiping nodes, an interval of 1000 ms, each
    /// message delayed 0–300 ms and one in `lose` lost (seeded).
    struct Sim {
        nodes: Vec<Gossip>,
        loads: Vec<u32>,
        /// (arrival ms, to index, entries)
        flying: Vec<(u64, usize, Vec<LoadEntry>)>,
        rng: u64,
        now: u64,
        lose: u64,
        sent: Vec<usize>,
    }

    impl Sim {
        fn new(n: usize, seed: u64, lose: u64) -> Sim {
            Sim {
                nodes: (1..=n)
                    .map(|i| Gossip::new(NodeId(i as u8), seed * 1000 + i as u64))
                    .collect(),
                loads: vec![1000; n],
                flying: Vec::new(),
                rng: seed | 1,
                now: 0,
                lose,
                sent: vec![0; n],
            }
        }

        fn random(&mut self) -> u64 {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            self.rng
        }

        /// One interval: every node ticks (at a jittered moment), messages
        /// arrive when due.
        fn interval(&mut self) {
            let up: Vec<NodeId> = (1..=self.nodes.len()).map(|i| NodeId(i as u8)).collect();
            let start = self.now;
            for i in 0..self.nodes.len() {
                let at = start + self.random() % 1000;
                self.deliver_until(at);
                let mine = entry(NodeId(i as u8 + 1), self.loads[i], 0);
                if let Some((to, entries)) = self.nodes[i].tick(at, mine, &up) {
                    assert_ne!(to, NodeId(i as u8 + 1), "never to itself");
                    self.sent[i] += 1;
                    if self.lose == 0 || !self.random().is_multiple_of(self.lose) {
                        let delay = self.random() % 300;
                        self.flying
                            .push((at + delay, usize::from(to.0) - 1, entries));
                    }
                }
            }
            self.now = start + 1000;
            self.deliver_until(self.now);
        }

        fn deliver_until(&mut self, t: u64) {
            self.flying.sort_by_key(|f| f.0);
            while self.flying.first().is_some_and(|f| f.0 <= t) {
                let (at, to, entries) = self.flying.remove(0);
                assert!(entries.len() <= 1 + WINDOW / 2, "a message stays small");
                self.nodes[to].receive(at, &entries);
                assert!(self.nodes[to].known().len() <= WINDOW);
                assert!(!self.nodes[to].known().contains_key(&NodeId(to as u8 + 1)));
            }
        }

        /// How many nodes know node `node`'s load as `load`.
        fn knowing(&self, node: usize, load: u32) -> usize {
            self.nodes
                .iter()
                .filter(|g| {
                    g.known()
                        .get(&NodeId(node as u8 + 1))
                        .is_some_and(|k| k.entry.load_milli == load)
                })
                .count()
        }
    }

    #[test]
    fn one_message_per_node_per_interval_whatever_the_size() {
        for n in [2usize, 8, 64] {
            let mut sim = Sim::new(n, 7, 0);
            for _ in 0..20 {
                sim.interval();
            }
            assert!(sim.sent.iter().all(|&s| s == 20), "{n}: {:?}", sim.sent);
        }
    }

    #[test]
    fn windows_fill_with_fresh_loads() {
        let n = 32;
        let mut sim = Sim::new(n, 3, 10);
        for _ in 0..12 {
            sim.interval();
        }
        let mut ages = Vec::new();
        for g in &sim.nodes {
            // About one message arrives an interval (Poisson): a node
            // that heard little lately knows fewer.
            assert!(g.known().len() >= WINDOW / 2, "{}", g.known().len());
            for k in g.known().values() {
                // Forgotten at its next look (at most an interval ago).
                assert!(
                    sim.now - k.measured_ms <= FORGET_AFTER_MS + 1000,
                    "stale: {k:?}"
                );
                ages.push(sim.now - k.measured_ms);
            }
        }
        // The window holds the newest: most of what a node knows is from
        // the last few intervals.
        ages.sort_unstable();
        let median = ages[ages.len() / 2];
        assert!(median <= 3_000, "median age {median} ms");
    }

    /// A node that becomes idle is heard of, as idle, by most nodes within
    /// a few intervals more than log2(N), over many seeds.
    #[test]
    fn an_idle_node_is_soon_known_as_idle() {
        let n = 32usize;
        let mut fractions = Vec::new();
        for seed in 1..=40 {
            let mut sim = Sim::new(n, seed, 20);
            for _ in 0..8 {
                sim.interval();
            }
            sim.loads[5] = 0;
            for _ in 0..(5 + 3) {
                sim.interval();
            }
            fractions.push(sim.knowing(5, 0) as f64 / (n - 1) as f64);
        }
        let mean = fractions.iter().sum::<f64>() / fractions.len() as f64;
        // With a window of 8 of 31 nodes, a node knows about a quarter of
        // the others at a time; the fresh idle one is among the newest.
        assert!(mean >= 0.2, "mean fraction knowing: {mean} ({fractions:?})");
    }

    #[test]
    fn two_nodes_know_each_other_and_a_lost_one_is_forgotten() {
        let mut sim = Sim::new(2, 1, 0);
        sim.loads[1] = 1500;
        sim.interval();
        sim.interval();
        assert_eq!(sim.knowing(1, 1500), 1);
        sim.nodes[0].forget(NodeId(2));
        assert!(sim.nodes[0].known().is_empty());
        // Silence: forgotten after FORGET_AFTER_MS.
        let mut lonely = Gossip::new(NodeId(1), 1);
        lonely.receive(0, &[entry(NodeId(2), 5, 0)]);
        assert!(lonely
            .tick(FORGET_AFTER_MS + 1, entry(NodeId(1), 0, 0), &[NodeId(1)])
            .is_none());
        assert!(lonely.known().is_empty());
    }

    #[test]
    fn older_news_never_replaces_newer() {
        let mut g = Gossip::new(NodeId(1), 1);
        let two = |load, age| entry(NodeId(2), load, age);
        g.receive(5_000, &[two(100, 0)]);
        g.receive(5_100, &[two(900, 500)]);
        assert_eq!(g.known()[&NodeId(2)].entry.load_milli, 100);
        g.receive(5_200, &[two(300, 10)]);
        assert_eq!(g.known()[&NodeId(2)].entry.load_milli, 300);
    }
}
