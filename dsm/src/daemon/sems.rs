//! Semaphore sets, as one node serves them: the home side (the sets homed
//! here, their waiters, undo adjustments per process) and the requesting
//! side (operations this node sent to a home and still awaits).
//!
//! Pure: events in, [`SemAction`]s out, no clock (times are passed in).
//! The daemon carries the notices and wakes the waiting connections.
//!
//! Every operation sent to a home ends with exactly one result: `Done`,
//! `Failed(errno)` or `Cancelled`. A cancel races the operation only at the
//! home, which decides once: a waiter still queued is withdrawn (nothing of
//! it applied), one that already finished keeps its result. Links are FIFO,
//! so a result sent before a cancel arrives is never overtaken.

use crate::ids::{NodeId, SemSetId};
use crate::semregion::Snapshot;
use crate::sysv::{Credentials, IpcPerm};
use crate::wire::{Notice, RpcResponse, SemCtl, SemResult, SemSetStat};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use sysv::sem::{Caller, SemBuf, SemLimits, SemSet, SemopOutcome, WaitId};

/// What the daemon must do for the service.
#[derive(Debug, PartialEq, Eq)]
pub enum SemAction {
    /// A notice for another node.
    Send(NodeId, Notice),
    /// An operation this node sent has ended.
    Complete { wait: u64, result: SemResult },
}

/// Bits of an engine wait id below the requesting node's id.
const WAIT_BITS: u32 = 56;

/// The engine's wait id of a requester's wait: unique at the home because
/// each requesting node numbers its own waits.
fn engine_wait(from: NodeId, wait: u64) -> WaitId {
    (u64::from(from.0) << WAIT_BITS) | (wait & ((1 << WAIT_BITS) - 1))
}

fn wait_origin(id: WaitId) -> (NodeId, u64) {
    (NodeId((id >> WAIT_BITS) as u8), id & ((1 << WAIT_BITS) - 1))
}

/// A process cluster-wide: its node and its pid there (undo lists are
/// keyed by it).
pub fn process_of(node: NodeId, pid: i32) -> u64 {
    (u64::from(node.0) << 32) | u64::from(pid as u32)
}

fn process_node(process: u64) -> NodeId {
    NodeId((process >> 32) as u8)
}

fn result_of(r: Result<(), i32>) -> SemResult {
    match r {
        Ok(()) => SemResult::Done,
        Err(e) => SemResult::Failed(e),
    }
}

pub struct SemService {
    me: NodeId,
    limits: SemLimits,
    sets: BTreeMap<SemSetId, SemSet>,
    /// Operations sent from this node that have not ended: the set each
    /// waits at.
    outstanding: HashMap<u64, SemSetId>,
    next_wait: u64,
    /// Local processes with undo adjustments, and the sets they hold them
    /// on (told when the process exits).
    undo_sets: HashMap<i32, BTreeSet<SemSetId>>,
    actions: VecDeque<SemAction>,
}

impl SemService {
    pub fn new(me: NodeId, limits: SemLimits) -> SemService {
        SemService {
            me,
            limits,
            sets: BTreeMap::new(),
            outstanding: HashMap::new(),
            next_wait: 1,
            undo_sets: HashMap::new(),
            actions: VecDeque::new(),
        }
    }

    pub fn poll_action(&mut self) -> Option<SemAction> {
        self.actions.pop_front()
    }

    pub fn is_homed_here(&self, id: SemSetId) -> bool {
        self.sets.contains_key(&id)
    }

    pub fn sets_homed(&self) -> usize {
        self.sets.len()
    }

    /// The fast path changed set `id` while the daemon did not hold it:
    /// take its values, pids, otime and local processes' undo adjustments.
    pub fn absorb(&mut self, id: SemSetId, snap: &Snapshot) {
        let me = self.me;
        if let Some(set) = self.sets.get_mut(&id) {
            let undo = snap
                .undo
                .iter()
                .map(|(pid, adj)| (process_of(me, *pid), adj.clone()))
                .collect();
            set.absorb(&snap.values, &snap.pids, snap.otime, undo);
        }
    }

