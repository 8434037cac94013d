//! `shmctl`, `semctl` and `semop`/`semtimedop` for the cluster's objects,
//! with the kernel's order of checks (ipc/shm.c, ipc/sem.c) and every
//! pointer copied through `user` (EFAULT, never a crash).
//!
//! Enumeration by index (`SHM_STAT`, `SEM_STAT` and their `_ANY` forms, the
//! max index the info commands return): the index of an object is its
//! position among the cluster's SysV objects of that kind, ordered by home
//! and id (creation order on each home). With no removals it is what the
//! kernel gives in a fresh namespace (0, 1, 2, ...); a removal shifts the
//! later ones down instead of leaving a hole, which tools that walk
//! 0..=max (ipcs) do not see.

use crate::runtime::{errno_of, Runtime};
use crate::user;
use dsm::sysv::{ShmSpace, ShmStat};
use dsm::wire::SemSetStat;
use libc::{c_int, c_ulong, semid_ds, shmid_ds, size_t, timespec};
use semaphore::SemBuf;
use std::time::Duration;

const SHM_LOCK: c_int = 11;
const SHM_UNLOCK: c_int = 12;
const SHM_STAT: c_int = 13;
const SHM_INFO: c_int = 14;
const SHM_STAT_ANY: c_int = 15;
const SEM_STAT: c_int = 18;
const SEM_INFO: c_int = 19;
const SEM_STAT_ANY: c_int = 20;
/// Constants `IPC_INFO` reports for semaphores (include/uapi/linux/sem.h).
const SEMMNU: c_int = 1_024_000_000;
const SEMMAP: c_int = 1_024_000_000;
const SEMUME: c_int = 500;
const SEMUSZ: c_int = 20;
const SEMVMX: c_int = 32767;
const SEMAEM: c_int = SEMVMX;
/// Larger arrays are refused before they are copied (the kernel's SEMOPM
/// is far lower and answers E2BIG first anyway).
const NSOPS_MAX: usize = 1 << 16;
const S_IWUGO: u32 = 0o222;

/// `struct shminfo64` (x86-64, aarch64).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ShmInfo {
    shmmax: c_ulong,
    shmmin: c_ulong,
    shmmni: c_ulong,
    shmseg: c_ulong,
    shmall: c_ulong,
    unused: [c_ulong; 4],
}

/// `struct shm_info`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ShmUse {
    used_ids: c_int,
    shm_tot: c_ulong,
    shm_rss: c_ulong,
    shm_swp: c_ulong,
    swap_attempts: c_ulong,
    swap_successes: c_ulong,
}

/// `struct seminfo`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SemInfo {
    semmap: c_int,
    semmni: c_int,
    semmns: c_int,
    semmnu: c_int,
    semmsl: c_int,
    semopm: c_int,
    semume: c_int,
    semusz: c_int,
    semvmx: c_int,
    semaem: c_int,
}

fn fail(e: dsm::client::Error) -> i32 {
    errno_of(&e)
}

fn sem_fail(e: semaphore::Error) -> i32 {
    errno_of(&e)
}

/// The highest index in use, as the kernel reports it (0 when none).
fn max_index(count: usize) -> c_int {
    count.saturating_sub(1) as c_int
}

/// The cluster's SysV segments in index order.
fn sysv_segments(rt: &Runtime) -> Result<Vec<ShmStat>, i32> {
    let mut list = rt.segments.ipcs().map_err(fail)?;
    list.retain(|s| s.space == ShmSpace::SysV);
    list.sort_by_key(|s| (s.home, s.id as u32));
    Ok(list)
}

/// The cluster's semaphore sets in index order.
fn sem_sets(rt: &Runtime) -> Result<Vec<SemSetStat>, i32> {
    let mut list = rt.segments.sem_ipcs().map_err(fail)?;
    list.sort_by_key(|s| (s.home, s.id as u32));
    Ok(list)
}

fn fill_perm(out: &mut libc::ipc_perm, perm: &sysv::perm::IpcPerm) {
    out.__key = perm.key;
    out.uid = perm.uid;
    out.gid = perm.gid;
    out.cuid = perm.cuid;
    out.cgid = perm.cgid;
    out.mode = perm.mode as u16;
}

fn shmid_ds_of(s: &ShmStat) -> shmid_ds {
    // SAFETY: all-zero is a valid shmid_ds (integers only).
    let mut ds: shmid_ds = unsafe { std::mem::zeroed() };
    fill_perm(&mut ds.shm_perm, &s.perm);
    ds.shm_segsz = s.size as size_t;
    ds.shm_atime = s.atime;
    ds.shm_dtime = s.dtime;
    ds.shm_ctime = s.ctime;
    ds.shm_cpid = s.cpid;
    ds.shm_lpid = s.lpid;
    ds.shm_nattch = s.nattch;
    ds
}

