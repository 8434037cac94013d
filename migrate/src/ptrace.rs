//! Driving another process through ptrace: stopping it, its registers, its
//! memory, and system calls run inside it (the process executes them at a
//! `syscall` instruction of its vDSO, between a syscall-entry and a
//! syscall-exit stop, so no code of ours ever lives in it).
//!
//! With `seccomp.rs` and `home_io.rs`, the only modules of the crate with
//! `unsafe`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

pub type Regs = libc::user_regs_struct;

const NT_X86_XSTATE: libc::c_int = 0x202;
const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
/// Generous bound on the XSAVE area (2 688 B with AVX-512 here).
const XSTATE_MAX: usize = 16 << 10;

/// `PTRACE_GET_RSEQ_CONFIGURATION` answer.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct RseqConfig {
    pub area: u64,
    pub len: u32,
    pub signature: u32,
    pub flags: u32,
    pub pad: u32,
}

/// A process stopped under our ptrace. Dropping it detaches (resuming the
/// process with the registers it has then) unless `detach` was called.
pub struct Tracee {
    pub pid: i32,
    mem: File,
    /// Address of a `syscall` instruction in the tracee (in its vDSO).
    syscall_at: Option<u64>,
    /// Registers at the stop, the base of every injected call.
    stop_regs: Regs,
    /// A signal that arrived while we held the process: delivered at detach.
    /// Signals that arrived while we held the process (each stopped it and
    /// was held back): delivered when we let it go, or taken by the caller.
    /// Signals held back, as the `siginfo_t` each came with.
    held_signals: Vec<SigInfo>,
    attached: bool,
    /// PTRACE_O_EXITKILL is on: the process dies if we do.
    exitkill: bool,
}

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn ptrace(req: libc::c_uint, pid: i32, addr: usize, data: usize) -> io::Result<libc::c_long> {
    // SAFETY: every caller passes, for requests that write through `data`
    // or `addr`, a pointer to a live buffer of the size the request uses.
    check(unsafe {
        libc::ptrace(
            req,
            pid,
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    })
}

/// How a process stopped or ended, from `waitpid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Stopped at a syscall entry or exit (TRACESYSGOOD).
    Syscall,
    /// A ptrace event stop (PTRACE_EVENT_*), such as the stop PTRACE_INTERRUPT asks for.
    Event(i32),
    /// About to receive this signal (signal-delivery stop), or a group stop.
    Signal(i32),
    Exited(i32),
    Killed(i32),
}

/// A raw `siginfo_t`.
pub type SigInfo = [u8; 128];

/// Was it queued by a process (`si_code` < 0: sigqueue, a timer, AIO…), and
/// not by `tgkill`? Only such a siginfo may be queued again by another
/// process, as it was.
fn queued_by_a_process(info: &SigInfo) -> bool {
    const SI_TKILL: i32 = -6;
    let code = i32::from_le_bytes([info[8], info[9], info[10], info[11]]);
    code < 0 && code != SI_TKILL
}

/// The signal number of a `siginfo_t` (0 if it is cut short).
pub fn signo_of(info: &[u8]) -> i32 {
    info.get(..4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, i32::from_le_bytes)
}

/// The `siginfo_t` of the signal `pid` is stopped to be given (at a
/// signal-delivery stop), or one with only its number if it cannot be read.
fn stopped_signal_info(pid: i32, sig: i32) -> SigInfo {
    let mut info = [0u8; 128];
    if ptrace(libc::PTRACE_GETSIGINFO, pid, 0, info.as_mut_ptr() as usize).is_err() {
        info = [0u8; 128];
        info[..4].copy_from_slice(&sig.to_le_bytes());
    }
    info
}