    /// What the set's region must now hold (local processes' undo
    /// adjustments included), its permissions, and whether it has waiters
    /// (the daemon then keeps the values). `None` once the set is gone.
    pub fn export(&self, id: SemSetId) -> Option<(Snapshot, IpcPerm, bool)> {
        let set = self.sets.get(&id)?;
        let undo = set
            .undo_entries()
            .filter(|(p, _)| process_node(*p) == self.me)
            .map(|(p, adj)| (p as u32 as i32, adj.to_vec()))
            .collect();
        let snap = Snapshot {
            values: set.values(),
            pids: set.pids(),
            otime: set.otime(),
            undo,
        };
        Some((snap, set.info().perm, set.has_waiters()))
    }

    /// The set's permissions (for handing its region to a process).
    pub fn perm_of(&self, id: SemSetId) -> Option<IpcPerm> {
        self.sets.get(&id).map(|s| s.info().perm)
    }

    /// The set an operation this node sent waits at.
    pub fn set_of_wait(&self, wait: u64) -> Option<SemSetId> {
        self.outstanding.get(&wait).copied()
    }

    /// The values of a set homed here (for the simulation's checks).
    #[cfg(test)]
    pub fn values(&self, id: SemSetId) -> Option<Vec<u16>> {
        self.sets.get(&id).map(SemSet::values)
    }

    // ---- home side: sets -------------------------------------------------------

    /// `semget` creating a set homed here under the id the daemon chose.
    pub fn create(
        &mut self,
        id: SemSetId,
        key: i32,
        nsems: i32,
        mode: u32,
        creator: &Credentials,
        now: i64,
    ) -> Result<(), i32> {
        if self.sets.len() >= self.limits.semmni {
            return Err(libc::ENOSPC);
        }
        let total: i64 = self.sets.values().map(|s| s.nsems() as i64).sum();
        if total + i64::from(nsems.max(0)) > self.limits.semmns {
            return Err(libc::ENOSPC);
        }
        let set = SemSet::create(key, nsems, mode, creator, &self.limits, now)?;
        self.sets.insert(id, set);
        Ok(())
    }

    /// `semget` of an existing set: EIDRM if it went meanwhile (the caller
    /// looks the key up again).
    pub fn open(
        &self,
        id: SemSetId,
        nsems: i32,
        flags: i32,
        cred: &Credentials,
    ) -> Result<(), i32> {
        match self.sets.get(&id) {
            Some(set) => set.open(nsems, flags, cred),
            None => Err(libc::EIDRM),
        }
    }

    /// A set created here whose key another node won: it never existed.
    pub fn discard(&mut self, id: SemSetId) {
        self.sets.remove(&id);
    }

    /// `semctl` at the home, for process `pid` of node `from`.
    pub fn ctl(
        &mut self,
        from: NodeId,
        id: SemSetId,
        cred: &Credentials,
        cmd: SemCtl,
        now: i64,
    ) -> RpcResponse {
        use RpcResponse as R;
        let Some(set) = self.sets.get_mut(&id) else {
            return R::Err(libc::EINVAL);
        };
        let caller = Caller {
            process: process_of(from, cred.pid),
            pid: cred.pid,
            cred: cred.clone(),
        };
        let value = |r: Result<i32, i32>| r.map_or_else(R::Err, R::Value);
        let done = |r: Result<(), i32>| r.map_or_else(R::Err, |()| R::Ok);
        let reply = match cmd {
            SemCtl::GetVal { semnum } => value(set.getval(semnum, cred)),
            SemCtl::GetPid { semnum } => value(set.getpid(semnum, cred)),
            SemCtl::GetNcnt { semnum } => value(set.getncnt(semnum, cred)),
            SemCtl::GetZcnt { semnum } => value(set.getzcnt(semnum, cred)),
            SemCtl::GetAll => set.getall(cred).map_or_else(R::Err, R::Values),
            SemCtl::SetVal { semnum, value } => done(set.setval(semnum, value, &caller, now)),
            SemCtl::SetAll { values } => done(set.setall(&values, &caller, now)),
            SemCtl::Stat => match set.stat(cred) {
                Ok(_) => R::SemStat(Self::stat_of(self.me, id, set)),
                Err(e) => R::Err(e),
            },
            SemCtl::Set { uid, gid, mode } => done(set.set(cred, uid, gid, mode, now)),
            SemCtl::Remove => match set.remove(cred) {
                Ok(waiters) => {
                    let key = set.info().perm.key;
                    self.sets.remove(&id);
                    for w in waiters {
                        self.answer(w, SemResult::Failed(libc::EIDRM));
                    }
                    return R::Removed { key };
                }
                Err(e) => R::Err(e),
            },
        };
        self.deliver_finished(id);
        reply
    }

