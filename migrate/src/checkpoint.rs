//! Checkpoint: read a stopped process's whole state into an `Image`.
//!
//! The process is held under ptrace (`Tracee`); what only the process itself
//! can ask the kernel (its signal actions, its clear-tid address, its brk) is
//! asked by system calls run inside it. Nothing in it changes: a checkpoint
//! that fails leaves the process to run on as if nothing happened.

use crate::daemon::DaemonConn;
use crate::image::{
    Backing, Credentials, FdEntry, FdKind, Image, MmFields, PageRun, PosixTimer, Region, Registers,
    Rseq, SignalAction,
};
use crate::procfs::{self, MapEntry, PAGE_SIZE};
use crate::ptrace::Tracee;
use crate::MigrateError;
use dsm::wire::ProcessInfo;
use std::os::fd::AsFd;

/// Where glibc 2.36 keeps the thread id in its thread descriptor (fs base +
/// this); checked against the pid before it is used.
const GLIBC_TID_OFFSET: u64 = 0x2d0;
const ERESTARTSYS: i64 = -512;
const ERESTARTNOINTR: i64 = -513;
const ERESTARTNOHAND: i64 = -514;
const ERESTART_RESTARTBLOCK: i64 = -516;
/// Signals whose action cannot be read or set.
const FIXED_SIGNALS: [i32; 2] = [libc::SIGKILL, libc::SIGSTOP];
const SIGNAL_MAX: i32 = 64;
/// The kernel mappings moved back to their old addresses on restore.
pub const SPECIAL_MAPPINGS: [&str; 3] = ["[vvar]", "[vvar_vclock]", "[vdso]"];

fn stay(reason: impl Into<String>) -> MigrateError {
    MigrateError::CannotMigrate(reason.into())
}

fn threads_stay(pid: i32) -> Result<Option<String>, MigrateError> {
    let threads = procfs::thread_count(pid)?;
    Ok((threads != 1).then(|| {
        format!("the process has {threads} threads; only single-threaded processes migrate")
    }))
}

/// Every reason process `pid` cannot move, found without stopping it (what
/// `omctl migrate --check` prints): its threads, memory and descriptors.
/// Empty if it can (a move may still find it inside a call, to retry).
pub fn stay_reasons(pid: i32, dsm: &ProcessInfo) -> Result<Vec<String>, MigrateError> {
    let mut stays: Vec<String> = threads_stay(pid)?.into_iter().collect();
    let maps = procfs::maps(pid)?;
    stays.extend(regions(&maps, dsm)?.1);
    stays.extend(fds(pid, dsm, Vec::new())?.1);
    Ok(stays)
}

/// Locate a `syscall` instruction in the tracee's vDSO for injected calls.
pub fn locate_syscall(t: &mut Tracee, maps: &[MapEntry]) -> Result<(), MigrateError> {
    let vdso = maps
        .iter()
        .find(|m| m.path == "[vdso]")
        .ok_or_else(|| stay("the process has no vDSO"))?;
    let code = t.read(vdso.start, vdso.len() as usize)?;
    let at = code
        .windows(2)
        .position(|w| w == [0x0f, 0x05])
        .ok_or_else(|| stay("no syscall instruction in the vDSO"))?;
    t.set_syscall_at(vdso.start + at as u64);
    Ok(())
}

