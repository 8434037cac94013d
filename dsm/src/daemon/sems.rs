//! Semaphore sets, as one node serves them: the home side (the sets homed
//! here, their waiters, undo adjustments per process) and the requesting
//! side (operations this node sent to a home and still awaits).
//!
//! Pure: events in, [`SemAction`]s out, no clock (times are passed in).
//! The daemon carries the notices and wakes the waiting connections.
//!
//! Every operation sent to a home ends with exactly one result: `Done`,
//! `Failed(errno)` or `Cancelled`. A cancel races the operation only where
//! the set is arbitrated, which decides once: a waiter still queued is
//! withdrawn (nothing of it applied), one that already finished keeps its
//! result. Links are FIFO, so a result sent before a cancel arrives is
//! never overtaken.
//!
//! Lending (the adaptive home of DESIGN.md §4): when the last
//! [`LEND_AFTER`] operations on a quiet set all came from one other node,
//! the home lends the set to it: that node then arbitrates it, locally (and
//! through its fast path). Identity stays at the home: requests still go
//! there. A request for a lent set waits at the home, which recalls the
//! set and serves it, in order, once the set is back. So the borrower only
//! ever applies its own processes' operations, and if it dies the home
//! takes back the set as it lent it (only the dead node's own changes since
//! are lost), applies the dead processes' undo, and serves what waited.

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
    /// The set is now arbitrated here: give it a fast path.
    Arbitrating(SemSetId),
}

/// Operations in a row from one other node after which its home lends it
/// a quiet set.
pub const LEND_AFTER: u32 = 16;

/// A set homed here, lent to another node.
struct Lent {
    to: NodeId,
    /// The set as lent: what the home takes back if the borrower dies.
    copy: SemSet,
    /// Requests that arrived since, in order: served when the set is back.
    pending: Vec<Notice>,
    recalled: bool,
}

/// Where a request about a set is served.
enum Route {
    Here,
    /// Lent: it waits here until the set is back.
    Queue,
    /// Not arbitrated here: send it to the home.
    Home(NodeId),
    /// No such set.
    Nowhere,
    /// From a node declared lost: nobody waits for it any more.
    Dropped,
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
    /// Re-read the limits from /proc at each creation (the daemon; the
    /// simulator keeps its own).
    live_limits: bool,
    /// The sets arbitrated here: homed here and not lent, or borrowed.
    sets: BTreeMap<SemSetId, SemSet>,
    /// Sets homed here and lent to another node.
    lent: BTreeMap<SemSetId, Lent>,
    /// Per set homed here: the node of the last operations and how many in
    /// a row came from it.
    streaks: HashMap<SemSetId, (NodeId, u32)>,
    lend_after: u32,
    /// Nodes declared lost (until a new life of one joins): requests that
    /// still arrive from them, forwarded or sent back, are dropped, and
    /// their processes' undo applies wherever a set is arbitrated.
    lost: BTreeSet<NodeId>,
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
    /// Limits read from /proc at each creation from now on.
    pub fn use_live_limits(&mut self) {
        self.live_limits = true;
    }

    pub fn new(me: NodeId, limits: SemLimits) -> SemService {
        SemService {
            me,
            limits,
            live_limits: false,
            sets: BTreeMap::new(),
            lent: BTreeMap::new(),
            streaks: HashMap::new(),
            lend_after: LEND_AFTER,
            lost: BTreeSet::new(),
            outstanding: HashMap::new(),
            next_wait: 1,
            undo_sets: HashMap::new(),
            actions: VecDeque::new(),
        }
    }

    /// Lend sets after `n` operations in a row from one node (0: never).
    pub fn set_lend_after(&mut self, n: u32) {
        self.lend_after = n;
    }

    pub fn poll_action(&mut self) -> Option<SemAction> {
        self.actions.pop_front()
    }

    pub fn is_homed_here(&self, id: SemSetId) -> bool {
        self.sets.contains_key(&id)
    }