    fn stat_of(me: NodeId, id: SemSetId, set: &SemSet) -> SemSetStat {
        let info = set.info();
        SemSetStat {
            id: id.0,
            perm: info.perm,
            otime: info.otime,
            ctime: info.ctime,
            nsems: info.nsems as u32,
            home: me.0,
        }
    }

    /// Every set homed here (for `ipcs`).
    pub fn list(&self) -> Vec<SemSetStat> {
        self.sets
            .iter()
            .map(|(id, set)| Self::stat_of(self.me, *id, set))
            .collect()
    }

    // ---- home side: operations --------------------------------------------------

    /// A `semop` arrived from node `from` (this node included).
    #[allow(clippy::too_many_arguments)]
    pub fn on_op(
        &mut self,
        from: NodeId,
        wait: u64,
        id: SemSetId,
        sops: &[SemBuf],
        pid: i32,
        cred: Credentials,
        now: i64,
    ) {
        let key = engine_wait(from, wait);
        let Some(set) = self.sets.get_mut(&id) else {
            self.answer(key, SemResult::Failed(libc::EINVAL));
            return;
        };
        let caller = Caller {
            process: process_of(from, pid),
            pid,
            cred,
        };
        match set.semop_or_wait(key, sops, &caller, &self.limits, now) {
            Ok(SemopOutcome::Done) => {
                self.answer(key, SemResult::Done);
                self.deliver_finished(id);
            }
            Ok(SemopOutcome::Blocked { .. }) => {}
            Err(e) => self.answer(key, SemResult::Failed(e)),
        }
    }

    /// The requester withdraws `wait`. If it still waits, it ends
    /// `Cancelled`; if it already ended, its result is on its way.
    pub fn on_cancel(&mut self, from: NodeId, id: SemSetId, wait: u64) {
        let key = engine_wait(from, wait);
        if let Some(set) = self.sets.get_mut(&id) {
            if set.cancel(key) {
                self.answer(key, SemResult::Cancelled);
            }
        }
    }

    /// Process `pid` of node `from` exited: its undo adjustments apply and
    /// its waiters end.
    pub fn on_process_exited(&mut self, from: NodeId, id: SemSetId, pid: i32, now: i64) {
        let Some(set) = self.sets.get_mut(&id) else {
            return;
        };
        for w in set.process_exited(process_of(from, pid), now) {
            self.answer(w, SemResult::Cancelled);
        }
        self.deliver_finished(id);
    }

    /// Send every result the set produced to whoever waits for it.
    fn deliver_finished(&mut self, id: SemSetId) {
        while let Some((w, r)) = self.sets.get_mut(&id).and_then(SemSet::poll_finished) {
            self.answer(w, result_of(r));
        }
    }

    fn answer(&mut self, key: WaitId, result: SemResult) {
        let (node, wait) = wait_origin(key);
        if node == self.me {
            self.complete(wait, result);
        } else {
            self.actions
                .push_back(SemAction::Send(node, Notice::SemResult { wait, result }));
        }
    }

    // ---- requesting side ----------------------------------------------------------

