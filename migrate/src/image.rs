//! A checkpoint of one process: everything `restore` needs to make another
//! process (on this node or another) continue exactly where it stopped.

use serde::{Deserialize, Serialize};

/// Registers from `PTRACE_GETREGS`, by name (the kernel's x86-64
/// `user_regs_struct`, fs_base included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registers {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

/// What backs a region of the address space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Backing {
    /// Private anonymous memory (heap, stack, anonymous mmap).
    Anonymous { grows_down: bool },
    /// A file mapped privately: pages never written come from the file.
    PrivateFile { file: FileIdentity, offset: u64 },
    /// A regular file mapped shared.
    SharedFile { file: FileIdentity, offset: u64 },
    /// A DSM segment's memfd: re-attached to the destination node's copy,
    /// whose pages fault in through the coherence protocol.
    Segment {
        id: i32,
        readonly: bool,
        offset: u64,
    },
    /// A semaphore set's fast-path region of the old node: replaced by a
    /// retired one, so that the process asks its new node's daemon.
    RetiredSemRegion,
    /// One of the kernel's special mappings ("[vdso]", "[vvar]",
    /// "[vvar_vclock]"): moved back to its old address, never copied.
    Special { name: String },
}

/// A file as the process saw it; restore refuses a file that changed,
/// since code and data mapped at the old offsets would no longer match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub path: String,
    pub dev: u64,
    pub inode: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    /// PROT_* bits.
    pub prot: u32,
    pub backing: Backing,
}

/// Contiguous pages of private memory that differ from what the mapping
/// alone would give (written anonymous pages, copied-on-write file pages).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    pub addr: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// A file descriptor and how to get it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdEntry {
    pub fd: i32,
    /// open(2) flags as /proc shows them (access mode, O_APPEND, …).
    pub flags: i32,
    pub cloexec: bool,
    pub kind: FdKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FdKind {
    /// A regular file, reopened by path at the same offset.
    File { path: String, pos: u64 },
    /// A character device (/dev/null, a terminal…), reopened by path.
    Device { path: String },
    /// A directory, reopened by path at the same `getdents` offset (the
    /// file system's cookie, which `lseek` takes back on the same tree).
    Directory { path: String, pos: u64 },
    /// An `O_PATH` descriptor (of a file of any kind), reopened by path.
    Path { path: String },
    /// A pipe or a socket: relayed between the node it runs on and the home
    /// process, which keeps the original (`what` is its /proc name).
    /// `shut_write`: a stream socket whose write side was shut (by
    /// `shutdown` or by its peer's going): the process's end is shut too.
    /// `messages`: a datagram or seqpacket socket (its type): the
    /// process's end is of the same type, and each message is relayed as
    /// one, with its boundaries.
    Relayed {
        what: String,
        #[serde(default)]
        shut_write: bool,
        #[serde(default)]
        messages: Option<i32>,
    },
    /// A listening TCP or (`unix`) unix stream socket: the home process
    /// keeps it, and a stand-in listener on the node the process runs on
    /// gets, one at a time, the connections the deputy accepts from it
    /// while the process waits for one (see `accept.rs`).
    Listener {
        what: String,
        #[serde(default)]
        unix: bool,
    },
    /// What can live only at home (a deleted file, an eventfd, a timerfd,
    /// an inotify instance): the home process keeps the original, the
    /// process gets a stand-in at the same number, and its calls on it are
    /// carried out at home by the deputy (`forward.rs`). `what` is its
    /// /proc name.
    Forwarded { what: String },
    /// Another number for the open file of descriptor `of` (dup, dup2, a
    /// shell's 2>&1): made with dup3, so that the two share offset and
    /// status flags again.
    Duplicate { of: i32 },
    /// A signalfd, made again with its mask (it reads the signals of the
    /// process that reads it: the process's own, wherever it runs).
    SignalFd { mask: u64 },
    /// An epoll instance and what it watches (descriptor, events, data),
    /// made again with the same targets once the other descriptors are back.
    Epoll { targets: Vec<(i32, u32, u64)> },
    /// The process's connection to its node's daemon: the client library
    /// reconnects to the daemon named in its socket slot on its next call.
    /// Until then /dev/null stands in for it, or, if an answer was on its
    /// way to the process (a `semop` withdrawn for the move), a socket
    /// holding `unread`, the bytes the process had still to read.
    DaemonLink {
        #[serde(with = "serde_bytes")]
        unread: Vec<u8>,
    },
}

/// A POSIX timer (`timer_create`), made again with the same id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PosixTimer {
    pub id: i32,
    pub clock: i32,
    /// SIGEV_SIGNAL, SIGEV_NONE or SIGEV_THREAD_ID (to the process's own
    /// thread, wherever it runs).
    pub notify: i32,
    pub signo: i32,
    /// `sigev_value`.
    pub value: u64,
    /// `struct itimerspec` from `timer_gettime`: interval, time left.
    pub setting: Vec<u8>,
}

