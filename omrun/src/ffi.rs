//! The exported C functions. Each one decides the route (libc, daemon, or
//! an errno), converts the C arguments, and never unwinds into C.

use crate::runtime::{errno_of, lock, route, Route, Runtime};
use libc::{c_int, c_ulong, c_void, key_t, sembuf, shmid_ds, size_t, timespec};
use std::ffi::CStr;

const SHM_RDONLY: c_int = 0o10000;
const SHM_RND: c_int = 0o20000;
const SHMLBA: usize = 4096;

fn set_errno(e: i32) {
    // SAFETY: __errno_location returns the calling thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

/// Run `f`, turning a panic (a bug of ours) into EIO rather than unwinding
/// into the program.
fn guarded<T>(fail: T, f: impl FnOnce() -> Result<T, i32>) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            set_errno(e);
            fail
        }
        Err(_) => {
            set_errno(libc::EIO);
            fail
        }
    }
}

/// The next definition of `name` after ours (libc's).
fn real(name: &CStr) -> Option<*mut c_void> {
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
    let sym = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
    (!sym.is_null()).then_some(sym)
}

macro_rules! native {
    ($name:literal, $ty:ty) => {{
        match real($name) {
            // SAFETY: the symbol is libc's function of that name, whose C
            // signature is `$ty`.
            Some(f) => Ok(unsafe { std::mem::transmute::<*mut c_void, $ty>(f) }),
            None => Err(libc::ENOSYS),
        }
    }};
}

