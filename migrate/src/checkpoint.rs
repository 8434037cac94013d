//! Checkpoint: read a stopped process's whole state into an `Image`.
//!
//! The process is held under ptrace (`Tracee`); what only the process itself
//! can ask the kernel (its signal actions, its clear-tid address, its brk) is
//! asked by system calls run inside it. Nothing in it changes: a checkpoint
//! that fails leaves the process to run on as if nothing happened.

use crate::image::{
    Backing, Credentials, FdEntry, FdKind, Image, MmFields, PageRun, Region, Registers, Rseq,
    SignalAction,
};
use crate::procfs::{self, MapEntry, PAGE_SIZE};
use crate::ptrace::Tracee;
use crate::MigrateError;
use dsm::wire::ProcessInfo;

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
/// restart state stays in the old kernel task (nanosleep…): those return
/// EINTR, as for a signal handler without SA_RESTART.
pub fn portable_registers(regs: libc::user_regs_struct) -> Registers {
    let mut r = Registers::from(regs);
    if (r.orig_rax as i64) >= 0 {
        match r.rax as i64 {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
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
    let pid = t.pid;
    let threads = procfs::thread_count(pid)?;
    if threads != 1 {
        return Err(stay(format!(
            "the process has {threads} threads; only single-threaded processes migrate"
        )));
    }
    let maps = procfs::maps(pid)?;
    locate_syscall(t, &maps)?;
    let regs = t.stop_regs();
    let xstate = t.xstate()?;
    let sigmask = t.sigmask()?;
    let rseq = t.rseq()?;
    let robust_list = crate::ptrace::robust_list(pid)?;

    let asked = ask_process(t)?;
    let regions = regions(&maps, dsm)?;
    let pages = private_pages(t, &regions)?;
    let fds = fds(pid, dsm)?;

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
    let ids = |key: &str| -> Result<Vec<u32>, MigrateError> {
        Ok(procfs::status_field(pid, key)?
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect())
    };
    let uids = ids("Uid")?;
    let gids = ids("Gid")?;
    let credentials = Credentials {
        uid: uids.get(1).copied().unwrap_or(u32::MAX),
        gid: gids.get(1).copied().unwrap_or(u32::MAX),
        groups: ids("Groups")?,
    };
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
        fds,
        cwd: std::fs::read_link(format!("/proc/{pid}/cwd"))?
            .to_string_lossy()
            .into_owned(),
        umask,
        rlimits,
        socket_slot: dsm.links.first().map(|l| l.socket_slot),
        attachments: dsm.attachments.clone(),
    })
}

struct Asked {
    actions: Vec<SignalAction>,
    tid_address: u64,
    brk: u64,
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
        Ok(Asked {
            actions,
            tid_address,
            brk,
        })
    })();
    t.syscall_ok(libc::SYS_munmap, &[scratch, PAGE_SIZE])?;
    asked
}

fn regions(maps: &[MapEntry], dsm: &ProcessInfo) -> Result<Vec<Region>, MigrateError> {
    let mut regions = Vec::new();
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
        } else if m.path.starts_with("/memfd:") {
            return Err(stay(format!(
                "shared memory at {:#x} ({}) is not a DSM segment (SysV semaphores do not migrate yet)",
                m.start, m.path
            )));
        } else if SPECIAL_MAPPINGS.contains(&m.path.as_str()) {
            Backing::Special {
                name: m.path.clone(),
            }
        } else if m.inode == 0 {
            if m.shared {
                return Err(stay(format!(
                    "shared anonymous memory at {:#x} ({})",
                    m.start, m.path
                )));
            }
            Backing::Anonymous {
                grows_down: m.path == "[stack]",
            }
        } else {
            if m.path.ends_with(" (deleted)") || !m.path.starts_with('/') {
                return Err(stay(format!(
                    "memory at {:#x} maps {:?}, which cannot be reopened",
                    m.start, m.path
                )));
            }
            let file = procfs::file_identity(&m.path, &m.path)?;
            if file.inode != m.inode {
                return Err(stay(format!("{} was replaced since it was mapped", m.path)));
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
    Ok(regions)
}

fn private_pages(t: &Tracee, regions: &[Region]) -> Result<Vec<PageRun>, MigrateError> {
    let mut pages = Vec::new();
    for r in regions {
        let file_backed = match r.backing {
            Backing::Anonymous { .. } => false,
            Backing::PrivateFile { .. } => true,
            Backing::SharedFile { .. } | Backing::Segment { .. } | Backing::Special { .. } => {
                continue
            }
        };
        for (addr, len) in procfs::own_page_runs(t.pid, r.start, r.end, file_backed)? {
            pages.push(PageRun {
                addr,
                data: t.read(addr, len as usize)?,
            });
        }
    }
    Ok(pages)
}

fn fds(pid: i32, dsm: &ProcessInfo) -> Result<Vec<FdEntry>, MigrateError> {
    let mut out = Vec::new();
    for (fd, target, flags, pos) in procfs::fds(pid)? {
        let cloexec = flags & libc::O_CLOEXEC != 0;
        let flags = flags & !libc::O_CLOEXEC;
        if dsm.links.iter().any(|l| l.fd == fd) && target.starts_with("socket:") {
            out.push(FdEntry {
                fd,
                flags: libc::O_RDWR,
                cloexec,
                kind: FdKind::DaemonLink,
            });
            continue;
        }
        let meta = std::fs::metadata(format!("/proc/{pid}/fd/{fd}"));
        let kind = match meta {
            Ok(m) if target.starts_with('/') && !target.ends_with(" (deleted)") => {
                use std::os::unix::fs::FileTypeExt;
                if m.file_type().is_file() {
                    FdKind::File { path: target, pos }
                } else if m.file_type().is_char_device() {
                    FdKind::Device { path: target }
                } else {
                    return Err(stay(format!("fd {fd} ({target}) cannot be reopened")));
                }
            }
            _ if target.starts_with("pipe:") || target.starts_with("socket:") => {
                FdKind::Relayed { what: target }
            }
            _ => {
                return Err(stay(format!(
                    "fd {fd} is {target}, which can be neither reopened nor relayed"
                )))
            }
        };
        out.push(FdEntry {
            fd,
            flags,
            cloexec,
            kind,
        });
    }
    Ok(out)
}