/// Registers to resume with in another process. A process stopped inside a
/// system call has the kernel's restart codes in rax: turn them into what
/// the kernel would have done (re-issue the call), except for calls whose
/// restart state stays in the old kernel task: those return EINTR, as for
/// a signal handler without SA_RESTART. A `nanosleep` or relative
/// `clock_nanosleep` given a `rem` is made again for the time left (which
/// the kernel wrote there), an absolute one as it was; only one without
/// `rem` (nothing says how long is left) returns EINTR. `poll` is re-issued
/// as it was (its arguments are all in registers; a timeout starts again):
/// libraries wait for their daemon's answer in it and must not see EINTR
/// that no signal caused.
pub fn portable_registers(regs: libc::user_regs_struct) -> Registers {
    let mut r = Registers::from(regs);
    if (r.orig_rax as i64) >= 0 {
        match r.rax as i64 {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
                r.rax = r.orig_rax;
                r.rip -= 2;
            }
            ERESTART_RESTARTBLOCK if r.orig_rax as i64 == libc::SYS_poll => {
                r.rax = r.orig_rax;
                r.rip -= 2;
            }
            // A sleep goes on for what was left of it: the kernel wrote
            // that to the caller's `rem` when it stopped (or the end is
            // absolute); the call is made again for that time.
            ERESTART_RESTARTBLOCK if r.orig_rax as i64 == libc::SYS_nanosleep && r.rsi != 0 => {
                r.rdi = r.rsi;
                r.rax = r.orig_rax;
                r.rip -= 2;
            }
            ERESTART_RESTARTBLOCK
                if r.orig_rax as i64 == libc::SYS_clock_nanosleep
                    && (r.rsi as i32 & libc::TIMER_ABSTIME != 0 || r.r10 != 0) =>
            {
                if r.rsi as i32 & libc::TIMER_ABSTIME == 0 {
                    r.rdx = r.r10;
                }
                r.rax = r.orig_rax;
                r.rip -= 2;
            }
            ERESTART_RESTARTBLOCK => r.rax = (-libc::EINTR) as u64,
            _ => {}
        }
    }
    r.orig_rax = u64::MAX;
    r
}

/// Checkpoint the stopped tracee. `dsm` is what its node's daemon knows of
/// it (its segments and connections), empty for a process not under omrun.
pub fn checkpoint(t: &mut Tracee, dsm: &ProcessInfo) -> Result<Image, MigrateError> {
    checkpoint_with(t, dsm, Transfer::Eager, None)
}

/// How private memory travels with an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    /// Every page in the image.
    Eager,
    /// Anonymous regions of at least `LAZY_REGION_MIN` bytes (not the
    /// stack) stay behind and are fetched once the process runs.
    Lazy,
}

/// Regions smaller than this (libraries' .bss, small mmaps) travel in the
/// image: the process touches them at once, a fault each would cost more.
pub const LAZY_REGION_MIN: u64 = 256 << 10;
/// Around the thread pointer: static TLS below it, libc's thread
/// descriptor above.
const THREAD_AREA_BELOW: u64 = 256 << 10;
const THREAD_AREA_ABOVE: u64 = 64 << 10;

/// The signals waiting for the stopped tracee: those queued in the kernel
/// and those our stop held back, as `siginfo_t` records, to queue again
/// wherever it is restored (when the tracee itself will not run again).
pub fn take_pending_signals(t: &mut Tracee) -> Result<Vec<Vec<u8>>, MigrateError> {
    let mut out: Vec<Vec<u8>> = t.pending_signals()?.iter().map(|s| s.to_vec()).collect();
    out.extend(t.take_held_signals().iter().map(|info| info.to_vec()));
    Ok(out)
}