    /// Send a `semop` to the set's home; it ends with one
    /// [`SemAction::Complete`] carrying the returned wait id.
    pub fn submit(
        &mut self,
        id: SemSetId,
        sops: Vec<SemBuf>,
        pid: i32,
        cred: Credentials,
        now: i64,
    ) -> u64 {
        let wait = self.next_wait;
        self.next_wait += 1;
        self.outstanding.insert(wait, id);
        match id.home() {
            Some(home) if home == self.me => self.on_op(home, wait, id, &sops, pid, cred, now),
            Some(home) => self.actions.push_back(SemAction::Send(
                home,
                Notice::SemOp {
                    wait,
                    set: id,
                    sops,
                    pid,
                    cred,
                },
            )),
            None => self.complete(wait, SemResult::Failed(libc::EINVAL)),
        }
        wait
    }

    /// Withdraw an operation this node sent (no effect once it ended).
    pub fn cancel(&mut self, wait: u64) {
        let Some(id) = self.outstanding.get(&wait).copied() else {
            return;
        };
        match id.home() {
            Some(home) if home == self.me => self.on_cancel(home, id, wait),
            Some(home) => self
                .actions
                .push_back(SemAction::Send(home, Notice::SemCancel { set: id, wait })),
            None => {}
        }
    }

    /// A home answered an operation of ours.
    pub fn on_result(&mut self, from: NodeId, wait: u64, result: SemResult) {
        match self.outstanding.get(&wait) {
            Some(id) if id.home() == Some(from) => self.complete(wait, result),
            _ => tracing::warn!(?from, wait, "semaphore result for no operation of ours"),
        }
    }

    fn complete(&mut self, wait: u64, result: SemResult) {
        if self.outstanding.remove(&wait).is_some() {
            self.actions.push_back(SemAction::Complete { wait, result });
        }
    }

    /// Local process `pid` is about to hold undo adjustments on `id`.
    /// True the first time for that process (it must now be watched).
    pub fn note_undo(&mut self, pid: i32, id: SemSetId) -> bool {
        let first = !self.undo_sets.contains_key(&pid);
        self.undo_sets.entry(pid).or_default().insert(id);
        first
    }

    /// Local process `pid` exited: every home it holds undo adjustments at
    /// applies them.
    pub fn local_process_exited(&mut self, pid: i32, now: i64) {
        for id in self.undo_sets.remove(&pid).unwrap_or_default() {
            match id.home() {
                Some(home) if home == self.me => self.on_process_exited(home, id, pid, now),
                Some(home) => self.actions.push_back(SemAction::Send(
                    home,
                    Notice::SemProcessExited { set: id, pid },
                )),
                None => {}
            }
        }
    }

    // ---- node loss -------------------------------------------------------------

    /// `node` is lost: operations waiting at its sets fail with EIDRM (its
    /// sets are gone), and at the sets homed here its processes' waiters
    /// vanish and their undo adjustments apply, as if they had all exited.
    pub fn peer_lost(&mut self, node: NodeId, now: i64) {
        let mut ended: Vec<u64> = self
            .outstanding
            .iter()
            .filter(|(_, id)| id.home() == Some(node))
            .map(|(w, _)| *w)
            .collect();
        ended.sort_unstable();
        for wait in ended {
            self.complete(wait, SemResult::Failed(libc::EIDRM));
        }
        let ids: Vec<SemSetId> = self.sets.keys().copied().collect();
        for id in ids {
            let Some(set) = self.sets.get_mut(&id) else {
                continue;
            };
            let waits: Vec<WaitId> = set
                .waiting_ids()
                .filter(|w| wait_origin(*w).0 == node)
                .collect();
            for w in waits {
                set.cancel(w);
            }
            let processes: Vec<u64> = set
                .undo_processes()
                .filter(|p| process_node(*p) == node)
                .collect();
            for p in processes {
                let _ = set.process_exited(p, now);
            }
            self.deliver_finished(id);
        }
    }
}