pub fn wait_stop(pid: i32) -> io::Result<Stop> {
    let mut status = 0;
    loop {
        // SAFETY: status is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if r == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if r < 0 && e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
    Ok(stop_of(status))
}

/// What a `waitpid` status says, for a tracee (TRACESYSGOOD set).
fn stop_of(status: i32) -> Stop {
    if libc::WIFEXITED(status) {
        Stop::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Stop::Killed(libc::WTERMSIG(status))
    } else {
        let sig = libc::WSTOPSIG(status);
        let event = status >> 16;
        if sig == libc::SIGTRAP | 0x80 {
            Stop::Syscall
        } else if event != 0 {
            Stop::Event(event)
        } else {
            Stop::Signal(sig)
        }
    }
}

impl Tracee {
    fn new(pid: i32) -> io::Result<Tracee> {
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))?;
        let mut t = Tracee {
            pid,
            mem,
            syscall_at: None,
            // SAFETY: user_regs_struct is plain integers; all-zero is valid.
            stop_regs: unsafe { std::mem::zeroed() },
            held_signals: Vec::new(),
            attached: true,
            exitkill: false,
        };
        t.stop_regs = t.regs()?;
        Ok(t)
    }

    /// Attach to a running process and stop it where it is. A signal that
    /// arrives meanwhile is kept and delivered when we let go.
    pub fn seize(pid: i32) -> io::Result<Tracee> {
        ptrace(
            libc::PTRACE_SEIZE,
            pid,
            0,
            libc::PTRACE_O_TRACESYSGOOD as usize,
        )?;
        let mut pending = 0;
        let stopped = ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0).and_then(|_| loop {
            match wait_stop(pid)? {
                Stop::Event(_) => break Ok(()),
                // A signal-delivery stop is a stop too; hold the signal.
                Stop::Signal(sig) => {
                    pending = sig;
                    break Ok(());
                }
                Stop::Syscall => continue,
                Stop::Exited(_) | Stop::Killed(_) => {
                    break Err(io::Error::from_raw_os_error(libc::ESRCH))
                }
            }
        });
        if let Err(e) = stopped {
            let _ = ptrace(libc::PTRACE_DETACH, pid, 0, 0);
            return Err(e);
        }
        let mut t = Tracee::new(pid).inspect_err(|_| {
            let _ = ptrace(libc::PTRACE_DETACH, pid, 0, pending as usize);
        })?;
        if pending != 0 {
            t.held_signals.push(stopped_signal_info(pid, pending));
        }
        Ok(t)
    }

    /// Take over a child that called PTRACE_TRACEME and then execve: it is
    /// stopped with SIGTRAP before running any instruction of the program.
    /// If we die before letting it go, it dies too.
    pub fn adopt_exec_stopped_child(pid: i32) -> io::Result<Tracee> {
        match wait_stop(pid)? {
            Stop::Signal(libc::SIGTRAP) => {}
            other => {
                return Err(io::Error::other(format!(
                    "restore shell stopped unexpectedly: {other:?}"
                )))
            }
        }
        ptrace(
            libc::PTRACE_SETOPTIONS,
            pid,
            0,
            (libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_EXITKILL) as usize,
        )?;
        let mut t = Tracee::new(pid)?;
        t.exitkill = true;
        Ok(t)
    }

    pub fn regs(&self) -> io::Result<Regs> {
        // SAFETY: all-zero is a valid user_regs_struct.
        let mut regs: Regs = unsafe { std::mem::zeroed() };
        ptrace(
            libc::PTRACE_GETREGS,
            self.pid,
            0,
            &mut regs as *mut Regs as usize,
        )?;
        Ok(regs)
    }

    pub fn set_regs(&self, regs: &Regs) -> io::Result<()> {
        ptrace(
            libc::PTRACE_SETREGS,
            self.pid,
            0,
            regs as *const Regs as usize,
        )?;
        Ok(())
    }

    /// Registers as they were when the process stopped for us.
    pub fn stop_regs(&self) -> Regs {
        self.stop_regs
    }

    /// The XSAVE area (x87, SSE, AVX… state).
    pub fn xstate(&self) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; XSTATE_MAX];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        ptrace(
            libc::PTRACE_GETREGSET,
            self.pid,
            NT_X86_XSTATE as usize,
            &mut iov as *mut libc::iovec as usize,
        )?;
        buf.truncate(iov.iov_len);
        Ok(buf)
    }

    pub fn set_xstate(&self, xstate: &[u8]) -> io::Result<()> {
        let mut copy = xstate.to_vec();
        let mut iov = libc::iovec {
            iov_base: copy.as_mut_ptr().cast(),
            iov_len: copy.len(),
        };
        ptrace(
            libc::PTRACE_SETREGSET,
            self.pid,
            NT_X86_XSTATE as usize,
            &mut iov as *mut libc::iovec as usize,
        )?;
        Ok(())
    }

    pub fn sigmask(&self) -> io::Result<u64> {
        let mut mask = 0u64;
        ptrace(
            PTRACE_GETSIGMASK,
            self.pid,
            8,
            &mut mask as *mut u64 as usize,
        )?;
        Ok(mask)
    }

    pub fn set_sigmask(&self, mask: u64) -> io::Result<()> {
        ptrace(PTRACE_SETSIGMASK, self.pid, 8, &mask as *const u64 as usize)?;
        Ok(())
    }

    pub fn rseq(&self) -> io::Result<RseqConfig> {
        let mut conf = RseqConfig::default();
        ptrace(
            libc::PTRACE_GET_RSEQ_CONFIGURATION,
            self.pid,
            std::mem::size_of::<RseqConfig>(),
            &mut conf as *mut RseqConfig as usize,
        )?;
        Ok(conf)
    }

    /// Read the tracee's memory, whatever the protection of the pages.
    pub fn read(&self, addr: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.mem.read_exact_at(&mut buf, addr)?;
        Ok(buf)
    }

    /// Write the tracee's memory, whatever the protection of the pages
    /// (private mappings are copied on write, as for a debugger).
    pub fn write(&self, addr: u64, data: &[u8]) -> io::Result<()> {
        self.mem.write_all_at(data, addr)
    }

    /// Where injected system calls execute.
    pub fn set_syscall_at(&mut self, addr: u64) {
        self.syscall_at = Some(addr);
    }

    /// Run one system call inside the tracee; its return value (a negative
    /// errno on failure, as the kernel returns it).
    ///
    /// A process that would outlive us (no EXITKILL) is never left inside
    /// an injected call if we die: it dies with us during the call, and
    /// gets its own registers back after it, so that our death at any
    /// other moment resumes it exactly where it was.
    pub fn syscall(&mut self, nr: libc::c_long, args: &[u64]) -> io::Result<i64> {
        if self.exitkill {
            return self.inject(nr, args);
        }
        self.kill_if_we_die()?;
        let result = self.inject(nr, args);
        if self.attached {
            self.set_regs(&self.stop_regs)?;
            self.keep_if_we_die()?;
        }
        result
    }

    fn inject(&mut self, nr: libc::c_long, args: &[u64]) -> io::Result<i64> {
        let at = self
            .syscall_at
            .ok_or_else(|| io::Error::other("no syscall instruction located in the tracee"))?;
        let mut regs = self.stop_regs;
        regs.rip = at;
        regs.rax = nr as u64;
        // No syscall restart for the call the process was in when it stopped.
        regs.orig_rax = u64::MAX;
        let arg = |i: usize| args.get(i).copied().unwrap_or(0);
        regs.rdi = arg(0);
        regs.rsi = arg(1);
        regs.rdx = arg(2);
        regs.r10 = arg(3);
        regs.r8 = arg(4);
        regs.r9 = arg(5);
        self.set_regs(&regs)?;
        for _phase in ["entry", "exit"] {
            loop {
                ptrace(libc::PTRACE_SYSCALL, self.pid, 0, 0)?;
                match wait_stop(self.pid)? {
                    Stop::Syscall => break,
                    // Hold a signal that arrives meanwhile for later.
                    Stop::Signal(sig) => self.held_signals.push(stopped_signal_info(self.pid, sig)),
                    Stop::Event(_) => {}
                    Stop::Exited(_) | Stop::Killed(_) => {
                        self.attached = false;
                        return Err(io::Error::from_raw_os_error(libc::ESRCH));
                    }
                }
            }
        }
        Ok(self.regs()?.rax as i64)
    }

    /// Like `syscall`, with a negative result turned into an error.
    pub fn syscall_ok(&mut self, nr: libc::c_long, args: &[u64]) -> io::Result<u64> {
        let r = self.syscall(nr, args)?;
        if (-4095..0).contains(&r) {
            Err(io::Error::from_raw_os_error(-r as i32))
        } else {
            Ok(r as u64)
        }
    }

    /// Re-read the registers after a new stop.
    pub fn refresh(&mut self) -> io::Result<()> {
        self.stop_regs = self.regs()?;
        Ok(())
    }

    /// Kill the process if we (its tracer) die: once it has moved, it must
    /// never run on at home behind its host's back.
    pub fn kill_if_we_die(&mut self) -> io::Result<()> {
        ptrace(
            libc::PTRACE_SETOPTIONS,
            self.pid,
            0,
            (libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_EXITKILL) as usize,
        )?;
        self.exitkill = true;
        Ok(())
    }

    /// Undo `kill_if_we_die`.
    pub fn keep_if_we_die(&mut self) -> io::Result<()> {
        ptrace(
            libc::PTRACE_SETOPTIONS,
            self.pid,
            0,
            libc::PTRACE_O_TRACESYSGOOD as usize,
        )?;
        self.exitkill = false;
        Ok(())
    }

    /// Leave the process sleeping in `pause()` (run from its vDSO), still
    /// traced: every signal sent to it stops it for us first.
    pub fn park(&mut self) -> io::Result<()> {
        let at = self
            .syscall_at
            .ok_or_else(|| io::Error::other("no syscall instruction located in the tracee"))?;
        let mut regs = self.stop_regs;
        regs.rip = at;
        regs.rax = libc::SYS_pause as u64;
        regs.orig_rax = u64::MAX;
        self.set_regs(&regs)?;
        ptrace(libc::PTRACE_CONT, self.pid, 0, 0)?;
        Ok(())
    }

    /// Resume a process stopped for a signal: `sig` 0 discards the signal.
    pub fn resume(&self, sig: i32) -> io::Result<()> {
        ptrace(libc::PTRACE_CONT, self.pid, 0, sig as usize)?;
        Ok(())
    }

    /// Signals queued for the process and not yet delivered (its own
    /// queue, then its thread group's), as raw `siginfo_t` records.
    pub fn pending_signals(&self) -> io::Result<Vec<[u8; 128]>> {
        const PEEKSIGINFO_SHARED: u32 = 1;
        const BATCH: usize = 32;
        let mut out = Vec::new();
        for flags in [0, PEEKSIGINFO_SHARED] {
            let mut offset = 0u64;
            loop {
                let args = libc::ptrace_peeksiginfo_args {
                    off: offset,
                    flags,
                    nr: BATCH as i32,
                };
                // The kernel writes at most `nr` records of 128 bytes.
                let mut buf = [[0u8; 128]; BATCH];
                let n = ptrace(
                    libc::PTRACE_PEEKSIGINFO,
                    self.pid,
                    &args as *const libc::ptrace_peeksiginfo_args as usize,
                    buf.as_mut_ptr() as usize,
                )? as usize;
                out.extend_from_slice(&buf[..n.min(BATCH)]);
                offset += n as u64;
                if n < BATCH {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The `siginfo_t` of the signal the process is stopped to be given (at a
    /// signal-delivery stop for `sig`).
    pub fn signal_info(&self, sig: i32) -> SigInfo {
        stopped_signal_info(self.pid, sig)
    }

    /// Let the stopped process run for `time`, then stop it again (signals
    /// that arrive meanwhile are held).
    pub fn run_briefly(&mut self, time: std::time::Duration) -> io::Result<()> {
        let mut regs = self.stop_regs;
        // An interrupted poll would go on as restart_syscall, whose state
        // stays in this kernel task: a later checkpoint could then only
        // make it fail with EINTR. Re-issue it as the poll it is instead.
        const ERESTART_RESTARTBLOCK: i64 = -516;
        if regs.orig_rax as i64 == libc::SYS_poll && regs.rax as i64 == ERESTART_RESTARTBLOCK {
            regs.rax = regs.orig_rax;
            regs.rip -= 2;
            regs.orig_rax = u64::MAX;
        }
        self.set_regs(&regs)?;
        ptrace(libc::PTRACE_CONT, self.pid, 0, 0)?;
        std::thread::sleep(time);
        let held = self.interrupt()?;
        self.held_signals.extend(held);
        Ok(())
    }

    /// The signals held back so far (for a caller that passes them on
    /// itself rather than letting the process have them at detach).
    pub fn take_held_signals(&mut self) -> Vec<SigInfo> {
        std::mem::take(&mut self.held_signals)
    }

    /// Stop a running (parked) tracee. Signals that stopped it on the way
    /// are discarded and returned, for the caller to pass on.
    pub fn interrupt(&mut self) -> io::Result<Vec<SigInfo>> {
        ptrace(libc::PTRACE_INTERRUPT, self.pid, 0, 0)?;
        let mut signals = Vec::new();
        loop {
            match wait_stop(self.pid)? {
                Stop::Event(_) => break,
                Stop::Signal(sig) => {
                    signals.push(stopped_signal_info(self.pid, sig));
                    // Discard it; the interrupt stop follows.
                    ptrace(libc::PTRACE_CONT, self.pid, 0, 0)?;
                }
                Stop::Syscall => ptrace(libc::PTRACE_CONT, self.pid, 0, 0).map(|_| ())?,
                Stop::Exited(_) | Stop::Killed(_) => {
                    self.attached = false;
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
            }
        }
        self.refresh()?;
        Ok(signals)
    }

    /// Make the (stopped) process exit with `code`.
    pub fn exit_with(mut self, code: i32) -> io::Result<()> {
        match self.syscall(libc::SYS_exit_group, &[code as u64]) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            Err(e) => Err(e),
            Ok(_) => Err(io::Error::other("exit_group returned")),
        }
    }

    /// Make the (stopped) process die of `sig`, as if it had no handler.
    pub fn die_of(mut self, sig: i32) -> io::Result<()> {
        // SIG_DFL for it, from a zeroed action written below the red zone.
        let action_at = (self.stop_regs.rsp - 512) & !15;
        self.write(action_at, &[0u8; 32])?;
        self.syscall(libc::SYS_rt_sigaction, &[sig as u64, action_at, 0, 8])?;
        self.syscall(libc::SYS_kill, &[self.pid as u64, sig as u64])?;
        self.park()?;
        loop {
            match wait_stop(self.pid)? {
                Stop::Signal(s) if s == sig => self.resume(sig)?,
                Stop::Exited(_) | Stop::Killed(_) => {
                    self.attached = false;
                    return Ok(());
                }
                _ => self.resume(0)?,
            }
        }
    }

    /// Set the registers the process resumes with at detach.
    pub fn set_resume_regs(&mut self, regs: Regs) {
        self.stop_regs = regs;
    }

    /// Let the process run on with the resume registers (and any signal that
    /// arrived while we held it).
    pub fn detach(mut self) -> io::Result<()> {
        self.release()
    }

    fn release(&mut self) -> io::Result<()> {
        if !self.attached {
            return Ok(());
        }
        self.attached = false;
        self.set_regs(&self.stop_regs)?;
        // Signals a process queued (sigqueue: a value, a sender) are queued
        // again as they were; the first of the others is given at detach
        // (from its own delivery stop it keeps the kernel's siginfo), the
        // rest are sent by number.
        let (queued, others): (Vec<SigInfo>, Vec<SigInfo>) = std::mem::take(&mut self.held_signals)
            .into_iter()
            .partition(queued_by_a_process);
        let mut others = others.into_iter();
        ptrace(
            libc::PTRACE_DETACH,
            self.pid,
            0,
            others.next().map_or(0, |info| signo_of(&info)) as usize,
        )?;
        for info in queued.iter().chain(others.as_slice()) {
            queue_signal(self.pid, info);
        }
        Ok(())
    }

    /// Stop tracking the process without resuming it: it is gone or about
    /// to be killed.
    pub fn forget(mut self) {
        self.attached = false;
    }
}

impl Drop for Tracee {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::warn!(pid = self.pid, "detaching: {e}");
        }
    }
}

/// The robust futex list of a thread (another process's, with ptrace rights).
pub fn robust_list(pid: i32) -> io::Result<(u64, u64)> {
    let mut head = 0u64;
    let mut len = 0usize;
    // SAFETY: both out-pointers are live.
    check(unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            pid,
            &mut head as *mut u64,
            &mut len as *mut usize,
        )
    })?;
    Ok((head, len as u64))
}