/// `checkpoint`, choosing how private memory travels. With `daemon` (a
/// connection to the process's node's daemon), a `semop` the process waits
/// in is withdrawn so that it can move (it asks again where it lands);
/// without, such a process is refused.
pub fn checkpoint_with(
    t: &mut Tracee,
    dsm: &ProcessInfo,
    transfer: Transfer,
    daemon: Option<&mut DaemonConn>,
) -> Result<Image, MigrateError> {
    let pid = t.pid;
    if let Some(why) = threads_stay(pid)? {
        return Err(stay(why));
    }
    let unread = quiesce(t, dsm, daemon)?;
    let maps = procfs::maps(pid)?;
    locate_syscall(t, &maps)?;
    let regs = t.stop_regs();
    let xstate = t.xstate()?;
    let sigmask = t.sigmask()?;
    let rseq = t.rseq()?;
    let robust_list = crate::ptrace::robust_list(pid)?;

    let asked = ask_process(t)?;
    let (regions, mut stays) = regions(&maps, dsm)?;
    let (fds, fd_stays) = fds(pid, dsm, unread)?;
    stays.extend(fd_stays);
    if !stays.is_empty() {
        return Err(stay(stays.join("; ")));
    }
    let (pages, lazy) = private_pages(t, &regions, transfer, regs.fs_base)?;

    let stat = procfs::stat_fields(pid)?;
    let field = |n: usize| stat.get(n).copied().unwrap_or(0);
    let mm = MmFields {
        start_code: field(26),
        end_code: field(27),
        start_stack: field(28),
        start_data: field(45),
        end_data: field(46),
        start_brk: field(47),
        brk: asked.brk,
        arg_start: field(48),
        arg_end: field(49),
        env_start: field(50),
        env_end: field(51),
    };
    let credentials = credentials_of(pid)?;
    let umask = u32::from_str_radix(&procfs::status_field(pid, "Umask")?, 8).unwrap_or(0o022);
    let rlimits = (0..=libc::RLIMIT_RTTIME)
        .filter_map(|resource| {
            let (soft, hard) = crate::ptrace::rlimit(pid, resource).ok()?;
            Some((resource, soft, hard))
        })
        .collect();
    let exe_path = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    let exe = procfs::file_identity(&format!("/proc/{pid}/exe"), &exe_path.to_string_lossy())?;
    let tid_slot = regs.fs_base + GLIBC_TID_OFFSET;
    let cached_tid_at = t
        .read(tid_slot, 4)
        .ok()
        .filter(|b| b.as_slice() == pid.to_le_bytes())
        .map(|_| tid_slot);
    Ok(Image {
        pid,
        exe,
        comm: std::fs::read_to_string(format!("/proc/{pid}/comm"))?
            .trim_end()
            .to_string(),
        credentials,
        regs: portable_registers(regs),
        xstate,
        sigmask,
        actions: asked.actions,
        rseq: (rseq.area != 0).then_some(Rseq {
            area: rseq.area,
            len: rseq.len,
            signature: rseq.signature,
        }),
        robust_list,
        tid_address: asked.tid_address,
        cached_tid_at,
        mm,
        auxv: std::fs::read(format!("/proc/{pid}/auxv"))?,
        regions,
        pages,
        lazy,
        fds,
        cwd: std::fs::read_link(format!("/proc/{pid}/cwd"))?
            .to_string_lossy()
            .into_owned(),
        umask,
        rlimits,
        // Field 19 of stat: the nice value.
        nice: procfs::stat_fields(pid)
            .ok()
            .and_then(|f| f.get(19).copied())
            .map_or(0, |n| n as i64 as i32),
        altstack: asked.altstack,
        itimers: asked.itimers,
        posix_timers: asked.posix_timers,
        pending_signals: Vec::new(),
        socket_slot: dsm.links.first().map(|l| l.socket_slot),
        calls_in_flight: calls_in_flight_word(dsm),
        attachments: dsm.attachments.clone(),
        has_children: !procfs::children(pid).is_empty(),
    })
}

/// The effective ids and groups a process runs with.
pub fn credentials_of(pid: i32) -> Result<Credentials, MigrateError> {
    let ids = |key: &str| -> Result<Vec<u32>, MigrateError> {
        Ok(procfs::status_field(pid, key)?
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect())
    };
    let uids = ids("Uid")?;
    let gids = ids("Gid")?;
    Ok(Credentials {
        uid: uids.get(1).copied().unwrap_or(u32::MAX),
        gid: gids.get(1).copied().unwrap_or(u32::MAX),
        groups: ids("Groups")?,
    })
}

/// What a restore of this process will start, read while it runs.
pub fn shell_spec_of(pid: i32) -> Result<crate::restore::ShellSpec, MigrateError> {
    Ok(crate::restore::ShellSpec {
        exe: std::fs::read_link(format!("/proc/{pid}/exe"))?
            .to_string_lossy()
            .into_owned(),
        comm: std::fs::read_to_string(format!("/proc/{pid}/comm"))?
            .trim_end()
            .to_string(),
        credentials: credentials_of(pid)?,
    })
}