fn daemon<T>(f: impl FnOnce(&'static Runtime) -> Result<T, i32>) -> Option<Result<T, i32>> {
    match route() {
        Route::Native => None,
        Route::Daemon(rt) => Some(f(rt)),
        Route::Fail(e) => Some(Err(e)),
    }
}

// ---- shared memory ---------------------------------------------------------------

/// # Safety
/// As `shmget(2)`.
#[no_mangle]
pub unsafe extern "C" fn shmget(key: key_t, size: size_t, shmflg: c_int) -> c_int {
    guarded(-1, || {
        daemon(|rt| {
            rt.segments
                .get_on(key, size as u64, shmflg, rt.home)
                .map_err(|e| errno_of(&e))
        })
        .unwrap_or_else(|| {
            let f = native!(
                c"shmget",
                unsafe extern "C" fn(key_t, size_t, c_int) -> c_int
            )?;
            // SAFETY: libc's shmget with the caller's arguments.
            Ok(unsafe { f(key, size, shmflg) })
        })
    })
}

/// # Safety
/// As `shmat(2)`.
#[no_mangle]
pub unsafe extern "C" fn shmat(shmid: c_int, shmaddr: *const c_void, shmflg: c_int) -> *mut c_void {
    let failed = usize::MAX as *mut c_void; // (void *) -1
    guarded(failed, || {
        daemon(|rt| {
            let mut addr = shmaddr as usize;
            if addr != 0 {
                if shmflg & SHM_RND != 0 {
                    addr &= !(SHMLBA - 1);
                } else if !addr.is_multiple_of(SHMLBA) {
                    return Err(libc::EINVAL);
                }
            }
            let readonly = shmflg & SHM_RDONLY != 0;
            let hint = (addr != 0).then_some(addr);
            let attachment =
                rt.segments
                    .attach_at(shmid, readonly, hint)
                    .map_err(|e| match errno_of(&e) {
                        // The range is taken: what shmat says without SHM_REMAP.
                        libc::EEXIST => libc::EINVAL,
                        n => n,
                    })?;
            let ptr = attachment.as_ptr() as *mut c_void;
            lock(&rt.attached).push(attachment);
            crate::reshape::note_dsm_mapping();
            Ok(ptr)
        })
        .unwrap_or_else(|| {
            let f = native!(
                c"shmat",
                unsafe extern "C" fn(c_int, *const c_void, c_int) -> *mut c_void
            )?;
            // SAFETY: libc's shmat with the caller's arguments.
            Ok(unsafe { f(shmid, shmaddr, shmflg) })
        })
    })
}

/// # Safety
/// As `shmdt(2)`.
#[no_mangle]
pub unsafe extern "C" fn shmdt(shmaddr: *const c_void) -> c_int {
    guarded(-1, || {
        daemon(|rt| {
            // A piece of a SysV attachment must start at the address (an
            // anonymous or POSIX mapping is not one: EINVAL, as natively).
            let addr = shmaddr as usize;
            let sysv: Vec<u64> = lock(&rt.attached).iter().map(|a| a.handle()).collect();
            let starts = rt
                .segments
                .pieces_in(addr, 1)
                .iter()
                .any(|p| p.addr == addr as u64 && sysv.contains(&p.handle));
            if !starts {
                return Err(libc::EINVAL);
            }
            let detached = rt.segments.detach_at(addr).map_err(|e| errno_of(&e));
            lock(&rt.attached).retain(|a| a.is_mapped());
            detached.map(|()| 0)
        })
        .unwrap_or_else(|| {
            let f = native!(c"shmdt", unsafe extern "C" fn(*const c_void) -> c_int)?;
            // SAFETY: libc's shmdt with the caller's argument.
            Ok(unsafe { f(shmaddr) })
        })
    })
}

/// # Safety
/// As `shmctl(2)`: `buf` must be valid for the command (a bad pointer
/// gives EFAULT, as from the kernel).
#[no_mangle]
pub unsafe extern "C" fn shmctl(shmid: c_int, cmd: c_int, buf: *mut shmid_ds) -> c_int {
    guarded(-1, || {
        daemon(|rt| crate::ctl::shmctl(rt, shmid, cmd, buf as usize)).unwrap_or_else(|| {
            let f = native!(
                c"shmctl",
                unsafe extern "C" fn(c_int, c_int, *mut shmid_ds) -> c_int
            )?;
            // SAFETY: libc's shmctl with the caller's arguments.
            Ok(unsafe { f(shmid, cmd, buf) })
        })
    })
}

// ---- semaphores --------------------------------------------------------------------

/// # Safety
/// As `semget(2)`.
#[no_mangle]
pub unsafe extern "C" fn semget(key: key_t, nsems: c_int, semflg: c_int) -> c_int {
    guarded(-1, || {
        daemon(|rt| {
            rt.sems
                .get_on(key, nsems, semflg, rt.home)
                .map(|s| s.id())
                .map_err(|e| errno_of(&e))
        })
        .unwrap_or_else(|| {
            let f = native!(
                c"semget",
                unsafe extern "C" fn(key_t, c_int, c_int) -> c_int
            )?;
            // SAFETY: libc's semget with the caller's arguments.
            Ok(unsafe { f(key, nsems, semflg) })
        })
    })
}

/// # Safety
/// As `semop(2)`.
#[no_mangle]
pub unsafe extern "C" fn semop(semid: c_int, sops: *mut sembuf, nsops: size_t) -> c_int {
    guarded(-1, || {
        daemon(|rt| crate::ctl::semtimedop(rt, semid, sops as usize, nsops, None)).unwrap_or_else(
            || {
                let f = native!(
                    c"semop",
                    unsafe extern "C" fn(c_int, *mut sembuf, size_t) -> c_int
                )?;
                // SAFETY: libc's semop with the caller's arguments.
                Ok(unsafe { f(semid, sops, nsops) })
            },
        )
    })
}

/// # Safety
/// As `semtimedop(2)`.
#[no_mangle]
pub unsafe extern "C" fn semtimedop(
    semid: c_int,
    sops: *mut sembuf,
    nsops: size_t,
    timeout: *const timespec,
) -> c_int {
    guarded(-1, || {
        daemon(|rt| {
            let timeout = (!timeout.is_null()).then_some(timeout as usize);
            crate::ctl::semtimedop(rt, semid, sops as usize, nsops, timeout)
        })
        .unwrap_or_else(|| {
            let f = native!(
                c"semtimedop",
                unsafe extern "C" fn(c_int, *mut sembuf, size_t, *const timespec) -> c_int
            )?;
            // SAFETY: libc's semtimedop with the caller's arguments.
            Ok(unsafe { f(semid, sops, nsops, timeout) })
        })
    })
}

/// `semctl` is variadic in C; its fourth argument (`union semun`, one
/// machine word) is read only by the commands that take it, which is how
/// the x86-64 and aarch64 calling conventions pass it (DESIGN.md §5).
///
/// # Safety
/// As `semctl(2)`: the fourth argument must be what the command expects
/// (a bad pointer in it gives EFAULT, as from the kernel).
#[no_mangle]
pub unsafe extern "C" fn semctl(semid: c_int, semnum: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    guarded(-1, || {
        daemon(|rt| crate::ctl::semctl(rt, semid, semnum, cmd, arg)).unwrap_or_else(|| {
            let f = native!(
                c"semctl",
                unsafe extern "C" fn(c_int, c_int, c_int, ...) -> c_int
            )?;
            // SAFETY: libc's semctl with the caller's arguments.
            Ok(unsafe { f(semid, semnum, cmd, arg) })
        })
    })
}

// ---- anonymous shared memory --------------------------------------------------------

/// libc's `mmap` and `munmap`, found on first use (dlsym does not map
/// anything through them).
static REAL_MMAP: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static REAL_MUNMAP: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

type MmapFn =
    unsafe extern "C" fn(*mut c_void, size_t, c_int, c_int, c_int, libc::off_t) -> *mut c_void;
type MunmapFn = unsafe extern "C" fn(*mut c_void, size_t) -> c_int;

fn cached(slot: &std::sync::atomic::AtomicUsize, name: &CStr) -> Option<*mut c_void> {
    let known = slot.load(std::sync::atomic::Ordering::Acquire);
    if known != 0 {
        return Some(known as *mut c_void);
    }
    let f = real(name)?;
    slot.store(f as usize, std::sync::atomic::Ordering::Release);
    Some(f)
}

/// `mmap`: an anonymous shared mapping becomes a DSM segment under omrun
/// (so that it stays one memory for processes on several nodes); anything
/// else, or a DSM refusal, goes to libc as is.
///
/// # Safety
/// As `mmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: libc::off_t,
) -> *mut c_void {
    // Shared, readable, and a DSM object under omrun: anonymous memory
    // (a shared mapping of /dev/zero is that too), or a POSIX shared
    // memory object mapped whole (from offset 0).
    let shared = flags & libc::MAP_SHARED != 0
        && flags & libc::MAP_SHARED_VALIDATE != libc::MAP_SHARED_VALIDATE;
    let anonymous = flags & libc::MAP_ANONYMOUS != 0 || (shared && fd >= 0 && is_dev_zero(fd));
    let candidate = shared
        && prot & libc::PROT_READ != 0
        && (anonymous || (fd >= 0 && offset == 0))
        && crate::runtime::anonymous_shared_as_dsm();
    let replaces = flags & libc::MAP_FIXED != 0 && flags & libc::MAP_FIXED_NOREPLACE == 0;
    if candidate {
        let fixed = flags & (libc::MAP_FIXED | libc::MAP_FIXED_NOREPLACE) != 0;
        let writable = prot & libc::PROT_WRITE != 0;
        let at = addr as usize;
        if replaces && at.is_multiple_of(4096) && len > 0 {
            // MAP_FIXED: what was there goes first, DSM pieces included.
            let _ = dsm::memfd::raw::munmap(at, len);
            crate::reshape::mapped_over(at, len);
        }
        let dsm = std::panic::catch_unwind(|| {
            if anonymous {
                return daemon(|rt| {
                    crate::runtime::map_shared_anonymous(rt, at, len, writable, fixed)
                });
            }
            let name = crate::runtime::posix_shm_name(fd)?;
            daemon(|rt| crate::runtime::map_posix_shm(rt, fd, &name, at, len, writable, fixed))
        });
        // Not under a daemon, not a POSIX object (or part of one), or
        // refused (limits): the kernel's mapping below, which works on
        // this node (and keeps the process from migrating).
        if let Ok(Some(Ok(at))) = dsm {
            return at as *mut c_void;
        }
    }
    let mapped = match cached(&REAL_MMAP, c"mmap") {
        // SAFETY: libc's mmap, with the caller's arguments.
        Some(f) => unsafe {
            std::mem::transmute::<*mut c_void, MmapFn>(f)(addr, len, prot, flags, fd, offset)
        },
        None => {
            set_errno(libc::ENOSYS);
            libc::MAP_FAILED
        }
    };
    if replaces && mapped != libc::MAP_FAILED {
        // The kernel's mapping replaced any DSM piece there.
        let _ = std::panic::catch_unwind(|| crate::reshape::mapped_over(mapped as usize, len));
    }
    mapped
}

