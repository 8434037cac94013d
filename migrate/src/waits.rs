//! A moved process's waits for its children at home. Its children stay
//! with the parked home process, whose children they are: a `wait4` or
//! `waitid` in the copy that may concern them is caught by the filter and
//! carried out at home as a `waitid` (`Call::Wait`), and its answer is put
//! back in the form the caller asked for. This module is the pure part:
//! reading the call, and writing its answer.

/// `waitid`'s id types (the kernel's values).
const P_ALL: i32 = 0;
const P_PID: i32 = 1;
const P_PGID: i32 = 2;
/// Options `wait4` takes (the kernel refuses others with EINVAL).
const WAIT4_OPTIONS: i32 = libc::WNOHANG
    | libc::WUNTRACED
    | libc::WCONTINUED
    | libc::__WNOTHREAD
    | libc::__WCLONE
    | libc::__WALL;

/// Sizes of what a wait writes.
pub const SIGINFO_LEN: usize = 128;
pub const RUSAGE_LEN: usize = 144;

/// Where the answer goes in the caller's memory (0: nowhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `wait4`: the status word and the resource usage.
    Status { status: u64, rusage: u64 },
    /// `waitid`: the `siginfo_t` and the resource usage.
    Info { info: u64, rusage: u64 },
}

/// A wait, in `waitid`'s terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitRequest {
    pub idtype: i32,
    pub id: u64,
    /// `waitid` options (`wait4`'s with WEXITED added).
    pub options: i32,
    pub answer: Answer,
}

/// Which children a wait is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// One child, by pid.
    Child(i32),
    /// Any child, or any of a process group.
    Any,
}

impl WaitRequest {
    pub fn target(&self) -> Target {
        if self.idtype == P_PID {
            Target::Child(self.id as i32)
        } else {
            Target::Any
        }
    }

    /// For any child at all (not one, not a group's).
    pub fn is_any_child(&self) -> bool {
        self.idtype == P_ALL
    }

    pub fn waits(&self) -> bool {
        self.options & libc::WNOHANG == 0
    }

    /// Whether a child in state `state` (a /proc state letter) has
    /// something for this wait now.
    pub fn ready_in(&self, state: char) -> bool {
        match state {
            'Z' => self.options & libc::WEXITED != 0,
            'T' => self.options & libc::WSTOPPED != 0,
            _ => false,
        }
    }

    /// The call as the deputy makes it (`nohang`: never waits there).
    pub fn call(&self, nohang: bool) -> crate::forward::Call {
        crate::forward::Call::Wait {
            idtype: self.idtype,
            id: self.id,
            options: self.options | if nohang { libc::WNOHANG } else { 0 },
        }
    }

    /// What the caller gets for the home `waitid`'s `result` and the
    /// bytes it wrote (`siginfo_t`, then `struct rusage`): the value it
    /// returns and the bytes to write where (address, bytes).
    pub fn answer(&self, result: i64, data: &[u8]) -> (i64, Vec<(u64, Vec<u8>)>) {
        if result < 0 {
            return (result, Vec::new());
        }
        let info = data.get(..SIGINFO_LEN).unwrap_or(&[]);
        let rusage = data.get(SIGINFO_LEN..SIGINFO_LEN + RUSAGE_LEN);
        let mut writes = Vec::new();
        let mut write = |addr: u64, bytes: Option<&[u8]>| {
            if let (true, Some(b)) = (addr != 0, bytes) {
                writes.push((addr, b.to_vec()));
            }
        };
        match self.answer {
            Answer::Info {
                info: at,
                rusage: usage,
            } => {
                write(at, Some(info).filter(|i| i.len() == SIGINFO_LEN));
                write(usage, rusage);
                (0, writes)
            }
            Answer::Status {
                status,
                rusage: usage,
            } => {
                let Some(child) = child_of(info).filter(|&c| c != 0) else {
                    // WNOHANG and nothing yet: wait4 writes nothing.
                    return (0, writes);
                };
                let word = status_word(info).to_le_bytes();
                write(status, Some(&word));
                write(usage, rusage);
                (i64::from(child), writes)
            }
        }
    }
}

/// The wait `nr(args)` asks for; None for one that is not about children
/// by pid or group (a pidfd's) or that the kernel refuses as it is: it
/// runs as it is.
pub fn wait_request(nr: i64, args: [u64; 6]) -> Option<WaitRequest> {
    match nr {
        libc::SYS_wait4 => {
            let pid = args[0] as i32;
            let options = args[2] as i32;
            if options & !WAIT4_OPTIONS != 0 {
                return None;
            }
            let (idtype, id) = match pid {
                -1 => (P_ALL, 0),
                0 => (P_PGID, 0),
                p if p < -1 => (P_PGID, u64::from(p.unsigned_abs())),
                p => (P_PID, p as u64),
            };
            Some(WaitRequest {
                idtype,
                id,
                options: options | libc::WEXITED,
                answer: Answer::Status {
                    status: args[1],
                    rusage: args[3],
                },
            })
        }
        libc::SYS_waitid => {
            let idtype = args[0] as i32;
            if !matches!(idtype, P_ALL | P_PID | P_PGID) {
                return None;
            }
            Some(WaitRequest {
                idtype,
                id: args[1] as u32 as u64,
                options: args[3] as i32,
                answer: Answer::Info {
                    info: args[2],
                    rusage: args[4],
                },
            })
        }
        _ => None,
    }
}

