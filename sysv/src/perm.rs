//! Who may do what to an IPC object, as the Linux kernel decides it:
//! credentials, `struct ipc_perm` and the `ipcperms` check.

use serde::{Deserialize, Serialize};

pub const IPC_CREAT: i32 = 0o1000;
pub const IPC_EXCL: i32 = 0o2000;
pub const IPC_NOWAIT: i32 = 0o4000;

const S_IRUGO: u32 = 0o444;
const S_IWUGO: u32 = 0o222;

/// The capability bits that matter here (`linux/capability.h`).
const CAP_SYS_ADMIN: u32 = 21;
const CAP_IPC_OWNER: u32 = 15;
const CAP_IPC_LOCK: u32 = 14;

/// Who is asking, as the kernel would see it at the time of the call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub cap_ipc_owner: bool,
    pub cap_sys_admin: bool,
    /// May lock memory (`SHM_LOCK` without owning the segment, and
    /// `SHM_HUGETLB`).
    pub cap_ipc_lock: bool,
}

impl Credentials {
    /// Read the current effective credentials of a local process from
    /// `/proc/PID/status` (they change when a server drops privileges, so
    /// they are read per call, not once at connect). `fallback` (SO_PEERCRED)
    /// is used if the process is gone.
    pub fn of_process(pid: i32, fallback_uid: u32, fallback_gid: u32) -> Credentials {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        Self::parse_status(pid, &status).unwrap_or(Credentials {
            pid,
            uid: fallback_uid,
            gid: fallback_gid,
            groups: vec![],
            cap_ipc_owner: fallback_uid == 0,
            cap_sys_admin: fallback_uid == 0,
            cap_ipc_lock: fallback_uid == 0,
        })
    }

    fn parse_status(pid: i32, status: &str) -> Option<Credentials> {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|rest| rest.split_whitespace().collect::<Vec<_>>())
        };
        // Uid:/Gid: list real, effective, saved, filesystem; the kernel's
        // IPC checks use the effective one.
        let uid = field("Uid:")?.get(1)?.parse().ok()?;
        let gid = field("Gid:")?.get(1)?.parse().ok()?;
        let groups = field("Groups:")
            .unwrap_or_default()
            .iter()
            .filter_map(|g| g.parse().ok())
            .collect();
        let caps = u64::from_str_radix(field("CapEff:")?.first()?, 16).ok()?;
        Some(Credentials {
            pid,
            uid,
            gid,
            groups,
            cap_ipc_owner: caps & (1 << CAP_IPC_OWNER) != 0,
            cap_sys_admin: caps & (1 << CAP_SYS_ADMIN) != 0,
            cap_ipc_lock: caps & (1 << CAP_IPC_LOCK) != 0,
        })
    }

    /// Root's credentials (for tools and tests that act as root).
    pub fn root(pid: i32) -> Credentials {
        Credentials {
            pid,
            uid: 0,
            gid: 0,
            groups: vec![],
            cap_ipc_owner: true,
            cap_sys_admin: true,
            cap_ipc_lock: true,
        }
    }

    /// Is `gid` among the process's groups (effective or supplementary)?
    pub fn has_group(&self, gid: u32) -> bool {
        self.in_group(gid)
    }

    fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// Ownership and mode of an IPC object (`struct ipc_perm`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcPerm {
    pub key: i32,
    pub uid: u32,
    pub gid: u32,
    pub cuid: u32,
    pub cgid: u32,
    pub mode: u32,
}

impl IpcPerm {
    pub fn new(key: i32, mode: u32, creator: &Credentials) -> IpcPerm {
        IpcPerm {
            key,
            uid: creator.uid,
            gid: creator.gid,
            cuid: creator.uid,
            cgid: creator.gid,
            mode: mode & 0o777,
        }
    }

