//! `libmigshm_preload.so`: preloaded by `omrun`, it takes over the SysV IPC
//! calls of an unmodified program (`shmget shmat shmdt shmctl semget semop
//! semtimedop semctl`) and serves them from the local `dsmd`, so that the
//! program's segments and semaphore sets are the cluster-wide ones. Shared
//! mappings that are not SysV become DSM segments too: anonymous ones
//! (`mmap(MAP_SHARED|MAP_ANONYMOUS)`) and POSIX shared memory (`shm_open`,
//! `shm_unlink`, and `mmap` of such an object). Everything else the program
//! does is untouched.
//!
//! * Outside `omrun` (no `DSMD_SOCKET`) every call goes to libc unchanged.
//! * Almost nothing happens at load time (one `dlsym`, for `dlopen`): the
//!   connection to the daemon is made by the first call (no thread, no
//!   async runtime in the program).
//! * `dlopen` drops `RTLD_DEEPBIND`, so that libraries loaded with it (PHP's
//!   extensions) bind their SysV calls here too.
//! * `fork`: the `dsm` and `semaphore` libraries re-register inherited
//!   attachments and drop inherited connections in the child.
//! * `exec`: the mappings go and the daemon's connection closes (CLOEXEC):
//!   the daemon detaches them, as Linux does; undo adjustments survive, as
//!   on Linux, until the process exits.
//! * Calls that bypass libc (static binaries, raw `syscall`) are not seen.
//!
//! `unsafe` lives here: this is the C boundary. Each export checks its
//! pointers as far as it can and never unwinds into C.

mod ctl;
mod ffi;
mod reshape;
mod runtime;
mod user;

#[cfg(target_arch = "x86_64")]
pub use ffi::dlopen;
pub use ffi::{
    semctl, semget, semop, semtimedop, shm_open, shm_unlink, shmat, shmctl, shmdt, shmget,
};