/// Is `fd` open on /dev/zero?
fn is_dev_zero(fd: c_int) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .is_ok_and(|p| p == std::path::Path::new("/dev/zero"))
}

/// # Safety
/// As `mmap64(2)` (the same call on 64-bit Linux).
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: libc::off_t,
) -> *mut c_void {
    // SAFETY: forwarded as received.
    unsafe { mmap(addr, len, prot, flags, fd, offset) }
}

/// The errno of a call that failed in the interposer, or its result.
fn fail_with<T>(e: i32, failed: T) -> T {
    set_errno(e);
    failed
}

/// `munmap`: pieces of DSM mappings in the range are unmapped and the
/// daemon stops serving them (all of a mapping: it is detached).
///
/// # Safety
/// As `munmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: size_t) -> c_int {
    match std::panic::catch_unwind(|| crate::reshape::munmap(addr as usize, len)) {
        Ok(Some(Ok(()))) => return 0,
        Ok(Some(Err(e))) => return fail_with(e, -1),
        Ok(None) => {}
        Err(_) => return fail_with(libc::EIO, -1),
    }
    match cached(&REAL_MUNMAP, c"munmap") {
        // SAFETY: libc's munmap, with the caller's arguments.
        Some(f) => unsafe { std::mem::transmute::<*mut c_void, MunmapFn>(f)(addr, len) },
        None => fail_with(libc::ENOSYS, -1),
    }
}