/// A duplicate of another process's descriptor `fd`.
pub fn take_fd(pid: i32, fd: u64) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscalls; each returned descriptor is owned once.
    unsafe {
        let pidfd = check(libc::syscall(libc::SYS_pidfd_open, pid, 0))? as i32;
        let pidfd = std::os::fd::OwnedFd::from_raw_fd(pidfd);
        let got = check(libc::syscall(
            libc::SYS_pidfd_getfd,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            fd as i32,
            0,
        ))? as i32;
        Ok(std::os::fd::OwnedFd::from_raw_fd(got))
    }
}

/// Set another process's nice value.
pub fn set_nice(pid: i32, nice: i32) -> io::Result<()> {
    // SAFETY: integer arguments only.
    check(unsafe { libc::setpriority(libc::PRIO_PROCESS, pid as libc::id_t, nice) } as libc::c_long)
        .map(|_| ())
}

/// Whether descriptors `a` and `b` of process `pid` are one open file
/// (kcmp KCMP_FILE).
pub fn same_open_file(pid: i32, a: i32, b: i32) -> bool {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: integer arguments only.
    unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, a, b) == 0 }
}

/// A resource limit of another process: (soft, hard).
pub fn rlimit(pid: i32, resource: u32) -> io::Result<(u64, u64)> {
    let mut old = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `old` is a live out-pointer; no new limit is set.
    check(unsafe { libc::prlimit64(pid, resource, std::ptr::null(), &mut old) } as libc::c_long)?;
    Ok((old.rlim_cur, old.rlim_max))
}

