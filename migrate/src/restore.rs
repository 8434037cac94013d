//! Restore: rebuild a process from an `Image` inside a stopped tracee.
//!
//! Everything is done by system calls run inside the tracee at a `syscall`
//! instruction of its vDSO: the kernel's special mappings are parked out of
//! the way, every other mapping is removed, the special ones go back to the
//! image's addresses (same kernel, same sizes), then the image's regions,
//! pages, memory-descriptor fields, files, signal actions and thread state
//! are put back. The registers are set last, and the process resumes at the
//! instruction where the checkpoint stopped it.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;

use crate::checkpoint::{locate_syscall, ITIMERVAL_LEN, SPECIAL_MAPPINGS};
use crate::daemon::DaemonConn;
use crate::image::{Backing, FdKind, FileIdentity, Image, Region, SignalAction};
use crate::procfs::{self, PAGE_SIZE};
use crate::ptrace::{self, Tracee};
use crate::seccomp::Watched;
use crate::MigrateError;

/// Where the kernel's special mappings wait while the rest is rebuilt,
/// followed by the scratch area (candidates, first free one wins).
const PARK_CANDIDATES: [u64; 3] = [0x3f00_0000_0000, 0x2f00_0000_0000, 0x1f00_0000_0000];
const PARK_SPAN: u64 = 1 << 20;
/// Scratch for paths, auxv and structures passed to injected calls.
const SCRATCH_LEN: u64 = 16 << 10;
const RSEQ_FLAG_UNREGISTER: u64 = 1;
/// End of the x86-64 user address space (47 bits, less the guard page).
const USER_SPACE_END: u64 = 0x7fff_ffff_f000;
const PR_SET_MM_MAP: u64 = 14;
const MM_MAP_SIZE: u64 = 104;

/// A process restored as a child of the caller, still stopped: it runs
/// once `resume` is called (after its deputy committed to the move), and is
/// killed if dropped before.
pub struct Restored {
    child: Option<std::process::Child>,
    /// Our ends of its relayed descriptors.
    relays: crate::relay::Relays,
    lazy: Option<crate::lazy::LazyMemory>,
    /// The listener of its filter, if calls of its go home.
    calls: Option<OwnedFd>,
    stopped: Option<Tracee>,
}

/// A restored process let run, and what serves it.
pub struct Running {
    pub child: std::process::Child,
    /// Our ends of its relayed descriptors.
    pub relays: crate::relay::Relays,
    /// The server of its pages that stayed behind (lazy transfer).
    pub lazy: Option<crate::lazy::LazyMemory>,
    /// The listener of its filter (calls on stand-ins, see `forward.rs`).
    pub calls: Option<OwnedFd>,
}