static REAL_MREMAP: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
type MremapFn = unsafe extern "C" fn(*mut c_void, size_t, size_t, c_int, ...) -> *mut c_void;

/// `mremap`: a DSM piece moves, grows or shrinks as the kernel would do
/// it, the daemon serving the new range before it can be touched. The
/// fifth argument exists only with MREMAP_FIXED (it is read only then).
///
/// # Safety
/// As `mremap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: size_t,
    new_len: size_t,
    flags: c_int,
    new_addr: *mut c_void,
) -> *mut c_void {
    let target = if flags & libc::MREMAP_FIXED != 0 {
        new_addr as usize
    } else {
        0
    };
    let dsm = std::panic::catch_unwind(|| {
        crate::reshape::mremap(old as usize, old_len, new_len, flags, target)
    });
    match dsm {
        Ok(Some(Ok(at))) => return at as *mut c_void,
        Ok(Some(Err(e))) => return fail_with(e, libc::MAP_FAILED),
        Ok(None) => {}
        Err(_) => return fail_with(libc::EIO, libc::MAP_FAILED),
    }
    match cached(&REAL_MREMAP, c"mremap") {
        // SAFETY: libc's mremap with the caller's arguments.
        Some(f) => unsafe {
            std::mem::transmute::<*mut c_void, MremapFn>(f)(old, old_len, new_len, flags, new_addr)
        },
        None => fail_with(libc::ENOSYS, libc::MAP_FAILED),
    }
}

