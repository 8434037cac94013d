//! A seeded simulation of the semaphore protocol: several nodes' services
//! exchanging notices over FIFO links delivered in random order across
//! links, with random operations, cancels, process exits and node crashes.
//!
//! It checks that every operation ends exactly once, and that the set's
//! values are exactly what the operations reported as done (and the undo of
//! exited or lost processes) imply: a cancelled operation never applied,
//! an applied one never reported as cancelled.

use super::sems::{SemAction, SemService};
use crate::coherence::sim::Rng;
use crate::ids::{IpcId, NodeId, SemSetId};
use crate::sysv::Credentials;
use crate::wire::{Notice, SemCtl, SemResult};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use sysv::sem::{SemBuf, SemLimits, IPC_NOWAIT, SEM_UNDO};

const HOME: NodeId = NodeId(1);
const NODES: u8 = 3;

/// What the test knows of one submitted operation.
struct Submitted {
    pid: i32,
    sops: Vec<SemBuf>,
    result: Option<SemResult>,
}

struct World {
    rng: Rng,
    services: BTreeMap<NodeId, SemService>,
    links: BTreeMap<(NodeId, NodeId), VecDeque<Notice>>,
    ops: BTreeMap<(NodeId, u64), Submitted>,
    crashed: BTreeSet<NodeId>,
    /// Processes whose exit was announced (their undo applies).
    exited: BTreeSet<(NodeId, i32)>,
    /// The first pid of the processes in use now (three per node).
    next_pid: i32,
    set: SemSetId,
    log: Vec<String>,
}

impl World {
    fn new(seed: u64) -> World {
        let limits = SemLimits {
            semmsl: 250,
            semmns: 32000,
            semopm: 32,
            semmni: 32,
        };
        let mut rng = Rng::new(seed);
        // Lend after 1 to 4 operations in a row (often), or never.
        let lend_after = rng.below(5) as u32;
        let mut services: BTreeMap<NodeId, SemService> = (1..=NODES)
            .map(|n| {
                let mut s = SemService::new(NodeId(n), limits);
                s.set_lend_after(lend_after);
                (NodeId(n), s)
            })
            .collect();
        let set = IpcId::new(HOME, 7);
        let home = services.get_mut(&HOME).expect("home");
        home.create(set, 0, 2, 0o600, &Credentials::root(1), 0)
            .expect("create");
        let reply = home.ctl(
            HOME,
            set,
            &Credentials::root(1),
            SemCtl::SetAll { values: vec![3, 0] },
            0,
        );
        assert_eq!(reply, crate::wire::RpcResponse::Ok);
        World {
            rng,
            services,
            links: BTreeMap::new(),
            ops: BTreeMap::new(),
            crashed: BTreeSet::new(),
            exited: BTreeSet::new(),
            next_pid: 100,
            set,
            log: Vec::new(),
        }
    }

    /// Collect what a node's service asked for.
    fn drain(&mut self, node: NodeId) -> Result<(), String> {
        loop {
            let Some(action) = self
                .services
                .get_mut(&node)
                .and_then(SemService::poll_action)
            else {
                return Ok(());
            };
            match action {
                SemAction::Send(to, notice) => {
                    if !self.crashed.contains(&to) {
                        self.links.entry((node, to)).or_default().push_back(notice);
                    }
                }
                SemAction::Arbitrating(id) => self.log.push(format!("{node:?} arbitrates {id:?}")),
                SemAction::Complete { wait, result } => {
                    self.log
                        .push(format!("{node:?} wait {wait} ended {result:?}"));
                    let op = self
                        .ops
                        .get_mut(&(node, wait))
                        .ok_or(format!("{node:?}: completion of unknown wait {wait}"))?;
                    if let Some(first) = op.result {
                        return Err(format!(
                            "{node:?} wait {wait} ended twice: {first:?}, then {result:?}"
                        ));
                    }
                    op.result = Some(result);
                }
            }
        }
    }

    fn live_nodes(&self) -> Vec<NodeId> {
        (1..=NODES)
            .map(NodeId)
            .filter(|n| !self.crashed.contains(n))
            .collect()
    }