pub fn set_rlimit(pid: i32, resource: u32, soft: u64, hard: u64) -> io::Result<()> {
    let new = libc::rlimit64 {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `new` is live; the old value is not asked for.
    check(unsafe { libc::prlimit64(pid, resource, &new, std::ptr::null_mut()) } as libc::c_long)
        .map(|_| ())
}

/// Send a signal to a process.
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: plain syscall with integer arguments.
    check(unsafe { libc::kill(pid, sig) } as libc::c_long).map(|_| ())
}

/// Give process `pid` a signal as `info` (a `siginfo_t`, 128 bytes) says it
/// was sent: queued with its value and sender when the kernel lets one
/// process queue that kind (`si_code` < 0, not a `tgkill`), else sent by
/// number (its sender, or a kernel signal's details, are then lost).
pub fn queue_signal(pid: i32, info: &[u8]) {
    let mut record = [0u8; 128];
    let n = info.len().min(128);
    record[..n].copy_from_slice(&info[..n]);
    let signo = signo_of(&record);
    if queued_by_a_process(&record) {
        // The thread's own queue, where a restore queues what a process
        // had pending: one queue keeps them in order.
        // SAFETY: `record` is a live siginfo_t-sized buffer.
        let queued = unsafe {
            libc::syscall(
                libc::SYS_rt_tgsigqueueinfo,
                pid,
                pid,
                signo,
                record.as_ptr(),
            )
        };
        if queued == 0 {
            return;
        }
    }
    let _ = kill(pid, signo);
}