    pub fn sets_homed(&self) -> usize {
        self.sets
            .keys()
            .filter(|id| id.home() == Some(self.me))
            .count()
            + self.lent.len()
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
        // The limits as they are now (they may change at run time), in the
        // kernel's order: nsems, then SEMMNS (newary), then SEMMNI (addid).
        if self.live_limits {
            self.limits = SemLimits::from_proc();
        }
        if nsems <= 0 || nsems > self.limits.semmsl {
            return Err(libc::EINVAL);
        }
        let me = self.me;
        let total: i64 = self
            .sets
            .iter()
            .filter(|(id, _)| id.home() == Some(me))
            .map(|(_, s)| s.nsems() as i64)
            .chain(self.lent.values().map(|l| l.copy.nsems() as i64))
            .sum();
        if total + i64::from(nsems) > self.limits.semmns {
            return Err(libc::ENOSPC);
        }
        if self.sets_homed() >= self.limits.semmni {
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
        // A lent set's permissions cannot change while it is lent (IPC_SET
        // recalls it), so the copy answers.
        match (self.sets.get(&id), self.lent.get(&id)) {
            (Some(set), _) if id.home() == Some(self.me) => set.open(nsems, flags, cred),
            (_, Some(lent)) => lent.copy.open(nsems, flags, cred),
            _ => Err(libc::EIDRM),
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
        if self.lent.contains_key(&id) {
            // Served once the set is back; the caller asks again.
            self.recall(id);
            return R::Moving;
        }
        if id.home() != Some(self.me) {
            return R::Err(libc::EINVAL);
        }
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
                Ok(_) => R::SemStat(Self::stat_of(self.me, self.me, id, set)),
                Err(e) => R::Err(e),
            },
            SemCtl::StatAny => R::SemStat(Self::stat_of(self.me, self.me, id, set)),
            SemCtl::Set { uid, gid, mode } => done(set.set(cred, uid, gid, mode, now)),
            SemCtl::Remove => match set.remove(cred) {
                Ok(waiters) => {
                    let key = set.info().perm.key;
                    self.sets.remove(&id);
                    self.streaks.remove(&id);
                    for w in waiters {
                        self.answer(w, SemResult::Failed(libc::EIDRM));
                    }
                    return R::Removed {
                        key,
                        kind: crate::ids::IpcKind::SemSet,
                    };
                }
                Err(e) => R::Err(e),
            },
        };
        self.deliver_finished(id);
        reply
    }

    fn stat_of(me: NodeId, arbiter: NodeId, id: SemSetId, set: &SemSet) -> SemSetStat {
        let info = set.info();
        SemSetStat {
            id: id.0,
            perm: info.perm,
            otime: info.otime,
            ctime: info.ctime,
            nsems: info.nsems as u32,
            home: me.0,
            arbiter: arbiter.0,
        }
    }

    /// Every set homed here (for `ipcs`; a lent set as it was lent).
    pub fn list(&self) -> Vec<SemSetStat> {
        let mut all: Vec<SemSetStat> = self
            .sets
            .iter()
            .filter(|(id, _)| id.home() == Some(self.me))
            .map(|(id, set)| Self::stat_of(self.me, self.me, *id, set))
            .chain(
                self.lent
                    .iter()
                    .map(|(id, l)| Self::stat_of(self.me, l.to, *id, &l.copy)),
            )
            .collect();
        all.sort_by_key(|s| s.id);
        all
    }

    // ---- home side: operations --------------------------------------------------

