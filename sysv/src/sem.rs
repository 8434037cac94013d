//! SysV semaphore-set semantics as Linux's `ipc/sem.c` implements them:
//! pure state, no I/O, no clock (times are passed in).
//!
//! One `SemSet` is one set at its home node. Operations that would block
//! report `Blocked`; queueing the caller and waking it is the caller's job
//! (the distributed layer), which retries with [`SemSet::semop`].

use crate::perm::{Credentials, IpcPerm};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// Identifies one waiting `semop` (chosen by the caller, unique per set).
pub type WaitId = u64;

/// An operation array waiting at the set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Waiting {
    id: WaitId,
    sops: Vec<SemBuf>,
    caller: Caller,
    /// The operation that blocked it (what GETNCNT/GETZCNT count).
    blocked: usize,
}

/// Largest semaphore value (`SEMVMX`).
pub const SEMVMX: i32 = 32767;
/// Largest undo adjustment (`SEMAEM`).
pub const SEMAEM: i32 = SEMVMX;
pub const SEM_UNDO: i16 = 0x1000;
pub const IPC_NOWAIT: i16 = 0o4000;

/// Limits for retrying queued waiters: their arrays passed the real limits
/// when they were queued.
const WAITER_LIMITS: SemLimits = SemLimits {
    semmsl: i32::MAX,
    semmns: i64::MAX,
    semopm: usize::MAX,
    semmni: usize::MAX,
};

const S_IRUGO: u32 = 0o444;
const S_IWUGO: u32 = 0o222;

/// One operation of a `semop` array (`struct sembuf`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SemBuf {
    pub num: u16,
    pub op: i16,
    pub flags: i16,
}

/// The kernel's own `struct sembuf` (to run the same operations on a
/// kernel set, as the differential tests and benchmarks do).
impl From<SemBuf> for libc::sembuf {
    fn from(s: SemBuf) -> libc::sembuf {
        libc::sembuf {
            sem_num: s.num,
            sem_op: s.op,
            sem_flg: s.flags,
        }
    }
}

/// An operation a program passed in its own `struct sembuf`.
impl From<&libc::sembuf> for SemBuf {
    fn from(s: &libc::sembuf) -> SemBuf {
        SemBuf {
            num: s.sem_num,
            op: s.sem_op,
            flags: s.sem_flg,
        }
    }
}

/// Limits from `/proc/sys/kernel/sem`: SEMMSL SEMMNS SEMOPM SEMMNI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SemLimits {
    pub semmsl: i32,
    pub semmns: i64,
    pub semopm: usize,
    pub semmni: usize,
}

impl SemLimits {
    pub fn from_proc() -> SemLimits {
        let text = std::fs::read_to_string("/proc/sys/kernel/sem").unwrap_or_default();
        let v: Vec<i64> = text
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        match v.as_slice() {
            [msl, mns, opm, mni] => SemLimits {
                semmsl: *msl as i32,
                semmns: *mns,
                semopm: *opm as usize,
                semmni: *mni as usize,
            },
            _ => SemLimits {
                semmsl: 32000,
                semmns: 1_024_000_000,
                semopm: 500,
                semmni: 32000,
            },
        }
    }
}

/// Who performs an operation: the process (for undo) and its credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    /// Identifies the process cluster-wide (its undo list is keyed by it).
    pub process: u64,
    /// The pid GETPID reports.
    pub pid: i32,
    pub cred: Credentials,
}

/// The result of a `semop` that did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SemopOutcome {
    /// Applied, atomically, as a whole.
    Done,
    /// Nothing applied: the operation at this index must wait (for the
    /// value to grow, or to reach zero when `op == 0`).
    Blocked { index: usize },
}

/// What `IPC_STAT` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SemStat {
    pub perm: IpcPerm,
    pub otime: i64,
    pub ctime: i64,
    pub nsems: usize,
}

/// A semaphore set.
/// Serializable, so a set can move to the node that uses it; a set
/// received from elsewhere is checked with [`SemSet::is_consistent`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SemSet {
    perm: IpcPerm,
    values: Vec<u16>,
    pids: Vec<i32>,
    otime: i64,
    ctime: i64,
    /// Undo adjustments per process (`semadj`), applied when it exits.
    undo: BTreeMap<u64, Vec<i32>>,
    /// Blocked operations, oldest first.
    waiting: VecDeque<Waiting>,
    /// Waiters that finished (applied, or failed with an errno).
    finished: VecDeque<(WaitId, Result<(), i32>)>,
}