static REAL_MPROTECT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
type MprotectFn = unsafe extern "C" fn(*mut c_void, size_t, c_int) -> c_int;

/// `mprotect`: a DSM piece attached read-only stays so (EACCES).
///
/// # Safety
/// As `mprotect(2)`.
#[no_mangle]
pub unsafe extern "C" fn mprotect(addr: *mut c_void, len: size_t, prot: c_int) -> c_int {
    match std::panic::catch_unwind(|| crate::reshape::mprotect(addr as usize, len, prot)) {
        Ok(Some(e)) => return fail_with(e, -1),
        Ok(None) => {}
        Err(_) => return fail_with(libc::EIO, -1),
    }
    match cached(&REAL_MPROTECT, c"mprotect") {
        // SAFETY: libc's mprotect with the caller's arguments.
        Some(f) => unsafe { std::mem::transmute::<*mut c_void, MprotectFn>(f)(addr, len, prot) },
        None => fail_with(libc::ENOSYS, -1),
    }
}

static REAL_MADVISE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
type MadviseFn = unsafe extern "C" fn(*mut c_void, size_t, c_int) -> c_int;

/// `madvise`: MADV_REMOVE of DSM pieces zeroes them cluster-wide (the
/// kernel would punch the node's copy behind the protocol's back); every
/// other advice is the kernel's (MADV_DONTNEED on shared memory only drops
/// the page tables: the daemon maps the pages again on the next access).
///
/// # Safety
/// As `madvise(2)`.
#[no_mangle]
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: size_t, advice: c_int) -> c_int {
    if advice == libc::MADV_REMOVE {
        match std::panic::catch_unwind(|| crate::reshape::madvise_remove(addr as usize, len)) {
            Ok(Some(Ok(()))) => return 0,
            Ok(Some(Err(e))) => return fail_with(e, -1),
            Ok(None) => {}
            Err(_) => return fail_with(libc::EIO, -1),
        }
    }
    match cached(&REAL_MADVISE, c"madvise") {
        // SAFETY: libc's madvise with the caller's arguments.
        Some(f) => unsafe { std::mem::transmute::<*mut c_void, MadviseFn>(f)(addr, len, advice) },
        None => fail_with(libc::ENOSYS, -1),
    }
}

static REAL_FALLOCATE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
type FallocateFn = unsafe extern "C" fn(c_int, c_int, libc::off_t, libc::off_t) -> c_int;

/// `fallocate`: the kernel's, on the object's file; then a hole punched
/// in a POSIX object that is a cluster segment zeroes that range of the
/// segment everywhere.
///
/// # Safety
/// As `fallocate(2)`.
#[no_mangle]
pub unsafe extern "C" fn fallocate(
    fd: c_int,
    mode: c_int,
    offset: libc::off_t,
    len: libc::off_t,
) -> c_int {
    let r = match cached(&REAL_FALLOCATE, c"fallocate") {
        // SAFETY: libc's fallocate with the caller's arguments.
        Some(f) => unsafe {
            std::mem::transmute::<*mut c_void, FallocateFn>(f)(fd, mode, offset, len)
        },
        None => return fail_with(libc::ENOSYS, -1),
    };
    if r == 0 && mode & libc::FALLOC_FL_PUNCH_HOLE != 0 && offset >= 0 && len > 0 {
        let dsm = std::panic::catch_unwind(|| {
            crate::reshape::posix_zero_range(fd, offset as u64, len as u64)
        });
        match dsm {
            Ok(Some(Err(e))) => return fail_with(e, -1),
            Err(_) => return fail_with(libc::EIO, -1),
            Ok(_) => {}
        }
    }
    r
}

static REAL_FTRUNCATE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
type FtruncateFn = unsafe extern "C" fn(c_int, libc::off_t) -> c_int;

