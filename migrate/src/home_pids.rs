//! Calls of a moved process that name another process by pid: signals
//! (`kill`, `tkill`, `tgkill`, `rt_sigqueueinfo`, `rt_tgsigqueueinfo`),
//! process groups (`getpgid`, `getsid`, `setpgid`), and its parent
//! (`getppid`, whose answer names one). The pids a process
//! knows are its home node's (its parent, its children there, what it read
//! before the move): on the node it runs on they name other processes, or
//! none. Such a call is carried out at home by the home process itself
//! (`Call::ByPid`), so that it reaches the process meant, with the home
//! pid's permissions and as its sender, as openMosix's deputy did; a
//! signal to the home pid reaches the moved process through the deputy.
//! Only the process itself and what it started where it runs are this
//! node's. This module decides, purely; `host_calls.rs` asks /proc.

use crate::forward::{Call, CallerMemory};

/// Calls this module decides about.
pub const CALLS: [libc::c_long; 9] = [
    libc::SYS_getppid,
    libc::SYS_kill,
    libc::SYS_tkill,
    libc::SYS_tgkill,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_tgsigqueueinfo,
    libc::SYS_getpgid,
    libc::SYS_getsid,
    libc::SYS_setpgid,
];

/// Size of the `siginfo_t` the queueing calls take.
const SIGINFO_LEN: usize = 128;

/// What to do with one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PidDecision {
    /// It names the caller itself or a process started here.
    RunHere,
    /// Carried out by the home process.
    AtHome(Call),
    /// A signal to the caller's own group: carried out at home (the home
    /// process and the group's members there), and sent here to the
    /// members of the group started here.
    AtHomeAndGroupHere { call: Call, signal: i32 },
    /// Answer at once (EFAULT for an unreadable `siginfo_t`).
    Answer(i64),
}

/// What the host knows about pids where the process runs.
pub trait LocalPids {
    /// `pid` is the moved process or one it started here (or theirs).
    fn is_local(&self, pid: i32) -> bool;
    /// The caller's process group here.
    fn own_group(&self) -> i32;
    /// The caller is the moved process (not one it started here).
    fn caller_is_the_process(&self) -> bool;
}

/// Decide about call `nr(args)`.
pub fn decide(
    nr: i64,
    args: [u64; 6],
    local: &dyn LocalPids,
    mem: &dyn CallerMemory,
) -> PidDecision {
    let pid = args[0] as i32;
    let at_home = |info_at: Option<usize>| -> PidDecision {
        let info = match info_at {
            Some(i) => match mem.read(args[i], SIGINFO_LEN) {
                Ok(bytes) => bytes,
                Err(_) => return PidDecision::Answer(-i64::from(libc::EFAULT)),
            },
            None => Vec::new(),
        };
        PidDecision::AtHome(Call::ByPid {
            nr,
            args: [args[0], args[1], args[2], args[3]],
            info,
        })
    };
    match nr {
        // Its parent is at home (here, its parent is the restore's).
        libc::SYS_getppid if local.caller_is_the_process() => at_home(None),
        libc::SYS_getppid => PidDecision::RunHere,
        libc::SYS_kill => {
            let signal = args[1] as i32;
            match pid {
                // The caller's group: here and at home.
                0 => group_here_and_home(nr, args, signal),
                p if p < -1 && p.unsigned_abs() as i32 == local.own_group() => {
                    group_here_and_home(nr, args, signal)
                }
                // -1 (every process it may signal) and other groups: its
                // world is its home's.
                p if p < 0 => at_home(None),
                p if local.is_local(p) => PidDecision::RunHere,
                _ => at_home(None),
            }
        }
        libc::SYS_tkill
        | libc::SYS_tgkill
        | libc::SYS_getpgid
        | libc::SYS_getsid
        | libc::SYS_setpgid => {
            if pid == 0 || local.is_local(pid) {
                PidDecision::RunHere
            } else {
                at_home(None)
            }
        }
        libc::SYS_rt_sigqueueinfo | libc::SYS_rt_tgsigqueueinfo => {
            if pid > 0 && local.is_local(pid) {
                PidDecision::RunHere
            } else {
                let info_at = if nr == libc::SYS_rt_sigqueueinfo {
                    2
                } else {
                    3
                };
                at_home(Some(info_at))
            }
        }
        _ => PidDecision::RunHere,
    }
}

fn group_here_and_home(nr: i64, args: [u64; 6], signal: i32) -> PidDecision {
    PidDecision::AtHomeAndGroupHere {
        // At home, the home process's own group.
        call: Call::ByPid {
            nr,
            args: [0, args[1], 0, 0],
            info: Vec::new(),
        },
        signal,
    }
}

/// Whether call `nr` sends a signal.
pub fn sends_signal(nr: i64) -> bool {
    matches!(
        nr,
        libc::SYS_kill
            | libc::SYS_tkill
            | libc::SYS_tgkill
            | libc::SYS_rt_sigqueueinfo
            | libc::SYS_rt_tgsigqueueinfo
    )
}

/// Where a `Call::ByPid`'s `siginfo_t` goes in its arguments, if it has
/// one; None for a call that is not one of ours (refused at home).
pub fn info_argument(nr: i64) -> Option<Option<usize>> {
    match nr {
        libc::SYS_rt_sigqueueinfo => Some(Some(2)),
        libc::SYS_rt_tgsigqueueinfo => Some(Some(3)),
        n if CALLS.contains(&n) => Some(None),
        _ => None,
    }
}