impl Restored {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// The userfaultfd through which the host serves the process's memory
    /// that stayed behind, if any did.
    pub fn lazy_uffd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.lazy.as_ref().and_then(|l| l.uffd())
    }

    /// Let the restored process run.
    pub fn run(mut self) -> Result<Running, MigrateError> {
        if let Some(t) = self.stopped.take() {
            t.detach()?;
        }
        let child = self
            .child
            .take()
            .ok_or_else(|| MigrateError::Restore("no child".into()))?;
        Ok(Running {
            child,
            relays: std::mem::take(&mut self.relays),
            lazy: self.lazy.take(),
            calls: self.calls.take(),
        })
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        if let (Some(t), Some(child)) = (self.stopped.take(), self.child.as_mut()) {
            t.forget();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether bytes flow out of (reads) / into (writes) a descriptor opened
/// with these flags, from the process's point of view.
pub fn directions(flags: i32) -> (bool, bool) {
    match flags & libc::O_ACCMODE {
        libc::O_RDONLY => (true, false),
        libc::O_WRONLY => (false, true),
        _ => (true, true),
    }
}

/// Start a new process from `image`: the image's executable is started
/// stopped (traced, with the image's credentials) and rebuilt before it runs
/// a single instruction of its own. The new process is a child of the caller.
pub fn restore_fresh(image: &Image, node: Option<&Path>) -> Result<Restored, MigrateError> {
    Shell::start(&ShellSpec::of(image))?.restore(image, node)
}

/// What the process to restore into is started as: known before the
/// checkpoint, so that the shell can be started while it is taken.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShellSpec {
    pub exe: String,
    pub comm: String,
    pub credentials: crate::image::Credentials,
}

impl ShellSpec {
    pub fn of(image: &Image) -> ShellSpec {
        ShellSpec {
            exe: image.exe.path.clone(),
            comm: image.comm.clone(),
            credentials: image.credentials.clone(),
        }
    }
}

/// The image's executable, started traced and stopped at its first
/// instruction: the process a restore rebuilds.
pub struct Shell {
    spec: ShellSpec,
    child: Option<std::process::Child>,
    tracee: Option<Tracee>,
}

impl Drop for Shell {
    /// A shell never used must not run the program from its start.
    fn drop(&mut self) {
        if let (Some(t), Some(child)) = (self.tracee.take(), self.child.as_mut()) {
            t.forget();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Shell {
    /// Started as root: the restore installs, with the privilege that
    /// needs, the filter of calls that go home, then takes on the image's
    /// credentials.
    pub fn start(spec: &ShellSpec) -> Result<Shell, MigrateError> {
        let mut command = std::process::Command::new(&spec.exe);
        command
            .arg0(&spec.comm)
            .env_clear()
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        ptrace::exec_traced(&mut command);
        let started = std::time::Instant::now();
        let mut child = command.spawn()?;
        match Tracee::adopt_exec_stopped_child(child.id() as i32) {
            Ok(t) => {
                tracing::debug!(elapsed = ?started.elapsed(), "restore shell started");
                Ok(Shell {
                    spec: spec.clone(),
                    child: Some(child),
                    tracee: Some(t),
                })
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(MigrateError::Restore(format!("starting {}: {e}", spec.exe)))
            }
        }
    }

    /// Rebuild `image` in this shell (one started for another executable
    /// or credentials is replaced by a fitting one).
    pub fn restore(self, image: &Image, node: Option<&Path>) -> Result<Restored, MigrateError> {
        self.restore_with(image, node, HashMap::new(), &Watched::default())
    }

    /// `restore`, with what the image's listeners and stand-ins become
    /// (see `accept::StandIns`, `host_calls.rs`), by descriptor number,
    /// and the descriptors whose calls go home.
    pub fn restore_with(
        mut self,
        image: &Image,
        node: Option<&Path>,
        listeners: HashMap<i32, OwnedFd>,
        watched: &Watched,
    ) -> Result<Restored, MigrateError> {
        check_identity(&image.exe)?;
        if self.spec != ShellSpec::of(image) {
            return Shell::start(&ShellSpec::of(image))?
                .restore_with(image, node, listeners, watched);
        }
        // A socketpair per relayed descriptor: the process gets one end.
        let mut relays = crate::relay::Relays::default();
        let mut ends = listeners;
        for entry in &image.fds {
            if let FdKind::Relayed {
                what,
                shut_write,
                messages,
            } = &entry.kind
            {
                let (ours, theirs) = ptrace::socket_pair(messages.unwrap_or(libc::SOCK_STREAM))?;
                if *shut_write {
                    // Its writes fail as before the move; the relay passes
                    // on the end of its stream (harmless on the original).
                    ptrace::shutdown_write(theirs.as_fd())?;
                }
                let (process_reads, process_writes) = directions(entry.flags);
                // We write what the process reads, and read what it writes.
                relays.add(entry.fd, ours, process_writes, process_reads);
                if what.starts_with("socket:") && process_reads {
                    // The deputy peeks its bytes: it is told what was read.
                    relays.report_reads(entry.fd, theirs.try_clone()?);
                }
                ends.insert(entry.fd, theirs);
            }
        }
        let (Some(mut t), Some(mut child)) = (self.tracee.take(), self.child.take()) else {
            return Err(MigrateError::Restore("shell already used".into()));
        };
        let finish = Finish {
            watched: watched.clone(),
            credentials: image.credentials.clone(),
        };
        match restore_into(&mut t, image, node, &ends, Some(&finish)) {
            Ok(rebuilt) => Ok(Restored {
                child: Some(child),
                relays,
                lazy: rebuilt.lazy,
                calls: rebuilt.calls,
                stopped: Some(t),
            }),
            Err(e) => {
                t.forget();
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }
}

fn check_identity(want: &FileIdentity) -> Result<(), MigrateError> {
    let now = procfs::file_identity(&want.path, &want.path)
        .map_err(|e| MigrateError::Restore(format!("{}: {e}", want.path)))?;
    if now.inode != want.inode
        || now.dev != want.dev
        || now.size != want.size
        || now.mtime_ns != want.mtime_ns
    {
        return Err(MigrateError::Restore(format!(
            "{} is not the file the process had mapped",
            want.path
        )));
    }
    Ok(())
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// What a restore into a new process (a shell) does last, while it is
/// still root: the filter that sends the calls on `watched` to the host,
/// then the image's credentials.
pub struct Finish {
    pub watched: Watched,
    pub credentials: crate::image::Credentials,
}

/// What serves a rebuilt process.
pub struct Rebuilt {
    pub lazy: Option<crate::lazy::LazyMemory>,
    pub calls: Option<OwnedFd>,
}

/// Rebuild `image` inside the stopped tracee and set the registers it
/// resumes with; the caller detaches. `node`: the socket of this node's
/// daemon, which serves the process's segments from now on. `relay_ends`:
/// what each relayed descriptor (or stand-in) becomes; one not there must
/// be open in the tracee already (the home process's original) and is kept
/// as it is. `finish`: for a new process (see `Finish`).
pub fn restore_into(
    t: &mut Tracee,
    image: &Image,
    node: Option<&Path>,
    relay_ends: &HashMap<i32, OwnedFd>,
    finish: Option<&Finish>,
) -> Result<Rebuilt, MigrateError> {
    let needs_daemon = !image.attachments.is_empty()
        || image
            .fds
            .iter()
            .any(|f| matches!(f.kind, FdKind::DaemonLink { .. }));
    if needs_daemon && node.is_none() {
        return Err(MigrateError::Restore(
            "the process uses DSM and no daemon was given".into(),
        ));
    }
    for r in &image.regions {
        if let Backing::PrivateFile { file, .. } | Backing::SharedFile { file, .. } = &r.backing {
            check_identity(file)?;
        }
    }
    // Nothing is delivered while it is rebuilt (a parked home process
    // blocks nothing): a signal queued below, or pending, would otherwise
    // stop an injected call and be held, and come after those queued.
    t.set_sigmask(u64::MAX)?;
    let maps = procfs::maps(t.pid)?;
    locate_syscall(t, &maps)?;
    let rseq = t.rseq()?;
    if rseq.area != 0 {
        t.syscall_ok(
            libc::SYS_rseq,
            &[
                rseq.area,
                u64::from(rseq.len),
                RSEQ_FLAG_UNREGISTER,
                u64::from(rseq.signature),
            ],
        )?;
    }

    let park = PARK_CANDIDATES
        .into_iter()
        .find(|&p| {
            let span = (p, p + PARK_SPAN);
            !image
                .regions
                .iter()
                .any(|r| overlaps(span, (r.start, r.end)))
                && !maps.iter().any(|m| overlaps(span, (m.start, m.end)))
        })
        .ok_or_else(|| MigrateError::Restore("no free area to park the vDSO in".into()))?;
    let specials: Vec<&procfs::MapEntry> = maps
        .iter()
        .filter(|m| SPECIAL_MAPPINGS.contains(&m.path.as_str()))
        .collect();
    let first_special = specials
        .iter()
        .map(|m| m.start)
        .min()
        .ok_or_else(|| MigrateError::Restore("the tracee has no vDSO".into()))?;
    let parked = |start: u64| park + (start - first_special);
    if specials
        .iter()
        .any(|m| parked(m.end) > park + PARK_SPAN - SCRATCH_LEN)
    {
        return Err(MigrateError::Restore(
            "the vDSO is larger than expected".into(),
        ));
    }
    // The vDSO moves last: injected calls run from it.
    let mut order = specials.clone();
    order.sort_by_key(|m| m.path == "[vdso]");
    for m in &order {
        move_mapping(t, m.start, m.len(), parked(m.start))?;
        if m.path == "[vdso]" {
            relocate_syscall(t, parked(m.start))?;
        }
    }
    let scratch = park + PARK_SPAN - SCRATCH_LEN;
    t.syscall_ok(
        libc::SYS_mmap,
        &[
            scratch,
            SCRATCH_LEN,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64,
            u64::MAX,
            0,
        ],
    )?;

    // Everything else goes: below the park, and above it up to the end
    // of user space (holes in between are no error for munmap).
    t.syscall_ok(libc::SYS_munmap, &[PAGE_SIZE, park - PAGE_SIZE])?;
    let above = park + PARK_SPAN;
    t.syscall_ok(libc::SYS_munmap, &[above, USER_SPACE_END - above])?;
    // The special mappings back where the image had them.
    let mut order: Vec<&Region> = image
        .regions
        .iter()
        .filter(|r| matches!(r.backing, Backing::Special { .. }))
        .collect();
    order.sort_by_key(|r| matches!(&r.backing, Backing::Special { name } if name == "[vdso]"));
    for r in order {
        let Backing::Special { name } = &r.backing else {
            continue;
        };
        let now = specials
            .iter()
            .find(|m| &m.path == name)
            .ok_or_else(|| MigrateError::Restore(format!("this kernel has no {name}")))?;
        if now.len() != r.end - r.start {
            return Err(MigrateError::Restore(format!(
                "{name} differs in size on this kernel"
            )));
        }
        move_mapping(t, parked(now.start), now.len(), r.start)?;
        if name == "[vdso]" {
            relocate_syscall(t, r.start)?;
        }
    }

    let started = std::time::Instant::now();
    map_regions(t, image, scratch)?;
    tracing::debug!(elapsed = ?started.elapsed(), "regions mapped");
    for run in &image.pages {
        t.write(run.addr, &run.data)?;
    }
    tracing::debug!(elapsed = ?started.elapsed(), "pages written");
    // After the pages: it writes the daemon's socket into the process's memory.
    if let Some(node) = node.filter(|_| needs_daemon) {
        adopt_segments(t, image, scratch, node)?;
    }

    set_mm(t, image, scratch)?;
    put_string(t, scratch, &image.comm)?;
    t.syscall_ok(libc::SYS_prctl, &[libc::PR_SET_NAME as u64, scratch])?;
    tracing::debug!(elapsed = ?started.elapsed(), "segments adopted");
    restore_fds(t, image, scratch, relay_ends)?;
    put_string(t, scratch, &image.cwd)?;
    t.syscall_ok(libc::SYS_chdir, &[scratch])?;
    t.syscall_ok(libc::SYS_umask, &[u64::from(image.umask)])?;
    // The image's actions, and the default for any other signal the
    // tracee had caught or ignored.
    let mut actions = image.actions.clone();
    let non_default = procfs::non_default_signals(t.pid)?;
    for signal in 1..=64 {
        let fixed = signal == libc::SIGKILL || signal == libc::SIGSTOP;
        if !fixed
            && non_default & (1 << (signal - 1)) != 0
            && !actions.iter().any(|a| a.signal == signal)
        {
            actions.push(SignalAction {
                signal,
                ..SignalAction::default()
            });
        }
    }
    for a in &actions {
        let raw: Vec<u8> = [a.handler, a.flags, a.restorer, a.mask]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        t.write(scratch, &raw)?;
        t.syscall_ok(libc::SYS_rt_sigaction, &[a.signal as u64, scratch, 0, 8])?;
    }
    for &(resource, soft, hard) in &image.rlimits {
        if let Err(e) = ptrace::set_rlimit(t.pid, resource, soft, hard) {
            tracing::warn!(pid = t.pid, resource, "restoring a resource limit: {e}");
        }
    }
    restore_timers(t, image, scratch)?;
    if let Err(e) = ptrace::set_nice(t.pid, image.nice) {
        tracing::warn!(
            pid = t.pid,
            nice = image.nice,
            "restoring the nice value: {e}"
        );
    }
    if let Some((sp, flags, size)) = image.altstack {
        let mut raw = sp.to_le_bytes().to_vec();
        // Only SS_AUTODISARM may be set; SS_ONSTACK is where it ran.
        let settable = flags & !libc::SS_ONSTACK;
        raw.extend_from_slice(&(settable as u32 as u64).to_le_bytes());
        raw.extend_from_slice(&size.to_le_bytes());
        t.write(scratch, &raw)?;
        t.syscall_ok(libc::SYS_sigaltstack, &[scratch, 0])?;
    }
    t.syscall_ok(
        libc::SYS_set_robust_list,
        &[image.robust_list.0, image.robust_list.1],
    )?;
    t.syscall_ok(libc::SYS_set_tid_address, &[image.tid_address])?;
    if let Some(at) = image.cached_tid_at {
        t.write(at, &t.pid.to_le_bytes())?;
    }
    if let Some(r) = image.rseq {
        t.syscall_ok(
            libc::SYS_rseq,
            &[r.area, u64::from(r.len), 0, u64::from(r.signature)],
        )?;
    }
    tracing::debug!(elapsed = ?started.elapsed(), "state restored");
    // Signals that waited for the process where it was: queued again here.
    for info in &image.pending_signals {
        let signo = i32::from_le_bytes(info[..4].try_into().unwrap_or_default());
        t.write(scratch, info)?;
        if let Err(e) = t.syscall_ok(
            libc::SYS_rt_tgsigqueueinfo,
            &[t.pid as u64, t.pid as u64, signo as u64, scratch],
        ) {
            tracing::warn!(pid = t.pid, signo, "queueing a pending signal again: {e}");
        }
    }
    // After every call of ours on the descriptors it watches.
    let calls = match finish {
        Some(f) if !f.watched.is_empty() => Some(install_filter(t, scratch, &f.watched)?),
        _ => None,
    };
    // Last of all the writes into its memory (ours and the kernel's, such
    // as rseq's): from here a write into a lazy region waits for its page.
    let lazy = register_lazy(t, image, scratch)?;
    if let Some(f) = finish {
        take_on_credentials(t, scratch, &f.credentials)?;
    }
    t.set_sigmask(image.sigmask)?;
    t.syscall_ok(libc::SYS_munmap, &[scratch, SCRATCH_LEN])?;
    t.set_xstate(&image.xstate)?;
    t.set_resume_regs(image.regs.into());
    Ok(Rebuilt { lazy, calls })
}

/// The image's interval and POSIX timers, with their time left: those the
/// tracee has (the home process's own, on a return) are set, the others
/// made with the same id (PR_TIMER_CREATE_RESTORE_IDS), and any timer of
/// the tracee the image does not have is deleted.
fn restore_timers(t: &mut Tracee, image: &Image, scratch: u64) -> Result<(), MigrateError> {
    const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
    for which in [libc::ITIMER_REAL, libc::ITIMER_VIRTUAL, libc::ITIMER_PROF] {
        let value = image
            .itimers
            .iter()
            .find(|(w, _)| *w == which)
            .map_or(vec![0; ITIMERVAL_LEN], |(_, v)| v.clone());
        t.write(scratch, &value)?;
        t.syscall_ok(libc::SYS_setitimer, &[which as u64, scratch, 0])?;
    }
    let existing = procfs::posix_timers(t.pid)?;
    for old in existing
        .iter()
        .filter(|e| !image.posix_timers.iter().any(|p| p.id == e.id))
    {
        t.syscall_ok(libc::SYS_timer_delete, &[old.id as u64])?;
    }
    let mut restoring_ids = false;
    for timer in &image.posix_timers {
        if !existing.iter().any(|e| e.id == timer.id) {
            if !restoring_ids {
                t.syscall_ok(libc::SYS_prctl, &[PR_TIMER_CREATE_RESTORE_IDS, 1])
                    .map_err(|e| {
                        MigrateError::Restore(format!(
                            "POSIX timers cannot be made with their ids here: {e}"
                        ))
                    })?;
                restoring_ids = true;
            }
            // struct sigevent (64 bytes), then the id asked for.
            let mut event = vec![0u8; 64];
            event[0..8].copy_from_slice(&timer.value.to_le_bytes());
            event[8..12].copy_from_slice(&timer.signo.to_le_bytes());
            event[12..16].copy_from_slice(&timer.notify.to_le_bytes());
            event[16..20].copy_from_slice(&t.pid.to_le_bytes());
            event.extend_from_slice(&timer.id.to_le_bytes());
            t.write(scratch, &event)?;
            t.syscall_ok(
                libc::SYS_timer_create,
                &[timer.clock as u64, scratch, scratch + 64],
            )?;
            let got = i32::from_le_bytes(t.read(scratch + 64, 4)?.try_into().unwrap_or_default());
            if got != timer.id {
                return Err(MigrateError::Restore(format!(
                    "POSIX timer {} was made as {got}",
                    timer.id
                )));
            }
        }
        t.write(scratch, &timer.setting)?;
        t.syscall_ok(libc::SYS_timer_settime, &[timer.id as u64, 0, scratch, 0])?;
    }
    if restoring_ids {
        t.syscall_ok(libc::SYS_prctl, &[PR_TIMER_CREATE_RESTORE_IDS, 0])?;
    }
    Ok(())
}

/// Install the filter for `watched` in the tracee (root: no
/// `no_new_privs` needed); its listener, now ours.
fn install_filter(
    t: &mut Tracee,
    scratch: u64,
    watched: &Watched,
) -> Result<OwnedFd, MigrateError> {
    let prog = crate::seccomp::filter(watched)
        .map_err(|e| MigrateError::Restore(format!("the filter of calls that go home: {e}")))?;
    let bytes = crate::seccomp::fprog_bytes(&prog, scratch);
    if bytes.len() as u64 > SCRATCH_LEN {
        return Err(MigrateError::Restore("the filter is too large".into()));
    }
    t.write(scratch, &bytes)?;
    let listener = t.syscall_ok(
        libc::SYS_seccomp,
        &[
            u64::from(libc::SECCOMP_SET_MODE_FILTER),
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            scratch,
        ],
    )?;
    let ours = ptrace::take_fd(t.pid, listener)?;
    t.syscall_ok(libc::SYS_close, &[listener])?;
    Ok(ours)
}

/// Take on the image's credentials (the shell started as root), then what
/// a change of credentials resets: death with the agent that answers for
/// the process, and being dumpable as a process started as that user is.
fn take_on_credentials(
    t: &mut Tracee,
    scratch: u64,
    c: &crate::image::Credentials,
) -> Result<(), MigrateError> {
    let groups: Vec<u8> = c.groups.iter().flat_map(|g| g.to_le_bytes()).collect();
    if groups.len() as u64 > SCRATCH_LEN {
        return Err(MigrateError::Restore(
            "too many supplementary groups".into(),
        ));
    }
    t.write(scratch, &groups)?;
    t.syscall_ok(libc::SYS_setgroups, &[c.groups.len() as u64, scratch])?;
    let (uid, gid) = (u64::from(c.uid), u64::from(c.gid));
    t.syscall_ok(libc::SYS_setresgid, &[gid, gid, gid])?;
    t.syscall_ok(libc::SYS_setresuid, &[uid, uid, uid])?;
    t.syscall_ok(
        libc::SYS_prctl,
        &[libc::PR_SET_PDEATHSIG as u64, libc::SIGKILL as u64],
    )?;
    t.syscall_ok(libc::SYS_prctl, &[libc::PR_SET_DUMPABLE as u64, 1])?;
    Ok(())
}

fn move_mapping(t: &mut Tracee, from: u64, len: u64, to: u64) -> Result<(), MigrateError> {
    if from == to {
        return Ok(());
    }
    t.syscall_ok(
        libc::SYS_mremap,
        &[
            from,
            len,
            len,
            (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
            to,
        ],
    )?;
    Ok(())
}

/// After the vDSO moved to `vdso_now`, injected calls run from there.
fn relocate_syscall(t: &mut Tracee, vdso_now: u64) -> Result<(), MigrateError> {
    let code = t.read(vdso_now, 2 * PAGE_SIZE as usize)?;
    let at = code
        .windows(2)
        .position(|w| w == [0x0f, 0x05])
        .ok_or_else(|| MigrateError::Restore("no syscall instruction in the vDSO".into()))?;
    t.set_syscall_at(vdso_now + at as u64);
    Ok(())
}

fn put_string(t: &Tracee, at: u64, s: &str) -> Result<(), MigrateError> {
    if s.len() as u64 >= SCRATCH_LEN / 2 || s.contains('\0') {
        return Err(MigrateError::Restore(format!("unusable path {s:?}")));
    }
    let mut bytes = s.as_bytes().to_vec();
    bytes.push(0);
    t.write(at, &bytes)?;
    Ok(())
}

fn map_regions(t: &mut Tracee, image: &Image, scratch: u64) -> Result<(), MigrateError> {
    // One descriptor per file and access mode, closed at the end.
    let mut opened: HashMap<(String, bool), u64> = HashMap::new();
    let mut result = Ok(());
    for r in &image.regions {
        let len = r.end - r.start;
        let (flags, fd, offset) = match &r.backing {
            Backing::Special { .. } | Backing::Segment { .. } => continue,
            Backing::RetiredSemRegion => {
                t.syscall_ok(
                    libc::SYS_mmap,
                    &[
                        r.start,
                        len,
                        (libc::PROT_READ | libc::PROT_WRITE) as u64,
                        (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE)
                            as u64,
                        u64::MAX,
                        0,
                    ],
                )?;
                t.write(r.start, &dsm::semregion::retired_header())?;
                continue;
            }
            Backing::Anonymous { grows_down } => {
                let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
                if *grows_down {
                    flags |= libc::MAP_GROWSDOWN;
                }
                (flags, u64::MAX, 0)
            }
            Backing::PrivateFile { file, offset } | Backing::SharedFile { file, offset } => {
                let shared = matches!(r.backing, Backing::SharedFile { .. });
                let writable = shared && r.prot & libc::PROT_WRITE as u32 != 0;
                let key = (file.path.clone(), writable);
                let fd = match opened.get(&key) {
                    Some(&fd) => fd,
                    None => {
                        put_string(t, scratch, &file.path)?;
                        let mode = if writable {
                            libc::O_RDWR
                        } else {
                            libc::O_RDONLY
                        };
                        match t
                            .syscall_ok(libc::SYS_open, &[scratch, (mode | libc::O_CLOEXEC) as u64])
                        {
                            Ok(fd) => {
                                opened.insert(key, fd);
                                fd
                            }
                            Err(e) => {
                                result = Err(MigrateError::Restore(format!(
                                    "opening {}: {e}",
                                    file.path
                                )));
                                break;
                            }
                        }
                    }
                };
                let flags = if shared {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                };
                (flags, fd, *offset)
            }
        };
        if let Err(e) = t.syscall_ok(
            libc::SYS_mmap,
            &[
                r.start,
                len,
                u64::from(r.prot),
                (flags | libc::MAP_FIXED_NOREPLACE) as u64,
                fd,
                offset,
            ],
        ) {
            result = Err(MigrateError::Restore(format!(
                "mapping {:#x}-{:#x}: {e}",
                r.start, r.end
            )));
            break;
        }
    }
    for fd in opened.into_values() {
        t.syscall_ok(libc::SYS_close, &[fd])?;
    }
    result
}

fn set_mm(t: &mut Tracee, image: &Image, scratch: u64) -> Result<(), MigrateError> {
    let mm = &image.mm;
    let auxv_at = scratch + 256;
    if image.auxv.len() as u64 > SCRATCH_LEN - 256 {
        return Err(MigrateError::Restore("auxv too large".into()));
    }
    t.write(auxv_at, &image.auxv)?;
    let mut raw: Vec<u8> = [
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        mm.brk,
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
        auxv_at,
    ]
    .iter()
    .flat_map(|w| w.to_le_bytes())
    .collect();
    raw.extend((image.auxv.len() as u32).to_le_bytes());
    // exe_fd -1: /proc/PID/exe stays the executable we started, which is
    // the image's.
    raw.extend((-1i32).to_le_bytes());
    debug_assert_eq!(raw.len() as u64, MM_MAP_SIZE);
    t.write(scratch, &raw)?;
    t.syscall_ok(
        libc::SYS_prctl,
        &[
            libc::PR_SET_MM as u64,
            PR_SET_MM_MAP,
            scratch,
            MM_MAP_SIZE,
            0,
        ],
    )
    .map_err(|e| MigrateError::Restore(format!("PR_SET_MM_MAP: {e}")))?;
    Ok(())
}

fn restore_fds(
    t: &mut Tracee,
    image: &Image,
    scratch: u64,
    relay_ends: &HashMap<i32, OwnedFd>,
) -> Result<(), MigrateError> {
    // A relayed descriptor, a listener or a stand-in without an end here
    // is the home process's original: it stays. So does a file the
    // process reopened where it ran, if the original is still open here:
    // the locks taken for it at home are on the original.
    let pid = t.pid;
    let kept = |fd: i32| {
        image.fds.iter().any(|e| {
            e.fd == fd
                && match &e.kind {
                    FdKind::Relayed { .. } | FdKind::Listener { .. } | FdKind::Forwarded { .. } => {
                        !relay_ends.contains_key(&fd)
                    }
                    FdKind::File { path, .. } => same_file(pid, fd, path),
                    // Still the same open file as the one it names (a
                    // close would drop the locks taken on it at home).
                    FdKind::Duplicate { of } => ptrace::same_open_file(pid, fd, *of),
                    _ => false,
                }
        })
    };
    let open_now: Vec<i32> = procfs::fds(t.pid)?.into_iter().map(|f| f.0).collect();
    for &fd in &open_now {
        if !kept(fd) {
            t.syscall_ok(libc::SYS_close, &[fd as u64])?;
        }
    }
    let kept_now: Vec<i32> = open_now.iter().copied().filter(|&fd| kept(fd)).collect();
    for entry in &image.fds {
        let path = match &entry.kind {
            FdKind::File { pos, .. } if kept_now.contains(&entry.fd) => {
                // Where the process left it, with its status flags.
                if entry.flags & libc::O_APPEND == 0 {
                    t.syscall_ok(
                        libc::SYS_lseek,
                        &[entry.fd as u64, *pos, libc::SEEK_SET as u64],
                    )?;
                }
                let status = entry.flags & (libc::O_APPEND | libc::O_NONBLOCK | libc::O_NOATIME);
                t.syscall_ok(
                    libc::SYS_fcntl,
                    &[entry.fd as u64, libc::F_SETFL as u64, status as u64],
                )?;
                let flag = if entry.cloexec { libc::FD_CLOEXEC } else { 0 };
                t.syscall_ok(
                    libc::SYS_fcntl,
                    &[entry.fd as u64, libc::F_SETFD as u64, flag as u64],
                )?;
                continue;
            }
            FdKind::File { path, .. }
            | FdKind::Device { path }
            | FdKind::Directory { path, .. }
            | FdKind::Path { path } => path,
            FdKind::DaemonLink { unread } if unread.is_empty() => "/dev/null",
            FdKind::DaemonLink { unread } => {
                // A socket holding what the process had still to read, then
                // end of file; the library reconnects after reading it.
                let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
                {
                    use std::io::Write;
                    (&ours).write_all(unread)?;
                }
                drop(ours);
                let given = give_fds(t, scratch, &[OwnedFd::from(theirs)])?[0];
                place_fd(t, given, entry)?;
                continue;
            }
            // Made once every descriptor it watches is back.
            FdKind::Epoll { .. } => continue,
            // Made once the one it names is back.
            FdKind::Duplicate { .. } => continue,
            FdKind::SignalFd { mask } => {
                t.write(scratch, &mask.to_le_bytes())?;
                let made = t.syscall_ok(
                    libc::SYS_signalfd4,
                    &[
                        u64::MAX,
                        scratch,
                        8,
                        (entry.flags & libc::O_NONBLOCK) as u64,
                    ],
                )?;
                place_fd(t, made, entry)?;
                continue;
            }
            FdKind::Relayed { what, .. }
            | FdKind::Listener { what, .. }
            | FdKind::Forwarded { what } => {
                match relay_ends.get(&entry.fd) {
                    // A stand-in's flags are the original's, at home.
                    Some(end) if matches!(entry.kind, FdKind::Forwarded { .. }) => {
                        let given = give_fds(t, scratch, &[end.try_clone()?])?[0];
                        place_fd(t, given, entry)?;
                    }
                    Some(end) => {
                        let dup = end.try_clone()?;
                        let given = give_fds(t, scratch, &[dup])?[0];
                        place_fd(t, given, entry)?;
                        // Non-blocking if the original was.
                        t.syscall_ok(
                            libc::SYS_fcntl,
                            &[
                                entry.fd as u64,
                                libc::F_SETFL as u64,
                                (entry.flags & libc::O_NONBLOCK) as u64,
                            ],
                        )?;
                    }
                    None if open_now.contains(&entry.fd) => {}
                    None => {
                        return Err(MigrateError::Restore(format!(
                            "fd {} ({what}) has no relay or stand-in",
                            entry.fd
                        )))
                    }
                }
                continue;
            }
        };
        // Opened here, as root, and handed over: the process may have
        // dropped the rights it opened the file with (a server that
        // switched to an unprivileged user keeps its logs open).
        let file = reopen(path, entry.flags).map_err(|e| {
            MigrateError::Restore(format!("reopening fd {} ({path}): {e}", entry.fd))
        })?;
        if let FdKind::File { pos, .. } | FdKind::Directory { pos, .. } = entry.kind {
            if entry.flags & libc::O_APPEND == 0 {
                use std::io::Seek;
                (&file).seek(std::io::SeekFrom::Start(pos))?;
            }
        }
        let given = give_fds(t, scratch, &[OwnedFd::from(file)])?[0];
        place_fd(t, given, entry)?;
    }
    for entry in &image.fds {
        if let FdKind::Duplicate { of } = entry.kind {
            if kept_now.contains(&entry.fd) {
                let flag = if entry.cloexec { libc::FD_CLOEXEC } else { 0 };
                t.syscall_ok(
                    libc::SYS_fcntl,
                    &[entry.fd as u64, libc::F_SETFD as u64, flag as u64],
                )?;
                continue;
            }
            let cloexec = if entry.cloexec { libc::O_CLOEXEC } else { 0 };
            t.syscall_ok(
                libc::SYS_dup3,
                &[of as u64, entry.fd as u64, cloexec as u64],
            )?;
        }
    }
    for entry in &image.fds {
        if let FdKind::Epoll { targets } = &entry.kind {
            restore_epoll(t, scratch, entry, targets)?;
        }
    }
    Ok(())
}

/// Whether descriptor `fd` of process `pid` is the file at `path`.
fn same_file(pid: i32, fd: i32, path: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (
        std::fs::metadata(format!("/proc/{pid}/fd/{fd}")),
        std::fs::metadata(path),
    ) {
        (Ok(open), Ok(named)) => {
            open.is_file() && open.dev() == named.dev() && open.ino() == named.ino()
        }
        _ => false,
    }
}

/// Put `given`, a descriptor the process just received, at `entry`'s
/// number with its close-on-exec flag.
fn place_fd(t: &mut Tracee, given: u64, entry: &crate::image::FdEntry) -> Result<(), MigrateError> {
    let fd = entry.fd as u64;
    if given == fd {
        let flag = if entry.cloexec { libc::FD_CLOEXEC } else { 0 };
        t.syscall_ok(libc::SYS_fcntl, &[fd, libc::F_SETFD as u64, flag as u64])?;
    } else {
        let cloexec = if entry.cloexec { libc::O_CLOEXEC } else { 0 };
        t.syscall_ok(libc::SYS_dup3, &[given, fd, cloexec as u64])?;
        t.syscall_ok(libc::SYS_close, &[given])?;
    }
    Ok(())
}

/// `path` opened as the process had it (`flags` from its fdinfo, without
/// those that only matter when creating).
fn reopen(path: &str, flags: i32) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let (reads, writes) = directions(flags);
    std::fs::OpenOptions::new()
        .read(reads)
        .write(writes)
        .custom_flags(
            flags
                & !(libc::O_ACCMODE
                    | libc::O_CREAT
                    | libc::O_EXCL
                    | libc::O_TRUNC
                    | libc::O_CLOEXEC),
        )
        .open(path)
}

/// A new epoll instance at `entry`'s number, watching `targets` (each
/// descriptor with its events and data) as the original did.
fn restore_epoll(
    t: &mut Tracee,
    scratch: u64,
    entry: &crate::image::FdEntry,
    targets: &[(i32, u32, u64)],
) -> Result<(), MigrateError> {
    let cloexec = if entry.cloexec {
        libc::EPOLL_CLOEXEC
    } else {
        0
    };
    let fd = t.syscall_ok(libc::SYS_epoll_create1, &[cloexec as u64])?;
    if fd != entry.fd as u64 {
        t.syscall_ok(libc::SYS_dup3, &[fd, entry.fd as u64, cloexec as u64])?;
        t.syscall_ok(libc::SYS_close, &[fd])?;
    }
    for &(target, events, data) in targets {
        // struct epoll_event is packed on x86-64: u32 events, u64 data.
        let mut event = events.to_le_bytes().to_vec();
        event.extend_from_slice(&data.to_le_bytes());
        t.write(scratch, &event)?;
        t.syscall_ok(
            libc::SYS_epoll_ctl,
            &[
                entry.fd as u64,
                libc::EPOLL_CTL_ADD as u64,
                target as u64,
                scratch,
            ],
        )
        .map_err(|e| {
            MigrateError::Restore(format!("epoll {}: watching fd {target}: {e}", entry.fd))
        })?;
    }
    Ok(())
}

/// `ioctl` on /dev/userfaultfd that makes a userfaultfd for the caller.
const USERFAULTFD_IOC_NEW: u64 = 0xAA00;

/// Map the image's segments from this node's copies, give the process a
/// userfaultfd of its own with their ranges registered by this node's
/// daemon, and point its client library at that daemon.
fn adopt_segments(
    t: &mut Tracee,
    image: &Image,
    scratch: u64,
    node: &Path,
) -> Result<(), MigrateError> {
    // Our attachments keep the node's copies while the process adopts its
    // own; they end when `host` is dropped.
    let mut host = DaemonConn::connect(node)?;
    let mut ids: Vec<(i32, bool)> = Vec::new();
    for r in &image.regions {
        if let Backing::Segment { id, readonly, .. } = r.backing {
            if !ids.iter().any(|(i, _)| *i == id) {
                ids.push((id, readonly));
            }
        }
    }
    let memfds = ids
        .iter()
        .map(|&(id, readonly)| host.segment_memfd(id, readonly))
        .collect::<Result<Vec<OwnedFd>, _>>()?;
    // The process adopts them as it had them, whatever its credentials
    // now (a server attaches as root, then drops privileges).
    host.call_ok(
        &dsm::wire::ClientRequest::GrantAdopt {
            pid: t.pid,
            attachments: image.attachments.clone(),
        },
        None,
    )?;
    let in_target = give_fds(t, scratch, &memfds)?;
    for r in &image.regions {
        let Backing::Segment { id, offset, .. } = r.backing else {
            continue;
        };
        let Some(i) = ids.iter().position(|(s, _)| *s == id) else {
            continue;
        };
        t.syscall_ok(
            libc::SYS_mmap,
            &[
                r.start,
                r.end - r.start,
                u64::from(r.prot),
                (libc::MAP_SHARED | libc::MAP_FIXED_NOREPLACE) as u64,
                in_target[i],
                offset,
            ],
        )
        .map_err(|e| MigrateError::Restore(format!("mapping segment {id}: {e}")))?;
    }
    for fd in in_target {
        t.syscall_ok(libc::SYS_close, &[fd])?;
    }

    let uffd = new_uffd_in(t, scratch)?;

    // A connection the daemon takes for the process's own (its peer
    // credentials are the process's), to hand over the attachments; when
    // we close it the daemon keeps serving them until the process's client
    // library reconnects and takes them back.
    let sock = t.syscall_ok(
        libc::SYS_socket,
        &[
            libc::AF_UNIX as u64,
            (libc::SOCK_STREAM | libc::SOCK_CLOEXEC) as u64,
            0,
        ],
    )?;
    let path = node.as_os_str().as_encoded_bytes();
    if path.len() >= dsm::client::SOCKET_SLOT_LEN {
        return Err(MigrateError::Restore(format!(
            "daemon socket path too long: {}",
            node.display()
        )));
    }
    let mut addr = (libc::AF_UNIX as u16).to_le_bytes().to_vec();
    addr.extend_from_slice(path);
    addr.push(0);
    t.write(scratch, &addr)?;
    t.syscall_ok(libc::SYS_connect, &[sock, scratch, addr.len() as u64])
        .map_err(|e| MigrateError::Restore(format!("connecting to {}: {e}", node.display())))?;
    let stream = std::os::unix::net::UnixStream::from(ptrace::take_fd(t.pid, sock)?);
    t.syscall_ok(libc::SYS_close, &[sock])?;
    // Recorded with the session it leaves, so that the next move finds the
    // library's socket slot even before the library reconnects.
    let link = image.socket_slot.map(|socket_slot| dsm::wire::ClientLink {
        // No descriptor of the library's is open yet (-1): it reconnects.
        fd: -1,
        socket_slot,
        calls_in_flight: image.calls_in_flight.unwrap_or(0),
    });
    let mut as_process = DaemonConn::over_as(stream, link)?;
    as_process.call_ok(
        &dsm::wire::ClientRequest::Adopt {
            attachments: image.attachments.clone(),
        },
        Some(uffd.as_fd()),
    )?;
    drop(as_process);
    if let Some(slot) = image.socket_slot {
        let mut bytes = path.to_vec();
        bytes.push(0);
        t.write(slot, &bytes)?;
    }
    drop(host);
    Ok(())
}

/// A userfaultfd bound to the tracee's memory, made by the tracee (through
/// /dev/userfaultfd, which we open for it), for us to use.
fn new_uffd_in(t: &mut Tracee, scratch: u64) -> Result<OwnedFd, MigrateError> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")?;
    let dev_in_target = give_fds(t, scratch, &[OwnedFd::from(dev)])?[0];
    let uffd_in_target = t.syscall_ok(
        libc::SYS_ioctl,
        &[
            dev_in_target,
            USERFAULTFD_IOC_NEW,
            (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64,
        ],
    )?;
    let uffd = ptrace::take_fd(t.pid, uffd_in_target)?;
    t.syscall_ok(libc::SYS_close, &[uffd_in_target])?;
    t.syscall_ok(libc::SYS_close, &[dev_in_target])?;
    Ok(uffd)
}

/// Register the lazy regions with a userfaultfd of the tracee's: the
/// server of their pages from now on.
fn register_lazy(
    t: &mut Tracee,
    image: &Image,
    scratch: u64,
) -> Result<Option<crate::lazy::LazyMemory>, MigrateError> {
    if image.lazy.is_empty() {
        return Ok(None);
    }
    let regions: Vec<(u64, u64)> = image
        .regions
        .iter()
        .filter(|r| crate::checkpoint::lazy_region(r))
        .filter(|r| image.lazy.iter().any(|&(a, _)| r.start <= a && a < r.end))
        .map(|r| (r.start, r.end))
        .collect();
    if image
        .lazy
        .iter()
        .any(|&(a, l)| !regions.iter().any(|&(s, e)| s <= a && a + l <= e))
    {
        return Err(MigrateError::Restore(
            "lazy pages outside the lazy regions".into(),
        ));
    }
    let uffd = dsm::uffd::Uffd::from_fd(new_uffd_in(t, scratch)?);
    uffd.api(u64::from(linux_raw_sys::general::UFFD_FEATURE_EVENT_FORK))?;
    for &(start, end) in &regions {
        uffd.register(
            start,
            end - start,
            u64::from(linux_raw_sys::general::UFFDIO_REGISTER_MODE_MISSING),
        )?;
    }
    Ok(Some(crate::lazy::LazyMemory::new(
        uffd,
        &image.lazy,
        regions,
    )))
}

/// Put duplicates of `fds` into the tracee (SCM_RIGHTS to a socket it
/// binds for the purpose); their numbers there.
fn give_fds(t: &mut Tracee, scratch: u64, fds: &[OwnedFd]) -> Result<Vec<u64>, MigrateError> {
    use std::os::linux::net::SocketAddrExt;
    const MSGHDR: u64 = 0;
    const IOV: u64 = 64;
    const BYTE: u64 = 96;
    const CONTROL: u64 = 128;
    if fds.is_empty() {
        return Ok(Vec::new());
    }
    if fds.len() > 200 {
        return Err(MigrateError::Restore("too many descriptors to pass".into()));
    }
    static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = format!(
        "migshm-restore-{}-{}-{}",
        std::process::id(),
        t.pid,
        SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let sock = t.syscall_ok(
        libc::SYS_socket,
        &[
            libc::AF_UNIX as u64,
            (libc::SOCK_DGRAM | libc::SOCK_CLOEXEC) as u64,
            0,
        ],
    )?;
    let received = (|| -> Result<Vec<u64>, MigrateError> {
        let mut addr = (libc::AF_UNIX as u16).to_le_bytes().to_vec();
        addr.push(0);
        addr.extend_from_slice(name.as_bytes());
        t.write(scratch, &addr)?;
        t.syscall_ok(libc::SYS_bind, &[sock, scratch, addr.len() as u64])?;
        let sender = std::os::unix::net::UnixDatagram::unbound()?;
        sender.connect_addr(&std::os::unix::net::SocketAddr::from_abstract_name(
            name.as_bytes(),
        )?)?;
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        dsm::fdpass::send_with_fds(sender.as_raw_fd(), b"f", &raw)?;
        let control_len = 16 + (4 * fds.len() as u64).div_ceil(8) * 8;
        let words = |w: &[u64]| -> Vec<u8> { w.iter().flat_map(|v| v.to_le_bytes()).collect() };
        t.write(
            scratch + MSGHDR,
            &words(&[0, 0, scratch + IOV, 1, scratch + CONTROL, control_len, 0]),
        )?;
        t.write(scratch + IOV, &words(&[scratch + BYTE, 1]))?;
        t.syscall_ok(libc::SYS_recvmsg, &[sock, scratch + MSGHDR, 0])?;
        let control = t.read(scratch + CONTROL, control_len as usize)?;
        let level = i32::from_le_bytes(control[8..12].try_into().unwrap_or_default());
        let kind = i32::from_le_bytes(control[12..16].try_into().unwrap_or_default());
        if level != libc::SOL_SOCKET || kind != libc::SCM_RIGHTS {
            return Err(MigrateError::Restore("descriptors did not arrive".into()));
        }
        Ok(control[16..16 + 4 * fds.len()]
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap_or_default()) as u64)
            .collect())
    })();
    t.syscall_ok(libc::SYS_close, &[sock])?;
    received
}