/// Make `command` start its program as a shell to restore into: killed if
/// we die, in a session of its own, and traced, so that its `execve` stops
/// it before the program runs a single instruction.
pub fn exec_traced(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as i32;
    // SAFETY: the hook only makes async-signal-safe system calls.
    unsafe {
        command.pre_exec(move || {
            // The copy never outlives the agent that answers for it (one
            // that died before we asked leaves us with another parent).
            die_with_parent()?;
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            // A session and process group of its own: what the process
            // signals as its group (kill(0, …)) is never the agent's, and
            // a leader at home is one here.
            check(libc::setsid() as libc::c_long)?;
            trace_me()
        });
    }
}

/// A descriptor our parent left us at `fd`, if it is a socket.
pub fn inherited_socket(fd: i32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let path = std::fs::read_link(format!("/proc/self/fd/{fd}"))?;
    if !path.to_string_lossy().starts_with("socket:") {
        return Err(io::Error::other(format!("fd {fd} is not a socket")));
    }
    // SAFETY: the descriptor exists (checked above), was left to us by our
    // parent and is owned by nothing else in this process.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Prepare a forked child to be restored into: it asks to be traced, so the
/// `execve` that follows stops it before the program runs.
///
/// # Safety
/// Call only between fork and exec (a `pre_exec` hook).
unsafe fn trace_me() -> io::Result<()> {
    // SAFETY: async-signal-safe syscall.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_TRACEME,
            0,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    })
    .map(|_| ())
}