/// `struct kernel_sigaction` for one signal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalAction {
    pub signal: i32,
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// The memory-descriptor fields PR_SET_MM_MAP takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rseq {
    pub area: u64,
    pub len: u32,
    pub signature: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// The pid the process had where it was checkpointed.
    pub pid: i32,
    pub exe: FileIdentity,
    pub comm: String,
    pub credentials: Credentials,
    pub regs: Registers,
    /// The XSAVE area, as PTRACE_GETREGSET NT_X86_XSTATE returns it.
    #[serde(with = "serde_bytes")]
    pub xstate: Vec<u8>,
    pub sigmask: u64,
    pub actions: Vec<SignalAction>,
    pub rseq: Option<Rseq>,
    pub robust_list: (u64, u64),
    pub tid_address: u64,
    /// glibc caches the thread id in its thread descriptor; where, if the
    /// old pid was found there.
    pub cached_tid_at: Option<u64>,
    pub mm: MmFields,
    #[serde(with = "serde_bytes")]
    pub auxv: Vec<u8>,
    pub regions: Vec<Region>,
    pub pages: Vec<PageRun>,
    /// Private pages left behind, fetched from the source once the process
    /// runs (on fault, and streamed meanwhile): (address, length) runs, all
    /// in regions that hold no page of `pages`.
    pub lazy: Vec<(u64, u64)>,
    pub fds: Vec<FdEntry>,
    pub cwd: String,
    pub umask: u32,
    /// (resource, soft, hard)
    pub rlimits: Vec<(u32, u64, u64)>,
    /// The nice value.
    pub nice: i32,
    /// The alternate signal stack (`stack_t`: ss_sp, ss_flags, ss_size),
    /// if one is set.
    pub altstack: Option<(u64, i32, u64)>,
    /// Interval timers (ITIMER_REAL, _VIRTUAL, _PROF) that are set: which,
    /// and `struct itimerval` (interval, then time left).
    pub itimers: Vec<(i32, Vec<u8>)>,
    pub posix_timers: Vec<PosixTimer>,
    /// Signals queued and not yet delivered (raw `siginfo_t`), queued again
    /// in the restored process: only in an image whose source process is
    /// killed after it (a return home), never one that stays to pass them on.
    #[serde(default)]
    pub pending_signals: Vec<Vec<u8>>,
    /// Where the client library reads the daemon's socket path from on
    /// reconnecting (`dsm::wire::ClientLink::socket_slot`).
    pub socket_slot: Option<u64>,
    /// Where the client library counts its calls in flight
    /// (`dsm::wire::ClientLink::calls_in_flight`).
    #[serde(default)]
    pub calls_in_flight: Option<u64>,
    /// The process's DSM attachments, as its node's daemon registered them.
    pub attachments: Vec<dsm::wire::AttachmentRecord>,
    /// It had children where it was checkpointed: they stay there with
    /// the parked home process, which waits for them for it (`wait4` and
    /// `waitid` go home, `forward.rs`).
    #[serde(default)]
    pub has_children: bool,
}

impl Image {
    /// Take the file identities `earlier` recorded for the same files (same
    /// path and inode): what the process mapped is what it had when it was
    /// first checkpointed, not what the files are now.
    pub fn keep_identities_of(&mut self, earlier: &Image) {
        let known = |f: &FileIdentity| -> Option<FileIdentity> {
            std::iter::once(&earlier.exe)
                .chain(earlier.regions.iter().filter_map(|r| match &r.backing {
                    Backing::PrivateFile { file, .. } | Backing::SharedFile { file, .. } => {
                        Some(file)
                    }
                    _ => None,
                }))
                .find(|e| e.path == f.path && e.inode == f.inode && e.dev == f.dev)
                .cloned()
        };
        if let Some(e) = known(&self.exe) {
            self.exe = e;
        }
        for r in &mut self.regions {
            if let Backing::PrivateFile { file, .. } | Backing::SharedFile { file, .. } =
                &mut r.backing
            {
                if let Some(e) = known(file) {
                    *file = e;
                }
            }
        }
    }

    pub fn private_bytes(&self) -> usize {
        self.pages.iter().map(|r| r.data.len()).sum()
    }

    pub fn lazy_bytes(&self) -> u64 {
        self.lazy.iter().map(|r| r.1).sum()
    }

    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        postcard::to_stdvec(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Image, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

impl From<libc::user_regs_struct> for Registers {
    fn from(r: libc::user_regs_struct) -> Registers {
        Registers {
            r15: r.r15,
            r14: r.r14,
            r13: r.r13,
            r12: r.r12,
            rbp: r.rbp,
            rbx: r.rbx,
            r11: r.r11,
            r10: r.r10,
            r9: r.r9,
            r8: r.r8,
            rax: r.rax,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            orig_rax: r.orig_rax,
            rip: r.rip,
            cs: r.cs,
            eflags: r.eflags,
            rsp: r.rsp,
            ss: r.ss,
            fs_base: r.fs_base,
            gs_base: r.gs_base,
            ds: r.ds,
            es: r.es,
            fs: r.fs,
            gs: r.gs,
        }
    }
}

impl From<Registers> for libc::user_regs_struct {
    fn from(r: Registers) -> libc::user_regs_struct {
        libc::user_regs_struct {
            r15: r.r15,
            r14: r.r14,
            r13: r.r13,
            r12: r.r12,
            rbp: r.rbp,
            rbx: r.rbx,
            r11: r.r11,
            r10: r.r10,
            r9: r.r9,
            r8: r.r8,
            rax: r.rax,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            orig_rax: r.orig_rax,
            rip: r.rip,
            cs: r.cs,
            eflags: r.eflags,
            rsp: r.rsp,
            ss: r.ss,
            fs_base: r.fs_base,
            gs_base: r.gs_base,
            ds: r.ds,
            es: r.es,
            fs: r.fs,
            gs: r.gs,
        }
    }
}