impl SemSet {
    /// `semget` creating a set of `nsems` semaphores (all zero).
    pub fn create(
        key: i32,
        nsems: i32,
        mode: u32,
        creator: &Credentials,
        limits: &SemLimits,
        now: i64,
    ) -> Result<SemSet, i32> {
        if nsems <= 0 || nsems > limits.semmsl {
            return Err(libc::EINVAL);
        }
        let n = nsems as usize;
        Ok(SemSet {
            perm: IpcPerm::new(key, mode, creator),
            values: vec![0; n],
            pids: vec![0; n],
            otime: 0,
            ctime: now,
            undo: BTreeMap::new(),
            waiting: VecDeque::new(),
            finished: VecDeque::new(),
        })
    }

    pub fn nsems(&self) -> usize {
        self.values.len()
    }

    /// Every value, unchecked (for tests and for the daemon's own use).
    pub fn values(&self) -> Vec<u16> {
        self.values.clone()
    }

    /// Every semaphore's last pid, unchecked.
    pub fn pids(&self) -> Vec<i32> {
        self.pids.clone()
    }

    pub fn otime(&self) -> i64 {
        self.otime
    }

    pub fn has_waiters(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Nothing waiting and nothing finished but not yet delivered: the set
    /// can move without carrying any operation in flight.
    pub fn is_quiet(&self) -> bool {
        self.waiting.is_empty() && self.finished.is_empty()
    }

    /// Does a set that arrived from elsewhere hold together (lengths,
    /// semaphore numbers, values in range)?
    pub fn is_consistent(&self, limits: &SemLimits) -> bool {
        let n = self.values.len();
        n > 0
            && n as i64 <= i64::from(limits.semmsl)
            && self.pids.len() == n
            && self.values.iter().all(|v| i32::from(*v) <= SEMVMX)
            && self.undo.values().all(|a| a.len() == n)
            && self.waiting.iter().all(|w| {
                !w.sops.is_empty()
                    && w.blocked < w.sops.len()
                    && w.sops.iter().all(|s| usize::from(s.num) < n)
            })
    }

    /// Take values, pids, otime and some processes' undo adjustments from
    /// elsewhere (the fast path changed them while the daemon did not look;
    /// it never does while anyone waits). Lengths that do not match are
    /// ignored, never trusted.
    pub fn absorb(&mut self, values: &[u16], pids: &[i32], otime: i64, undo: Vec<(u64, Vec<i32>)>) {
        let n = self.values.len();
        if values.len() == n && pids.len() == n {
            self.values.copy_from_slice(values);
            self.pids.copy_from_slice(pids);
            self.otime = otime;
        }
        for (process, adj) in undo {
            if adj.len() == n {
                self.undo.insert(process, adj);
            }
        }
    }

    /// The undo adjustments of every process, for writing back.
    pub fn undo_entries(&self) -> impl Iterator<Item = (u64, &[i32])> + '_ {
        self.undo.iter().map(|(p, a)| (*p, a.as_slice()))
    }

    /// `semget` of an existing set: size and permission checks.
    pub fn open(&self, nsems: i32, flags: i32, cred: &Credentials) -> Result<(), i32> {
        if nsems < 0 || nsems as usize > self.values.len() {
            return Err(libc::EINVAL);
        }
        if !self.perm.permits(cred, (flags & 0o777) as u32) {
            return Err(libc::EACCES);
        }
        Ok(())
    }

    /// `semop`: all operations or none. Never waits; see [`SemopOutcome`].
    /// A change it makes lets queued waiters proceed.
    pub fn semop(
        &mut self,
        sops: &[SemBuf],
        caller: &Caller,
        limits: &SemLimits,
        now: i64,
    ) -> Result<SemopOutcome, i32> {
        let outcome = self.try_apply(sops, caller, limits, now)?;
        if outcome == SemopOutcome::Done {
            self.wake_waiters(now);
        }
        Ok(outcome)
    }

