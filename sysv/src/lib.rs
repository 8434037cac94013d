//! SysV IPC semantics as the Linux kernel implements them, with no I/O:
//! the rules both the segment service (`dsm`) and the semaphore service
//! build on, kept apart so that the daemon and the semaphore library can
//! share them without depending on each other.
//!
//! * [`perm`]: credentials and the `ipcperms` check.
//! * [`sem`]: one semaphore set (`ipc/sem.c`).

pub mod perm;
pub mod sem;