fn semid_ds_of(s: &SemSetStat) -> semid_ds {
    // SAFETY: all-zero is a valid semid_ds (integers only).
    let mut ds: semid_ds = unsafe { std::mem::zeroed() };
    fill_perm(&mut ds.sem_perm, &s.perm);
    ds.sem_otime = s.otime;
    ds.sem_ctime = s.ctime;
    ds.sem_nsems = c_ulong::from(s.nsems);
    ds
}

fn sysctl_numbers(name: &str) -> Vec<u64> {
    std::fs::read_to_string(format!("/proc/sys/kernel/{name}"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect()
}

/// The node's semaphore limits now: SEMMSL, SEMMNS, SEMOPM, SEMMNI.
fn sem_limits() -> [u64; 4] {
    match sysctl_numbers("sem").as_slice() {
        [a, b, c, d] => [*a, *b, *c, *d],
        _ => [32000, 1_024_000_000, 500, 32000],
    }
}

/// `shmctl` on the cluster's segments.
pub fn shmctl(rt: &Runtime, shmid: c_int, cmd: c_int, buf: usize) -> Result<c_int, i32> {
    if cmd < 0 || shmid < 0 {
        return Err(libc::EINVAL);
    }
    match cmd {
        libc::IPC_INFO => {
            let limits = dsm::sysv::ShmLimits::from_proc();
            let info = ShmInfo {
                shmmax: limits.shmmax as c_ulong,
                shmmin: limits.shmmin as c_ulong,
                shmmni: limits.shmmni as c_ulong,
                shmseg: limits.shmmni as c_ulong,
                shmall: limits.shmall as c_ulong,
                unused: [0; 4],
            };
            let count = sysv_segments(rt)?.len();
            user::write(buf, &info)?;
            Ok(max_index(count))
        }
        SHM_INFO => {
            let list = sysv_segments(rt)?;
            let used = ShmUse {
                used_ids: list.len() as c_int,
                shm_tot: list.iter().map(|s| s.size.div_ceil(4096)).sum::<u64>() as c_ulong,
                ..Default::default()
            };
            user::write(buf, &used)?;
            Ok(max_index(list.len()))
        }
        SHM_STAT | SHM_STAT_ANY => {
            let list = sysv_segments(rt)?;
            let entry = list.get(shmid as usize).ok_or(libc::EINVAL)?;
            let stat = if cmd == SHM_STAT {
                // Read permission, as IPC_STAT checks it.
                rt.segments.stat(entry.id).map_err(fail)?
            } else {
                entry.clone()
            };
            user::write(buf, &shmid_ds_of(&stat))?;
            Ok(stat.id)
        }
        libc::IPC_STAT => {
            // As the kernel: the id and permission first, then the buffer.
            let stat = rt.segments.stat(shmid).map_err(fail)?;
            user::write(buf, &shmid_ds_of(&stat))?;
            Ok(0)
        }
        libc::IPC_SET => {
            // The buffer is copied before the id is looked at.
            let ds: shmid_ds = user::read(buf)?;
            let p = ds.shm_perm;
            rt.segments
                .set(shmid, p.uid, p.gid, u32::from(p.mode))
                .map(|()| 0)
                .map_err(fail)
        }
        libc::IPC_RMID => rt.segments.remove(shmid).map(|()| 0).map_err(fail),
        SHM_LOCK | SHM_UNLOCK => rt
            .segments
            .lock(shmid, cmd == SHM_LOCK)
            .map(|()| 0)
            .map_err(fail),
        _ => Err(libc::EINVAL),
    }
}

/// `semctl` on the cluster's sets; `arg` is the fourth argument's word.
pub fn semctl(
    rt: &Runtime,
    semid: c_int,
    semnum: c_int,
    cmd: c_int,
    arg: c_ulong,
) -> Result<c_int, i32> {
    if semid < 0 {
        return Err(libc::EINVAL);
    }
    let at = arg as usize;
    match cmd {
        libc::IPC_INFO | SEM_INFO => {
            let [msl, mns, opm, mni] = sem_limits();
            let list = sem_sets(rt)?;
            let (semusz, semaem) = if cmd == SEM_INFO {
                (
                    list.len() as c_int,
                    list.iter().map(|s| s.nsems as c_int).sum(),
                )
            } else {
                (SEMUSZ, SEMAEM)
            };
            let info = SemInfo {
                semmap: SEMMAP,
                semmni: mni as c_int,
                semmns: mns as c_int,
                semmnu: SEMMNU,
                semmsl: msl as c_int,
                semopm: opm as c_int,
                semume: SEMUME,
                semusz,
                semvmx: SEMVMX,
                semaem,
            };
            user::write(at, &info)?;
            Ok(max_index(list.len()))
        }
        SEM_STAT | SEM_STAT_ANY => {
            let list = sem_sets(rt)?;
            let entry = list.get(semid as usize).ok_or(libc::EINVAL)?;
            let stat = if cmd == SEM_STAT {
                rt.sems.open(entry.id).stat().map_err(sem_fail)?
            } else {
                entry.clone()
            };
            user::write(at, &semid_ds_of(&stat))?;
            Ok(stat.id)
        }
        _ => semctl_on(rt, semid, semnum, cmd, at, arg),
    }
}

fn semctl_on(
    rt: &Runtime,
    semid: c_int,
    semnum: c_int,
    cmd: c_int,
    at: usize,
    arg: c_ulong,
) -> Result<c_int, i32> {
    let set = rt.sems.open(semid);
    match cmd {
        libc::GETVAL => set.get_value(semnum).map_err(sem_fail),
        libc::GETPID => set.get_pid(semnum).map_err(sem_fail),
        libc::GETNCNT => set.get_ncnt(semnum).map_err(sem_fail),
        libc::GETZCNT => set.get_zcnt(semnum).map_err(sem_fail),
        // The value is the low half of the word (little-endian); its range
        // is checked before the id (semctl_setval).
        libc::SETVAL if !(0..=SEMVMX).contains(&(arg as c_int)) => Err(libc::ERANGE),
        libc::SETVAL => set
            .set_value(semnum, arg as c_int)
            .map(|()| 0)
            .map_err(sem_fail),
        libc::GETALL => {
            let values = set.get_all().map_err(sem_fail)?;
            user::write_slice(at, &values)?;
            Ok(0)
        }
        libc::SETALL => {
            // As semctl_main: the id, then write permission, then the
            // array is copied (EFAULT), then its values (ERANGE).
            let stat = set.stat_any().map_err(sem_fail)?;
            // SAFETY: getpid, geteuid and getegid have no preconditions.
            let (pid, uid, gid) = unsafe { (libc::getpid(), libc::geteuid(), libc::getegid()) };
            let cred = sysv::perm::Credentials::of_process(pid, uid, gid);
            if !stat.perm.permits(&cred, S_IWUGO) {
                return Err(libc::EACCES);
            }
            let values: Vec<u16> = user::read_slice(at, stat.nsems as usize)?;
            set.set_all(&values).map(|()| 0).map_err(sem_fail)
        }
        libc::IPC_STAT => {
            let stat = set.stat().map_err(sem_fail)?;
            user::write(at, &semid_ds_of(&stat))?;
            Ok(0)
        }
        libc::IPC_SET => {
            let ds: semid_ds = user::read(at)?;
            let p = ds.sem_perm;
            set.set_perm(p.uid, p.gid, u32::from(p.mode))
                .map(|()| 0)
                .map_err(sem_fail)
        }
        libc::IPC_RMID => set.remove().map(|()| 0).map_err(sem_fail),
        _ => Err(libc::EINVAL),
    }
}

/// `semtimedop` (and `semop`, without a timeout): the timeout is copied
/// first (ksys_semtimedop), then SEMOPM, the count, the array, the id's
/// sign and the timeout's validity are checked as do_semtimedop does; the
/// rest (id, EFBIG, EACCES, ...) is the daemon's.
pub fn semtimedop(
    rt: &Runtime,
    semid: c_int,
    sops: usize,
    nsops: size_t,
    timeout: Option<usize>,
) -> Result<c_int, i32> {
    let timeout: Option<timespec> = timeout.map(user::read).transpose()?;
    // One operation is always within SEMOPM; more are checked against the
    // limit as it is now (reading it costs a few µs).
    if nsops > 1 && nsops as u64 > sem_limits()[2] {
        return Err(libc::E2BIG);
    }
    if nsops < 1 {
        return Err(libc::EINVAL);
    }
    if nsops > NSOPS_MAX {
        return Err(libc::E2BIG);
    }
    let raw: Vec<libc::sembuf> = user::read_slice(sops, nsops)?;
    if semid < 0 {
        return Err(libc::EINVAL);
    }
    let limit = match timeout {
        None => None,
        Some(t) if t.tv_sec < 0 || !(0..1_000_000_000).contains(&t.tv_nsec) => {
            return Err(libc::EINVAL)
        }
        Some(t) => Some(Duration::new(t.tv_sec as u64, t.tv_nsec as u32)),
    };
    let ops: Vec<SemBuf> = raw.iter().map(SemBuf::from).collect();
    rt.sems
        .open(semid)
        .timed_op(&ops, limit)
        .map(|()| 0)
        .map_err(sem_fail)
}