    fn submit(&mut self, node: NodeId) -> Result<(), String> {
        // Nodes other than the home may crash: their processes use only
        // P with undo, whose effects a loss reverts exactly.
        let sops = if node != HOME {
            vec![SemBuf {
                num: 0,
                op: -1,
                flags: SEM_UNDO,
            }]
        } else {
            match self.rng.below(5) {
                0 => vec![SemBuf {
                    num: 0,
                    op: 1,
                    flags: 0,
                }],
                1 => vec![SemBuf {
                    num: 0,
                    op: -1,
                    flags: 0,
                }],
                2 => vec![SemBuf {
                    num: 0,
                    op: -1,
                    flags: IPC_NOWAIT,
                }],
                3 => vec![
                    SemBuf {
                        num: 0,
                        op: -1,
                        flags: 0,
                    },
                    SemBuf {
                        num: 1,
                        op: 1,
                        flags: 0,
                    },
                ],
                _ => vec![SemBuf {
                    num: 0,
                    op: -1,
                    flags: SEM_UNDO,
                }],
            }
        };
        // A few processes per node, each used until it exits.
        let pid = self.next_pid + self.rng.below(3) as i32;
        if self.exited.contains(&(node, pid)) {
            return Ok(());
        }
        let now = 0;
        let service = self.services.get_mut(&node).ok_or("no service")?;
        if sops.iter().any(|s| s.flags & SEM_UNDO != 0) {
            service.note_undo(pid, self.set);
        }
        let wait = service.submit(self.set, sops.clone(), pid, Credentials::root(pid), now);
        self.log.push(format!(
            "{node:?} pid {pid} submits {sops:?} as wait {wait}"
        ));
        self.ops.insert(
            (node, wait),
            Submitted {
                pid,
                sops,
                result: None,
            },
        );
        self.drain(node)
    }

    /// The waits of `node` that have not ended.
    fn open_waits(&self, node: NodeId) -> Vec<u64> {
        self.ops
            .iter()
            .filter(|((n, _), op)| *n == node && op.result.is_none())
            .map(|((_, w), _)| *w)
            .collect()
    }

    fn cancel_one(&mut self, node: NodeId) -> Result<(), String> {
        let open = self.open_waits(node);
        if open.is_empty() {
            return Ok(());
        }
        let wait = open[self.rng.below(open.len() as u64) as usize];
        self.log.push(format!("{node:?} cancels wait {wait}"));
        if let Some(s) = self.services.get_mut(&node) {
            s.cancel(wait);
        }
        self.drain(node)
    }

    fn exit_one(&mut self, node: NodeId) -> Result<(), String> {
        let pid = self.next_pid + self.rng.below(3) as i32;
        if !self.exited.insert((node, pid)) {
            return Ok(());
        }
        self.log.push(format!("{node:?} pid {pid} exits"));
        if let Some(s) = self.services.get_mut(&node) {
            s.local_process_exited(pid, 0);
        }
        self.drain(node)
    }