/// `ftruncate`: a POSIX object that is a cluster segment keeps its size
/// (EPERM for another, as for a sealed memfd).
///
/// # Safety
/// As `ftruncate(2)`.
#[no_mangle]
pub unsafe extern "C" fn ftruncate(fd: c_int, length: libc::off_t) -> c_int {
    if length >= 0 {
        match std::panic::catch_unwind(|| crate::reshape::posix_truncate(fd, length as u64)) {
            Ok(Some(e)) => return fail_with(e, -1),
            Err(_) => return fail_with(libc::EIO, -1),
            Ok(None) => {}
        }
    }
    match cached(&REAL_FTRUNCATE, c"ftruncate") {
        // SAFETY: libc's ftruncate with the caller's arguments.
        Some(f) => unsafe { std::mem::transmute::<*mut c_void, FtruncateFn>(f)(fd, length) },
        None => fail_with(libc::ENOSYS, -1),
    }
}

/// # Safety
/// As `ftruncate64(2)` (the same call on 64-bit Linux).
#[no_mangle]
pub unsafe extern "C" fn ftruncate64(fd: c_int, length: libc::off_t) -> c_int {
    // SAFETY: forwarded as received.
    unsafe { ftruncate(fd, length) }
}

/// # Safety
/// As `fallocate64(2)` (the same call on 64-bit Linux).
#[no_mangle]
pub unsafe extern "C" fn fallocate64(
    fd: c_int,
    mode: c_int,
    offset: libc::off_t,
    len: libc::off_t,
) -> c_int {
    // SAFETY: forwarded as received.
    unsafe { fallocate(fd, mode, offset, len) }
}

// ---- POSIX shared memory ---------------------------------------------------------------

type ShmOpenFn = unsafe extern "C" fn(*const libc::c_char, c_int, libc::mode_t) -> c_int;
type ShmUnlinkFn = unsafe extern "C" fn(*const libc::c_char) -> c_int;

/// `shm_open`: libc's; an object that exists only in the cluster (made on
/// another node) gets its local file here, of its size, so that it can be
/// opened and mapped (the mapping is then its DSM segment, see `mmap`).
///
/// # Safety
/// As `shm_open(3)`.
#[no_mangle]
pub unsafe extern "C" fn shm_open(
    name: *const libc::c_char,
    oflag: c_int,
    mode: libc::mode_t,
) -> c_int {
    let real: ShmOpenFn = match native!(c"shm_open", ShmOpenFn) {
        Ok(f) => f,
        Err(e) => {
            set_errno(e);
            return -1;
        }
    };
    // SAFETY: libc's shm_open with the caller's arguments.
    let fd = unsafe { real(name, oflag, mode) };
    // SAFETY: errno of this thread, just set by shm_open.
    let errno = unsafe { *libc::__errno_location() };
    if fd >= 0 || errno != libc::ENOENT || oflag & libc::O_CREAT != 0 || name.is_null() {
        return fd;
    }
    // SAFETY: a NUL-terminated name, as shm_open needs.
    let wanted = unsafe { CStr::from_ptr(name) }.to_bytes().to_vec();
    let elsewhere =
        std::panic::catch_unwind(|| daemon(|rt| Ok(crate::runtime::posix_shm_stat(rt, &wanted))));
    let Ok(Some(Ok(Some((size, perm))))) = elsewhere else {
        set_errno(libc::ENOENT);
        return -1;
    };
    // SAFETY: libc's shm_open, creating the local file of the object.
    let fd = unsafe { real(name, oflag | libc::O_CREAT, perm as libc::mode_t) };
    if fd >= 0 {
        // SAFETY: sizing the descriptor just opened.
        if unsafe { libc::ftruncate(fd, size as libc::off_t) } < 0 {
            // SAFETY: errno of this thread, set by ftruncate.
            let e = unsafe { *libc::__errno_location() };
            // SAFETY: closing the descriptor we just opened, not returned.
            unsafe { libc::close(fd) };
            set_errno(e);
            return -1;
        }
    }
    fd
}

