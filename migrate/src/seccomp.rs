//! The seccomp filter that sends a moved process's calls on its stand-in
//! descriptors to its host (user notification), and the host's side of
//! the notification descriptor: receiving, answering, and the calling
//! task's memory.
//!
//! With `ptrace.rs` and `home_io.rs`, the only modules of the crate with
//! `unsafe`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// Offsets in `struct seccomp_data`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const fn data_arg_low(i: u32) -> u32 {
    // Descriptors are 32-bit: the low half of the 64-bit argument (x86-64
    // is little-endian).
    16 + 8 * i
}
/// Wake the task that waits for an answer on the CPU of the one that
/// answers (SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP, Linux 6.6).
const NOTIF_FD_SYNC_WAKE_UP: u64 = 1;
/// Most descriptors one filter watches (its jumps reach at most 255
/// instructions).
pub const MOST_WATCHED: usize = 60;

/// Which descriptors the filter watches, and how.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Watched {
    /// Stand-ins: every call on them that `forward.rs` knows goes home.
    pub stand_ins: Vec<i32>,
    /// Files reopened here whose locks are taken at home: only `fcntl`,
    /// `flock`, and what closes them.
    pub lock_homes: Vec<i32>,
    /// `wait4` and `waitid`: the process has children at home.
    pub waits: bool,
    /// The calls that name a process by pid (`home_pids.rs`): a moved
    /// process's.
    pub pids: bool,
}

impl Watched {
    pub fn is_empty(&self) -> bool {
        self.stand_ins.is_empty() && self.lock_homes.is_empty() && !self.waits && !self.pids
    }

    fn all(&self) -> Vec<i32> {
        self.stand_ins
            .iter()
            .chain(&self.lock_homes)
            .copied()
            .collect()
    }
}

/// Calls whose first argument is a descriptor and that go home for a
/// stand-in.
const ON_STAND_INS: [libc::c_long; 25] = [
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_ftruncate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_fadvise64,
    libc::SYS_ioctl,
    libc::SYS_dup,
    libc::SYS_timerfd_gettime,
    libc::SYS_timerfd_settime,
    libc::SYS_inotify_add_watch,
    libc::SYS_inotify_rm_watch,
];
/// Calls that go home for a stand-in and for a file whose locks are kept
/// at home.
const ON_ALL: [libc::c_long; 3] = [libc::SYS_fcntl, libc::SYS_flock, libc::SYS_close];

/// One BPF instruction.
fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

fn load(offset: u32) -> libc::sock_filter {
    stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset)
}

fn ret(action: u32) -> libc::sock_filter {
    stmt(libc::BPF_RET | libc::BPF_K, action)
}

/// `arg`'s low half is one of `fds`: notify; otherwise go on with the
/// instruction after the block, or allow if `then_allow`.
fn match_block(arg: u32, fds: &[i32], then_allow: bool) -> Vec<libc::sock_filter> {
    let mut block = vec![load(data_arg_low(arg))];
    let n = fds.len();
    for (i, &fd) in fds.iter().enumerate() {
        // To the notify at the end: past the other comparisons and the
        // allow (if any).
        block.push(jeq(fd as u32, (n - i) as u8, 0));
    }
    if then_allow {
        block.push(ret(libc::SECCOMP_RET_ALLOW));
        block.push(ret(libc::SECCOMP_RET_USER_NOTIF));
    } else {
        // A match jumps over this jump to the notify; none goes on.
        block.push(stmt(libc::BPF_JMP | libc::BPF_JA, 1));
        block.push(ret(libc::SECCOMP_RET_USER_NOTIF));
    }
    block
}

/// `close_range(first, last, _)` covers one of `fds`.
fn range_block(fds: &[i32]) -> Vec<libc::sock_filter> {
    let mut block = Vec::new();
    for &fd in fds {
        // first <= fd (not first > fd) and last >= fd: 4 instructions.
        block.push(load(data_arg_low(0)));
        block.push(libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16,
            jt: 2,
            jf: 0,
            k: fd as u32,
        });
        block.push(load(data_arg_low(1)));
        block.push(libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: fd as u32,
        });
    }
    // A true JGE at i skips the rest of the block and the allow.
    let len = block.len();
    for i in (3..len).step_by(4) {
        block[i].jt = (len - i) as u8;
    }
    block.push(ret(libc::SECCOMP_RET_ALLOW));
    block.push(ret(libc::SECCOMP_RET_USER_NOTIF));
    block
}