    fn deliver_one(&mut self) -> Result<bool, String> {
        let busy: Vec<(NodeId, NodeId)> = self
            .links
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(k, _)| *k)
            .collect();
        if busy.is_empty() {
            return Ok(false);
        }
        let (from, to) = busy[self.rng.below(busy.len() as u64) as usize];
        self.deliver_from(from, to)?;
        Ok(true)
    }

    /// A node other than the home dies: a random prefix of what it sent is
    /// still delivered, the rest is lost; what was sent to it is lost.
    fn crash(&mut self, node: NodeId) {
        self.log.push(format!("{node:?} crashes"));
        self.crashed.insert(node);
        for to in self.live_nodes() {
            if let Some(q) = self.links.get_mut(&(node, to)) {
                let keep = self.rng.below(q.len() as u64 + 1) as usize;
                q.truncate(keep);
            }
        }
        self.links.retain(|(_, to), _| *to != node);
    }

    /// The survivors declare `node` lost, after the end of its links (what
    /// it managed to send arrives first: the links are FIFO).
    fn declare_lost(&mut self, node: NodeId) -> Result<(), String> {
        for to in self.live_nodes() {
            while self.links.get(&(node, to)).is_some_and(|q| !q.is_empty()) {
                self.deliver_from(node, to)?;
            }
        }
        for n in self.live_nodes() {
            if let Some(s) = self.services.get_mut(&n) {
                s.peer_lost(node, 0, &[]);
            }
            self.drain(n)?;
        }
        Ok(())
    }

    fn deliver_from(&mut self, from: NodeId, to: NodeId) -> Result<(), String> {
        let Some(notice) = self
            .links
            .get_mut(&(from, to))
            .and_then(VecDeque::pop_front)
        else {
            return Ok(());
        };
        self.log.push(format!("{from:?} -> {to:?}: {notice:?}"));
        let service = self.services.get_mut(&to).ok_or("no service")?;
        if !service.on_notice(from, notice, 0) {
            return Err("a notice that is not about semaphores".into());
        }
        self.drain(to)
    }

    fn run(&mut self) -> Result<(), String> {
        let mut crash: Option<NodeId> = None;
        for step in 0..400 {
            let live = self.live_nodes();
            let node = live[self.rng.below(live.len() as u64) as usize];
            match self.rng.below(100) {
                0..=29 => self.submit(node)?,
                30..=39 => self.cancel_one(node)?,
                40..=42 => self.exit_one(node)?,
                43 if crash.is_none() && step > 50 => {
                    let victim = NodeId(2 + self.rng.below(u64::from(NODES) - 1) as u8);
                    crash = Some(victim);
                    self.crash(victim);
                    self.declare_lost(victim)?;
                }
                _ => {
                    self.deliver_one()?;
                }
            }
            if step % 100 == 99 {
                // Fresh processes now and then.
                self.next_pid += 3;
            }
        }
        // Quiesce: withdraw everything still waiting, deliver everything.
        while self.deliver_one()? {}
        for node in self.live_nodes() {
            let open = self.open_waits(node);
            for wait in open {
                if let Some(s) = self.services.get_mut(&node) {
                    s.cancel(wait);
                }
                self.drain(node)?;
            }
        }
        while self.deliver_one()? {}
        // Bring a lent set home (a semctl recalls it) to read it there.
        for _ in 0..10 {
            let home = self.services.get_mut(&HOME).ok_or("no home")?;
            let reply = home.ctl(HOME, self.set, &Credentials::root(1), SemCtl::Stat, 0);
            self.drain(HOME)?;
            if reply != crate::wire::RpcResponse::Moving {
                break;
            }
            while self.deliver_one()? {}
        }
        self.check(crash)
    }

    fn check(&self, crash: Option<NodeId>) -> Result<(), String> {
        let mut expected = [3i64, 0];
        // Undone P's per process still owed back at exit or loss.
        let mut undo: BTreeMap<(NodeId, i32), i64> = BTreeMap::new();
        for ((node, wait), op) in &self.ops {
            if Some(*node) == crash {
                continue; // a lost node's undone P's are all reverted
            }
            match op.result {
                None => return Err(format!("{node:?} wait {wait} never ended")),
                Some(SemResult::Done) => {
                    for s in &op.sops {
                        expected[usize::from(s.num)] += i64::from(s.op);
                        if s.flags & SEM_UNDO != 0 {
                            *undo.entry((*node, op.pid)).or_default() -= i64::from(s.op);
                        }
                    }
                }
                Some(SemResult::Failed(libc::EAGAIN)) => {}
                Some(SemResult::Cancelled) => {}
                Some(other) => return Err(format!("{node:?} wait {wait} ended {other:?}")),
            }
        }
        for (process, adj) in &undo {
            if self.exited.contains(process) {
                expected[0] += adj;
            }
        }
        let home = self.services.get(&HOME).ok_or("no home")?;
        let values = home_values(home, self.set)?;
        if values != [expected[0], expected[1]] {
            return Err(format!(
                "values {values:?}, but the operations reported imply {expected:?}"
            ));
        }
        Ok(())
    }
}

fn home_values(home: &SemService, set: SemSetId) -> Result<[i64; 2], String> {
    let values = home
        .values(set)
        .ok_or_else(|| "the set is gone".to_string())?;
    Ok([i64::from(values[0]), i64::from(values[1])])
}

fn run_seed(seed: u64) -> Result<(), String> {
    let mut world = World::new(seed);
    world.run().map_err(|e| {
        let keep = if std::env::var_os("SEM_SIM_FULL_LOG").is_some() {
            usize::MAX
        } else {
            30
        };
        let tail: Vec<&String> = world.log.iter().rev().take(keep).collect();
        let tail: Vec<&&String> = tail.iter().rev().collect();
        format!("SEED={seed}: {e}\nlast events:\n{tail:#?}")
    })
}

#[test]
fn semaphore_protocol_holds_under_random_schedules() {
    let seeds: u64 = std::env::var("SEM_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    for seed in 0..seeds {
        if let Err(e) = run_seed(seed) {
            panic!("{e}");
        }
    }
}
