//! The fast path of a semaphore set: its values in memory shared between
//! the daemon of the node that arbitrates the set and the local processes
//! using it, so that an operation that can complete at once (the common,
//! uncontended case) needs no message at all (DESIGN.md §4).
//!
//! One lock word decides who may touch the values:
//! * `FREE`: nobody; a process may take it for one operation;
//! * a pid: that process is applying one operation, for a few hundred ns;
//! * `DAEMON`: the daemon owns the values. It keeps them while the set has
//!   waiters (every change must then run the kernel's wake-up rules, which
//!   the daemon does), and for good once the set is removed or moves away.
//!
//! A process that finds the lock taken, or an operation it cannot finish
//! at once (it would block, or fail), asks the daemon: the fast path only
//! ever completes operations, and only when the outcome is certain.
//!
//! A process killed while holding the lock leaves its journal behind (the
//! old values of what it was changing); the daemon, finding the holder
//! dead, restores them: the operation never happened.
//!
//! Trust: a process is given the region only if it may alter the set, and
//! checks permissions itself on every operation (they may change). A
//! process that bypasses this code can corrupt the sets it was given, as it
//! could with any shared memory it may write.

use crate::memfd::{Mapping, Memfd};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU32, Ordering::*};
use sysv::perm::{Credentials, IpcPerm};
use sysv::sem::{SemBuf, IPC_NOWAIT, SEMAEM, SEMVMX, SEM_UNDO};

/// Sets of at most this many semaphores get a fast path.
pub const NSEMS_MAX: usize = 64;
/// Local processes that can hold undo adjustments on the fast path.
pub const UNDO_SLOTS: usize = 32;
/// Longest operation array the fast path takes.
pub const JOURNAL_MAX: usize = 8;

const FREE: u32 = 0;
const DAEMON: u32 = u32::MAX;
const RETIRED: u32 = 1;

#[repr(C)]
struct JournalEntry {
    num: AtomicU32,
    value: AtomicU32,
    pid: AtomicI32,
    adj: AtomicI32,
}

#[repr(C)]
struct UndoSlot {
    pid: AtomicI32,
    adj: [AtomicI32; NSEMS_MAX],
}

/// The shared layout. Every field is an atomic: processes and the daemon
/// see one another's writes through the lock's acquire/release.
#[repr(C)]
struct Layout {
    lock: AtomicU32,
    state: AtomicU32,
    nsems: AtomicU32,
    uid: AtomicU32,
    gid: AtomicU32,
    cuid: AtomicU32,
    cgid: AtomicU32,
    mode: AtomicU32,
    otime: AtomicI64,
    journal_active: AtomicU32,
    journal_count: AtomicU32,
    journal_slot: AtomicI32,
    journal_otime: AtomicI64,
    journal: [JournalEntry; JOURNAL_MAX],
    values: [AtomicU32; NSEMS_MAX],
    pids: [AtomicI32; NSEMS_MAX],
    slots: [UndoSlot; UNDO_SLOTS],
}

pub const REGION_BYTES: usize = size_of::<Layout>().next_multiple_of(4096);

/// The first bytes of a region that the daemon owns for good (lock word,
/// state): what a migrated process finds where its region was, so that it
/// asks the daemon of its new node instead.
pub fn retired_header() -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&DAEMON.to_le_bytes());
    h[4..].copy_from_slice(&RETIRED.to_le_bytes());
    h
}

/// A mapped region (the daemon's, or a process's copy of its mapping).
pub struct Region {
    map: Mapping,
}

// SAFETY: the mapping is only accessed through atomics.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

/// What the daemon reads out of a region and writes back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub values: Vec<u16>,
    pub pids: Vec<i32>,
    pub otime: i64,
    /// Undo adjustments of local processes, by pid.
    pub undo: Vec<(i32, Vec<i32>)>,
}

/// How a fast-path attempt ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Fast {
    /// Applied (Ok) or refused with the errno the kernel gives (EAGAIN for
    /// IPC_NOWAIT): the operation is finished.
    Done(Result<(), i32>),
    /// Ask the daemon.
    Slow,
    /// The region is retired: drop it and ask the daemon.
    Retired,
}