/// This process gets SIGKILL when its parent dies; false if that parent,
/// `parent`, is already gone (the caller should end).
pub fn die_with(parent: i32) -> bool {
    // SAFETY: prctl and getppid take and return plain integers.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        libc::getppid() == parent
    }
}

/// SIGKILL when the parent dies, in a forked child before exec (after any
/// change of credentials, which clears it).
///
/// # Safety
/// Call only between fork and exec (a `pre_exec` hook).
unsafe fn die_with_parent() -> io::Result<()> {
    // SAFETY: async-signal-safe syscall with integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } as libc::c_long).map(|_| ())
}

/// A descriptor that becomes readable when a child of ours changes state
/// (SIGCHLD, blocked for the whole process and read through a signalfd).
pub fn child_events() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: the set is initialised by sigemptyset before use; the
    // descriptor returned is owned once.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        check(libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) as libc::c_long)?;
        let fd = check(
            libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) as libc::c_long,
        )?;
        Ok(std::os::fd::OwnedFd::from_raw_fd(fd as i32))
    }
}

/// Empty a `child_events` descriptor.
pub fn drain_child_events(fd: std::os::fd::BorrowedFd<'_>) {
    let mut buf = [0u8; 128 * 8];
    // SAFETY: reads into a live buffer of its length.
    while unsafe {
        libc::read(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    } > 0
    {}
}

/// Whether `fd` becomes readable within `limit`.
pub fn readable_within(
    fd: std::os::fd::BorrowedFd<'_>,
    limit: std::time::Duration,
) -> io::Result<bool> {
    ready_within(fd, libc::POLLIN, limit)
}

/// Whether `fd` becomes writable within `limit`.
pub fn writable_within(
    fd: std::os::fd::BorrowedFd<'_>,
    limit: std::time::Duration,
) -> io::Result<bool> {
    ready_within(fd, libc::POLLOUT, limit)
}

/// Cap a socket's send buffer.
pub fn limit_send_buffer(fd: std::os::fd::BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    let value = bytes as libc::c_int;
    // SAFETY: setsockopt reads one c_int from a live local.
    check(unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } as libc::c_long)
    .map(|_| ())
}