/// The filter for `watched`: the calls on them listed above are sent to
/// the listener, every other call runs as it would.
pub fn filter(watched: &Watched) -> io::Result<Vec<libc::sock_filter>> {
    let all = watched.all();
    if all.len() > MOST_WATCHED {
        return Err(io::Error::other(format!(
            "{} descriptors to forward (at most {MOST_WATCHED})",
            all.len()
        )));
    }
    // Blocks, each reached by a long jump from the dispatch on the number.
    let stand_ins = match_block(0, &watched.stand_ins, true);
    let everything = match_block(0, &all, true);
    // dup2/dup3: the target is one of them (it gets closed), or the source
    // is a stand-in.
    let mut dup_target = match_block(1, &all, false);
    dup_target.extend(match_block(0, &watched.stand_ins, true));
    // mmap of a stand-in: its descriptor is the fifth argument.
    let mapped = match_block(4, &watched.stand_ins, true);
    let ranges = range_block(&all);
    let mut routes: Vec<(libc::c_long, usize)> = Vec::new();
    for nr in ON_STAND_INS {
        routes.push((nr, 0));
    }
    for nr in ON_ALL {
        routes.push((nr, 1));
    }
    routes.push((libc::SYS_dup2, 2));
    routes.push((libc::SYS_dup3, 2));
    routes.push((libc::SYS_mmap, 3));
    routes.push((libc::SYS_close_range, 4));
    if watched.waits {
        routes.push((libc::SYS_wait4, 5));
        routes.push((libc::SYS_waitid, 5));
    }
    if watched.pids {
        for nr in crate::home_pids::CALLS {
            routes.push((nr, 5));
        }
    }
    let always = vec![ret(libc::SECCOMP_RET_USER_NOTIF)];
    let blocks = [stand_ins, everything, dup_target, mapped, ranges, always];

    let mut prog = vec![
        load(DATA_ARCH),
        // Another ABI (x32 calls carry a marked number): not ours to judge.
        jeq(AUDIT_ARCH_X86_64, 1, 0),
        ret(libc::SECCOMP_RET_ALLOW),
        load(DATA_NR),
    ];
    // Dispatch: per call, a comparison and a long jump (2 instructions).
    let dispatch_len = routes.len() * 2 + 1;
    let mut block_at = Vec::new();
    let mut at = 0;
    for b in &blocks {
        block_at.push(at);
        at += b.len();
    }
    for (i, &(nr, block)) in routes.iter().enumerate() {
        prog.push(jeq(nr as u32, 0, 1));
        // From the instruction after this jump to the block's start.
        let after_jump = i * 2 + 2;
        let offset = dispatch_len - after_jump + block_at[block];
        prog.push(stmt(libc::BPF_JMP | libc::BPF_JA, offset as u32));
    }
    prog.push(ret(libc::SECCOMP_RET_ALLOW));
    for b in blocks {
        prog.extend(b);
    }
    Ok(prog)
}

/// One intercepted call, as the kernel reports it.
#[derive(Debug, Clone, Copy)]
pub struct Notification {
    pub id: u64,
    /// The calling thread (its tid in our pid namespace).
    pub pid: i32,
    pub nr: i64,
    pub args: [u64; 6],
}

/// The host's end of a moved process's filter.
pub struct Listener {
    fd: OwnedFd,
}

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Listener {
    pub fn new(fd: OwnedFd) -> Listener {
        // Faster answers where the kernel has it; nothing lost without.
        let flags = NOTIF_FD_SYNC_WAKE_UP;
        // SAFETY: the ioctl reads a u64 flag word we pass by pointer.
        let _ = unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS as _,
                &flags as *const u64,
            )
        };
        Listener { fd }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// The next call waiting for an answer (the listener was readable);
    /// None if it went away meanwhile (its caller got a signal).
    pub fn receive(&self) -> io::Result<Option<Notification>> {
        // SAFETY: the kernel requires a zeroed buffer, which it fills.
        let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: n is a live seccomp_notif the ioctl writes.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_RECV as _,
                &mut n as *mut libc::seccomp_notif,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::EINTR) | Some(libc::EAGAIN) => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(Notification {
            id: n.id,
            pid: n.pid as i32,
            nr: i64::from(n.data.nr),
            args: n.data.args,
        }))
    }

    /// Whether the call is still waiting (a signal may have ended it).
    pub fn still_waiting(&self, id: u64) -> bool {
        // SAFETY: the ioctl reads the u64 id we pass by pointer.
        unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_ID_VALID as _,
                &id as *const u64,
            ) == 0
        }
    }

    fn send(&self, resp: &libc::seccomp_notif_resp) -> io::Result<()> {
        self.send_reached(resp).map(|_| ())
    }

    /// Send an answer; false if its caller had already left the call.
    fn send_reached(&self, resp: &libc::seccomp_notif_resp) -> io::Result<bool> {
        // SAFETY: resp is a live seccomp_notif_resp the ioctl reads.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_SEND as _,
                resp as *const libc::seccomp_notif_resp,
            )
        };
        match check(r as libc::c_long) {
            Ok(_) => Ok(true),
            // The caller went away (signal, death): nobody to answer.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Let the call run as it would have without the filter.
    pub fn run_as_is(&self, id: u64) -> io::Result<()> {
        self.send(&libc::seccomp_notif_resp {
            id,
            val: 0,
            error: 0,
            flags: libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
        })
    }

    /// Answer the call: `result` is what it returns (a negative errno on
    /// failure, as the kernel returns it).
    pub fn answer(&self, id: u64, result: i64) -> io::Result<()> {
        self.answer_reached(id, result).map(|_| ())
    }

    /// `answer`, telling whether the caller still waited for it (false:
    /// it had left the call, for a signal).
    pub fn answer_reached(&self, id: u64, result: i64) -> io::Result<bool> {
        let (val, error) = if (-4095..0).contains(&result) {
            (0, result as i32)
        } else {
            (result, 0)
        };
        self.send_reached(&libc::seccomp_notif_resp {
            id,
            val,
            error,
            flags: 0,
        })
    }
}