    /// A `semop` of process `pid` of node `origin` (this node included),
    /// as its wait `wait`.
    #[allow(clippy::too_many_arguments)]
    pub fn on_op(
        &mut self,
        origin: NodeId,
        wait: u64,
        id: SemSetId,
        sops: &[SemBuf],
        pid: i32,
        cred: Credentials,
        owner: NodeId,
        now: i64,
    ) {
        let key = engine_wait(origin, wait);
        let notice = || Notice::SemOp {
            origin,
            wait,
            set: id,
            sops: sops.to_vec(),
            pid,
            cred: cred.clone(),
            owner,
        };
        match self.route(id, origin) {
            Route::Here => {}
            Route::Queue => {
                self.queue(id, notice());
                return;
            }
            Route::Home(home) => {
                self.actions.push_back(SemAction::Send(home, notice()));
                return;
            }
            Route::Nowhere => {
                self.answer(key, SemResult::Failed(libc::EINVAL));
                return;
            }
            Route::Dropped => return,
        }
        let Some(set) = self.sets.get_mut(&id) else {
            return;
        };
        let caller = Caller {
            process: process_of(owner, pid),
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
        self.consider_lending(id, origin);
    }

    /// The requester withdraws `wait`. If it still waits, it ends
    /// `Cancelled`; if it already ended, its result is on its way.
    pub fn on_cancel(&mut self, origin: NodeId, id: SemSetId, wait: u64) {
        let notice = Notice::SemCancel {
            origin,
            set: id,
            wait,
        };
        match self.route(id, origin) {
            Route::Here => {
                let key = engine_wait(origin, wait);
                let withdrawn = self.sets.get_mut(&id).is_some_and(|set| set.cancel(key));
                if withdrawn {
                    self.answer(key, SemResult::Cancelled);
                } else if origin == self.me && id.home() != Some(self.me) {
                    // A borrower's own op sent to the home before the set
                    // came here may still wait there.
                    if let Some(home) = id.home() {
                        self.actions.push_back(SemAction::Send(
                            home,
                            Notice::SemCancel {
                                origin,
                                set: id,
                                wait,
                            },
                        ));
                    }
                }
            }
            Route::Queue => self.queue(id, notice),
            Route::Home(home) => self.actions.push_back(SemAction::Send(home, notice)),
            Route::Nowhere | Route::Dropped => {}
        }
    }

    /// Process `pid` of node `origin` exited: its undo adjustments apply
    /// and its waiters end.
    pub fn on_process_exited(&mut self, origin: NodeId, id: SemSetId, pid: i32, now: i64) {
        let notice = Notice::SemProcessExited {
            origin,
            set: id,
            pid,
        };
        match self.route(id, origin) {
            Route::Here => {}
            Route::Queue => {
                self.queue(id, notice);
                return;
            }
            Route::Home(home) => {
                self.actions.push_back(SemAction::Send(home, notice));
                return;
            }
            Route::Nowhere | Route::Dropped => return,
        }
        let Some(set) = self.sets.get_mut(&id) else {
            return;
        };
        for w in set.process_exited(process_of(origin, pid), now) {
            self.answer(w, SemResult::Cancelled);
        }
        self.deliver_finished(id);
    }

    /// Where a request about set `id` from node `origin` is served. A
    /// borrower gives the set back at the first request of another node.
    fn route(&mut self, id: SemSetId, origin: NodeId) -> Route {
        if self.lost.contains(&origin) {
            return Route::Dropped;
        }
        let home = id.home();
        if self.sets.contains_key(&id) {
            if home != Some(self.me) && origin != self.me {
                self.give_back(id);
                return home.map_or(Route::Nowhere, Route::Home);
            }
            return Route::Here;
        }
        if self.lent.contains_key(&id) {
            return Route::Queue;
        }
        match home {
            Some(h) if h != self.me => Route::Home(h),
            _ => Route::Nowhere,
        }
    }

    // ---- lending -------------------------------------------------------------------

    /// A request for a lent set: keep it, and have the set come back.
    fn queue(&mut self, id: SemSetId, notice: Notice) {
        self.recall(id);
        if let Some(lent) = self.lent.get_mut(&id) {
            lent.pending.push(notice);
        }
    }

    fn recall(&mut self, id: SemSetId) {
        if let Some(lent) = self.lent.get_mut(&id) {
            if !lent.recalled {
                lent.recalled = true;
                let to = lent.to;
                self.actions
                    .push_back(SemAction::Send(to, Notice::SemRecall { set: id }));
            }
        }
    }

    /// The set is back here: serve what waited for it, in order.
    fn serve_pending(&mut self, pending: Vec<Notice>, now: i64) {
        let me = self.me;
        for notice in pending {
            // Queued requests carry their origin: `from` does not matter.
            self.on_notice(me, notice, now);
        }
    }

    /// After an operation from `origin` on a set homed here: lend the set to
    /// `origin` once it alone has used it for a while.
    fn consider_lending(&mut self, id: SemSetId, origin: NodeId) {
        if id.home() != Some(self.me) || self.lend_after == 0 {
            return;
        }
        let streak = self.streaks.entry(id).or_insert((origin, 0));
        if streak.0 == origin {
            streak.1 += 1;
        } else {
            *streak = (origin, 1);
        }
        if origin == self.me || streak.1 < self.lend_after {
            return;
        }
        if !self.sets.get(&id).is_some_and(SemSet::is_quiet) {
            return;
        }
        let Some(set) = self.sets.remove(&id) else {
            return;
        };
        self.streaks.remove(&id);
        self.actions.push_back(SemAction::Send(
            origin,
            Notice::SemLend {
                set: id,
                state: Box::new(set.clone()),
            },
        ));
        self.lent.insert(
            id,
            Lent {
                to: origin,
                copy: set,
                pending: Vec::new(),
                recalled: false,
            },
        );
    }

    /// The home lent us a set.
    pub fn on_lend(&mut self, from: NodeId, id: SemSetId, state: SemSet) {
        if id.home() != Some(from) || self.sets.contains_key(&id) {
            tracing::warn!(
                ?from,
                ?id,
                "refusing a set lent by a node that is not its home"
            );
            return;
        }
        if !state.is_consistent(&self.limits) {
            // Sent straight back: the home then checks it and keeps its copy.
            tracing::warn!(?from, ?id, "refusing an inconsistent lent set");
            self.actions.push_back(SemAction::Send(
                from,
                Notice::SemReturn {
                    set: id,
                    state: Box::new(state),
                },
            ));
            return;
        }
        self.sets.insert(id, state);
        self.purge_lost(id, 0);
        self.actions.push_back(SemAction::Arbitrating(id));
    }

    /// The borrower applied the exit of its process `pid`. Ops of that
    /// process sent before the set reached it may wait here: the exit must
    /// then follow them.
    pub fn on_exit_applied(&mut self, from: NodeId, id: SemSetId, pid: i32) {
        let Some(lent) = self.lent.get_mut(&id) else {
            return;
        };
        let behind_ops = lent.to == from
            && lent.pending.iter().any(|n| {
                matches!(n, Notice::SemOp { origin, pid: p, .. } if *origin == from && *p == pid)
            });
        if behind_ops {
            lent.pending.push(Notice::SemProcessExited {
                origin: from,
                set: id,
                pid,
            });
        }
    }

    /// The home wants its set back (a `semctl`).
    pub fn on_recall(&mut self, from: NodeId, id: SemSetId) {
        if id.home() == Some(from) && self.sets.contains_key(&id) {
            self.give_back(id);
        }
    }

    fn give_back(&mut self, id: SemSetId) {
        let (Some(home), Some(set)) = (id.home(), self.sets.remove(&id)) else {
            return;
        };
        self.actions.push_back(SemAction::Send(
            home,
            Notice::SemReturn {
                set: id,
                state: Box::new(set),
            },
        ));
    }

    /// A borrower gave a set back.
    pub fn on_return(&mut self, from: NodeId, id: SemSetId, state: SemSet, now: i64) {
        let Some(lent) = self.lent.remove(&id) else {
            tracing::warn!(?from, ?id, "a set returned that was not lent");
            return;
        };
        if lent.to != from {
            tracing::warn!(?from, ?id, "a set returned by a node it was not lent to");
            self.lent.insert(id, lent);
            return;
        }
        let state = if state.is_consistent(&self.limits) {
            state
        } else {
            tracing::warn!(
                ?from,
                ?id,
                "an inconsistent set came back; keeping the lent copy"
            );
            lent.copy.clone()
        };
        self.sets.insert(id, state);
        self.purge_lost(id, now);
        self.actions.push_back(SemAction::Arbitrating(id));
        self.deliver_finished(id);
        self.serve_pending(lent.pending, now);
    }

    /// Drop the waiters of lost nodes from a set and apply their
    /// processes' undo adjustments (a set that was elsewhere when a node
    /// was lost may still hold them).
    pub fn purge_lost(&mut self, id: SemSetId, now: i64) {
        let lost = &self.lost;
        let Some(set) = self.sets.get_mut(&id) else {
            return;
        };
        let waits: Vec<WaitId> = set
            .waiting_ids()
            .filter(|w| lost.contains(&wait_origin(*w).0))
            .collect();
        for w in waits {
            set.cancel(w);
        }
        let processes: Vec<u64> = set
            .undo_processes()
            .filter(|p| lost.contains(&process_node(*p)))
            .collect();
        for p in processes {
            let _ = set.process_exited(p, now);
        }
        self.deliver_finished(id);
    }

    /// A node joined (again, as a new life): its requests count again.
    pub fn peer_up(&mut self, node: NodeId) {
        self.lost.remove(&node);
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

    /// A semaphore notice from node `from`, to whichever handler it is for.
    /// False if it is not a semaphore notice (nothing done).
    pub fn on_notice(&mut self, from: NodeId, notice: Notice, now: i64) -> bool {
        match notice {
            Notice::SemOp {
                origin,
                wait,
                set,
                sops,
                pid,
                cred,
                owner,
            } => self.on_op(origin, wait, set, &sops, pid, cred, owner, now),
            Notice::SemCancel { origin, set, wait } => self.on_cancel(origin, set, wait),
            Notice::SemResult { wait, result } => self.on_result(from, wait, result),
            Notice::SemProcessExited { origin, set, pid } => {
                self.on_process_exited(origin, set, pid, now)
            }
            Notice::SemLend { set, state } => self.on_lend(from, set, *state),
            Notice::SemReturn { set, state } => self.on_return(from, set, *state, now),
            Notice::SemRecall { set } => self.on_recall(from, set),
            Notice::SemExitApplied { set, pid } => self.on_exit_applied(from, set, pid),
            Notice::SegmentGone { .. } | Notice::KeyReplica { .. } | Notice::Load { .. } => {
                return false
            }
        }
        true
    }

    // ---- requesting side ----------------------------------------------------------

    /// Send a `semop` to the set's home; it ends with one
    /// [`SemAction::Complete`] carrying the returned wait id.
    #[cfg(test)]
    pub fn submit(
        &mut self,
        id: SemSetId,
        sops: Vec<SemBuf>,
        pid: i32,
        cred: Credentials,
        now: i64,
    ) -> u64 {
        let wait = self.reserve_wait();
        self.submit_as(wait, id, sops, pid, cred, self.me, now);
        wait
    }

    /// A wait id for an operation about to be submitted.
    pub fn reserve_wait(&mut self) -> u64 {
        let wait = self.next_wait;
        self.next_wait += 1;
        wait
    }

    /// Send a `semop` as wait `wait` (from [`SemService::reserve_wait`])
    /// for process `pid` of node `owner` (this node, or the home of a
    /// process that moved here); it ends with one [`SemAction::Complete`]
    /// for that wait.
    #[allow(clippy::too_many_arguments)]
    pub fn submit_as(
        &mut self,
        wait: u64,
        id: SemSetId,
        sops: Vec<SemBuf>,
        pid: i32,
        cred: Credentials,
        owner: NodeId,
        now: i64,
    ) {
        self.outstanding.insert(wait, id);
        if id.home().is_none() {
            self.complete(wait, SemResult::Failed(libc::EINVAL));
        } else {
            self.on_op(self.me, wait, id, &sops, pid, cred, owner, now);
        }
    }

    /// Withdraw an operation this node sent (no effect once it ended).
    pub fn cancel(&mut self, wait: u64) {
        let Some(id) = self.outstanding.get(&wait).copied() else {
            return;
        };
        self.on_cancel(self.me, id, wait);
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

    /// Whether local process `pid` holds undo adjustments (maybe zero).
    pub fn holds_undo(&self, pid: i32) -> bool {
        self.undo_sets
            .get(&pid)
            .is_some_and(|sets| !sets.is_empty())
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
    #[cfg(test)]
    pub fn local_process_exited(&mut self, pid: i32, now: i64) {
        for id in self.take_undo_sets(pid) {
            self.local_process_exited_at(id, pid, now);
        }
    }

    /// The sets local process `pid` holds undo adjustments on (forgotten
    /// here: its exit is being settled).
    pub fn take_undo_sets(&mut self, pid: i32) -> Vec<SemSetId> {
        self.undo_sets
            .remove(&pid)
            .unwrap_or_default()
            .into_iter()
            .collect()
    }

    /// Settle the exit of local process `pid` at set `id`.
    pub fn local_process_exited_at(&mut self, id: SemSetId, pid: i32, now: i64) {
        let borrowed = self.sets.contains_key(&id) && id.home() != Some(self.me);
        self.on_process_exited(self.me, id, pid, now);
        if let (true, Some(home)) = (borrowed, id.home()) {
            // Ops of the process sent to the home before the set came
            // here may wait there: the exit must follow them.
            self.actions.push_back(SemAction::Send(
                home,
                Notice::SemExitApplied { set: id, pid },
            ));
        }
    }

    // ---- node loss -------------------------------------------------------------

    /// `node` is lost: operations waiting at its sets fail with EIDRM (its
    /// sets are gone), and at the sets homed here its processes' waiters
    /// vanish and their undo adjustments apply, as if they had all exited.
    /// Sets in `held` (their values are held by a local process) are not
    /// purged here: the caller purges them once it can ([`SemService::purge_lost`]).
    pub fn peer_lost(&mut self, node: NodeId, now: i64, held: &[SemSetId]) {
        self.lost.insert(node);
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
        // Sets it lent us went with it.
        self.sets.retain(|id, _| id.home() != Some(node));
        // Sets we lent it come back as they were lent; what waited for
        // them is served after its processes' undo.
        let taken_back: Vec<SemSetId> = self
            .lent
            .iter()
            .filter(|(_, l)| l.to == node)
            .map(|(id, _)| *id)
            .collect();
        let mut pending = Vec::new();
        for id in &taken_back {
            if let Some(lent) = self.lent.remove(id) {
                self.sets.insert(*id, lent.copy);
                self.actions.push_back(SemAction::Arbitrating(*id));
                pending.extend(lent.pending);
            }
        }
        let ids: Vec<SemSetId> = self.sets.keys().copied().collect();
        for id in ids.into_iter().filter(|id| !held.contains(id)) {
            self.purge_lost(id, now);
        }
        // (The dead node's own requests are dropped by `route`.)
        self.serve_pending(pending, now);
    }
}