/// Shut the sending side of a socket (the peer reads end of file).
/// What is waiting to be read on socket `fd`, without taking it (up to
/// `max` bytes; nothing if nothing is there).
pub fn peek(fd: std::os::fd::BorrowedFd<'_>, max: usize) -> io::Result<Vec<u8>> {
    Ok(recv_now(fd, max, libc::MSG_PEEK)?.unwrap_or_default())
}

/// One `recv` with `flags` that does not wait: None if nothing came yet,
/// empty at end of file.
fn recv_now(
    fd: std::os::fd::BorrowedFd<'_>,
    max: usize,
    flags: libc::c_int,
) -> io::Result<Option<Vec<u8>>> {
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; max];
    // SAFETY: recv writes at most buf.len() bytes into buf.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            flags | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(e),
        };
    }
    buf.truncate(n as usize);
    Ok(Some(buf))
}

/// Take (not peek) what socket `fd` holds for its reader, up to `max`
/// bytes, without waiting.
pub fn take_queued(fd: std::os::fd::BorrowedFd<'_>, max: usize) -> io::Result<Vec<u8>> {
    Ok(recv_now(fd, max, 0)?.unwrap_or_default())
}

/// The next message of datagram or seqpacket socket `fd` (at most `max`
/// bytes of it), without waiting: None if none is queued.
pub fn take_message(fd: std::os::fd::BorrowedFd<'_>, max: usize) -> io::Result<Option<Vec<u8>>> {
    recv_now(fd, max, 0)
}

/// Send `message` on socket `fd` as one, without waiting (WouldBlock if
/// there is no room) and without SIGPIPE.
pub fn send_message(fd: std::os::fd::BorrowedFd<'_>, message: &[u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: send reads message.len() bytes from a live slice.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            message.as_ptr().cast(),
            message.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    check(n as libc::c_long).map(|n| n as usize)
}

/// The next bytes of socket `fd` after its peek offset (SO_PEEK_OFF), left
/// in it: None if none came yet, empty at end of file.
pub fn peek_next(fd: std::os::fd::BorrowedFd<'_>, max: usize) -> io::Result<Option<Vec<u8>>> {
    recv_now(fd, max, libc::MSG_PEEK)
}

/// Set socket `fd`'s peek offset (-1: peeking from the front again).
pub fn set_peek_offset(fd: std::os::fd::BorrowedFd<'_>, offset: i32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the option value is a live int of the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            (&offset as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    check(r as libc::c_long).map(|_| ())
}

/// Bytes queued in socket `fd` for its reader (FIONREAD).
pub fn unread_bytes(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) } as libc::c_long)?;
    Ok(n.max(0) as usize)
}

/// Make pipe `fd` hold at least `bytes` (F_SETPIPE_SZ); its size.
pub fn grow_pipe(fd: std::os::fd::BorrowedFd<'_>, bytes: usize) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl with integer arguments.
    let now = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) } as libc::c_long)?;
    if now as usize >= bytes {
        return Ok(now as usize);
    }
    // SAFETY: as above.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, bytes as libc::c_int) };
    Ok(check(r as libc::c_long)? as usize)
}

/// Accept a connection from listener `fd` if one is queued (`None` if not,
/// or if someone else took it first). Our descriptor shares the file with
/// the process that owns the listener: its O_NONBLOCK is theirs, so a
/// blocking listener is checked with poll first (and could still block if
/// one of theirs takes the connection in between).
pub fn accept_now(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<Option<std::os::fd::OwnedFd>> {
    use std::os::fd::{AsRawFd, FromRawFd};
    if !readable_within(fd, std::time::Duration::ZERO)? {
        return Ok(None);
    }
    // SAFETY: accept4 without an address buffer; the result is a new
    // descriptor we own, or -1.
    let conn = unsafe {
        libc::accept4(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if conn < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::ECONNABORTED) | Some(libc::EINTR) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: accept4 returned a fresh descriptor nobody else owns.
    Ok(Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(conn) }))
}