impl Region {
    /// A new region for a set of `nsems` semaphores (the daemon's).
    pub fn create(nsems: usize, perm: &IpcPerm) -> std::io::Result<(Region, Memfd)> {
        if nsems == 0 || nsems > NSEMS_MAX {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        let memfd = Memfd::create("migshm-sem", REGION_BYTES as u64)?;
        let region = Region::map(memfd.as_fd().try_clone_to_owned()?)?;
        let l = region.layout();
        l.nsems.store(nsems as u32, Relaxed);
        l.lock.store(DAEMON, Release);
        region.set_perm(perm);
        Ok((region, memfd))
    }

    /// Map a region received from the daemon.
    pub fn map(fd: OwnedFd) -> std::io::Result<Region> {
        let map = Mapping::map(fd.as_fd(), REGION_BYTES, true, None)?;
        Ok(Region { map })
    }

    fn layout(&self) -> &Layout {
        // SAFETY: the mapping is REGION_BYTES long, page aligned, lives as
        // long as `self`, and holds only atomics (any bit pattern is valid).
        unsafe { &*(self.map.as_ptr() as *const Layout) }
    }

    // ---- the process side --------------------------------------------------------

    /// Try to apply `sops` at once as process `pid` with `cred`.
    pub fn try_semop(&self, sops: &[SemBuf], pid: i32, cred: &Credentials, now: i64) -> Fast {
        let l = self.layout();
        if sops.is_empty() || sops.len() > JOURNAL_MAX {
            return Fast::Slow;
        }
        if l.lock
            .compare_exchange(FREE, pid as u32, Acquire, Relaxed)
            .is_err()
        {
            return if l.state.load(Relaxed) & RETIRED != 0 {
                Fast::Retired
            } else {
                Fast::Slow
            };
        }
        let outcome = self.apply_locked(l, sops, pid, cred, now);
        l.lock.store(FREE, Release);
        outcome
    }

    fn apply_locked(
        &self,
        l: &Layout,
        sops: &[SemBuf],
        pid: i32,
        cred: &Credentials,
        now: i64,
    ) -> Fast {
        let nsems = l.nsems.load(Relaxed) as usize;
        if sops.iter().any(|s| usize::from(s.num) >= nsems) {
            return Fast::Slow;
        }
        let alter = sops.iter().any(|s| s.op != 0);
        if !self.perm().permits(cred, if alter { 0o222 } else { 0o444 }) {
            return Fast::Slow; // the daemon answers (CAP_IPC_OWNER, EACCES)
        }
        let undo = sops.iter().any(|s| s.flags & SEM_UNDO != 0);
        let slot = if undo {
            match l.slots.iter().position(|s| s.pid.load(Relaxed) == pid) {
                Some(i) => i as i32,
                None => return Fast::Slow, // the daemon allots a slot
            }
        } else {
            -1
        };
        // Work on copies, in order, as the kernel does; nothing is kept
        // unless every operation can proceed.
        let mut values = [0i32; JOURNAL_MAX];
        let mut adjs = [0i32; JOURNAL_MAX];
        for (i, s) in sops.iter().enumerate() {
            let n = usize::from(s.num);
            // An earlier op of the array on the same semaphore counts.
            let earlier = sops[..i].iter().rposition(|e| e.num == s.num);
            let current = match earlier {
                Some(j) => values[j],
                None => l.values[n].load(Relaxed) as i32,
            };
            let adj = match (earlier, slot) {
                (Some(j), _) => adjs[j],
                (None, -1) => 0,
                (None, k) => l.slots[k as usize].adj[n].load(Relaxed),
            };
            let op = i32::from(s.op);
            if op == 0 && current != 0 || current + op < 0 {
                return if s.flags & IPC_NOWAIT != 0 {
                    Fast::Done(Err(libc::EAGAIN))
                } else {
                    Fast::Slow // it must wait: the daemon queues it
                };
            }
            if current + op > SEMVMX {
                return Fast::Slow; // ERANGE, from the daemon
            }
            let new_adj = if s.flags & SEM_UNDO != 0 {
                adj - op
            } else {
                adj
            };
            if !(-SEMAEM - 1..=SEMAEM).contains(&new_adj) {
                return Fast::Slow;
            }
            values[i] = current + op;
            adjs[i] = new_adj;
        }
        // Journal the old state, then apply: a holder that dies in between
        // is undone by the daemon.
        for (i, s) in sops.iter().enumerate() {
            let n = usize::from(s.num);
            let e = &l.journal[i];
            e.num.store(u32::from(s.num), Relaxed);
            e.value.store(l.values[n].load(Relaxed), Relaxed);
            e.pid.store(l.pids[n].load(Relaxed), Relaxed);
            let adj = if slot >= 0 {
                l.slots[slot as usize].adj[n].load(Relaxed)
            } else {
                0
            };
            e.adj.store(adj, Relaxed);
        }
        l.journal_count.store(sops.len() as u32, Relaxed);
        l.journal_slot.store(slot, Relaxed);
        l.journal_otime.store(l.otime.load(Relaxed), Relaxed);
        l.journal_active.store(1, Release);
        for (i, s) in sops.iter().enumerate() {
            let n = usize::from(s.num);
            l.values[n].store(values[i] as u32, Relaxed);
            l.pids[n].store(pid, Relaxed);
            if slot >= 0 {
                l.slots[slot as usize].adj[n].store(adjs[i], Relaxed);
            }
        }
        l.otime.store(now, Relaxed);
        l.journal_active.store(0, Release);
        Fast::Done(Ok(()))
    }

    fn perm(&self) -> IpcPerm {
        let l = self.layout();
        IpcPerm {
            key: 0,
            uid: l.uid.load(Relaxed),
            gid: l.gid.load(Relaxed),
            cuid: l.cuid.load(Relaxed),
            cgid: l.cgid.load(Relaxed),
            mode: l.mode.load(Relaxed),
        }
    }

    // ---- the daemon side ---------------------------------------------------------

    /// Take the values for the daemon (it may already hold them). Waits
    /// out a process in the middle of an operation for at most `patience`
    /// (false then: the process is stopped or starved; the daemon comes
    /// back later rather than wait on it); undoes the operation of one that
    /// died there.
    pub fn try_acquire(&self, patience: std::time::Duration) -> bool {
        let l = self.layout();
        let started = std::time::Instant::now();
        let mut spins = 0u32;
        loop {
            let holder = l.lock.load(Acquire);
            if holder == DAEMON {
                return true;
            }
            if holder == FREE {
                if l.lock
                    .compare_exchange(FREE, DAEMON, Acquire, Relaxed)
                    .is_ok()
                {
                    return true;
                }
                continue;
            }
            spins += 1;
            if spins.is_multiple_of(64) {
                if holder_is_gone(holder as i32) {
                    if l.lock
                        .compare_exchange(holder, DAEMON, Acquire, Relaxed)
                        .is_ok()
                    {
                        self.roll_back(l);
                        tracing::warn!(
                            pid = holder,
                            "a process died inside a semaphore operation; undone"
                        );
                        return true;
                    }
                    continue;
                }
                if started.elapsed() >= patience {
                    return false;
                }
            }
            std::hint::spin_loop();
        }
    }

    /// Take the values for the daemon, however long it takes.
    #[cfg(test)]
    fn acquire(&self) {
        while !self.try_acquire(std::time::Duration::from_millis(10)) {}
    }

    fn roll_back(&self, l: &Layout) {
        if l.journal_active.load(Acquire) == 0 {
            return;
        }
        let count = (l.journal_count.load(Relaxed) as usize).min(JOURNAL_MAX);
        let slot = l.journal_slot.load(Relaxed);
        // In reverse, so an array naming a semaphore twice ends at the
        // first (oldest) saved state.
        for e in l.journal[..count].iter().rev() {
            let n = (e.num.load(Relaxed) as usize).min(NSEMS_MAX - 1);
            l.values[n].store(e.value.load(Relaxed), Relaxed);
            l.pids[n].store(e.pid.load(Relaxed), Relaxed);
            if (0..UNDO_SLOTS as i32).contains(&slot) {
                l.slots[slot as usize].adj[n].store(e.adj.load(Relaxed), Relaxed);
            }
        }
        l.otime.store(l.journal_otime.load(Relaxed), Relaxed);
        l.journal_active.store(0, Release);
    }

    /// Let processes operate again (the daemon has no waiter to serve).
    pub fn release(&self) {
        let l = self.layout();
        if l.state.load(Relaxed) & RETIRED == 0 {
            l.lock.store(FREE, Release);
        }
    }

    /// For good: processes drop the region and ask the daemon. The
    /// daemon holds the values when it retires a region; a process still
    /// inside an operation sees RETIRED when it next tries.
    pub fn retire(&self) {
        self.layout().state.fetch_or(RETIRED, Release);
        let _ = self
            .layout()
            .lock
            .compare_exchange(FREE, DAEMON, Acquire, Relaxed);
    }

    /// Read the values (the daemon holds them).
    pub fn load(&self) -> Snapshot {
        let l = self.layout();
        let n = (l.nsems.load(Relaxed) as usize).min(NSEMS_MAX);
        Snapshot {
            values: l.values[..n]
                .iter()
                .map(|v| v.load(Relaxed) as u16)
                .collect(),
            pids: l.pids[..n].iter().map(|p| p.load(Relaxed)).collect(),
            otime: l.otime.load(Relaxed),
            undo: l
                .slots
                .iter()
                .filter(|s| s.pid.load(Relaxed) != 0)
                .map(|s| {
                    (
                        s.pid.load(Relaxed),
                        s.adj[..n].iter().map(|a| a.load(Relaxed)).collect(),
                    )
                })
                .collect(),
        }
    }

    /// Write the values back (the daemon holds them). Local processes in
    /// `snap.undo` get a slot if one is free; the others' slots are freed.
    /// Returns the pids left without a slot (their undo operations keep
    /// going through the daemon).
    pub fn store(&self, snap: &Snapshot) -> Vec<i32> {
        let l = self.layout();
        let n = snap.values.len().min(NSEMS_MAX);
        for i in 0..n {
            l.values[i].store(u32::from(snap.values[i]), Relaxed);
            l.pids[i].store(snap.pids.get(i).copied().unwrap_or(0), Relaxed);
        }
        l.otime.store(snap.otime, Relaxed);
        for s in &l.slots {
            let pid = s.pid.load(Relaxed);
            if pid != 0 && !snap.undo.iter().any(|(p, _)| *p == pid) {
                s.pid.store(0, Relaxed);
            }
        }
        let mut homeless = Vec::new();
        for (pid, adj) in &snap.undo {
            let slot = l
                .slots
                .iter()
                .position(|s| s.pid.load(Relaxed) == *pid)
                .or_else(|| l.slots.iter().position(|s| s.pid.load(Relaxed) == 0));
            match slot {
                Some(k) => {
                    let s = &l.slots[k];
                    // Only the set's semaphores: a slot's other entries
                    // stay zero (cleared when the slot was handed out).
                    let fresh = s.pid.load(Relaxed) != *pid;
                    let upto = if fresh { NSEMS_MAX } else { n };
                    for i in 0..upto {
                        s.adj[i].store(adj.get(i).copied().unwrap_or(0), Relaxed);
                    }
                    s.pid.store(*pid, Relaxed);
                }
                None => homeless.push(*pid),
            }
        }
        homeless
    }

    /// Owner, group and mode as `IPC_SET` left them.
    pub fn set_perm(&self, perm: &IpcPerm) {
        let l = self.layout();
        l.uid.store(perm.uid, Relaxed);
        l.gid.store(perm.gid, Relaxed);
        l.cuid.store(perm.cuid, Relaxed);
        l.cgid.store(perm.cgid, Relaxed);
        l.mode.store(perm.mode & 0o777, Relaxed);
    }
}

/// Has the process holding the lock exited (or does it not exist)?
fn holder_is_gone(pid: i32) -> bool {
    match crate::pidfd::open(pid) {
        Ok(fd) => crate::pidfd::has_exited(&fd),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(num: u16, op: i16, flags: i16) -> SemBuf {
        SemBuf { num, op, flags }
    }

    fn region(values: &[u16]) -> Region {
        let perm = IpcPerm::new(0, 0o600, &Credentials::root(1));
        let (r, _fd) = Region::create(values.len(), &perm).unwrap();
        r.store(&Snapshot {
            values: values.to_vec(),
            pids: vec![0; values.len()],
            otime: 0,
            undo: vec![],
        });
        r.release();
        r
    }

    #[test]
    fn completes_what_it_can_and_leaves_the_rest_to_the_daemon() {
        let r = region(&[1, 0]);
        let me = std::process::id() as i32;
        assert_eq!(
            r.try_semop(&[op(0, -1, 0)], me, &Credentials::root(1), 5),
            Fast::Done(Ok(()))
        );
        // Would block: the daemon must queue it.
        assert_eq!(
            r.try_semop(&[op(0, -1, 0)], me, &Credentials::root(1), 5),
            Fast::Slow
        );
        assert_eq!(
            r.try_semop(&[op(0, -1, IPC_NOWAIT)], me, &Credentials::root(1), 5),
            Fast::Done(Err(libc::EAGAIN))
        );
        // Out of range or too large: the daemon gives the errno.
        assert_eq!(
            r.try_semop(&[op(2, 1, 0)], me, &Credentials::root(1), 5),
            Fast::Slow
        );
        assert_eq!(
            r.try_semop(
                &[op(1, 32767, 0), op(1, 1, 0)],
                me,
                &Credentials::root(1),
                5
            ),
            Fast::Slow
        );
        // Undo needs a slot, which the daemon allots.
        assert_eq!(
            r.try_semop(&[op(0, 1, SEM_UNDO)], me, &Credentials::root(1), 5),
            Fast::Slow
        );
        r.acquire();
        let mut snap = r.load();
        assert_eq!(snap.values, vec![0, 0]);
        assert_eq!(snap.pids[0], me);
        assert_eq!(snap.otime, 5);
        snap.undo.push((me, vec![0, 0]));
        assert!(r.store(&snap).is_empty());
        r.release();
        assert_eq!(
            r.try_semop(&[op(0, 1, SEM_UNDO)], me, &Credentials::root(1), 6),
            Fast::Done(Ok(()))
        );
        r.acquire();
        assert_eq!(r.load().undo, vec![(me, vec![-1, 0])]);
    }

    #[test]
    fn the_daemon_holding_it_sends_processes_to_the_slow_path() {
        let r = region(&[3]);
        r.acquire();
        let me = std::process::id() as i32;
        assert_eq!(
            r.try_semop(&[op(0, -1, 0)], me, &Credentials::root(1), 0),
            Fast::Slow
        );
        r.retire();
        assert_eq!(
            r.try_semop(&[op(0, -1, 0)], me, &Credentials::root(1), 0),
            Fast::Retired
        );
    }

    #[test]
    fn permission_bits_are_checked_on_every_operation() {
        let r = region(&[3]);
        let nobody = Credentials {
            pid: 2,
            uid: 65534,
            gid: 65534,
            groups: vec![],
            cap_ipc_owner: false,
            cap_sys_admin: false,
            cap_ipc_lock: false,
        };
        assert_eq!(r.try_semop(&[op(0, -1, 0)], 2, &nobody, 0), Fast::Slow);
        r.acquire();
        r.set_perm(&IpcPerm::new(0, 0o606, &Credentials::root(1)));
        r.release();
        assert_eq!(
            r.try_semop(&[op(0, -1, 0)], 2, &nobody, 0),
            Fast::Done(Ok(()))
        );
    }

    #[test]
    fn a_live_holder_is_waited_for_a_bounded_time() {
        let r = region(&[3]);
        // This process "holds" the lock and never lets go.
        r.layout().lock.store(std::process::id(), Release);
        let t = std::time::Instant::now();
        assert!(!r.try_acquire(std::time::Duration::from_millis(2)));
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        r.layout().lock.store(FREE, Release);
        assert!(r.try_acquire(std::time::Duration::from_millis(2)));
    }

    #[test]
    fn a_holder_that_died_mid_operation_is_undone() {
        let r = region(&[3, 4]);
        let l = r.layout();
        // A process (pid 999999 does not exist) took the lock, journaled
        // and applied half of its array, and died.
        l.lock.store(999_999, Release);
        l.journal[0].num.store(1, Relaxed);
        l.journal[0].value.store(4, Relaxed);
        l.journal_count.store(1, Relaxed);
        l.journal_slot.store(-1, Relaxed);
        l.journal_active.store(1, Release);
        l.values[1].store(2, Relaxed);
        r.acquire();
        assert_eq!(r.load().values, vec![3, 4], "the half operation was undone");
    }
}