/// `struct itimerval` and `struct itimerspec`: two 16-byte times.
pub const ITIMERVAL_LEN: usize = 32;

struct Asked {
    actions: Vec<SignalAction>,
    tid_address: u64,
    brk: u64,
    altstack: Option<(u64, i32, u64)>,
    itimers: Vec<(i32, Vec<u8>)>,
    posix_timers: Vec<PosixTimer>,
}

/// What only the process can ask about itself, through a scratch page
/// mapped in it for the occasion and unmapped after.
fn ask_process(t: &mut Tracee) -> Result<Asked, MigrateError> {
    let scratch = t.syscall_ok(
        libc::SYS_mmap,
        &[
            0,
            PAGE_SIZE,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
            u64::MAX,
            0,
        ],
    )?;
    // Default actions need no asking: a restored process starts with them.
    let non_default = procfs::non_default_signals(t.pid)?;
    let asked = (|| -> Result<Asked, MigrateError> {
        let mut actions = Vec::new();
        for signal in (1..=SIGNAL_MAX)
            .filter(|s| !FIXED_SIGNALS.contains(s) && non_default & (1 << (s - 1)) != 0)
        {
            t.syscall_ok(libc::SYS_rt_sigaction, &[signal as u64, 0, scratch, 8])?;
            let raw = t.read(scratch, 32)?;
            let word =
                |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
            actions.push(SignalAction {
                signal,
                handler: word(0),
                flags: word(1),
                restorer: word(2),
                mask: word(3),
            });
        }
        t.syscall_ok(libc::SYS_prctl, &[libc::PR_GET_TID_ADDRESS as u64, scratch])?;
        let tid_address = u64::from_le_bytes(t.read(scratch, 8)?.try_into().unwrap_or([0; 8]));
        let brk = t.syscall_ok(libc::SYS_brk, &[0])?;
        t.syscall_ok(libc::SYS_sigaltstack, &[0, scratch])?;
        let raw = t.read(scratch, 24)?;
        let word = |i: usize| u64::from_le_bytes(raw[i..i + 8].try_into().unwrap_or([0; 8]));
        let flags = word(8) as u32 as i32;
        let altstack = (flags & libc::SS_DISABLE == 0).then(|| (word(0), flags, word(16)));
        let mut itimers = Vec::new();
        for which in [libc::ITIMER_REAL, libc::ITIMER_VIRTUAL, libc::ITIMER_PROF] {
            t.syscall_ok(libc::SYS_getitimer, &[which as u64, scratch])?;
            let value = t.read(scratch, ITIMERVAL_LEN)?;
            if value.iter().any(|b| *b != 0) {
                itimers.push((which, value));
            }
        }
        let mut posix_timers = procfs::posix_timers(t.pid)?;
        for timer in &mut posix_timers {
            t.syscall_ok(libc::SYS_timer_gettime, &[timer.id as u64, scratch])?;
            timer.setting = t.read(scratch, ITIMERVAL_LEN)?;
        }
        Ok(Asked {
            actions,
            tid_address,
            brk,
            altstack,
            itimers,
            posix_timers,
        })
    })();
    t.syscall_ok(libc::SYS_munmap, &[scratch, PAGE_SIZE])?;
    asked
}