    /// The kernel's `ipc_update_perm` (IPC_SET): owner, group and the
    /// permission bits; the other mode bits (SHM_DEST, SHM_LOCKED) stay.
    /// An id that maps to nobody ((uid_t) -1) is EINVAL.
    pub fn update(&mut self, uid: u32, gid: u32, mode: u32) -> Result<(), i32> {
        if uid == u32::MAX || gid == u32::MAX {
            return Err(libc::EINVAL);
        }
        self.uid = uid;
        self.gid = gid;
        self.mode = (self.mode & !0o777) | (mode & 0o777);
        Ok(())
    }

    /// The kernel's `ipcperms`: may `cred` access with the rwx bits of `flag`?
    pub fn permits(&self, cred: &Credentials, flag: u32) -> bool {
        let requested = (flag >> 6) | (flag >> 3) | flag;
        let mut granted = self.mode;
        if cred.uid == self.cuid || cred.uid == self.uid {
            granted >>= 6;
        } else if cred.in_group(self.cgid) || cred.in_group(self.gid) {
            granted >>= 3;
        }
        requested & !granted & 0o7 == 0 || cred.cap_ipc_owner
    }

    /// `IPC_SET`/`IPC_RMID` are for the owner, the creator, or an admin.
    pub fn may_control(&self, cred: &Credentials) -> bool {
        cred.uid == self.uid || cred.uid == self.cuid || cred.cap_sys_admin
    }

    /// Read access for `shmat(SHM_RDONLY)`/`IPC_STAT`, read-write for `shmat`.
    pub fn permits_attach(&self, cred: &Credentials, readonly: bool) -> bool {
        self.permits(cred, if readonly { S_IRUGO } else { S_IRUGO | S_IWUGO })
    }

    pub fn permits_read(&self, cred: &Credentials) -> bool {
        self.permits(cred, S_IRUGO)
    }
}

pub fn now_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The soft RLIMIT_MEMLOCK of local process `pid`, in bytes (from
/// `/proc/PID/limits`; `u64::MAX` for unlimited, 0 if unreadable).
pub fn memlock_limit(pid: i32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max locked memory"))
        .and_then(|rest| rest.split_whitespace().next().map(str::to_string))
        .map_or(0, |soft| {
            if soft == "unlimited" {
                u64::MAX
            } else {
                soft.parse().unwrap_or(0)
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cred(uid: u32, gid: u32, groups: Vec<u32>) -> Credentials {
        Credentials {
            pid: 1,
            uid,
            gid,
            groups,
            cap_ipc_owner: uid == 0,
            cap_sys_admin: uid == 0,
            cap_ipc_lock: uid == 0,
        }
    }

    #[test]
    fn ipcperms_follows_owner_group_other() {
        let owner = cred(1000, 100, vec![]);
        let perm = IpcPerm::new(1, 0o640, &owner);
        assert!(perm.permits_attach(&owner, false));
        assert!(perm.permits_attach(&cred(2000, 100, vec![]), true));
        assert!(!perm.permits_attach(&cred(2000, 100, vec![]), false));
        assert!(perm.permits_attach(&cred(2000, 5, vec![100]), true));
        assert!(!perm.permits_attach(&cred(2000, 5, vec![]), true));
        assert!(perm.permits_attach(&cred(0, 0, vec![]), false));
        assert!(!perm.may_control(&cred(2000, 100, vec![])));
        // shmget with mode bits asks for them.
        assert!(!perm.permits(&cred(2000, 100, vec![]), 0o660));
        assert!(perm.permits(&cred(2000, 100, vec![]), 0o040));
    }

    #[test]
    fn credentials_parse_effective_ids() {
        let status = "Name:\tx\nUid:\t0\t33\t33\t33\nGid:\t0\t44\t44\t44\nGroups:\t4 27 \nCapEff:\t0000000000000000\n";
        let c = Credentials::parse_status(7, status).unwrap();
        assert_eq!(
            (c.uid, c.gid, c.groups, c.cap_ipc_owner),
            (33, 44, vec![4, 27], false)
        );
    }
}