fn int_at(bytes: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// The child a `siginfo_t` of SIGCHLD is about (0: none).
pub fn child_of(info: &[u8]) -> Option<i32> {
    int_at(info, 16)
}

/// The `wait4` status word for a SIGCHLD `siginfo_t` (si_code, si_status).
fn status_word(info: &[u8]) -> i32 {
    let code = int_at(info, 8).unwrap_or(0);
    let status = int_at(info, 24).unwrap_or(0);
    match code {
        libc::CLD_EXITED => (status & 0xff) << 8,
        libc::CLD_KILLED => status & 0x7f,
        libc::CLD_DUMPED => (status & 0x7f) | 0x80,
        libc::CLD_STOPPED | libc::CLD_TRAPPED => ((status & 0xff) << 8) | 0x7f,
        libc::CLD_CONTINUED => 0xffff,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(code: i32, pid: i32, status: i32) -> Vec<u8> {
        let mut b = vec![0u8; SIGINFO_LEN + RUSAGE_LEN];
        b[0..4].copy_from_slice(&libc::SIGCHLD.to_le_bytes());
        b[8..12].copy_from_slice(&code.to_le_bytes());
        b[16..20].copy_from_slice(&pid.to_le_bytes());
        b[24..28].copy_from_slice(&status.to_le_bytes());
        b[SIGINFO_LEN] = 7;
        b
    }

    fn status_of(code: i32, status: i32) -> i32 {
        let req = wait_request(libc::SYS_wait4, [u64::MAX, 0x1000, 0, 0, 0, 0]).unwrap();
        let (pid, writes) = req.answer(0, &info(code, 42, status));
        assert_eq!(pid, 42);
        assert_eq!(writes.len(), 1, "only the status: no rusage asked");
        i32::from_le_bytes(writes[0].1.clone().try_into().unwrap())
    }

    #[test]
    fn status_words_are_the_kernels() {
        let exited = status_of(libc::CLD_EXITED, 3);
        assert!(libc::WIFEXITED(exited) && libc::WEXITSTATUS(exited) == 3);
        let killed = status_of(libc::CLD_KILLED, libc::SIGTERM);
        assert!(libc::WIFSIGNALED(killed) && libc::WTERMSIG(killed) == libc::SIGTERM);
        assert!(!libc::WCOREDUMP(killed));
        let dumped = status_of(libc::CLD_DUMPED, libc::SIGSEGV);
        assert!(libc::WCOREDUMP(dumped) && libc::WTERMSIG(dumped) == libc::SIGSEGV);
        let stopped = status_of(libc::CLD_STOPPED, libc::SIGSTOP);
        assert!(libc::WIFSTOPPED(stopped) && libc::WSTOPSIG(stopped) == libc::SIGSTOP);
        assert!(libc::WIFCONTINUED(status_of(
            libc::CLD_CONTINUED,
            libc::SIGCONT
        )));
    }

    #[test]
    fn wait4_targets_are_waitids() {
        let req = |pid: i64, options: i32| {
            wait_request(libc::SYS_wait4, [pid as u64, 0, options as u64, 0, 0, 0])
        };
        let r = req(-1, 0).unwrap();
        assert_eq!(
            (r.idtype, r.target(), r.waits()),
            (P_ALL, Target::Any, true)
        );
        assert_eq!(r.options, libc::WEXITED);
        assert_eq!(req(0, 0).unwrap().idtype, P_PGID);
        let group = req(-77, libc::WNOHANG).unwrap();
        assert_eq!((group.idtype, group.id, group.waits()), (P_PGID, 77, false));
        assert_eq!(req(9, 0).unwrap().target(), Target::Child(9));
        assert!(req(9, libc::WUNTRACED).unwrap().ready_in('T'));
        assert!(!req(9, 0).unwrap().ready_in('T'));
        assert!(req(9, 0).unwrap().ready_in('Z'));
        // What the kernel refuses runs as it is, to be refused there.
        assert_eq!(req(9, 0x40), None);
    }

    #[test]
    fn nothing_yet_writes_nothing_for_wait4_and_zeros_for_waitid() {
        let req = wait_request(libc::SYS_wait4, [u64::MAX, 0x1000, 1, 0x2000, 0, 0]).unwrap();
        assert_eq!(
            req.answer(0, &[0; SIGINFO_LEN + RUSAGE_LEN]),
            (0, Vec::new())
        );
        let id = wait_request(libc::SYS_waitid, [0, 0, 0x1000, 5, 0x2000, 0]).unwrap();
        let (r, writes) = id.answer(0, &[0; SIGINFO_LEN + RUSAGE_LEN]);
        assert_eq!(r, 0);
        assert_eq!(writes[0], (0x1000, vec![0; SIGINFO_LEN]));
        assert_eq!(writes[1].0, 0x2000);
        // A pidfd's wait is not about a pid.
        assert_eq!(wait_request(libc::SYS_waitid, [3, 5, 0, 4, 0, 0]), None);
    }

    #[test]
    fn errors_write_nothing() {
        let req = wait_request(libc::SYS_wait4, [5, 0x1000, 0, 0x2000, 0, 0]).unwrap();
        let ours = -i64::from(libc::ECHILD);
        assert_eq!(
            req.answer(ours, &info(libc::CLD_EXITED, 5, 0)),
            (ours, Vec::new())
        );
        let (pid, writes) = req.answer(0, &info(libc::CLD_EXITED, 5, 0));
        assert_eq!(pid, 5);
        assert_eq!(
            writes[1],
            (0x2000, {
                let mut usage = vec![0u8; RUSAGE_LEN];
                usage[0] = 7;
                usage
            })
        );
    }
}