/// `shm_unlink`: libc's, and the object's segment is removed from the
/// cluster (mappings stay until unmapped).
///
/// # Safety
/// As `shm_unlink(3)`.
#[no_mangle]
pub unsafe extern "C" fn shm_unlink(name: *const libc::c_char) -> c_int {
    let real: ShmUnlinkFn = match native!(c"shm_unlink", ShmUnlinkFn) {
        Ok(f) => f,
        Err(e) => {
            set_errno(e);
            return -1;
        }
    };
    // SAFETY: libc's shm_unlink with the caller's argument.
    let r = unsafe { real(name) };
    // SAFETY: errno of this thread, just set by shm_unlink.
    let errno = unsafe { *libc::__errno_location() };
    if name.is_null() || (r < 0 && errno != libc::ENOENT) {
        return r;
    }
    // SAFETY: a NUL-terminated name, as shm_unlink needs.
    let object = unsafe { CStr::from_ptr(name) }.to_bytes().to_vec();
    let removed =
        std::panic::catch_unwind(|| daemon(|rt| crate::runtime::unlink_posix_shm(rt, &object)));
    match removed {
        // Made on another node: gone from the cluster all the same.
        Ok(Some(Ok(true))) => 0,
        _ => {
            if r < 0 {
                set_errno(errno);
            }
            r
        }
    }
}

// ---- dlopen --------------------------------------------------------------------------

/// glibc's `dlopen`, found when the interposer loads.
static REAL_DLOPEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

const RTLD_DEEPBIND: c_int = 0x0008;

extern "C" fn resolve_dlopen() {
    if let Some(f) = real(c"dlopen") {
        REAL_DLOPEN.store(f as usize, std::sync::atomic::Ordering::Release);
    }
    // Only under `omrun --node`; never unwinds into the loader.
    let _ = std::panic::catch_unwind(crate::runtime::start_where_asked);
}

// Runs when the interposer is loaded: one dlsym (and, under `omrun --node`,
// the move to that node).
#[used]
#[link_section = ".init_array"]
static RESOLVE_DLOPEN: extern "C" fn() = resolve_dlopen;

/// `dlopen` without `RTLD_DEEPBIND`. A library loaded with DEEPBIND (PHP
/// loads its extensions so, opcache among them) binds its own libc's
/// `shmget` before the interposer's; without it the interposer sees its
/// calls. The real `dlopen` is reached by a jump, so that it still sees
/// the program's call site (glibc resolves bare names with the caller's
/// RUNPATH).
///
/// # Safety
/// As `dlopen(3)`.
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn dlopen(filename: *const libc::c_char, flags: c_int) -> *mut c_void {
    core::arch::naked_asm!(
        "mov rax, qword ptr [rip + {real}]",
        "test rax, rax",
        "jz {slow}",
        "and esi, -9", // flags & !RTLD_DEEPBIND
        "jmp rax",
        real = sym REAL_DLOPEN,
        slow = sym dlopen_before_init,
    )
}

/// `dlopen` called before the interposer's initialiser ran (by another
/// library's): resolve the real one now.
///
/// # Safety
/// As `dlopen(3)`.
#[cfg(target_arch = "x86_64")]
unsafe extern "C" fn dlopen_before_init(
    filename: *const libc::c_char,
    flags: c_int,
) -> *mut c_void {
    resolve_dlopen();
    match REAL_DLOPEN.load(std::sync::atomic::Ordering::Acquire) {
        0 => std::ptr::null_mut(),
        f => {
            // SAFETY: `f` is glibc's dlopen.
            let real: unsafe extern "C" fn(*const libc::c_char, c_int) -> *mut c_void =
                unsafe { std::mem::transmute(f) };
            // SAFETY: the caller's arguments, DEEPBIND removed.
            unsafe { real(filename, flags & !RTLD_DEEPBIND) }
        }
    }
}
