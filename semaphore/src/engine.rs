//! SysV semaphore-set semantics as Linux's `ipc/sem.c` implements them:
//! pure state, no I/O, no clock (times are passed in).
//!
//! One `SemSet` is one set at its home node. Operations that would block
//! report `Blocked`; queueing the caller and waking it is the caller's job
//! (the distributed layer), which retries with [`SemSet::semop`].

use dsm::sysv::{Credentials, IpcPerm};
use std::collections::BTreeMap;

/// Largest semaphore value (`SEMVMX`).
pub const SEMVMX: i32 = 32767;
/// Largest undo adjustment (`SEMAEM`).
pub const SEMAEM: i32 = SEMVMX;
pub const SEM_UNDO: i16 = 0x1000;
pub const IPC_NOWAIT: i16 = 0o4000;

const S_IRUGO: u32 = 0o444;
const S_IWUGO: u32 = 0o222;

/// One operation of a `semop` array (`struct sembuf`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SemBuf {
    pub num: u16,
    pub op: i16,
    pub flags: i16,
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
#[derive(Clone, Debug)]
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
#[derive(Clone, Debug)]
pub struct SemSet {
    perm: IpcPerm,
    values: Vec<u16>,
    pids: Vec<i32>,
    otime: i64,
    ctime: i64,
    /// Undo adjustments per process (`semadj`), applied when it exits.
    undo: BTreeMap<u64, Vec<i32>>,
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
        })
    }

    pub fn nsems(&self) -> usize {
        self.values.len()
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
    pub fn semop(
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
        Ok(())
    }

    pub fn stat(&self, cred: &Credentials) -> Result<SemStat, i32> {
        self.check_read(cred)?;
        Ok(SemStat {
            perm: self.perm.clone(),
            otime: self.otime,
            ctime: self.ctime,
            nsems: self.values.len(),
        })
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
        self.perm.uid = uid;
        self.perm.gid = gid;
        self.perm.mode = (self.perm.mode & !0o777) | (mode & 0o777);
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

    /// A process ended: apply its undo adjustments, as `exit_sem` does
    /// (each value clamped to 0..=SEMVMX).
    pub fn process_exited(&mut self, process: u64) {
        let Some(adj) = self.undo.remove(&process) else {
            return;
        };
        for (value, a) in self.values.iter_mut().zip(adj) {
            *value = (i32::from(*value) + a).clamp(0, SEMVMX) as u16;
        }
    }

    /// The undo adjustments a process holds on this set.
    pub fn semadj(&self, process: u64) -> Vec<i32> {
        self.undo
            .get(&process)
            .cloned()
            .unwrap_or_else(|| vec![0; self.values.len()])
    }
}
