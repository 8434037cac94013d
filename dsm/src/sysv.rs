//! SysV rules for segments: the metadata `IPC_STAT` reports and the
//! node's limits. Credentials and permission checks, shared with the
//! semaphore sets, come from the `sysv` crate.

use serde::{Deserialize, Serialize};
pub use sysv::perm::*;

/// `shm_perm.mode` flag of a segment removed while still attached.
pub const SHM_DEST: u32 = 0o1000;
pub const SHM_RDONLY: i32 = 0o10000;

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