    /// The checks and the atomic application of one operation array.
    fn try_apply(
        &mut self,
        sops: &[SemBuf],
        caller: &Caller,
        limits: &SemLimits,
        now: i64,
    ) -> Result<SemopOutcome, i32> {
        if sops.is_empty() {
            return Err(libc::EINVAL);
        }
        if sops.len() > limits.semopm {
            return Err(libc::E2BIG);
        }
        let max = sops.iter().map(|s| s.num).max().unwrap_or(0);
        if usize::from(max) >= self.values.len() {
            return Err(libc::EFBIG);
        }
        let alter = sops.iter().any(|s| s.op != 0);
        if !self
            .perm
            .permits(&caller.cred, if alter { S_IWUGO } else { S_IRUGO })
        {
            return Err(libc::EACCES);
        }
        let n = self.values.len();
        let mut values = self.values.clone();
        let mut adj = self
            .undo
            .get(&caller.process)
            .cloned()
            .unwrap_or_else(|| vec![0; n]);
        // Applied in order, each op seeing the ones before it, as the
        // kernel's slow path does; nothing is kept unless all succeed.
        for (index, sop) in sops.iter().enumerate() {
            let i = usize::from(sop.num);
            let current = i32::from(values[i]);
            let op = i32::from(sop.op);
            if op == 0 && current != 0 || current + op < 0 {
                if sop.flags & IPC_NOWAIT != 0 {
                    return Err(libc::EAGAIN);
                }
                return Ok(SemopOutcome::Blocked { index });
            }
            let result = current + op;
            if result > SEMVMX {
                return Err(libc::ERANGE);
            }
            if sop.flags & SEM_UNDO != 0 {
                let undo = adj[i] - op;
                if !(-SEMAEM - 1..=SEMAEM).contains(&undo) {
                    return Err(libc::ERANGE);
                }
                adj[i] = undo;
            }
            values[i] = result as u16;
        }
        self.values = values;
        if sops.iter().any(|s| s.flags & SEM_UNDO != 0) {
            self.undo.insert(caller.process, adj);
        }
        for sop in sops {
            self.pids[usize::from(sop.num)] = caller.pid;
        }
        self.otime = now;
        Ok(SemopOutcome::Done)
    }

    /// `semop` that waits when it must: a blocked operation array is queued
    /// under `id` and finishes later through [`SemSet::poll_finished`].
    pub fn semop_or_wait(
        &mut self,
        id: WaitId,
        sops: &[SemBuf],
        caller: &Caller,
        limits: &SemLimits,
        now: i64,
    ) -> Result<SemopOutcome, i32> {
        let outcome = self.try_apply(sops, caller, limits, now)?;
        match outcome {
            SemopOutcome::Done => self.wake_waiters(now),
            SemopOutcome::Blocked { index } => self.waiting.push_back(Waiting {
                id,
                sops: sops.to_vec(),
                caller: caller.clone(),
                blocked: index,
            }),
        }
        Ok(outcome)
    }