/// In a `siginfo_t` a queueing call passes, the sender `here` (the moved
/// process's pid where it runs, as glibc's `sigqueue` writes it) becomes
/// `home`, the pid the receiver knows it by.
pub fn sender_seen_at_home(info: &mut [u8], here: i32, home: i32) {
    if let Some(sender) = info.get_mut(16..20) {
        if sender == here.to_le_bytes() {
            sender.copy_from_slice(&home.to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Node;

    impl LocalPids for Node {
        fn is_local(&self, pid: i32) -> bool {
            pid == 500 || pid == 501
        }
        fn own_group(&self) -> i32 {
            500
        }
        fn caller_is_the_process(&self) -> bool {
            true
        }
    }

    struct Memory;

    impl CallerMemory for Memory {
        fn read(&self, addr: u64, len: usize) -> std::io::Result<Vec<u8>> {
            if addr == 0x1000 {
                Ok(vec![7; len])
            } else {
                Err(std::io::Error::from_raw_os_error(libc::EFAULT))
            }
        }
        fn cwd(&self) -> std::io::Result<String> {
            Ok("/".into())
        }
    }

    fn decide_on(nr: i64, args: [u64; 6]) -> PidDecision {
        decide(nr, args, &Node, &Memory)
    }

    fn by_pid(nr: i64, args: [u64; 4], info: Vec<u8>) -> PidDecision {
        PidDecision::AtHome(Call::ByPid { nr, args, info })
    }

    #[test]
    fn signals_to_home_pids_go_home_and_to_local_ones_stay() {
        let sig = libc::SIGUSR1 as u64;
        assert_eq!(
            decide_on(libc::SYS_kill, [501, sig, 0, 0, 0, 0]),
            PidDecision::RunHere
        );
        assert_eq!(
            decide_on(libc::SYS_kill, [77, sig, 0, 0, 0, 0]),
            by_pid(libc::SYS_kill, [77, sig, 0, 0], Vec::new())
        );
        let broadcast = (-1i64) as u64;
        assert_eq!(
            decide_on(libc::SYS_kill, [broadcast, sig, 0, 0, 0, 0]),
            by_pid(libc::SYS_kill, [broadcast, sig, 0, 0], Vec::new())
        );
        assert_eq!(
            decide_on(libc::SYS_tgkill, [77, 77, sig, 0, 0, 0]),
            by_pid(libc::SYS_tgkill, [77, 77, sig, 0], Vec::new())
        );
        assert_eq!(
            decide_on(libc::SYS_tgkill, [500, 500, sig, 0, 0, 0]),
            PidDecision::RunHere
        );
    }

    #[test]
    fn its_own_group_is_signalled_on_both_sides() {
        let sig = libc::SIGHUP as u64;
        let both = PidDecision::AtHomeAndGroupHere {
            call: Call::ByPid {
                nr: libc::SYS_kill,
                args: [0, sig, 0, 0],
                info: Vec::new(),
            },
            signal: libc::SIGHUP,
        };
        assert_eq!(decide_on(libc::SYS_kill, [0, sig, 0, 0, 0, 0]), both);
        assert_eq!(
            decide_on(libc::SYS_kill, [(-500i64) as u64, sig, 0, 0, 0, 0]),
            both
        );
        // Another group: its home's.
        let other = (-77i64) as u64;
        assert_eq!(
            decide_on(libc::SYS_kill, [other, sig, 0, 0, 0, 0]),
            by_pid(libc::SYS_kill, [other, sig, 0, 0], Vec::new())
        );
    }

    #[test]
    fn queued_signals_carry_their_siginfo_home() {
        assert_eq!(
            decide_on(libc::SYS_rt_sigqueueinfo, [77, 10, 0x1000, 0, 0, 0]),
            by_pid(libc::SYS_rt_sigqueueinfo, [77, 10, 0x1000, 0], vec![7; 128])
        );
        assert_eq!(
            decide_on(libc::SYS_rt_tgsigqueueinfo, [77, 77, 10, 0x2000, 0, 0]),
            PidDecision::Answer(-i64::from(libc::EFAULT))
        );
        assert_eq!(
            decide_on(libc::SYS_rt_sigqueueinfo, [500, 10, 0x2000, 0, 0, 0]),
            PidDecision::RunHere
        );
        assert_eq!(info_argument(libc::SYS_rt_tgsigqueueinfo), Some(Some(3)));
        assert_eq!(info_argument(libc::SYS_kill), Some(None));
        assert_eq!(info_argument(libc::SYS_execve), None);
        let mut info = vec![0u8; 128];
        info[16..20].copy_from_slice(&500i32.to_le_bytes());
        sender_seen_at_home(&mut info, 500, 42);
        assert_eq!(info[16..20], 42i32.to_le_bytes());
        sender_seen_at_home(&mut info, 500, 43);
        assert_eq!(info[16..20], 42i32.to_le_bytes(), "another sender stays");
    }

    #[test]
    fn its_parent_is_asked_at_home() {
        assert_eq!(
            decide_on(libc::SYS_getppid, [0; 6]),
            by_pid(libc::SYS_getppid, [0; 4], Vec::new())
        );
    }

    #[test]
    fn groups_of_home_pids_are_asked_at_home() {
        assert_eq!(
            decide_on(libc::SYS_getpgid, [0, 0, 0, 0, 0, 0]),
            PidDecision::RunHere
        );
        assert_eq!(
            decide_on(libc::SYS_getsid, [501, 0, 0, 0, 0, 0]),
            PidDecision::RunHere
        );
        assert_eq!(
            decide_on(libc::SYS_getpgid, [77, 0, 0, 0, 0, 0]),
            by_pid(libc::SYS_getpgid, [77, 0, 0, 0], Vec::new())
        );
        assert_eq!(
            decide_on(libc::SYS_setpgid, [77, 77, 0, 0, 0, 0]),
            by_pid(libc::SYS_setpgid, [77, 77, 0, 0], Vec::new())
        );
    }
}