/// The process's memory as the image keeps it, and the reasons (one per
/// mapping) it cannot move, if any.
fn regions(
    maps: &[MapEntry],
    dsm: &ProcessInfo,
) -> Result<(Vec<Region>, Vec<String>), MigrateError> {
    let mut regions = Vec::new();
    let mut stays = Vec::new();
    for m in maps {
        let segment = dsm
            .attachments
            .iter()
            .find(|a| a.addr <= m.start && m.end <= a.addr + a.len);
        let backing = if m.path == "[vsyscall]" {
            continue;
        } else if let (Some(a), true) = (segment, m.shared) {
            Backing::Segment {
                id: a.id,
                readonly: a.readonly,
                offset: m.offset,
            }
        } else if m.shared && m.path.starts_with("/memfd:migshm-sem") {
            Backing::RetiredSemRegion
        } else if m.path.starts_with("/memfd:") {
            stays.push(format!(
                "shared memory at {:#x} ({}) is not a DSM segment (SysV semaphores do not migrate yet)",
                m.start, m.path
            ));
            continue;
        } else if SPECIAL_MAPPINGS.contains(&m.path.as_str()) {
            Backing::Special {
                name: m.path.clone(),
            }
        } else if m.inode == 0 {
            if m.shared {
                stays.push(format!(
                    "shared anonymous memory at {:#x} ({})",
                    m.start, m.path
                ));
                continue;
            }
            Backing::Anonymous {
                grows_down: m.path == "[stack]",
            }
        } else {
            if m.path.ends_with(" (deleted)") || !m.path.starts_with('/') {
                stays.push(format!(
                    "memory at {:#x} maps {:?}, which cannot be reopened",
                    m.start, m.path
                ));
                continue;
            }
            let file = procfs::file_identity(&m.path, &m.path)?;
            if file.inode != m.inode {
                stays.push(format!("{} was replaced since it was mapped", m.path));
                continue;
            }
            if m.shared {
                Backing::SharedFile {
                    file,
                    offset: m.offset,
                }
            } else {
                Backing::PrivateFile {
                    file,
                    offset: m.offset,
                }
            }
        };
        regions.push(Region {
            start: m.start,
            end: m.end,
            prot: m.prot(),
            backing,
        });
    }
    Ok((regions, stays))
}

/// Times a process found inside a semaphore fast-path operation or a call
/// to its daemon is let run on to finish it (each a few hundred ns to a few
/// tens of µs of work) before giving up.
const QUIESCE_TRIES: u32 = 200;
/// Rounds after which a process still in a call to its daemon is taken for
/// one waiting in a `semop`, and its daemon asked to withdraw it.
const WITHDRAW_AFTER: u32 = 10;
/// How long the daemon may take to answer withdrawn operations.
const WITHDRAWN_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The address of the library's count of calls in flight, if it has one.
fn calls_in_flight_word(dsm: &ProcessInfo) -> Option<u64> {
    dsm.links
        .iter()
        .map(|l| l.calls_in_flight)
        .find(|&a| a != 0)
}

/// Answers on their way to the process, per daemon connection: the bytes
/// it has not read yet.
type Unread = Vec<(i32, Vec<u8>)>;

/// Make sure the process is between two of its library's dealings with the
/// daemon: not inside a semaphore fast-path operation (holding a region's
/// lock word, with its pid in it: an image taken there would carry half an
/// operation the daemon rolls back), and not in a call to the daemon
/// (whose answer would go to a connection it leaves behind). It is let run
/// a moment until it is out. One that stays in a call waits in a `semop`:
/// with `daemon`, that wait is withdrawn, and the answer (`Withdrawn`, or
/// the outcome it had reached) travels with the process, which reads it
/// where it lands and asks again there. Otherwise it is refused, to be
/// moved again later.
fn quiesce(
    t: &mut Tracee,
    dsm: &ProcessInfo,
    mut daemon: Option<&mut DaemonConn>,
) -> Result<Unread, MigrateError> {
    let word = calls_in_flight_word(dsm);
    for round in 0..QUIESCE_TRIES {
        let holding = procfs::maps(t.pid)?
            .iter()
            .filter(|m| m.shared && m.path.starts_with("/memfd:migshm-sem"))
            .any(|m| {
                t.read(m.start, 4)
                    .is_ok_and(|w| w.as_slice() == (t.pid as u32).to_le_bytes())
            });
        let calling = match word {
            Some(addr) => t.read(addr, 4).is_ok_and(|w| w != [0; 4]),
            None => in_daemon_call(t, dsm),
        };
        if !holding && !calling {
            return Ok(Vec::new());
        }
        if !holding && round >= WITHDRAW_AFTER {
            if let Some(conn) = daemon.as_deref_mut() {
                let withdrawn = conn.withdraw_waits(t.pid)?;
                if withdrawn > 0 {
                    return withdrawn_answers(t.pid, dsm, withdrawn);
                }
            }
        }
        t.run_briefly(std::time::Duration::from_micros(50))?;
    }
    Err(stay(
        "the process stays in a call to its daemon or a semaphore operation; try again",
    ))
}