    /// After any change of values: retry the waiters oldest first; each that
    /// completes (or now fails, e.g. ERANGE) leaves the queue, and after one
    /// completes the scan starts again, since it may unblock older ones.
    fn wake_waiters(&mut self, now: i64) {
        'scan: loop {
            for i in 0..self.waiting.len() {
                let w = self.waiting[i].clone();
                match self.try_apply(&w.sops, &w.caller, &WAITER_LIMITS, now) {
                    Ok(SemopOutcome::Blocked { index }) => self.waiting[i].blocked = index,
                    Ok(SemopOutcome::Done) => {
                        self.waiting.remove(i);
                        self.finished.push_back((w.id, Ok(())));
                        continue 'scan;
                    }
                    Err(e) => {
                        self.waiting.remove(i);
                        self.finished.push_back((w.id, Err(e)));
                        continue 'scan;
                    }
                }
            }
            return;
        }
    }

    /// A waiter that finished, with its result.
    pub fn poll_finished(&mut self) -> Option<(WaitId, Result<(), i32>)> {
        self.finished.pop_front()
    }

    /// The waiter gives up (signal or timeout). True if it was still
    /// waiting: nothing of it was applied. False if it already finished:
    /// its result stands and must be delivered, never undone.
    pub fn cancel(&mut self, id: WaitId) -> bool {
        match self.waiting.iter().position(|w| w.id == id) {
            Some(i) => {
                self.waiting.remove(i);
                true
            }
            None => false,
        }
    }

    /// `IPC_RMID`: every waiter fails with EIDRM.
    pub fn remove(&mut self, cred: &Credentials) -> Result<Vec<WaitId>, i32> {
        self.may_remove(cred)?;
        Ok(self.waiting.drain(..).map(|w| w.id).collect())
    }

    /// `GETNCNT`: waiters blocked on decreasing `semnum`.
    pub fn getncnt(&self, semnum: i32, cred: &Credentials) -> Result<i32, i32> {
        self.count_blocked(semnum, cred, |op| op < 0)
    }

    /// `GETZCNT`: waiters blocked until `semnum` is zero.
    pub fn getzcnt(&self, semnum: i32, cred: &Credentials) -> Result<i32, i32> {
        self.count_blocked(semnum, cred, |op| op == 0)
    }

    fn count_blocked(
        &self,
        semnum: i32,
        cred: &Credentials,
        kind: impl Fn(i16) -> bool,
    ) -> Result<i32, i32> {
        self.check_read(cred)?;
        let i = self.index(semnum)?;
        Ok(self
            .waiting
            .iter()
            .filter(|w| {
                let sop = w.sops[w.blocked];
                usize::from(sop.num) == i && kind(sop.op)
            })
            .count() as i32)
    }

    fn check_read(&self, cred: &Credentials) -> Result<(), i32> {
        if self.perm.permits(cred, S_IRUGO) {
            Ok(())
        } else {
            Err(libc::EACCES)
        }
    }

    fn index(&self, semnum: i32) -> Result<usize, i32> {
        if semnum < 0 || semnum as usize >= self.values.len() {
            return Err(libc::EINVAL);
        }
        Ok(semnum as usize)
    }

    pub fn getval(&self, semnum: i32, cred: &Credentials) -> Result<i32, i32> {
        self.check_read(cred)?;
        Ok(i32::from(self.values[self.index(semnum)?]))
    }

    pub fn getpid(&self, semnum: i32, cred: &Credentials) -> Result<i32, i32> {
        self.check_read(cred)?;
        Ok(self.pids[self.index(semnum)?])
    }

    pub fn getall(&self, cred: &Credentials) -> Result<Vec<u16>, i32> {
        self.check_read(cred)?;
        Ok(self.values.clone())
    }

    /// `SETVAL`: clears every process's undo adjustment of that semaphore.
    pub fn setval(
        &mut self,
        semnum: i32,
        value: i32,
        caller: &Caller,
        now: i64,
    ) -> Result<(), i32> {
        if !(0..=SEMVMX).contains(&value) {
            return Err(libc::ERANGE);
        }
        let i = self.index(semnum)?;
        if !self.perm.permits(&caller.cred, S_IWUGO) {
            return Err(libc::EACCES);
        }
        for adj in self.undo.values_mut() {
            adj[i] = 0;
        }
        self.values[i] = value as u16;
        self.pids[i] = caller.pid;
        self.ctime = now;
        self.wake_waiters(now);
        Ok(())
    }

    /// `SETALL`: clears every undo adjustment of the set.
    pub fn setall(&mut self, values: &[u16], caller: &Caller, now: i64) -> Result<(), i32> {
        if !self.perm.permits(&caller.cred, S_IWUGO) {
            return Err(libc::EACCES);
        }
        if values.len() != self.values.len() {
            return Err(libc::EINVAL);
        }
        if values.iter().any(|v| i32::from(*v) > SEMVMX) {
            return Err(libc::ERANGE);
        }
        self.values.copy_from_slice(values);
        self.pids.iter_mut().for_each(|p| *p = caller.pid);
        self.undo
            .values_mut()
            .for_each(|adj| adj.iter_mut().for_each(|a| *a = 0));
        self.ctime = now;
        self.wake_waiters(now);
        Ok(())
    }

    pub fn stat(&self, cred: &Credentials) -> Result<SemStat, i32> {
        self.check_read(cred)?;
        Ok(self.info())
    }

    /// What `IPC_STAT` shows, without a permission check (for `ipcs`,
    /// which lists every set as `/proc/sysvipc/sem` does).
    pub fn info(&self) -> SemStat {
        SemStat {
            perm: self.perm.clone(),
            otime: self.otime,
            ctime: self.ctime,
            nsems: self.values.len(),
        }
    }

    /// `IPC_SET`: owner, group and permission bits.
    pub fn set(
        &mut self,
        cred: &Credentials,
        uid: u32,
        gid: u32,
        mode: u32,
        now: i64,
    ) -> Result<(), i32> {
        if !self.perm.may_control(cred) {
            return Err(libc::EPERM);
        }
        self.perm.update(uid, gid, mode)?;
        self.ctime = now;
        Ok(())
    }

    /// May `cred` remove the set (`IPC_RMID`)?
    pub fn may_remove(&self, cred: &Credentials) -> Result<(), i32> {
        if self.perm.may_control(cred) {
            Ok(())
        } else {
            Err(libc::EPERM)
        }
    }

    /// A process ended: drop its waiters and apply its undo adjustments, as
    /// `exit_sem` does (each value clamped to 0..=SEMVMX). Returns the
    /// waiters dropped (nothing of them was applied).
    pub fn process_exited(&mut self, process: u64, now: i64) -> Vec<WaitId> {
        let mut dropped = Vec::new();
        self.waiting.retain(|w| {
            let keep = w.caller.process != process;
            if !keep {
                dropped.push(w.id);
            }
            keep
        });
        if let Some(adj) = self.undo.remove(&process) {
            for (value, a) in self.values.iter_mut().zip(adj) {
                *value = (i32::from(*value) + a).clamp(0, SEMVMX) as u16;
            }
            self.wake_waiters(now);
        }
        dropped
    }

    /// Every queued waiter, oldest first.
    pub fn waiting_ids(&self) -> impl Iterator<Item = WaitId> + '_ {
        self.waiting.iter().map(|w| w.id)
    }

    /// Every process that holds undo adjustments on the set.
    pub fn undo_processes(&self) -> impl Iterator<Item = u64> + '_ {
        self.undo.keys().copied()
    }

    /// The undo adjustments a process holds on this set.
    pub fn semadj(&self, process: u64) -> Vec<i32> {
        self.undo
            .get(&process)
            .cloned()
            .unwrap_or_else(|| vec![0; self.values.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(process: u64) -> Caller {
        let cred = Credentials::root(100 + process as i32);
        Caller {
            process,
            pid: 100 + process as i32,
            cred,
        }
    }

    fn op(num: u16, op: i16) -> SemBuf {
        SemBuf { num, op, flags: 0 }
    }

    const L: SemLimits = SemLimits {
        semmsl: 250,
        semmns: 32000,
        semopm: 32,
        semmni: 128,
    };

    fn set(n: i32) -> SemSet {
        SemSet::create(0, n, 0o600, &root(0).cred, &L, 0).unwrap()
    }

    #[test]
    fn setall_and_setval_wake_waiters() {
        let mut s = set(2);
        assert_eq!(
            s.semop_or_wait(1, &[op(1, -2)], &root(1), &L, 0),
            Ok(SemopOutcome::Blocked { index: 0 })
        );
        s.setall(&[0, 2], &root(2), 0).unwrap();
        assert_eq!(s.poll_finished(), Some((1, Ok(()))));
        assert_eq!(s.getall(&root(0).cred), Ok(vec![0, 0]));
        assert_eq!(
            s.semop_or_wait(2, &[op(0, -1)], &root(1), &L, 0),
            Ok(SemopOutcome::Blocked { index: 0 })
        );
        s.setval(0, 1, &root(2), 0).unwrap();
        assert_eq!(s.poll_finished(), Some((2, Ok(()))));
    }

    #[test]
    fn a_blocked_p_completes_on_a_later_v_and_consumes_it() {
        let mut s = set(1);
        assert_eq!(
            s.semop_or_wait(1, &[op(0, -1)], &root(1), &L, 0),
            Ok(SemopOutcome::Blocked { index: 0 })
        );
        assert_eq!(s.getncnt(0, &root(0).cred), Ok(1));
        assert_eq!(s.poll_finished(), None);
        assert_eq!(
            s.semop(&[op(0, 1)], &root(2), &L, 0),
            Ok(SemopOutcome::Done)
        );
        assert_eq!(s.poll_finished(), Some((1, Ok(()))));
        assert_eq!(
            s.getval(0, &root(0).cred),
            Ok(0),
            "the waiter took the unit"
        );
        assert_eq!(
            s.getpid(0, &root(0).cred),
            Ok(101),
            "GETPID names the last process to operate"
        );
        assert_eq!(s.getncnt(0, &root(0).cred), Ok(0));
    }

    #[test]
    fn waiters_are_served_oldest_first() {
        let mut s = set(1);
        for id in 1..=3 {
            s.semop_or_wait(id, &[op(0, -1)], &root(id), &L, 0).unwrap();
        }
        s.semop(&[op(0, 2)], &root(9), &L, 0).unwrap();
        assert_eq!(s.poll_finished(), Some((1, Ok(()))));
        assert_eq!(s.poll_finished(), Some((2, Ok(()))));
        assert_eq!(s.poll_finished(), None);
        assert_eq!(s.getncnt(0, &root(0).cred), Ok(1));
    }

    #[test]
    fn wait_for_zero_wakes_when_the_value_reaches_zero() {
        let mut s = set(2);
        s.setval(1, 3, &root(9), 0).unwrap();
        assert_eq!(
            s.semop_or_wait(7, &[op(0, 1), op(1, 0)], &root(1), &L, 0),
            Ok(SemopOutcome::Blocked { index: 1 })
        );
        assert_eq!(
            s.getval(0, &root(0).cred),
            Ok(0),
            "nothing of a blocked array is applied"
        );
        assert_eq!(s.getzcnt(1, &root(0).cred), Ok(1));
        s.semop(&[op(1, -2)], &root(2), &L, 0).unwrap();
        assert_eq!(s.poll_finished(), None);
        s.setval(1, 0, &root(2), 0).unwrap();
        assert_eq!(s.poll_finished(), Some((7, Ok(()))));
        assert_eq!(s.getval(0, &root(0).cred), Ok(1));
    }

    #[test]
    fn cancel_never_loses_or_invents_an_operation() {
        let mut s = set(1);
        s.semop_or_wait(1, &[op(0, -1)], &root(1), &L, 0).unwrap();
        assert!(s.cancel(1), "still waiting: cancelled, nothing applied");
        s.semop(&[op(0, 1)], &root(2), &L, 0).unwrap();
        assert_eq!(s.poll_finished(), None);
        assert_eq!(
            s.getval(0, &root(0).cred),
            Ok(1),
            "the cancelled P took nothing"
        );
        s.semop_or_wait(2, &[op(0, -2)], &root(1), &L, 0).unwrap();
        s.semop(&[op(0, 1)], &root(2), &L, 0).unwrap();
        assert!(!s.cancel(2), "already applied: the cancel must not undo it");
        assert_eq!(s.poll_finished(), Some((2, Ok(()))));
        assert_eq!(s.getval(0, &root(0).cred), Ok(0));
    }

    #[test]
    fn removal_fails_every_waiter_and_exit_drops_a_process_waiters() {
        let mut s = set(1);
        // A zero-wait on a value that is already 0 completes at once.
        assert_eq!(
            s.semop_or_wait(2, &[op(0, 0)], &root(2), &L, 0),
            Ok(SemopOutcome::Done)
        );
        s.semop_or_wait(4, &[op(0, -1)], &root(4), &L, 0).unwrap();
        s.semop_or_wait(5, &[op(0, -1)], &root(5), &L, 0).unwrap();
        let _ = s.process_exited(4, 0);
        assert_eq!(s.getncnt(0, &root(0).cred), Ok(1));
        let user = Credentials {
            pid: 1,
            uid: 1000,
            gid: 1000,
            groups: vec![],
            cap_ipc_owner: false,
            cap_sys_admin: false,
            cap_ipc_lock: false,
        };
        assert_eq!(s.remove(&user), Err(libc::EPERM));
        assert_eq!(s.remove(&root(0).cred), Ok(vec![5]));
    }

    #[test]
    fn a_waiter_that_can_no_longer_succeed_fails_with_the_kernels_errno() {
        let mut s = set(2);
        s.setval(1, SEMVMX - 1, &root(9), 0).unwrap();
        // Waits on sem 0; once it can take it, adding 2 to sem 1 overflows.
        s.semop_or_wait(1, &[op(0, -1), op(1, 2)], &root(1), &L, 0)
            .unwrap();
        s.semop(&[op(0, 1)], &root(2), &L, 0).unwrap();
        assert_eq!(s.poll_finished(), Some((1, Err(libc::ERANGE))));
        assert_eq!(
            s.getval(0, &root(0).cred),
            Ok(1),
            "nothing of the failed array was applied"
        );
    }

    #[test]
    fn undo_at_exit_wakes_waiters() {
        let mut s = set(1);
        s.setval(0, 1, &root(9), 0).unwrap();
        let undo = SemBuf {
            num: 0,
            op: -1,
            flags: SEM_UNDO,
        };
        assert_eq!(s.semop(&[undo], &root(1), &L, 0), Ok(SemopOutcome::Done));
        s.semop_or_wait(2, &[op(0, -1)], &root(2), &L, 0).unwrap();
        let _ = s.process_exited(1, 0);
        assert_eq!(
            s.poll_finished(),
            Some((2, Ok(()))),
            "the dead holder's unit went to the waiter"
        );
        assert_eq!(s.getval(0, &root(0).cred), Ok(0));
    }
}