/// Socket option `name` of `level` on `fd`, read into a `T` (plain
/// integers: all-zero is a valid value).
fn socket_option<T: Copy>(
    fd: std::os::fd::BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<T> {
    use std::os::fd::AsRawFd;
    // SAFETY: T is a plain-integer C struct or integer (the callers').
    let mut value: T = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut T).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Whether socket `fd` listens (SO_ACCEPTCONN).
pub fn is_listening(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<bool> {
    Ok(socket_option::<libc::c_int>(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 0)
}

/// Socket `fd`'s family (SO_DOMAIN) and type (SO_TYPE).
pub fn socket_domain_and_type(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<(i32, i32)> {
    Ok((
        socket_option(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)?,
        socket_option(fd, libc::SOL_SOCKET, libc::SO_TYPE)?,
    ))
}

/// A connected pair of unix sockets of type `kind` (SOCK_STREAM,
/// SOCK_DGRAM, SOCK_SEQPACKET), close-on-exec.
pub fn socket_pair(kind: libc::c_int) -> io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: socketpair writes two descriptors into `fds`.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            kind | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    check(r as libc::c_long)?;
    // SAFETY: fresh descriptors from socketpair, owned once each.
    Ok(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

/// Whether `fd` is a stream socket whose writes fail with EPIPE (its write
/// side shut, or its peer gone): a zero-length send tells without sending
/// anything (it would send an empty datagram on another kind, so only
/// stream sockets are asked).
pub fn stream_write_shut(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    if !matches!(socket_domain_and_type(fd), Ok((_, libc::SOCK_STREAM))) {
        return false;
    }
    // SAFETY: a zero-length send from no buffer.
    let sent = unsafe {
        libc::send(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            std::ptr::null(),
            0,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    sent < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EPIPE)
}

pub fn shutdown_write(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: shutdown of a live descriptor.
    check(
        unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::SHUT_WR) }
            as libc::c_long,
    )
    .map(|_| ())
}

/// Poll `fds` with their events until one is ready; the returned events,
/// in order.
pub fn wait_ready(fds: &[(std::os::fd::BorrowedFd<'_>, i16)]) -> io::Result<Vec<i16>> {
    wait_ready_within(fds, None)
}

/// `wait_ready`, giving up after `limit` (every event 0 then).
pub fn wait_ready_within(
    fds: &[(std::os::fd::BorrowedFd<'_>, i16)],
    limit: Option<std::time::Duration>,
) -> io::Result<Vec<i16>> {
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|(fd, events)| libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(fd),
            events: *events,
            revents: 0,
        })
        .collect();
    poll_until(&mut polls, limit)?;
    Ok(polls.iter().map(|p| p.revents).collect())
}

/// `poll` until something is ready or `limit` (None: forever) passes,
/// going on after EINTR; how many are ready.
fn poll_until(polls: &mut [libc::pollfd], limit: Option<std::time::Duration>) -> io::Result<usize> {
    let deadline = limit.map(|l| std::time::Instant::now() + l);
    loop {
        // Rounded up: a wait of less than a millisecond must not become a
        // poll that returns at once (a caller looping on it would spin).
        let timeout = deadline.map_or(-1, |d| {
            d.saturating_duration_since(std::time::Instant::now())
                .as_micros()
                .div_ceil(1000)
                .min(i32::MAX as u128) as i32
        });
        // SAFETY: polls is a live array of its length.
        let r = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, timeout) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

fn ready_within(
    fd: std::os::fd::BorrowedFd<'_>,
    events: i16,
    limit: std::time::Duration,
) -> io::Result<bool> {
    let mut p = [libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
        events,
        revents: 0,
    }];
    Ok(poll_until(&mut p, Some(limit))? > 0)
}

/// A child's state change, if it has one (exit, or a stop when traced).
pub fn poll_child(pid: i32) -> io::Result<Option<Stop>> {
    let mut status = 0;
    // SAFETY: status is a live out-pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL | libc::WNOHANG) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if r == 0 {
        return Ok(None);
    }
    Ok(Some(stop_of(status)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// A wait shorter than poll's millisecond still waits (rounded up): a
    /// loop that waits this way (the host's, while a moved process has
    /// listeners) would otherwise spin a CPU.
    #[test]
    fn a_wait_under_a_millisecond_waits() {
        let (quiet, _other) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let limit = std::time::Duration::from_micros(300);
        let started = std::time::Instant::now();
        let ready = wait_ready_within(&[(quiet.as_fd(), libc::POLLIN)], Some(limit)).expect("poll");
        assert_eq!(ready, [0]);
        assert!(
            started.elapsed() >= limit,
            "returned after {:?}",
            started.elapsed()
        );
    }
}