/// The answers to `count` withdrawn operations of the stopped process, as
/// they arrive on its daemon connections (left there: if the move fails,
/// the process reads them at home).
fn withdrawn_answers(pid: i32, dsm: &ProcessInfo, count: usize) -> Result<Unread, MigrateError> {
    let links: Vec<(i32, std::os::fd::OwnedFd)> = dsm
        .links
        .iter()
        .filter(|l| l.fd >= 0)
        .filter_map(|l| Some((l.fd, crate::ptrace::take_fd(pid, l.fd as u64).ok()?)))
        .collect();
    let deadline = std::time::Instant::now() + WITHDRAWN_ANSWER_TIMEOUT;
    loop {
        let mut unread = Vec::new();
        let mut frames = 0;
        for (fd, sock) in &links {
            // (A number the program reused for something else: nothing of
            // ours to carry there.)
            let Ok(bytes) = crate::ptrace::peek(sock.as_fd(), 1 << 20) else {
                continue;
            };
            frames += complete_frames(&bytes);
            if !bytes.is_empty() {
                unread.push((*fd, bytes));
            }
        }
        if frames >= count {
            tracing::debug!(
                pid,
                count,
                links = unread.len(),
                "withdrawn operations answered"
            );
            return Ok(unread);
        }
        if std::time::Instant::now() >= deadline {
            return Err(MigrateError::Daemon(format!(
                "{frames} of {count} withdrawn semaphore operations answered"
            )));
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

/// How many whole frames of the local protocol `bytes` starts with.
fn complete_frames(mut bytes: &[u8]) -> usize {
    let mut n = 0;
    while let Ok(Some(len)) = dsm::wire::client_frame_len(bytes) {
        if bytes.len() < len {
            break;
        }
        bytes = &bytes[len..];
        n += 1;
    }
    n
}

/// Whether the stopped process is in a system call on one of its daemon
/// connections (or polling one).
fn in_daemon_call(t: &Tracee, dsm: &ProcessInfo) -> bool {
    let regs = t.stop_regs();
    if (regs.orig_rax as i64) < 0 {
        return false;
    }
    let is_link = |fd: i64| dsm.links.iter().any(|l| i64::from(l.fd) == fd);
    match regs.orig_rax as i64 {
        libc::SYS_read
        | libc::SYS_write
        | libc::SYS_recvfrom
        | libc::SYS_sendto
        | libc::SYS_recvmsg
        | libc::SYS_sendmsg => is_link(regs.rdi as i64),
        libc::SYS_poll | libc::SYS_ppoll => {
            // struct pollfd { int fd; short events, revents; }, rsi of them.
            let count = (regs.rsi as usize).min(1024);
            t.read(regs.rdi, count * 8).is_ok_and(|raw| {
                raw.chunks_exact(8)
                    .any(|p| is_link(i64::from(i32::from_le_bytes([p[0], p[1], p[2], p[3]]))))
            })
        }
        _ => false,
    }
}

/// Whether a region's pages may stay behind under lazy transfer.
pub fn lazy_region(r: &Region) -> bool {
    matches!(r.backing, Backing::Anonymous { grows_down: false })
        && r.end - r.start >= LAZY_REGION_MIN
}

type PrivatePages = (Vec<PageRun>, Vec<(u64, u64)>);

fn private_pages(
    t: &Tracee,
    regions: &[Region],
    transfer: Transfer,
    thread_area: u64,
) -> Result<PrivatePages, MigrateError> {
    let mut pages = Vec::new();
    let mut lazy = Vec::new();
    for r in regions {
        let file_backed = match r.backing {
            Backing::Anonymous { .. } => false,
            Backing::PrivateFile { .. } => true,
            Backing::SharedFile { .. }
            | Backing::Segment { .. }
            | Backing::Special { .. }
            | Backing::RetiredSemRegion => continue,
        };
        let mut runs = procfs::own_page_runs(t.pid, r.start, r.end, file_backed)?;
        if transfer == Transfer::Lazy && lazy_region(r) {
            // The thread's own area (TLS, libc's thread descriptor), often
            // merged into a large anonymous region, is used at once and
            // written by the kernel (rseq): it travels; the rest stays.
            let hot = (
                thread_area.saturating_sub(THREAD_AREA_BELOW) & !(PAGE_SIZE - 1),
                (thread_area + THREAD_AREA_ABOVE).next_multiple_of(PAGE_SIZE),
            );
            let mut eager = Vec::new();
            for (addr, len) in runs {
                let end = addr + len;
                let (cut_start, cut_end) = (hot.0.max(addr), hot.1.min(end));
                if cut_start >= cut_end {
                    lazy.push((addr, len));
                    continue;
                }
                if addr < cut_start {
                    lazy.push((addr, cut_start - addr));
                }
                eager.push((cut_start, cut_end - cut_start));
                if cut_end < end {
                    lazy.push((cut_end, end - cut_end));
                }
            }
            runs = eager;
        }
        for (addr, len) in runs {
            pages.push(PageRun {
                addr,
                data: t.read(addr, len as usize)?,
            });
        }
    }
    Ok((pages, lazy))
}

/// Descriptors (by /proc name) that can live only at home, served there
/// for the process wherever it runs.
const SERVED_AT_HOME: [&str; 3] = [
    "anon_inode:[eventfd]",
    "anon_inode:[timerfd]",
    "anon_inode:inotify",
];

/// Whether a character device is a terminal (a virtual console or serial
/// line, a pseudo-terminal's either side, /dev/tty, /dev/console): it
/// belongs to the node it is attached to.
fn is_terminal(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (major, minor) = (libc::major(m.rdev()), libc::minor(m.rdev()));
    // 4: tty and ttyS; 5: tty, console, ptmx; 136-143: pts (devices.txt).
    major == 4 || (major == 5 && minor <= 2) || (136..=143).contains(&major)
}

/// The process's descriptors as the image keeps them, and the reasons (one
/// per descriptor) it cannot move, if any.
fn fds(
    pid: i32,
    dsm: &ProcessInfo,
    mut unread: Unread,
) -> Result<(Vec<FdEntry>, Vec<String>), MigrateError> {
    let mut out = Vec::new();
    let mut stays = Vec::new();
    // Listening sockets (SO_ACCEPTCONN on a duplicate): Ok(unix) for a TCP
    // or unix stream one, which moves (accept.rs); Err(what) for another.
    let listener_kind = |fd: i32, target: &str| -> Option<Result<bool, String>> {
        if !target.starts_with("socket:") {
            return None;
        }
        let dup = crate::ptrace::take_fd(pid, fd as u64).ok()?;
        if !crate::ptrace::is_listening(dup.as_fd()).unwrap_or(false) {
            return None;
        }
        let (domain, kind) = crate::ptrace::socket_domain_and_type(dup.as_fd()).ok()?;
        Some(match (domain, kind) {
            (libc::AF_INET | libc::AF_INET6, libc::SOCK_STREAM) => Ok(false),
            (libc::AF_UNIX, libc::SOCK_STREAM) => Ok(true),
            (libc::AF_UNIX, libc::SOCK_SEQPACKET) => Err("a unix seqpacket".to_string()),
            _ => Err(format!("of family {domain}, type {kind},")),
        })
    };
    for (fd, target, flags, pos) in procfs::fds(pid)? {
        let cloexec = flags & libc::O_CLOEXEC != 0;
        let flags = flags & !libc::O_CLOEXEC;
        if dsm.links.iter().any(|l| l.fd == fd) && target.starts_with("socket:") {
            out.push(FdEntry {
                fd,
                flags: libc::O_RDWR,
                cloexec,
                kind: FdKind::DaemonLink {
                    unread: unread
                        .iter()
                        .position(|(f, _)| *f == fd)
                        .map(|i| unread.swap_remove(i).1)
                        .unwrap_or_default(),
                },
            });
            continue;
        }
        let meta = std::fs::metadata(format!("/proc/{pid}/fd/{fd}"));
        let listening = listener_kind(fd, &target);
        let kind = match meta {
            Ok(m) if target.starts_with('/') && !target.ends_with(" (deleted)") => {
                use std::os::unix::fs::FileTypeExt;
                if flags & libc::O_PATH != 0 {
                    FdKind::Path { path: target }
                } else if m.file_type().is_file() {
                    FdKind::File { path: target, pos }
                } else if m.file_type().is_dir() {
                    FdKind::Directory { path: target, pos }
                } else if m.file_type().is_char_device() && is_terminal(&m) {
                    // The terminal is the home node's: served from there.
                    FdKind::Forwarded { what: target }
                } else if m.file_type().is_char_device() {
                    FdKind::Device { path: target }
                } else if m.file_type().is_fifo() {
                    // Its home process keeps it open, as for a pipe.
                    FdKind::Relayed {
                        what: target,
                        shut_write: false,
                        messages: None,
                    }
                } else {
                    stays.push(format!("fd {fd} ({target}) cannot be reopened"));
                    continue;
                }
            }
            _ if matches!(listening, Some(Ok(_))) => FdKind::Listener {
                what: target,
                unix: listening == Some(Ok(true)),
            },
            _ if matches!(listening, Some(Err(_))) => {
                let what = listening.and_then(Result::err).unwrap_or_default();
                stays.push(format!(
                    "fd {fd} is {what} listening socket ({target}); only TCP and unix stream listeners move"
                ));
                continue;
            }
            // Only at home: the process gets a stand-in whose calls the
            // deputy carries out on the original (forward.rs).
            Ok(m) if target.ends_with(" (deleted)") && m.is_file() => {
                FdKind::Forwarded { what: target }
            }
            _ if SERVED_AT_HOME.contains(&target.as_str()) => FdKind::Forwarded { what: target },
            _ if target == "anon_inode:[signalfd]" => FdKind::SignalFd {
                mask: procfs::signalfd_mask(pid, fd)?,
            },
            _ if target == "anon_inode:[eventpoll]" => FdKind::Epoll {
                targets: procfs::epoll_targets(pid, fd)?,
            },
            _ if target.starts_with("pipe:") => FdKind::Relayed {
                what: target,
                shut_write: false,
                messages: None,
            },
            _ if target.starts_with("socket:") => {
                let dup = crate::ptrace::take_fd(pid, fd as u64).ok();
                let kind = dup
                    .as_ref()
                    .and_then(|d| crate::ptrace::socket_domain_and_type(d.as_fd()).ok())
                    .map(|(_, kind)| kind);
                FdKind::Relayed {
                    shut_write: dup.is_some_and(|d| crate::ptrace::stream_write_shut(d.as_fd())),
                    messages: kind.filter(|&k| k == libc::SOCK_DGRAM || k == libc::SOCK_SEQPACKET),
                    what: target,
                }
            }
            _ => {
                stays.push(format!(
                    "fd {fd} is {target}, which can be neither reopened, relayed nor served at home"
                ));
                continue;
            }
        };
        // A second number for an open file already in the image is made
        // again as such (reopened, it would have an offset of its own).
        let reopened = matches!(
            kind,
            FdKind::File { .. }
                | FdKind::Directory { .. }
                | FdKind::Device { .. }
                | FdKind::Path { .. }
        );
        let kind = match out.iter().find(|e: &&FdEntry| {
            reopened && e.kind == kind && crate::ptrace::same_open_file(pid, e.fd, fd)
        }) {
            Some(first) => FdKind::Duplicate { of: first.fd },
            None => kind,
        };
        out.push(FdEntry {
            fd,
            flags,
            cloexec,
            kind,
        });
    }
    Ok((out, stays))
}