/// Read `len` bytes of task `pid`'s memory at `addr`.
pub fn read_task(pid: i32, addr: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    if len == 0 {
        return Ok(buf);
    }
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: local describes our live buffer; remote is only read, in
    // the other process, by the kernel.
    let got =
        check(unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) } as libc::c_long)?;
    if got as usize != len {
        return Err(io::Error::from_raw_os_error(libc::EFAULT));
    }
    Ok(buf)
}

/// Write `data` into task `pid`'s memory at `addr`.
pub fn write_task(pid: i32, addr: u64, data: &[u8]) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    let local = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: local describes our live buffer, only read; remote is
    // written, in the other process, by the kernel.
    let put =
        check(unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) } as libc::c_long)?;
    if put as usize != data.len() {
        return Err(io::Error::from_raw_os_error(libc::EFAULT));
    }
    Ok(())
}

/// The filter as the `struct sock_fprog` bytes `seccomp(2)` takes, with
/// its instructions at `at + 16` in the same buffer.
pub fn fprog_bytes(prog: &[libc::sock_filter], at: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(16 + prog.len() * 8);
    bytes.extend_from_slice(&(prog.len() as u16).to_le_bytes());
    bytes.extend_from_slice(&[0u8; 6]);
    bytes.extend_from_slice(&(at + 16).to_le_bytes());
    for i in prog {
        bytes.extend_from_slice(&i.code.to_le_bytes());
        bytes.push(i.jt);
        bytes.push(i.jf);
        bytes.extend_from_slice(&i.k.to_le_bytes());
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run the filter on one call, as the kernel would (the subset of
    /// classic BPF the builder emits).
    fn run(prog: &[libc::sock_filter], nr: i64, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&(nr as u32).to_le_bytes());
        data[4..8].copy_from_slice(&AUDIT_ARCH_X86_64.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            let code = u32::from(i.code);
            pc += 1;
            if code == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS {
                let k = i.k as usize;
                acc = u32::from_le_bytes(data[k..k + 4].try_into().unwrap());
            } else if code == libc::BPF_RET | libc::BPF_K {
                return i.k;
            } else if code == libc::BPF_JMP | libc::BPF_JA {
                pc += i.k as usize;
            } else {
                let taken = match code & 0xf0 {
                    c if c == libc::BPF_JEQ => acc == i.k,
                    c if c == libc::BPF_JGT => acc > i.k,
                    c if c == libc::BPF_JGE => acc >= i.k,
                    other => panic!("unexpected jump {other:#x}"),
                };
                pc += usize::from(if taken { i.jt } else { i.jf });
            }
        }
    }

    const NOTIFY: u32 = libc::SECCOMP_RET_USER_NOTIF;
    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;

    fn watched() -> Watched {
        Watched {
            stand_ins: vec![3, 7],
            lock_homes: vec![5],
            waits: false,
            pids: false,
        }
    }

    #[test]
    fn waits_and_pid_calls_are_sent_only_when_asked_for() {
        let prog = filter(&watched()).unwrap();
        assert_eq!(
            run(&prog, libc::SYS_wait4, [u64::MAX, 0, 0, 0, 0, 0]),
            ALLOW
        );
        let prog = filter(&Watched {
            waits: true,
            ..watched()
        })
        .unwrap();
        assert_eq!(
            run(&prog, libc::SYS_wait4, [u64::MAX, 0, 0, 0, 0, 0]),
            NOTIFY
        );
        assert_eq!(run(&prog, libc::SYS_waitid, [0, 0, 0, 4, 0, 0]), NOTIFY);
        assert_eq!(run(&prog, libc::SYS_read, [3, 0, 0, 0, 0, 0]), NOTIFY);
        assert_eq!(run(&prog, libc::SYS_read, [4, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(run(&prog, libc::SYS_getppid, [0; 6]), ALLOW);
        assert_eq!(run(&prog, libc::SYS_kill, [9, 9, 0, 0, 0, 0]), ALLOW);
        let prog = filter(&Watched {
            pids: true,
            ..watched()
        })
        .unwrap();
        assert_eq!(run(&prog, libc::SYS_kill, [9, 9, 0, 0, 0, 0]), NOTIFY);
        assert_eq!(run(&prog, libc::SYS_getsid, [0; 6]), NOTIFY);
        assert_eq!(run(&prog, libc::SYS_wait4, [0; 6]), ALLOW);
    }

    #[test]
    fn calls_on_stand_ins_are_sent_and_others_run() {
        let prog = filter(&watched()).unwrap();
        let on = |nr, fd| run(&prog, nr, [fd, 0, 0, 0, 0, 0]);
        assert_eq!(on(libc::SYS_read, 3), NOTIFY);
        assert_eq!(on(libc::SYS_pwrite64, 7), NOTIFY);
        assert_eq!(on(libc::SYS_read, 4), ALLOW);
        // A file whose locks stay home: only locks and closing.
        assert_eq!(on(libc::SYS_read, 5), ALLOW);
        assert_eq!(on(libc::SYS_fcntl, 5), NOTIFY);
        assert_eq!(on(libc::SYS_close, 5), NOTIFY);
        assert_eq!(on(libc::SYS_close, 6), ALLOW);
        assert_eq!(on(libc::SYS_getpid, 3), ALLOW);
        // Only the low half names the descriptor.
        assert_eq!(on(libc::SYS_read, (1 << 32) | 3), NOTIFY);
    }

    #[test]
    fn dups_mappings_and_ranges_that_touch_them_are_sent() {
        let prog = filter(&watched()).unwrap();
        let call = |nr, args| run(&prog, nr, args);
        assert_eq!(call(libc::SYS_dup2, [1, 5, 0, 0, 0, 0]), NOTIFY);
        assert_eq!(call(libc::SYS_dup3, [3, 9, 0, 0, 0, 0]), NOTIFY);
        assert_eq!(call(libc::SYS_dup3, [5, 9, 0, 0, 0, 0]), ALLOW);
        assert_eq!(call(libc::SYS_dup2, [1, 2, 0, 0, 0, 0]), ALLOW);
        assert_eq!(call(libc::SYS_mmap, [0, 4096, 1, 1, 7, 0]), NOTIFY);
        assert_eq!(call(libc::SYS_mmap, [0, 4096, 1, 1, 4, 0]), ALLOW);
        assert_eq!(call(libc::SYS_close_range, [4, 6, 0, 0, 0, 0]), NOTIFY);
        assert_eq!(call(libc::SYS_close_range, [8, 100, 0, 0, 0, 0]), ALLOW);
        assert_eq!(call(libc::SYS_close_range, [0, 2, 0, 0, 0, 0]), ALLOW);
        assert_eq!(
            call(libc::SYS_close_range, [3, u32::MAX as u64, 0, 0, 0, 0]),
            NOTIFY
        );
    }

    #[test]
    fn many_descriptors_still_jump_right() {
        let watched = Watched {
            stand_ins: (10..40).collect(),
            lock_homes: (100..120).collect(),
            waits: true,
            pids: true,
        };
        let prog = filter(&watched).unwrap();
        for fd in 0..130u64 {
            let want = if (10..40).contains(&fd) {
                NOTIFY
            } else {
                ALLOW
            };
            assert_eq!(
                run(&prog, libc::SYS_write, [fd, 0, 0, 0, 0, 0]),
                want,
                "write {fd}"
            );
            let any = (10..40).contains(&fd) || (100..120).contains(&fd);
            let want = if any { NOTIFY } else { ALLOW };
            assert_eq!(
                run(&prog, libc::SYS_flock, [fd, 0, 0, 0, 0, 0]),
                want,
                "flock {fd}"
            );
            assert_eq!(
                run(&prog, libc::SYS_close_range, [fd, fd, 0, 0, 0, 0]),
                want,
                "range {fd}"
            );
        }
    }
}
