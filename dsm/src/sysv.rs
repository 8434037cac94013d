//! SysV rules for segments: the metadata `IPC_STAT` reports and the
//! node's limits. Credentials and permission checks, shared with the
//! semaphore sets, come from the `sysv` crate.

use serde::{Deserialize, Serialize};
pub use sysv::perm::*;

/// `shm_perm.mode` flag of a segment removed while still attached.
pub const SHM_DEST: u32 = 0o1000;
pub const SHM_RDONLY: i32 = 0o10000;

/// `shmget` flag: back the segment with huge pages.
pub const SHM_HUGETLB: i32 = 0o4000;

/// Whether `cred` may create a SHM_HUGETLB segment of `size` bytes with
/// the huge page size `flags` asks for (bits 26..31: log2 of the size, 0
/// for the default), as `newseg` and `hugetlb_file_setup` decide: a size
/// the node does not have is EINVAL; without CAP_IPC_LOCK or membership
/// of `vm.hugetlb_shm_group`, EPERM; then the pages must be free (ENOMEM).
/// The segment itself is made of normal pages (userfaultfd serves them the
/// same way).
pub fn hugetlb_allowed(cred: &Credentials, size: u64, flags: i32) -> Result<(), i32> {
    let read_u64 = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let log = (flags >> 26) & 0x3f;
    let huge_kb = if log == 0 {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix("Hugepagesize:"))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .ok_or(libc::EINVAL)?
    } else {
        (1u64 << log) / 1024
    };
    let dir = format!("/sys/kernel/mm/hugepages/hugepages-{huge_kb}kB");
    if huge_kb == 0 || !std::path::Path::new(&dir).exists() {
        return Err(libc::EINVAL);
    }
    let group = read_u64("/proc/sys/vm/hugetlb_shm_group").unwrap_or(0) as u32;
    if !cred.cap_ipc_lock && !cred.has_group(group) {
        return Err(libc::EPERM);
    }
    let free = read_u64(&format!("{dir}/free_hugepages")).unwrap_or(0);
    if free < size.div_ceil(huge_kb * 1024) {
        return Err(libc::ENOMEM);
    }
    Ok(())
}

/// `shm_perm.mode` flag of a segment locked in memory (`SHM_LOCK`).
pub const SHM_LOCKED: u32 = 0o2000;

/// What a segment stands for: only SysV segments are what the SysV calls
/// enumerate and count against the SysV limits; the interposer also makes
/// segments of anonymous shared mappings and POSIX shared memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShmSpace {
    #[default]
    SysV,
    Anonymous,
    Posix,
}

impl ShmSpace {
    /// The key namespace of segments of this space.
    pub fn key_kind(self) -> crate::ids::IpcKind {
        match self {
            ShmSpace::Posix => crate::ids::IpcKind::PosixShm,
            _ => crate::ids::IpcKind::Segment,
        }
    }
}

/// What `shmctl(IPC_STAT)` reports, cluster-wide.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmStat {
    pub id: i32,
    pub perm: IpcPerm,
    pub size: u64,
    pub atime: i64,
    pub dtime: i64,
    pub ctime: i64,
    pub cpid: i32,
    pub lpid: i32,
    /// Attachments on every node.
    pub nattch: u64,
    pub home: u8,
    pub space: ShmSpace,
}

/// Limits of the node's kernel, from `/proc/sys/kernel`.
#[derive(Clone, Copy, Debug)]
pub struct ShmLimits {
    pub shmmin: u64,
    pub shmmax: u64,
    pub shmmni: u64,
    /// Total pages of all segments.
    pub shmall: u64,
}

impl ShmLimits {
    /// The limits now (they may be changed at run time, as on Linux).
    pub fn from_proc() -> ShmLimits {
        let read = |name: &str, default: u64| {
            std::fs::read_to_string(format!("/proc/sys/kernel/{name}"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(default)
        };
        ShmLimits {
            shmmin: 1,
            shmmax: read("shmmax", u64::MAX >> 1),
            shmmni: read("shmmni", 4096),
            shmall: read("shmall", u64::MAX >> 1),
        }
    }
}
